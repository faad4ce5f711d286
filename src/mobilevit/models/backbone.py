"""The MobileViT v1 network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .config import MobileViTConfig
from .layers import ConvNormAct, InvertedResidual, MobileViTBlock


class MobileViT(nn.Module):
    """MobileViT v1 image classifier.

    Expects RGB images scaled to [0, 1] (no mean/std normalisation), any spatial size.
    Stages ``stages[0..4]`` reduce the input by 2, 4, 8, 16 and 32 (see ``feature_info``).
    """

    def __init__(self, config: MobileViTConfig):
        super().__init__()
        self.config = c = config
        #: Where loaded weights came from, their class names and eval preprocessing.
        self.weights_meta: dict[str, Any] = {}
        self.stem = ConvNormAct(c.in_chans, c.stem_channels, 3, stride=2)
        in_ch = c.stem_channels
        stages: list[nn.Sequential] = []
        reduction, dilation = 2, 1
        for i, out_ch in enumerate(c.channels):
            stride = 1 if i == 0 else 2
            block_dilation = dilation
            if stride == 2 and reduction >= c.output_stride:  # dense prediction: keep the resolution
                stride, dilation = 1, dilation * 2
            reduction *= stride
            blocks: list[nn.Module] = [InvertedResidual(in_ch, out_ch, stride, c.expansion, block_dilation)]
            if i == 1:
                blocks += [InvertedResidual(out_ch, out_ch, 1, c.expansion) for _ in range(2)]
            if i >= 2:
                j = i - 2
                blocks.append(
                    MobileViTBlock(
                        out_ch,
                        c.transformer_dims[j],
                        c.transformer_depths[j],
                        c.patch_sizes[j],
                        c.num_heads,
                        c.ffn_ratio,
                        c.dropout,
                        c.attn_dropout,
                        c.ffn_dropout,
                    )
                )
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.final_conv: nn.Module = ConvNormAct(in_ch, c.last_channels, 1) if c.last_channels else nn.Identity()
        self.feature_info = [
            {"index": i, "channels": ch, "reduction": min(2 ** (i + 1), c.output_stride), "module": f"stages.{i}"}
            for i, ch in enumerate(c.channels)
        ]
        self.num_features = c.last_channels or in_ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(c.classifier_dropout)
        self.fc: nn.Module = nn.Linear(self.num_features, c.num_classes) if c.num_classes else nn.Identity()
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.fc.out_features if isinstance(self.fc, nn.Linear) else 0

    def reset_parameters(self) -> None:
        """Initialisation for training from scratch (official recipe)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0 removes it)."""
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.trunc_normal_(self.fc.weight, std=0.02)
            nn.init.zeros_(self.fc.bias)
            self.fc.to(self.stem.conv.weight.device)
        self.config = self.config.replace(num_classes=num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map after the final 1x1 conv: [B, num_features, H/output_stride, W/output_stride]."""
        _check_input(x, self.config.in_chans)
        return self.final_conv(self.stages(self.stem(x)))

    def forward_intermediates(self, x: Tensor, out_indices: Sequence[int] = (0, 1, 2, 3, 4)) -> list[Tensor]:
        """Outputs of the stages in ``out_indices`` (0..4, strides 2..32), for dense prediction heads."""
        _check_input(x, self.config.in_chans)
        bad = [i for i in out_indices if not 0 <= i < len(self.stages)]
        if bad:
            raise ValueError(f"out_indices {bad} out of range; stages are 0..{len(self.stages) - 1}")
        feats, x = [], self.stem(x)
        for i, stage in enumerate(self.stages[: max(out_indices) + 1]):
            x = stage(x)
            if i in out_indices:
                feats.append(x)
        return feats

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check_input(x: Tensor, in_chans: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected a batch of images shaped [B, {in_chans}, H, W], got {tuple(x.shape)}")
