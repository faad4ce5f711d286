"""How fast training batches of Fashion-MNIST are made: per image on the host, or on the device (data_on_device).

Times three ways of producing the same epoch of augmented batches (the 64 px recipe of the README's long runs:
multi-scale 48-80 px, crops of 0.8-1 of the area, mirroring, random erasing with probability 0.25), nothing
else running in the loop:

* ``per-image``: the DataLoader path of ``mobilevit train`` (each image cropped, resized, erased in a worker
  process, the batch stacked and copied to the device);
* ``data_on_device``: :class:`mobilevit.data.device.DeviceBatches` (plans drawn in the workers, the batch
  rendered on the device);
* ``plans only``: the host's share of ``data_on_device`` alone.

    python benchmarks/device_data.py --device cuda --workers 3
    python benchmarks/device_data.py --device cpu --workers 0 --threads 1 --batches 100

Prints images per second for each; a model whose training step runs faster than a path's rate waits for it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader

from mobilevit.data.datasets import FASHION_MNIST_DIR, FashionMNIST, TrainTransform, collate
from mobilevit.data.device import DeviceBatches
from mobilevit.data.sampler import MultiScaleBatchSampler, multiscale_sizes


def rate(batches: Iterable, device: torch.device, limit: int, to_device: bool) -> float:
    """Images per second over the first ``limit`` batches (after one untimed batch)."""
    it = iter(batches)
    next(it)
    images, start = 0, time.perf_counter()
    for _, batch in zip(range(limit), it, strict=False):
        labels = batch.label if hasattr(batch, "label") else batch[1]
        if to_device:
            batch[0].to(device, non_blocking=True)
        images += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(FASHION_MNIST_DIR))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of this process")
    p.add_argument("--batches", type=int, default=200, help="timed batches per path")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tf = TrainTransform(size=64, scale=(0.8, 1.0), ratio=(0.9, 1.11), erase=0.25)
    data = FashionMNIST(args.data, "train", tf)
    sampler = MultiScaleBatchSampler(len(data), sizes=multiscale_sizes(64, 128, 48, 80, 3, 16), seed=0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, {args.workers} workers, {args.threads} threads, {args.batches} batches of 48-80 px")
    pin = device.type == "cuda"
    per_image = DataLoader(data, batch_sampler=sampler, num_workers=args.workers, collate_fn=collate, pin_memory=pin)
    on_device = DeviceBatches(data, sampler, device, args.workers)
    for label, batches, copy in [
        ("per-image", per_image, True),
        ("data_on_device", on_device, False),
        ("plans only", on_device.loader, False),
    ]:
        print(f"{label:>15}: {rate(batches, device, args.batches, copy):8.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
