"""Datasets, IDX reading, seeded augmentations and skipping collate (synthetic files; real Fashion-MNIST if installed)."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import idx_bytes, needs_fashion_mnist, save_image, write_mnist
from mobilevit.data.datasets import (
    FASHION_MNIST_CLASSES,
    DataError,
    FashionMNIST,
    ImageFolder,
    TrainTransform,
    _resize,
    build_dataset,
    collate,
    read_idx,
    split_holdout,
)
from mobilevit.data.sampler import MultiScaleBatchSampler
from mobilevit.data.transforms import EvalTransform


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """``root/{cat,dog}`` with nested, upper-case, hidden, non-image and one corrupt file."""
    root = tmp_path / "images"
    save_image(root / "dog" / "a.png", (255, 0, 0))
    save_image(root / "dog" / "nested" / "b.JPG", (0, 255, 0))
    save_image(root / "cat" / "c.bmp", (0, 0, 255))
    save_image(root / "cat" / ".hidden.png", (0, 0, 0))
    save_image(root / ".cache" / "d.png", (0, 0, 0))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


# ------------------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([-5, 7, 2**30], np.int32)])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path: Path, array: np.ndarray, compress: bool):
    raw = idx_bytes(array)
    path = tmp_path / ("x.gz" if compress else "x")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.dtype == array.dtype and out.dtype.isnative and np.array_equal(out, array)


def test_read_idx_errors(tmp_path: Path):
    good = idx_bytes(np.arange(6, dtype=np.float32).reshape(2, 3))
    cases = {
        "bad magic": (b"\x08\x03" + good[2:], "not an IDX file"),
        "bad dtype": (good[:2] + b"\x07" + good[3:], "not an IDX file"),
        "empty": (b"", "not an IDX file"),
        "short header": (good[:10], "truncated IDX header"),
        "truncated": (good[:-1], "truncated"),
        "trailing": (good + b"\0", "trailing bytes"),
        "corrupt gzip": (gzip.compress(good)[:-12], "corrupt gzip"),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(DataError, match=message):
            read_idx(path)
    assert issubclass(DataError, ValueError)


# -------------------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_from_idx_files(tmp_path: Path):
    data = write_mnist(tmp_path)
    images, labels = data["train"]
    ds = FashionMNIST(tmp_path, "train")
    assert len(ds) == 12 and ds.classes == FASHION_MNIST_CLASSES and ds.targets == labels.tolist()
    pil = ds.load(3)
    assert pil.mode == "RGB" and pil.size == (28, 28)
    assert all(np.array_equal(np.asarray(pil)[..., c], images[3]) for c in range(3))
    tensor, label = ds[3]
    assert tensor.shape == (3, 28, 28) and tensor.dtype == torch.float32 and label == labels[3]
    assert torch.equal(tensor, torch.from_numpy(images[3]).float().div(255).expand(3, -1, -1))

    test = FashionMNIST(tmp_path, "test").subset([4, 0])
    assert len(test) == 2 and test.targets == [4, 0] and test.classes == FASHION_MNIST_CLASSES
    assert np.array_equal(np.asarray(test.load(0))[..., 0], data["t10k"][0][4])
    with pytest.raises(IndexError):
        FashionMNIST(tmp_path, "test").subset([5])


def test_fashion_mnist_fast_path_matches_pil_input(tmp_path: Path):
    write_mnist(tmp_path)
    for transform in (TrainTransform(40), EvalTransform(36, 32), EvalTransform(40, 40)):
        ds = FashionMNIST(tmp_path, transform=transform)
        for index, size, seed in [(0, 64, 1), (5, 32, 2), (7, 48, 3)]:
            tensor, _ = ds[(index, size, seed)]
            expected = transform(ds.load(index), size, torch.Generator().manual_seed(seed))
            assert tensor.shape == (3, size, size) and torch.equal(tensor, expected)


def test_fashion_mnist_errors(tmp_path: Path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "missing")
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(DataError, match="do not match"):
        FashionMNIST(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(5, 10, np.uint8)))
    with pytest.raises(DataError, match="labels outside"):
        FashionMNIST(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(tmp_path, "val")


@needs_fashion_mnist
def test_real_fashion_mnist_test_split():
    ds = build_dataset("fashion-mnist", "val", EvalTransform(32, 32))
    assert isinstance(ds, FashionMNIST) and ds.split == "test" and len(ds) == 10_000
    assert np.bincount(ds.targets).tolist() == [1000] * 10
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and 0 <= image.min() < image.max() <= 1 and label == ds.targets[0]


# --------------------------------------------------------------------------------------- image folders


def test_image_folder(folder: Path):
    ds = ImageFolder(folder)
    assert ds.classes == ["cat", "dog"]
    assert [p.relative_to(folder).as_posix() for p, _ in ds.samples] == [
        "cat/broken.jpg",
        "cat/c.bmp",
        "dog/a.png",
        "dog/nested/b.JPG",
    ]
    assert ds.targets == [0, 0, 1, 1] and len(ds) == 4
    image, label = ds[2]
    assert label == 1 and image.shape == (3, 8, 12) and torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0, 0]))
    subset = ds.subset([3, 1], EvalTransform(4, 4))
    assert subset.classes == ["cat", "dog"] and subset.targets == [1, 0] and len(subset) == 2
    assert subset.samples is ds.samples  # the file list is shared, not scanned again
    assert subset[1][0].shape == (3, 4, 4) and ds[2][0].shape == (3, 8, 12)  # the parent keeps its transform
    nested = subset.subset([1])  # positions in the subset, its transform
    assert nested.targets == [0] and nested.load(0).size == ds.load(1).size and nested[0][0].shape == (3, 4, 4)


def test_unreadable_image_is_skipped_and_logged_once(folder: Path, caplog: pytest.LogCaptureFixture):
    ds = ImageFolder(folder, transform=EvalTransform(16, 16))
    with pytest.raises(OSError):
        ds.load(0)
    with caplog.at_level(logging.WARNING, logger="mobilevit.data.datasets"):
        assert ds[0] is None and ds[(0, 16, 1)] is None
    assert len(caplog.records) == 1 and str(folder / "cat" / "broken.jpg") in caplog.records[0].getMessage()

    images, labels, skipped = collate([ds[i] for i in range(len(ds))])
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [0, 1, 1] and skipped == 1
    images, labels, skipped = collate([None, None])
    assert images.shape == (0,) and labels.shape == (0,) and labels.dtype == torch.long and skipped == 2


def test_image_folder_errors(tmp_path: Path):
    with pytest.raises(DataError, match="no such directory"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty")


def test_build_dataset(tmp_path: Path, folder: Path):
    write_mnist(tmp_path / "mnist")
    assert build_dataset(tmp_path / "mnist", "train").split == "train"
    assert build_dataset(str(tmp_path / "mnist"), "test").split == "test"

    assert build_dataset(folder, "train").root == folder  # no split subdirectories: the folder itself
    save_image(tmp_path / "splits" / "train" / "a" / "x.png", (1, 2, 3))
    save_image(tmp_path / "splits" / "test" / "a" / "y.png", (1, 2, 3))
    assert build_dataset(tmp_path / "splits", "train").root == tmp_path / "splits" / "train"
    assert build_dataset(tmp_path / "splits", "val").root == tmp_path / "splits" / "test"
    save_image(tmp_path / "splits" / "val" / "a" / "z.png", (1, 2, 3))
    assert build_dataset(tmp_path / "splits", "val").root == tmp_path / "splits" / "val"
    assert build_dataset(tmp_path / "splits", "test").root == tmp_path / "splits" / "test"

    save_image(tmp_path / "only_train" / "train" / "a" / "x.png", (1, 2, 3))
    with pytest.raises(DataError, match="no val or test subdirectory"):
        build_dataset(tmp_path / "only_train", "val")
    with pytest.raises(DataError, match="not a directory"):
        build_dataset(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset(folder, "validation")


def test_split_holdout():
    train, val = split_holdout(100, 0.1, seed=0)
    assert len(val) == 10 and sorted(train + val) == list(range(100)) and train == sorted(train)
    assert split_holdout(100, 0.1, seed=0) == (train, val) and split_holdout(100, 0.1, seed=1)[1] != val
    assert split_holdout(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError):
        split_holdout(10, 1.0, seed=0)


# ------------------------------------------------------------------------------------------ transforms


def gradient(height: int = 20, width: int = 30) -> torch.Tensor:
    """A uint8 ``[3, H, W]`` image with distinct rows, columns and channels."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([x * 8, y * 12, x + y * 3]).to(torch.uint8)


