"""Architecture configuration of MobileViT v1 (arXiv 2110.02178)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MobileViTConfig:
    """Everything that defines a MobileViT v1 network.

    ``channels`` are the output channels of the five stages (``layer_1`` .. ``layer_5``);
    the last three stages end in a MobileViT block of width ``transformer_dims[i]`` with
    ``transformer_depths[i]`` transformer layers and square patches of ``patch_sizes[i]``.
    ``output_stride`` 16 gives ``layer_5``'s downsampling block stride 1; 8 also ``layer_4``'s, and
    ``layer_5``'s block dilation 2 (the official dense-prediction backbones). ``last_channels`` 0
    drops the final 1x1 expansion (as the segmentation and detection models do).
    """

    channels: tuple[int, int, int, int, int]
    transformer_dims: tuple[int, int, int]
    expansion: int
    last_channels: int
    transformer_depths: tuple[int, int, int] = (2, 4, 3)
    patch_sizes: tuple[int, int, int] = (2, 2, 2)
    stem_channels: int = 16
    num_heads: int = 4
    ffn_ratio: float = 2.0
    dropout: float = 0.1
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0
    classifier_dropout: float = 0.1
    num_classes: int = 1000
    in_chans: int = 3
    output_stride: int = 32  # 16 or 8 for dense prediction: later stages keep their resolution

    def __post_init__(self) -> None:
        if isinstance(self.patch_sizes, int):
            object.__setattr__(self, "patch_sizes", (self.patch_sizes,) * 3)
        object.__setattr__(self, "patch_sizes", tuple(int(p) for p in self.patch_sizes))
        if len(self.patch_sizes) != 3 or min(self.patch_sizes) < 1:
            raise ValueError(f"patch_sizes must be 3 positive ints (one per MobileViT block), got {self.patch_sizes}")
        for dim in self.transformer_dims:
            if dim % self.num_heads:
                raise ValueError(f"transformer dim {dim} is not divisible by num_heads={self.num_heads}")
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        if self.last_channels < 0:
            raise ValueError(f"last_channels must be >= 0 (0 removes the final 1x1 conv), got {self.last_channels}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 removes the classifier), got {self.num_classes}")

    def replace(self, **overrides: Any) -> MobileViTConfig:
        """Copy with some fields changed; unknown names raise a ``TypeError`` listing valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(f"unknown MobileViT option(s) {unknown}; valid options: {sorted(valid)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MobileViTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


VARIANTS: dict[str, MobileViTConfig] = {
    "mobilevit_xxs": MobileViTConfig(
        channels=(16, 24, 48, 64, 80),
        transformer_dims=(64, 80, 96),
        expansion=2,
        last_channels=320,
        dropout=0.05,
    ),
    "mobilevit_xs": MobileViTConfig(
        channels=(32, 48, 64, 80, 96),
        transformer_dims=(96, 120, 144),
        expansion=4,
        last_channels=384,
    ),
    "mobilevit_s": MobileViTConfig(
        channels=(32, 64, 96, 128, 160),
        transformer_dims=(144, 192, 240),
        expansion=4,
        last_channels=640,
    ),
}


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value


class TaskConfig:
    """What the config of a dense-prediction model (a head on a MobileViT ``backbone``) shares.

    Subclasses are frozen dataclasses with a ``backbone`` field, the head's own fields and a ``task``.
    """

    backbone: MobileViTConfig
    task: str

    @property
    def patch_sizes(self) -> tuple[int, int, int]:
        return self.backbone.patch_sizes

    @property
    def in_chans(self) -> int:
        return self.backbone.in_chans

    def _own_fields(self) -> list[str]:
        """The head's fields, in declaration order."""
        return [f.name for f in dataclasses.fields(self) if f.init and f.name != "backbone"]  # type: ignore[arg-type]

    def replace(self, **overrides: Any) -> Any:
        """Copy with some fields changed; backbone fields (``patch_sizes``, ``dropout``, ...) are accepted too."""
        own = self._own_fields()
        backbone = {k: v for k, v in overrides.items() if k not in own and k != "backbone"}
        mine = {k: v for k, v in overrides.items() if k in own or k == "backbone"}
        new = dataclasses.replace(self, **mine)  # type: ignore[type-var]
        return dataclasses.replace(new, backbone=new.backbone.replace(**backbone)) if backbone else new

    def to_dict(self) -> dict[str, Any]:
        own = {name: _lists(getattr(self, name)) for name in self._own_fields()}
        return {"task": self.task, "backbone": self.backbone.to_dict(), **own}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "backbone"}  # type: ignore[arg-type]
        own = {k: _tuples(v) for k, v in d.items() if k in names}
        return cls(backbone=MobileViTConfig.from_dict(d["backbone"]), **own)
