"""Batches augmented on the training device (data_on_device): the same images as the per-image path."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import save_image, write_mnist
from mobilevit.data.datasets import FashionMNIST, TrainTransform, _resize, collate
from mobilevit.data.device import DeviceBatches, resize_weights
from mobilevit.data.sampler import MultiScaleBatchSampler, multiscale_sizes
from mobilevit.training.recipe import load_recipe
from mobilevit.training.trainer import Trainer, train

RECIPE = "mobilevit_xxs_fashion_mnist"


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("out_size", [5, 16, 40])
def test_resize_weights_are_interpolates_weights(interpolation: str, out_size: int):
    """Up- and downscaling a segment of a 28 x 30 image by two matrix products gives F.interpolate's result
    (antialiased when downscaling, clamped at the segment's ends, not the image's)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 28, 30, generator=g)
    for top, left, h, w in [(0, 0, 28, 30), (3, 5, 11, 20), (10, 2, 17, 7), (27, 29, 1, 1)]:
        rows = resize_weights(torch.tensor([top]), torch.tensor([h]), 28, out_size, interpolation)[0]
        cols = resize_weights(torch.tensor([left]), torch.tensor([w]), 30, out_size, interpolation)[0]
        got = rows @ image @ cols.T
        if interpolation == "bicubic":
            got = got.clamp(0, 1)
        want = _resize(image[:, top : top + h, left : left + w], (out_size, out_size), interpolation)[:2]
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


@pytest.fixture
def mnist(tmp_path: Path) -> Path:
    write_mnist(tmp_path / "mnist", n_train=60, n_test=8)
    return tmp_path / "mnist"


@pytest.mark.parametrize("auto_augment", ["none", "randaugment"])
def test_device_batches_equal_the_per_image_batches(mnist: Path, auto_augment: str):
    """Crops (down- and upscaled), mirroring, erasing and auto-augmentation follow each image's seed exactly as in
    the DataLoader path; only float rounding differs (and, rarely, a pixel that rounding moves across one of
    RandAugment's thresholds)."""
    tf = TrainTransform(size=32, scale=(0.1, 1.0), erase=0.5, auto_augment=auto_augment)
    data = FashionMNIST(mnist, "train", tf).subset(range(3, 60, 2))  # a subset: positions differ from sources
    sampler = MultiScaleBatchSampler(len(data), sizes=multiscale_sizes(32, 6, 16, 48, 3, 16), seed=5)
    sampler.set_epoch(1)
    want = list(DataLoader(data, batch_sampler=sampler, collate_fn=collate))
    got = list(DeviceBatches(data, sampler, torch.device("cpu")))
    assert len(got) == len(want) and {x.shape[-1] for x, _, _ in got} == {16, 32, 48}
    diffs = []
    for (x, y, skipped), (x_ref, y_ref, _) in zip(got, want, strict=True):
        assert torch.equal(y, y_ref) and skipped == 0 and x.shape == x_ref.shape
        diffs.append((x - x_ref).abs().flatten())
    diffs = torch.cat(diffs)
    if auto_augment == "none":
        assert diffs.max() < 1e-5
    else:
        assert (diffs > 1e-5).float().mean() < 1e-4
    # the per-image path really varies: another epoch's batches differ
    sampler.set_epoch(2)
    other = next(iter(DeviceBatches(data, sampler, torch.device("cpu"))))[0]
    assert other.shape != got[0][0].shape or not torch.allclose(other, got[0][0])


def _losses(out: Path) -> list[float]:
    with (out / "steps.csv").open(newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_training_with_data_on_device_follows_the_per_image_run(mnist: Path, tmp_path: Path):
    """The same run with data_on_device (plans drawn in a worker process) gives the same losses up to float
    rounding; image folders, which are not held in memory, are refused with a message saying what to do."""
    common = dict(
        data=str(mnist), val_fraction=0.25, workers=0, base_size=32, base_batch=8, min_size=24, max_size=40,
        num_scales=3, size_divisor=8, eval_resize=32, eval_size=32, eval_batch=16, epochs=2, warmup_iters=3,
        ema_momentum=0.01, tensorboard=False, progress=False, log_every=1, random_erase=0.5, hflip=0.5,
    )  # fmt: skip
    train(load_recipe(RECIPE, common | {"output": str(tmp_path / "host")}))
    device = train(
        load_recipe(RECIPE, common | {"output": str(tmp_path / "dev"), "data_on_device": True, "workers": 1})
    )
    host_losses, device_losses = _losses(tmp_path / "host"), _losses(tmp_path / "dev")
    assert len(host_losses) == len(device_losses) > 5
    assert host_losses[0] == pytest.approx(device_losses[0], rel=1e-5)
    assert device_losses == pytest.approx(host_losses, rel=1e-3)
    assert device["best_top1"] >= 0
    folder = tmp_path / "folder"
    for name in ("a", "b"):
        for i in range(3):
            save_image(folder / name / f"{i}.png", (40 * i, 90, 200))
    cfg = load_recipe(RECIPE, common | {"data": str(folder), "output": str(tmp_path / "f"), "data_on_device": True})
    with pytest.raises(ValueError, match="data_on_device needs a dataset held in memory"):
        Trainer(cfg)
