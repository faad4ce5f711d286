"""torchvision models behind our model interface, so the same loop trains peers for side-by-side comparisons.

``create_model("torchvision:deeplabv3_mobilenet_v3_large", num_classes=11)`` builds torchvision's model
without pretrained weights; its forward returns what ours returns (logits; a detector's detections or
losses). Its weights files are read and written by :mod:`mobilevit.checkpoints.io` (``save_peer``). A
segmentation or detection peer also takes the weights of the matching torchvision classifier as its
backbone (``torchvision:mobilenet_v3_large`` trained by our loop), as our models take a classifier's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import ssdlite
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD

log = logging.getLogger(__name__)

PREFIX = "torchvision:"
#: The classifier whose ``features.*`` are each segmentation peer's ``backbone.*``.
SEGMENTATION_BACKBONES = {
    "deeplabv3_mobilenet_v3_large": "mobilenet_v3_large",
    "lraspp_mobilenet_v3_large": "mobilenet_v3_large",
}
#: The classifier whose ``features.*`` fill each detection peer's backbone.
DETECTION_BACKBONES = {"ssdlite320_mobilenet_v3_large": "mobilenet_v3_large"}


@dataclass(frozen=True)
class PeerConfig:
    name: str  # torchvision builder, e.g. "deeplabv3_mobilenet_v3_large"
    num_classes: int

    @property
    def task(self) -> str:
        if self.name in DETECTION_BACKBONES:
            return "detection"
        return "segmentation" if self.name in SEGMENTATION_BACKBONES else "classification"

    def to_dict(self) -> dict[str, Any]:
        return {"peer": self.name, "num_classes": self.num_classes}


def peer_task(name: str) -> str | None:
    """The task (``"classification"``, ...) of a ``torchvision:`` name, None for our models."""
    return PeerConfig(name.removeprefix(PREFIX), 0).task if name.startswith(PREFIX) else None


def _ssdlite_mobilenet_v3_large(num_classes: int) -> tuple[SSD, dict[str, str]]:
    """torchvision's SSDLite320-MobileNetV3-Large as its builder makes it around a pretrained backbone (full
    tail; it halves the tail only without one), and the map from its backbone's keys to the classifier's."""
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    classifier = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm)
    ssdlite._normal_init(classifier)
    names = {id(t): f"features.{k}" for k, t in classifier.features.state_dict(keep_vars=True).items()}
    backbone = ssdlite._mobilenet_extractor(classifier, 6, norm)
    renames = {f"backbone.{k}": names[id(t)] for k, t in backbone.state_dict(keep_vars=True).items() if id(t) in names}
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    channels = det_utils.retrieve_out_channels(backbone, (320, 320))
    head = ssdlite.SSDLiteHead(channels, anchors.num_anchors_per_location(), num_classes, norm)
    net = SSD(
        backbone, anchors, (320, 320), num_classes, head=head, score_thresh=0.001, nms_thresh=0.55,
        detections_per_img=300, topk_candidates=300, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )  # fmt: skip
    return net, renames


class TorchvisionModel(nn.Module):
    """A torchvision classifier, segmenter or detector behind our models' interface.

    ``forward`` returns logits (segmentation: at the input size); a detector takes ``(images, targets)``
    and returns ``{"loss_box", "loss_cls"}`` in training, else detections in pixels of the input (which it
    sees at the input's size: torchvision's fixed 320x320 resize is set to each batch's size).
    """

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        builder = name.removeprefix(PREFIX)
        if builder not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {builder!r}")
        self.config = PeerConfig(builder, num_classes)
        self.weights_meta: dict[str, Any] = {}
        self.backbone_names: dict[str, str] = {}  # detector's backbone key -> its classifier's key
        if builder == "ssdlite320_mobilenet_v3_large":
            self.net, self.backbone_names = _ssdlite_mobilenet_v3_large(num_classes)
            return
        kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
        if builder in SEGMENTATION_BACKBONES:
            kwargs["weights_backbone"] = None
        self.net = torchvision.models.get_model(builder, **kwargs)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the backbone (dense-prediction peers; empty for classifiers)."""
        if self.config.task == "classification":
            return []
        return [p for n, p in self.net.named_parameters() if not n.startswith("backbone.")]

    def forward(self, x: Tensor, targets: list[dict[str, Tensor]] | None = None) -> Any:
        if self.config.task == "detection":
            self.net.transform.fixed_size = tuple(x.shape[-2:])
            if targets is None:
                return self.net(list(x))
            losses = self.net(list(x), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            return {"loss_box": losses["bbox_regression"], "loss_cls": losses["classification"]}
        out = self.net(x)
        return out["out"] if isinstance(out, dict) else out


def load_peer_state(model: TorchvisionModel, state: dict[str, Tensor], saved: str, source: str) -> bool:
    """Load weights saved from ``torchvision:{saved}`` into ``model``; True when its classifier was kept.

    A segmentation peer given its backbone's classifier takes ``features.*`` as ``backbone.*`` (the head
    stays fresh); tensors of other shapes (a classifier of another size) are left as initialised.
    """
    own = model.net.state_dict()
    if saved != model.config.name:
        name = model.config.name
        if (SEGMENTATION_BACKBONES | DETECTION_BACKBONES).get(name) != saved:
            raise ValueError(f"{source} holds torchvision:{saved}, which does not fit torchvision:{name}")
        if model.backbone_names:
            state = {ours: state[theirs] for ours, theirs in model.backbone_names.items() if theirs in state}
        else:
            state = {
                "backbone." + k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")
            }
        log.info("torchvision:%s: backbone loaded from the classifier %s (%d tensors)", name, source, len(state))
    state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.net.load_state_dict(state, strict=False)
    return saved == model.config.name and len(state) == len(own)
