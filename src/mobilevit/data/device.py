"""Training batches of an in-memory dataset (Fashion-MNIST) augmented on the training device, a whole batch at once.

On a GPU, a small model trains faster than host processes can crop, resize and erase images one by one. Here
the uint8 images live on the device; the host (the ``workers`` processes of a DataLoader) only draws each image's
:class:`~mobilevit.data.datasets.AugmentPlan` from the same per-image seed as the per-image path, and the device
renders the batch: crop, mirror and resize as two small matrix products per image (the resampling weights of
``F.interpolate``, antialiased when downscaling, as :class:`~mobilevit.data.datasets.TrainTransform` uses),
auto-augmentation per image where it is on, then the erased boxes filled with the plan's noise. The batches
equal the per-image path's up to float rounding, so runs stay reproducible and resumable whichever path made them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .datasets import AugmentPlan, ImageDataset, TrainTransform
from .sampler import SampleKey


def _triangle(x: Tensor) -> Tensor:
    return (1 - x.abs()).clamp_(min=0)


def _cubic(x: Tensor, a: float = -0.5) -> Tensor:  # the antialiasing bicubic kernel of F.interpolate
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start: Tensor, length: Tensor, in_size: int, out_size: int, interpolation: str) -> Tensor:
    """``[B, out_size, in_size]`` matrices that resize the segment ``[start, start + length)`` of an axis of
    ``in_size`` pixels to ``out_size`` (one segment per row of the integer tensors ``start`` and ``length``).

    The weights of ``F.interpolate(..., align_corners=False, antialias=True)`` (bilinear: a triangle; bicubic:
    the cubic with a = -0.5), stretched by the scale when downscaling, cut at the segment's ends and normalised;
    when upscaling, antialiased bilinear equals plain bilinear, so this also covers :func:`datasets._resize`'s
    unantialiased case.
    """
    kernel = {"bilinear": _triangle, "bicubic": _cubic}[interpolation]
    scale = length.double() / out_size
    centers = (torch.arange(out_size, device=start.device, dtype=torch.float64) + 0.5)[None] * scale[:, None]
    rel = torch.arange(in_size, device=start.device)[None] - start[:, None]  # position inside the segment
    x = (rel[:, None, :] + 0.5 - centers[:, :, None]) / scale.clamp(min=1)[:, None, None]
    weights = kernel(x) * ((rel >= 0) & (rel < length[:, None]))[:, None, :]
    return (weights / weights.sum(-1, keepdim=True)).float()


@dataclass
class PlanBatch:
    """The plans of one batch as tensors: positions ``index`` in the dataset, ``label``, ``crop`` ``[B, 4]``
    (top, left, h, w), ``flip``, output ``size``, ``augment_seed`` (-1: none), ``erase`` ``[B, 4]`` (-1: none)
    and every erased box's noise, flattened and concatenated in batch order."""

    index: Tensor
    label: Tensor
    crop: Tensor
    flip: Tensor
    size: int
    augment_seed: Tensor
    erase: Tensor
    noise: Tensor

    @classmethod
    def collate(cls, items: Sequence[tuple[int, AugmentPlan, int]]) -> PlanBatch:
        plans = [plan for _, plan, _ in items]
        noise = [p.erase_noise.reshape(-1) for p in plans if p.erase_noise is not None]
        return cls(
            index=torch.tensor([i for i, _, _ in items]),
            label=torch.tensor([label for _, _, label in items]),
            crop=torch.tensor([p.crop for p in plans]),
            flip=torch.tensor([p.flip for p in plans]),
            size=plans[0].size,
            augment_seed=torch.tensor([-1 if p.augment_seed is None else p.augment_seed for p in plans]),
            erase=torch.tensor([p.erase_box or (-1, -1, -1, -1) for p in plans]),
            noise=torch.cat(noise) if noise else torch.empty(0),
        )


