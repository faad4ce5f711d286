"""torchvision models behind our model interface, so the same loop trains peers for side-by-side comparisons.

``create_model("torchvision:deeplabv3_mobilenet_v3_large", num_classes=11)`` builds torchvision's model
without pretrained weights; its forward returns a logits tensor like ours. Its weights files are read and
written by :mod:`mobilevit.checkpoints.io` (``save_peer``). A segmentation peer also takes the weights of
the matching torchvision classifier as its backbone (``torchvision:mobilenet_v3_large`` trained by our
loop), as our models take a classifier's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torchvision
from torch import Tensor, nn

log = logging.getLogger(__name__)

PREFIX = "torchvision:"
#: The classifier whose ``features.*`` are each segmentation peer's ``backbone.*``.
SEGMENTATION_BACKBONES = {
    "deeplabv3_mobilenet_v3_large": "mobilenet_v3_large",
    "lraspp_mobilenet_v3_large": "mobilenet_v3_large",
}


@dataclass(frozen=True)
class PeerConfig:
    name: str  # torchvision builder, e.g. "deeplabv3_mobilenet_v3_large"
    num_classes: int

    @property
    def task(self) -> str:
        return "segmentation" if self.name in SEGMENTATION_BACKBONES else "classification"

    def to_dict(self) -> dict[str, Any]:
        return {"peer": self.name, "num_classes": self.num_classes}


def peer_task(name: str) -> str | None:
    """``"segmentation"`` / ``"classification"`` for a ``torchvision:`` name, None for our models."""
    return PeerConfig(name.removeprefix(PREFIX), 0).task if name.startswith(PREFIX) else None


class TorchvisionModel(nn.Module):
    """A torchvision classifier or segmenter; ``forward`` returns logits (segmentation: at the input size)."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        builder = name.removeprefix(PREFIX)
        if builder not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {builder!r}")
        kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
        if builder in SEGMENTATION_BACKBONES:
            kwargs["weights_backbone"] = None
        self.net = torchvision.models.get_model(builder, **kwargs)
        self.config = PeerConfig(builder, num_classes)
        self.weights_meta: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the backbone (segmentation peers; empty for classifiers)."""
        if self.config.task != "segmentation":
            return []
        return [p for n, p in self.net.named_parameters() if not n.startswith("backbone.")]

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out["out"] if isinstance(out, dict) else out


def load_peer_state(model: TorchvisionModel, state: dict[str, Tensor], saved: str, source: str) -> bool:
    """Load weights saved from ``torchvision:{saved}`` into ``model``; True when its classifier was kept.

    A segmentation peer given its backbone's classifier takes ``features.*`` as ``backbone.*`` (the head
    stays fresh); tensors of other shapes (a classifier of another size) are left as initialised.
    """
    own = model.net.state_dict()
    if saved != model.config.name:
        if SEGMENTATION_BACKBONES.get(model.config.name) != saved:
            raise ValueError(f"{source} holds torchvision:{saved}, which does not fit torchvision:{model.config.name}")
        state = {"backbone." + k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        log.info("torchvision:%s: backbone loaded from the classifier %s", model.config.name, source)
    state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.net.load_state_dict(state, strict=False)
    return saved == model.config.name and len(state) == len(own)