def test_train_transform_is_seeded_by_its_generator_only():
    transform, image = TrainTransform(size=24), gradient()
    state = torch.get_rng_state()
    a = transform(image, None, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, transform(image, None, torch.Generator().manual_seed(1)))
    outputs = {transform(image, 16, torch.Generator().manual_seed(s)).sum().item() for s in range(10)}
    assert len(outputs) == 10
    assert transform(image, 40, torch.Generator()).shape == (3, 40, 40)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    assert torch.equal(
        transform(pil, 16, torch.Generator().manual_seed(4)), transform(image, 16, torch.Generator().manual_seed(4))
    )


def test_train_transform_crop_and_flip():
    image = gradient()
    full = TrainTransform(size=10, scale=(1.0, 1.0), ratio=(1.5, 1.5), hflip=1.0)
    assert torch.equal(full(image, None, torch.Generator()), _resize(image.flip(-1), (10, 10), "bilinear"))
    no_flip = TrainTransform(size=10, scale=(1.0, 1.0), ratio=(1.5, 1.5), hflip=0.0)
    assert torch.equal(no_flip(image, None, torch.Generator()), _resize(image, (10, 10), "bilinear"))

    transform = TrainTransform(scale=(0.2, 0.6), ratio=(0.5, 2.0))
    g = torch.Generator().manual_seed(0)
    for height, width in [(20, 30), (300, 17), (7, 7)]:
        for _ in range(50):
            top, left, h, w = transform.crop_box(height, width, torch.rand(40, generator=g).tolist())
            assert top >= 0 and left >= 0 and h > 0 and w > 0 and top + h <= height and left + w <= width
    # no attempt fits a 10x1000 strip: fall back to the centre crop of the allowed aspect ratio
    square = TrainTransform(scale=(0.9, 1.0), ratio=(1.0, 1.0))
    assert square.crop_box(10, 1000, [0.5] * 40) == (0, 495, 10, 10)
    with pytest.raises(ValueError):
        TrainTransform(interpolation="lanczos")