class _Plans(Dataset):
    """Sampler key -> ``(index, plan, label)``: the host's share of :class:`DeviceBatches`."""

    def __init__(self, transform: TrainTransform, shape: tuple[int, int, int], labels: list[int]):
        self.transform, self.shape, self.labels = transform, shape, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: SampleKey) -> tuple[int, AugmentPlan, int]:
        index, size, seed = key
        channels, height, width = self.shape
        plan = self.transform.plan(height, width, channels, size, torch.Generator().manual_seed(seed))
        return index, plan, self.labels[index]


class DeviceBatches:
    """Training batches ``(images [B, 3, S, S], labels, 0)`` of ``dataset``, made on ``device`` from the keys of
    ``batch_sampler`` (a :class:`~mobilevit.data.sampler.MultiScaleBatchSampler`): what a DataLoader over the
    dataset with :func:`~mobilevit.data.datasets.collate` gives, up to float rounding, without per-image work on
    the host but drawing the plans (in ``workers`` processes).

    ``dataset`` must hold its images in memory (:meth:`~mobilevit.data.datasets.ImageDataset.in_memory`) and
    augment them with a :class:`~mobilevit.data.datasets.TrainTransform`.
    """

    def __init__(self, dataset: ImageDataset, batch_sampler: Iterable[list[SampleKey]], device: torch.device,
                 workers: int = 0):  # fmt: skip
        images = dataset.in_memory()
        if images is None:
            raise ValueError(
                f"data_on_device needs a dataset held in memory (Fashion-MNIST, IDX files); "
                f"{type(dataset).__name__} reads its images one by one: drop data_on_device"
            )
        if not isinstance(dataset.transform, TrainTransform):
            raise ValueError(f"data_on_device renders TrainTransform augmentation, not {dataset.transform!r}")
        self.transform: TrainTransform = dataset.transform
        self.images = images.to(device)  # uint8 [N, C, H, W], this subset's images in order
        self.device = device
        plans = _Plans(self.transform, tuple(images.shape[1:]), list(dataset.targets))
        # its own generator: creating an iterator must not consume the global (dropout) RNG
        self.loader = DataLoader(plans, batch_sampler=batch_sampler, num_workers=workers,
                                 collate_fn=PlanBatch.collate, generator=torch.Generator())  # fmt: skip

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        for batch in self.loader:
            yield self.render(batch), batch.label.to(self.device), 0

    def render(self, batch: PlanBatch) -> Tensor:
        """The augmented float ``[B, 3, S, S]`` images of ``batch`` in [0, 1], on the device."""
        dev, tf, size = self.device, self.transform, batch.size
        crop, flip = batch.crop.to(dev), batch.flip.to(dev)
        x = self.images[batch.index.to(dev)].float().div_(255)
        rows = resize_weights(crop[:, 0], crop[:, 2], x.shape[-2], size, tf.interpolation)
        cols = resize_weights(crop[:, 1], crop[:, 3], x.shape[-1], size, tf.interpolation)
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)  # mirrored crop = mirrored output
        out = rows[:, None] @ x @ cols.transpose(1, 2)[:, None]
        if tf.interpolation == "bicubic":
            out = out.clamp_(0, 1)
        for i in (batch.augment_seed >= 0).nonzero().flatten().tolist():
            out[i] = tf.augment(out[i], int(batch.augment_seed[i]))
        erased = (batch.erase[:, 0] >= 0).nonzero().flatten().tolist()
        noise, offset = batch.noise.to(dev), 0
        for i in erased:
            top, left, h, w = batch.erase[i].tolist()
            n = out.shape[1] * h * w
            out[i, :, top : top + h, left : left + w] = noise[offset : offset + n].view(-1, h, w)
            offset += n
        return out.expand(-1, 3, -1, -1) if out.shape[1] == 1 else out


def cache_batches(batches: Iterable[tuple[Tensor, Any, int]], device: torch.device) -> list[tuple[Tensor, Any, int]]:
    """Every batch of a deterministic loader (validation), moved to ``device`` once and replayed each epoch."""
    return [(images.to(device), labels.to(device), skipped) for images, labels, skipped in batches]
