"""Evaluation preprocessing of the official MobileViT weights; advanced training augmentation (RandAugment,
TrivialAugment, MixUp, CutMix: torchvision.transforms.v2's, made reproducible per image or batch by a seed)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor

#: Values of the ``auto_augment`` training option.
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to ``resize_size``, center-crop ``crop_size``, scale to [0, 1] RGB.

    No mean/std normalisation: MobileViT takes raw [0, 1] pixels. Accepts a PIL image or a uint8
    ``[3, H, W]`` (or grayscale ``[1, H, W]``) tensor and returns a float ``[3, crop, crop]`` tensor.
    ``size`` overrides the crop size (the resize size scales with it); ``generator`` is ignored (the
    dataset transform signature, see :mod:`mobilevit.data`).
    """

    resize_size: int = 288
    crop_size: int = 256
    interpolation: str = "bilinear"

    def __call__(
        self, image: Image.Image | Tensor, size: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        if isinstance(image, Image.Image):
            image = TF.pil_to_tensor(image.convert("RGB"))
        if size is not None and size != self.crop_size:
            return self.at_size(size)(image)
        mode = TF.InterpolationMode(self.interpolation)
        image = TF.resize(image, [self.resize_size], interpolation=mode, antialias=True)
        image = TF.center_crop(image, [self.crop_size, self.crop_size])
        return TF.to_dtype(image, torch.float32, scale=True).expand(3, -1, -1)

    def at_size(self, size: int) -> EvalTransform:
        """The same preprocessing with crop ``size``; the resize side keeps its ratio to the crop."""
        return replace(self, resize_size=round(size * self.resize_size / self.crop_size), crop_size=size)

    def to_dict(self) -> dict[str, int | str]:
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "interpolation": self.interpolation}


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run the body with torch's global CPU generator seeded by ``seed`` and restore its state afterwards.

    torchvision.transforms.v2 draws from the global generator; under this context its draws depend on ``seed``
    only, and the caller's stream (dropout, other images) is untouched. CUDA generators are left alone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def random_seed(generator: torch.Generator | None) -> int:
    """A 62-bit seed drawn from ``generator`` (torch's global generator when None)."""
    return int(torch.randint(2**62, (), generator=generator))


def auto_augment(name: str, num_ops: int = 2, magnitude: int = 9) -> T.Transform | None:
    """torchvision's ``RandAugment(num_ops, magnitude)``, ``TrivialAugmentWide()``, or None for ``"none"``.

    ``magnitude`` is on torchvision's scale, 0..30 (31 bins; its reference recipe uses 9): timm's ``rand-m9-n2``
    (0..10 scale) is about ``magnitude=27``. Both take ``[C, H, W]`` images, uint8 or float in [0, 1].
    """
    if name == "none":
        return None
    if name == "randaugment":
        if not (0 <= magnitude <= 30 and num_ops >= 0):
            raise ValueError(f"RandAugment needs 0 <= magnitude <= 30 and num_ops >= 0, got {magnitude}, {num_ops}")
        return T.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=31)
    if name == "trivialaugment":
        return T.TrivialAugmentWide(num_magnitude_bins=31)
    raise ValueError(f"auto_augment must be one of {', '.join(AUTO_AUGMENTS)}, got {name!r}")


def apply_auto_augment(transform: T.Transform, image: Tensor, seed: int) -> Tensor:
    """``transform`` (see :func:`auto_augment`) applied to a float ``[C, H, W]`` image in [0, 1], its random
    choices seeded by ``seed``."""
    with seeded_global_rng(seed):
        return transform(image)


class BatchMix:
    """MixUp / CutMix of a batch (torchvision.transforms.v2's), seeded per call, for soft-target training.

    With probability ``prob`` a batch is mixed: by CutMix with probability ``switch_prob`` when both are on
    (``mixup_alpha > 0`` and ``cutmix_alpha > 0``), otherwise by the one that is on. The batch is first permuted
    at random, so images are paired at random (torchvision pairs each image with its predecessor, and repeated
    augmentation puts copies of one image next to each other). Returns the images and ``[B, num_classes]``
    float targets (one-hot mixed by the image areas / weights; no label smoothing, which the loss adds:
    smoothing is linear, so smoothing the mixed one-hot equals mixing smoothed one-hots); an unmixed batch
    keeps its images and integer labels.
    """

    def __init__(
        self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
        switch_prob: float = 0.5,
    ):  # fmt: skip
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("BatchMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mixup = T.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = T.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None
        self.prob = prob
        self.switch_prob = switch_prob

    def __call__(self, images: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """Mix ``images`` ``[B, C, H, W]`` with integer ``labels`` ``[B]``; every random choice follows ``seed``."""
        g = torch.Generator().manual_seed(seed)
        mixed, cut = torch.rand(2, generator=g).tolist()
        if mixed >= self.prob or len(labels) < 2:
            return images, labels
        use_cutmix = self.cutmix is not None and (self.mixup is None or cut < self.switch_prob)
        transform = self.cutmix if use_cutmix else self.mixup
        order = torch.randperm(len(labels), generator=g).to(labels.device)
        with seeded_global_rng(random_seed(g)):
            return transform(images[order], labels[order])
