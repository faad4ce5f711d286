"""Training recipes: the :class:`TrainConfig` dataclass, bundled YAML recipes and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..data.transforms import AUTO_AUGMENTS


@dataclass
class TrainConfig:
    """Everything a training run needs; a recipe YAML file holds a subset of these fields.

    Defaults are the paper's ImageNet recipe for MobileViT v1 (../shared/REFERENCE.md): AdamW
    (0.9, 0.999), weight decay 0.01, cosine LR 0.002 -> 0.0002 after 3000 linear warm-up iterations
    from 0.0002, label smoothing 0.1, EMA momentum 0.0005, multi-scale sampler 160..320 around 256
    with 128 images per GPU at 256 px, effective batch 1024.
    """

    # model
    model: str = (
        "mobilevit_xxs"  # any create_model name (*_deeplabv3, *_ssdlite: other tasks); "torchvision:NAME" peers
    )
    weights: str | None = None  # fine-tune from any checkpoint create_model loads (new head if classes differ)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"dropout": 0.0}
    # data
    data: str = (
        "fashion-mnist"  # "fashion-mnist", IDX, ImageFolder; segmentation: VOC, images/+masks/; detection: COCO, VOC
    )
    val_fraction: float = 0.0  # > 0: hold out this share of the training images for validation
    val_split: str | None = "val"  # otherwise validate on this split of `data` (None: no validation)
    workers: int = 4
    data_on_device: bool = False  # in-memory data (Fashion-MNIST) held and augmented on the device, a batch at once
    # multi-scale variable-batch sampler (batch sizes are per process)
    base_size: int = 256
    base_batch: int = 128
    min_size: int = 160
    max_size: int = 320
    num_scales: int = 5
    size_divisor: int = 32
    multiscale: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    hflip: float = 0.5
    random_erase: float = 0.0  # probability of random erasing (a noise-filled rectangle) per training image
    resize_scale: tuple[float, float] = (0.5, 2.0)  # segmentation: random resize relative to the crop, then crop
    # advanced augmentation (classification only; all off in the paper's recipe)
    auto_augment: str = "none"  # per image, after the crop: none, randaugment, trivialaugment (torchvision's)
    randaugment_ops: int = 2  # RandAugment: operations per image
    randaugment_magnitude: int = 9  # RandAugment: torchvision's 0..30 scale (timm's rand-m9 is about 27)
    mixup_alpha: float = 0.0  # > 0: MixUp with lambda ~ Beta(alpha, alpha)
    cutmix_alpha: float = 0.0  # > 0: CutMix with lambda ~ Beta(alpha, alpha)
    mix_prob: float = 1.0  # probability that a batch is mixed (when mixup_alpha or cutmix_alpha > 0)
    mix_switch_prob: float = 0.5  # probability of CutMix rather than MixUp when both are on
    repeated_aug: int = 1  # > 1: repeated augmentation, each image this many times per epoch (epoch length kept)
    # knowledge distillation (classification only)
    teacher: str | None = None  # weights of a trained classifier (path, URL or known name): distil from it
    distill_alpha: float = 0.5  # loss = (1 - alpha) * hard-label loss + alpha * T^2 * KL(teacher || student)
    distill_temperature: float = 1.0  # T: softmax temperature of both teacher and student in the KL term
    eval_resize: int = 288
    eval_size: int = 256
    eval_batch: int = 100
    # optimisation
    epochs: int = 300
    effective_batch: int | None = 1024  # reached with gradient accumulation; None: no accumulation
    lr: float = 0.002
    min_lr: float = 0.0002
    warmup_iters: int = 3000
    warmup_init_lr: float = 0.0002
    weight_decay: float = 0.01
    head_lr_scale: float = 1.0  # LR multiplier of a dense model's head (official segmentation recipe: 10)
    betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.1
    ema_momentum: float = 0.0005  # 0 disables the EMA model
    ema_warmup: bool = False  # momentum max(ema_momentum, 9 / (10 + step)): for short runs
    grad_clip: float | None = None  # max gradient norm
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU), bf16, fp16, none
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPU and on CPU at >= 64 px)
    # run
    seed: int = 0
    device: str | None = None  # default: cuda if available
    output: str = "runs/train"
    checkpoint_every_steps: int = 0  # 0: only at the end of every epoch
    log_every: int = 10  # steps between rows of steps.csv
    max_steps: int | None = None  # stop early after this many optimizer steps (smoke tests)
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # YAML reads 1e-4 (no dot) as a string: take it as the number it is
            value = getattr(self, f.name)
            if str(f.type).startswith("float") and isinstance(value, str):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    raise ValueError(f"{f.name} must be a number, got {value!r}") from None
        self.crop_scale = tuple(self.crop_scale)  # type: ignore[assignment]
        self.crop_ratio = tuple(self.crop_ratio)  # type: ignore[assignment]
        self.resize_scale = tuple(self.resize_scale)  # type: ignore[assignment]
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"amp must be auto, bf16, fp16 or none, got {self.amp!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("epochs", "base_batch", "base_size", "eval_batch", "eval_size", "repeated_aug"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.auto_augment in (None, False):  # YAML reads `none` as a string but `null`/`off` as None/False
            self.auto_augment = "none"
        if self.auto_augment not in AUTO_AUGMENTS:
            raise ValueError(f"auto_augment must be one of {', '.join(AUTO_AUGMENTS)}, got {self.auto_augment!r}")
        if not 0 <= self.randaugment_magnitude <= 30 or self.randaugment_ops < 0:
            raise ValueError("randaugment_magnitude must be in 0..30 (torchvision's scale) and randaugment_ops >= 0")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        for name in ("mix_prob", "mix_switch_prob", "distill_alpha"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.teacher is not None:
            self.teacher = str(self.teacher)

    @property
    def mixing(self) -> bool:
        """Whether batches are mixed (MixUp or CutMix on)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def classification_only(self) -> list[str]:
        """The options set here (off by default) that only classification supports."""
        defaults = TrainConfig.__dataclass_fields__
        names = ("auto_augment", "mixup_alpha", "cutmix_alpha", "repeated_aug", "teacher", "data_on_device")
        return [n for n in names if getattr(self, n) != defaults[n].default]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def list_recipes() -> list[str]:
    """Names of the bundled recipes (``mobilevit train --config NAME``)."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__package__).joinpath("recipes").iterdir()
                  if p.name.endswith(".yaml"))  # fmt: skip


def _recipe_text(recipe: str | os.PathLike) -> tuple[str, str]:
    path = Path(recipe)
    if path.is_file():
        return path.read_text(), str(path)
    bundled = resources.files(__package__).joinpath("recipes", f"{path.name.removesuffix('.yaml')}.yaml")
    if bundled.is_file():
        return bundled.read_text(), f"bundled recipe {bundled.name}"
    raise FileNotFoundError(
        f"recipe {str(recipe)!r} is neither a file nor a bundled recipe ({', '.join(list_recipes())})"
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=0.001", "model_overrides={dropout: 0}"]`` -> dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
    return out


def load_recipe(recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file or bundled recipe name, with ``overrides`` applied on top."""
    values: dict[str, Any] = {}
    source = "overrides"
    if recipe is not None:
        text, source = _recipe_text(recipe)
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{source} is not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"{source} must be a mapping of option: value")
    values |= overrides or {}
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown} in {source}; valid options: {sorted(valid)}")
    return TrainConfig(**values)
