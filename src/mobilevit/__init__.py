"""MobileViT v1 (arXiv 2110.02178): exact classification, segmentation and detection models, weights of every ecosystem, training, inference and export."""

from .checkpoints.average import average_checkpoints
from .checkpoints.hub import Weights, get_weights, imagenet_categories, list_weights
from .checkpoints.io import Checkpoint, CheckpointError, read_checkpoint, save_checkpoint
from .data.transforms import EvalTransform
from .deployment.export import ExportError, export_model
from .deployment.fuse import DeployedMobileViT, deploy
from .deployment.runtime import ExportedModel, load_exported
from .factory import create_model, list_models, load_checkpoint, model_categories, model_transform
from .models.backbone import MobileViT
from .models.config import VARIANTS, MobileViTConfig
from .models.deeplabv3 import DeepLabV3Config, MobileViTDeepLabV3
from .models.flops import count_macs
from .models.ssdlite import MobileViTSSDLite, SSDLiteConfig

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "Checkpoint",
    "CheckpointError",
    "DeepLabV3Config",
    "DeployedMobileViT",
    "EvalTransform",
    "ExportError",
    "ExportedModel",
    "MobileViT",
    "MobileViTConfig",
    "MobileViTDeepLabV3",
    "MobileViTSSDLite",
    "SSDLiteConfig",
    "Weights",
    "average_checkpoints",
    "count_macs",
    "create_model",
    "deploy",
    "export_model",
    "get_weights",
    "imagenet_categories",
    "list_models",
    "list_weights",
    "load_checkpoint",
    "load_exported",
    "model_categories",
    "model_transform",
    "read_checkpoint",
    "save_checkpoint",
]
