"""Multi-scale variable-batch sampler of the MobileViT ImageNet recipe, DDP-aware and exactly resumable."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ..models.layers import make_divisible

#: ``(index, size, aug_seed)``: which sample, the square resolution to produce, the seed of its augmentation.
SampleKey = tuple[int, int, int]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def multiscale_sizes(
    base_size: int = 256,
    base_batch: int = 128,
    min_size: int = 160,
    max_size: int = 320,
    num_scales: int = 5,
    divisor: int = 32,
) -> list[tuple[int, int]]:
    """``(size, batch)`` pairs: ``num_scales`` sizes from ``min_size`` to ``max_size`` plus ``base_size``.

    Sizes are made divisible by ``divisor``; each batch keeps the pixels per batch of
    ``base_batch`` images at ``base_size`` (the v0.2+ rule): defaults give
    ``[(160, 327), (192, 227), (256, 128), (288, 101), (320, 81)]``.
    """
    if not 0 < min_size <= max_size or num_scales < 1 or base_size < 1 or base_batch < 1:
        raise ValueError(f"invalid multi-scale settings: sizes {min_size}..{max_size}, {num_scales} scales")
    step = (max_size - min_size) / max(num_scales - 1, 1)
    sizes = {make_divisible(min_size + i * step, divisor) for i in range(num_scales)} | {base_size}
    return [(s, max(1, int(base_batch * base_size**2 / s**2))) for s in sorted(sizes)]


def _seed(*values: int) -> int:
    """A stable 63-bit seed from integers (same in every process and Python version)."""
    data = b"".join(v.to_bytes(8, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def mix_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """The seed of a batch-level augmentation (MixUp / CutMix) of batch ``batch`` of ``epoch`` on ``rank``."""
    return _seed(seed, epoch, 2, batch, rank)


def _aug_seeds(base: int, indices: np.ndarray) -> np.ndarray:
    """SplitMix64 of ``base + index * golden``: a well-mixed 63-bit seed per index."""
    with np.errstate(over="ignore"):
        z = np.uint64(base) + indices.astype(np.uint64) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z >> np.uint64(1)


class MultiScaleBatchSampler(Sampler[list[SampleKey]]):
    """Batches of ``(index, size, aug_seed)`` keys with a resolution (and batch size) drawn per step.

    Each epoch, a generator seeded by ``(seed, epoch)`` permutes the indices (if ``shuffle``), which are
    padded by wrapping around so each of the ``world_size`` ranks gets an equal shard ``perm[rank::world_size]``,
    then draws the ``(size, batch)`` of every step from ``sizes``: all ranks see the same sizes in the same
    order and disjoint indices covering the dataset (only the padding repeats). ``aug_seed`` depends only on ``(seed, epoch, index)``,
    so augmentations do not depend on workers, ranks or resumption. ``sizes=None`` means the single scale
    ``(base_size, base_batch)``.

    ``repeats > 1`` is repeated augmentation (Hoffer et al. 2020; the DeiT recipe): every index of the permutation
    is repeated ``repeats`` times in a row before sharding, and the epoch keeps its length, so it covers about
    ``1 / repeats`` of the dataset, each image ``repeats`` times. Consecutive copies go to consecutive ranks (with
    ``world_size == repeats`` every rank sees one copy of each image at the same step; with one process the copies
    share a batch), and copy ``k`` of an image gets its own ``aug_seed`` from ``(seed, epoch, index, k)`` (copy 0
    the seed it has without repeats).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        sizes: list[tuple[int, int]] | None = None,
        base_size: int = 256,
        base_batch: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        repeats: int = 1,
    ):
        self.sizes = list(sizes) if sizes is not None else [(base_size, base_batch)]
        if num_samples < 0 or not self.sizes or any(s < 1 or b < 1 for s, b in self.sizes):
            raise ValueError(f"invalid sampler settings: {num_samples} samples, sizes {self.sizes}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.repeats = repeats
        self.per_rank = math.ceil(num_samples / world_size)
        self.epoch = 0
        self.start_step = 0
        self._plan: tuple[int, torch.Tensor, list[tuple[int, int, int]]] | None = None  # epoch, order, steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate over ``epoch`` from now on, skipping its first ``start_step`` batches (to resume)."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        """Steps of the whole current epoch, the same on every rank (``start_step`` skipped ones included)."""
        return len(self._epoch_plan()[2])

    def __iter__(self) -> Iterator[list[SampleKey]]:
        _, order, steps = self._epoch_plan()
        shard = order[self.rank :: self.world_size].numpy()
        base = _seed(self.seed, self.epoch, 1)
        for start, size, count in steps[self.start_step :]:
            keys = shard[start : start + count]  # index + copy * num_samples (copy 0 without repeats)
            indices = keys % max(self.num_samples, 1)
            seeds = _aug_seeds(base, keys)
            yield [(i, size, s) for i, s in zip(indices.tolist(), seeds.tolist(), strict=True)]

    def _epoch_plan(self) -> tuple[int, torch.Tensor, list[tuple[int, int, int]]]:
        """The padded index order and the ``(offset in shard, size, count)`` steps of the current epoch."""
        if self._plan is None or self._plan[0] != self.epoch:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, 0))
            n = self.num_samples
            order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            if self.repeats > 1:  # each index `repeats` times in a row, copy k encoded as index + k * n
                copies = torch.arange(self.repeats).repeat(n)
                order = order.repeat_interleave(self.repeats) + copies * n
            total = self.per_rank * self.world_size
            if total > len(order):  # wrap around so every rank gets per_rank indices
                order = order.repeat(math.ceil(total / len(order)))
            order = order[:total]
            most_steps = math.ceil(self.per_rank / min(b for _, b in self.sizes))
            choices = torch.randint(len(self.sizes), (most_steps,), generator=g).tolist()
            steps, start = [], 0
            for choice in choices:
                size, batch = self.sizes[choice]
                count = min(batch, self.per_rank - start)
                if count <= 0 or (self.drop_last and count < batch):
                    break
                steps.append((start, size, count))
                start += count
            self._plan = (self.epoch, order, steps)
        return self._plan
