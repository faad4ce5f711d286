"""Evaluation preprocessing of the official MobileViT weights."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor


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