def test_train_transform_random_erasing():
    grey = torch.full((1, 28, 28), 255, dtype=torch.uint8)  # all white: erased pixels are the ones below 1
    never = TrainTransform(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), erase=0.0)
    always = TrainTransform(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), erase=1.0, erase_scale=(0.1, 0.2))
    assert torch.equal(never(grey, None, torch.Generator()), torch.ones(3, 32, 32))
    for seed in range(20):
        out = always(grey, None, torch.Generator().manual_seed(seed))
        assert torch.equal(out, always(grey, None, torch.Generator().manual_seed(seed)))  # seeded
        erased = out[0] < 1
        rows, cols = erased.any(1).nonzero()[:, 0], erased.any(0).nonzero()[:, 0]
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert 0.1 * 1024 - 40 <= h * w <= 0.2 * 1024 + 40  # one rectangle of the asked area (rounding aside)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # gray noise for a grayscale image
        assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="erase"):
        TrainTransform(erase=1.5)
    with pytest.raises(ValueError, match="erase_scale"):
        TrainTransform(erase_scale=(0.5, 0.1))


def test_resize_and_eval_transforms():
    image = gradient()
    assert _resize(image, (16, 16), "bilinear").shape == (3, 16, 16)
    grey = torch.full((1, 5, 5), 51, dtype=torch.uint8)
    assert torch.allclose(_resize(grey, (12, 12), "bicubic"), torch.full((3, 12, 12), 0.2))
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    for interpolation, size in [("bilinear", 7), ("bilinear", 45), ("bicubic", 11)]:  # like PIL (antialiased)
        ours = _resize(image, (size, size), interpolation)
        reference = np.array(pil.resize((size, size), getattr(Image.Resampling, interpolation.upper())))
        assert (ours * 255 - torch.from_numpy(reference).permute(2, 0, 1)).abs().max() < 1.01

    transform = EvalTransform(36, 32)
    assert transform(image).shape == (3, 32, 32)
    assert torch.equal(transform(image, 16, torch.Generator()), EvalTransform(18, 16)(image))
    assert transform.at_size(16) == EvalTransform(18, 16) and transform.at_size(48).resize_size == 54
    assert torch.allclose(transform(grey), torch.full((3, 32, 32), 0.2))


def test_loader_with_multiscale_sampler(tmp_path: Path):
    write_mnist(tmp_path, n_train=30)
    ds = FashionMNIST(tmp_path, transform=TrainTransform(32))
    sampler = MultiScaleBatchSampler(len(ds), sizes=[(16, 8), (32, 4)], seed=0)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate))
    assert len(batches) == len(sampler)
    for (images, labels, skipped), keys in zip(batches, sampler, strict=True):
        size = keys[0][1]
        assert images.shape == (len(keys), 3, size, size) and skipped == 0
        assert labels.tolist() == [ds.targets[i] for i, _, _ in keys]
