"""DeepLabv3 with a MobileViT backbone: the paper's semantic segmentation model (official ml-cvnets v0.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import MobileViT, _check_input
from .config import VARIANTS, MobileViTConfig, TaskConfig


@dataclass(frozen=True)
class DeepLabV3Config(TaskConfig):
    """A DeepLabv3 head (ASPP) on a MobileViT backbone.

    The backbone has no classifier and no final 1x1 expansion; ``backbone.output_stride`` is 16
    (official) or 8. ASPP: a 1x1 branch, three 3x3 branches dilated by ``aspp_rates``, an image-pooling
    branch, all ``aspp_channels`` wide with BatchNorm and ReLU, projected back to ``aspp_channels``
    and followed by Dropout(``aspp_dropout``); then Dropout2d(``classifier_dropout``) and a 1x1
    classifier with bias.
    """

    backbone: MobileViTConfig
    num_classes: int = 21
    aspp_channels: int = 256
    aspp_rates: tuple[int, int, int] = (6, 12, 18)
    aspp_dropout: float = 0.1
    classifier_dropout: float = 0.1
    task: str = field(default="segmentation", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "aspp_rates", tuple(int(r) for r in self.aspp_rates))
        if self.num_classes < 1:
            raise ValueError(f"a segmentation model needs num_classes >= 1, got {self.num_classes}")
        if self.backbone.num_classes or self.backbone.last_channels:
            object.__setattr__(self, "backbone", self.backbone.replace(num_classes=0, last_channels=0))


def _deeplabv3(arch: str) -> DeepLabV3Config:
    return DeepLabV3Config(VARIANTS[arch].replace(num_classes=0, last_channels=0, output_stride=16))


#: The official DeepLabv3-MobileViT models (21 PASCAL VOC classes, output stride 16).
SEGMENTATION_VARIANTS: dict[str, DeepLabV3Config] = {
    f"{arch}_deeplabv3": _deeplabv3(arch) for arch in ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s")
}


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU, 'same' padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel 1x1, dilated 3x3 and image-pooling branches, projected."""

    def __init__(self, in_ch: int, channels: int, rates: tuple[int, ...], dropout: float):
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_ch, channels, 1)] + [ConvBNReLU(in_ch, channels, 3, r) for r in rates]
        )
        self.pool = ConvBNReLU(in_ch, channels, 1)
        self.project = ConvBNReLU(channels * (len(rates) + 2), channels, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.drop(self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1)))


class MobileViTDeepLabV3(nn.Module):
    """DeepLabv3-MobileViT (arXiv 2110.02178, PASCAL VOC at 512x512).

    Expects RGB images in [0, 1] (no mean/std), any size. :meth:`forward` returns per-pixel class
    logits at the input size; :meth:`forward_logits` the classifier's output at the backbone's output
    stride, ``[B, C, ceil(H/16), ceil(W/16)]`` (what Hugging Face's model returns).
    """

    def __init__(self, config: DeepLabV3Config):
        super().__init__()
        self.config = c = config
        #: Where loaded weights came from, their class names and eval preprocessing.
        self.weights_meta: dict[str, Any] = {}
        self.backbone = MobileViT(c.backbone)
        self.aspp = ASPP(self.backbone.num_features, c.aspp_channels, c.aspp_rates, c.aspp_dropout)
        self.drop = nn.Dropout2d(c.classifier_dropout)
        self.classifier = nn.Conv2d(c.aspp_channels, c.num_classes, 1)
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.classifier.out_channels

    def reset_parameters(self) -> None:
        """Initialisation for training from scratch (the backbone's own, the same rules for the head)."""
        self.backbone.reset_parameters()
        for m in [*self.aspp.modules(), self.classifier]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (fine-tuning)."""
        device = self.classifier.weight.device
        self.classifier = nn.Conv2d(self.config.aspp_channels, num_classes, 1).to(device)
        nn.init.kaiming_normal_(self.classifier.weight, mode="fan_out")
        nn.init.zeros_(self.classifier.bias)
        self.config = self.config.replace(num_classes=num_classes)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the backbone (the official recipe gives them 10x the learning rate)."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def forward_features(self, x: Tensor) -> Tensor:
        """The backbone's last feature map: [B, C5, H/os, W/os]."""
        return self.backbone.forward_features(x)

    def forward_logits(self, x: Tensor) -> Tensor:
        """Class logits at the output stride: [B, num_classes, ceil(H/os), ceil(W/os)]."""
        return self.classifier(self.drop(self.aspp(self.forward_features(x))))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits at the input size (bilinear, align_corners=False): [B, num_classes, H, W]."""
        _check_input(x, self.config.backbone.in_chans)
        return F.interpolate(self.forward_logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
