"""MobileViT v1 (arXiv 2110.02178): exact models, weights of every ecosystem, inference and export."""

from .checkpoints import Checkpoint, CheckpointError, read_checkpoint, save_checkpoint
from .config import VARIANTS, MobileViTConfig
from .deploy import DeployedMobileViT, deploy
from .export import ExportError, export_model
from .factory import create_model, list_models, load_checkpoint, model_categories, model_transform
from .flops import count_macs
from .model import MobileViT
from .transforms import EvalTransform
from .weights import Weights, get_weights, imagenet_categories, list_weights

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "Checkpoint",
    "CheckpointError",
    "DeployedMobileViT",
    "EvalTransform",
    "ExportError",
    "MobileViT",
    "MobileViTConfig",
    "Weights",
    "count_macs",
    "create_model",
    "deploy",
    "export_model",
    "get_weights",
    "imagenet_categories",
    "list_models",
    "list_weights",
    "load_checkpoint",
    "model_categories",
    "model_transform",
    "read_checkpoint",
    "save_checkpoint",
]
