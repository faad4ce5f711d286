"""Segmentation datasets (VOC layout, images/masks folders), joint transforms, collate and bad input."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mobilevit.data.datasets import DataError
from mobilevit.data.sampler import MultiScaleBatchSampler
from mobilevit.data.segmentation import (
    IGNORE_INDEX,
    VOC_CLASSES,
    MaskFolder,
    SegEvalTransform,
    SegTrainTransform,
    VOCSegmentation,
    build_segmentation_dataset,
    collate_segmentation,
    open_mask,
    voc_colormap,
)


def save_mask(path: Path, mask: np.ndarray, palette: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8))
    if palette:
        img.putpalette(voc_colormap().tobytes())
    img.save(path)


def blocks(h: int, w: int, seed: int, classes: int = 21) -> np.ndarray:
    """A mask of 8x8 blocks of random classes, with an ignore (255) border line."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, classes, ((h + 7) // 8, (w + 7) // 8))
    mask = np.kron(grid, np.ones((8, 8), dtype=np.int64))[:h, :w]
    mask[0] = IGNORE_INDEX
    return mask


def image_of(mask: np.ndarray) -> np.ndarray:
    """An RGB image whose pixels encode the mask (red = 10 * class, 250 on ignore), blue a horizontal ramp."""
    h, w = mask.shape
    red = np.where(mask == IGNORE_INDEX, 250, mask * 10)
    blue = np.broadcast_to(np.linspace(0, 255, w), (h, w))
    return np.stack([red, np.full((h, w), 100), blue], -1).astype(np.uint8)


SIZES = {"a": (30, 40), "b": (48, 48), "c": (44, 36)}


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """A tiny VOC tree: train = a, b; val = c; palette masks with an ignore border."""
    root = tmp_path / "voc"
    for k, (name, (h, w)) in enumerate(SIZES.items()):
        mask = blocks(h, w, k)
        save_mask(root / "SegmentationClass" / f"{name}.png", mask)
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_of(mask)).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\nb\n")
    (sets / "val.txt").write_text("c\n\n")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """``images/`` + ``masks/`` (grayscale masks, 3 classes), matched by stem."""
    root = tmp_path / "folder"
    for k, name in enumerate(("x", "y")):
        mask = blocks(24, 32, k, classes=3)
        mask[0] = 0
        save_mask(root / "masks" / f"{name}.png", mask, palette=False)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_of(mask)).save(root / "images" / f"{name}.png")
    return root


# -------------------------------------------------------------------------------------------- datasets


def test_voc_reads_palette_indices(voc: Path):
    ds = VOCSegmentation(voc, "train")
    assert ds.classes == VOC_CLASSES and len(ds) == 2 and ds.num_classes == 21
    image, mask = ds[1]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(blocks(48, 48, 1)))
    with Image.open(ds.paths(1)[1]) as png:
        assert png.mode == "P"  # indices, not the palette's RGB colours
    assert VOCSegmentation(voc, "val").paths(0)[0].name == "c.jpg"


def test_voc_labels_file(voc: Path):
    (voc / "labels.txt").write_text("\n".join(f"class{k}" for k in range(25)) + "\n\n")
    ds = VOCSegmentation(voc, "train")
    assert ds.classes == [f"class{k}" for k in range(25)]


def test_mask_folder(folder: Path):
    ds = MaskFolder(folder, num_classes=3)
    assert ds.classes == ["0", "1", "2"] and len(ds) == 2
    image, mask = ds[0]
    assert image.shape == (3, 24, 32) and mask.shape == (24, 32)
    expected = blocks(24, 32, 0, classes=3)
    expected[0] = 0
    assert torch.equal(mask, torch.from_numpy(expected))
    assert torch.equal((image[0] * 255).round().long(), mask * 10)  # PNG images: lossless, aligned
    (folder / "labels.txt").write_text("sky\nroad\ncar\n")
    assert MaskFolder(folder).classes == ["sky", "road", "car"]
    with pytest.raises(DataError, match="names 3 classes"):
        MaskFolder(folder, num_classes=4)


def test_subset_and_sampler_keys(voc: Path):
    ds = VOCSegmentation(voc, "train", SegTrainTransform(32))
    part = ds.subset([1], SegEvalTransform(16))
    assert len(part) == 1 and part.paths(0) == ds.paths(1)
    image, mask = part[0]
    assert image.shape == (3, 16, 16) and mask.shape == (48, 48)
    a, b = ds[(1, 24, 7)], ds[(1, 24, 7)]
    assert a[0].shape == (3, 24, 24) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(IndexError):
        ds.subset([2])


def test_loader_with_multiscale_sampler(voc: Path):
    ds = VOCSegmentation(voc, "train", SegTrainTransform(32))
    sampler = MultiScaleBatchSampler(len(ds), sizes=[(32, 2), (40, 2)], seed=3)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_segmentation))
    assert len(batches) == 1
    images, masks, skipped = batches[0]
    size = images.shape[-1]
    assert skipped == 0 and images.shape == (2, 3, size, size) and masks.shape == (2, size, size)
    assert masks.dtype == torch.int64


def test_build_segmentation_dataset(voc: Path, folder: Path, tmp_path: Path):
    assert isinstance(build_segmentation_dataset(voc, "train"), VOCSegmentation)
    assert len(build_segmentation_dataset(voc, "test")) == 1  # falls back to val.txt
    with pytest.raises(DataError, match="21 classes"):
        build_segmentation_dataset(voc, "train", num_classes=3)
    assert len(build_segmentation_dataset(folder, "val", num_classes=3)) == 2
    with pytest.raises(DataError, match=r"labels\.txt"):
        build_segmentation_dataset(folder, "train")
    split_root = tmp_path / "splits"
    split_root.mkdir()
    folder.rename(split_root / "val")
    (split_root / "labels.txt").write_text("a\nb\nc\n")
    ds = build_segmentation_dataset(split_root, "test")
    assert isinstance(ds, MaskFolder) and ds.classes == ["a", "b", "c"]
    with pytest.raises(DataError, match="train/images"):
        build_segmentation_dataset(split_root, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a segmentation dataset"):
        build_segmentation_dataset(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="no such directory"):
        build_segmentation_dataset(tmp_path / "nowhere", "train")


def test_build_finds_vocdevkit(voc: Path, tmp_path: Path):
    outer = tmp_path / "download"
    (outer / "VOCdevkit").mkdir(parents=True)
    voc.rename(outer / "VOCdevkit" / "VOC2012")
    assert len(build_segmentation_dataset(outer, "val")) == 1


# ------------------------------------------------------------------------------------------ transforms


def eroded(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood has one class (interior of the blocks, not on the crop's border)."""
    m = mask[None, None].float()
    same = torch.nn.functional.max_pool2d(m, 3, 1) == -torch.nn.functional.max_pool2d(-m, 3, 1)
    return torch.nn.functional.pad(same[0, 0], (1, 1, 1, 1))


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_keeps_image_and_mask_aligned(seed: int):
    mask = blocks(40, 56, seed)
    image = torch.from_numpy(image_of(mask)).permute(2, 0, 1)
    out_image, out_mask = SegTrainTransform(48)(image, torch.from_numpy(mask), None, seed)
    assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48) and out_mask.dtype == torch.int64
    red = (out_image[0] * 255).round().long()
    padded = out_mask == IGNORE_INDEX
    padded &= (out_image == 0).all(0)  # pad: image 0, mask 255; the ignore border line: red 250
    inner = eroded(out_mask) & ~padded & (out_mask != IGNORE_INDEX)
    assert inner.sum() > 100
    assert (red[inner] - out_mask[inner] * 10).abs().max() <= 3
    line = eroded(out_mask) & (out_mask == IGNORE_INDEX) & ~padded
    assert (red[line] >= 245).all()


def test_train_transform_pads_with_ignore():
    mask = np.ones((16, 16), dtype=np.int64)
    image = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    out_image, out_mask = SegTrainTransform(32, scale=(0.25, 0.25))(image, torch.from_numpy(mask), None, 0)
    assert (out_mask == 1).sum() == 64 and (out_mask == IGNORE_INDEX).sum() == 32 * 32 - 64
    assert (out_image[:, out_mask == IGNORE_INDEX] == 0).all()
    assert torch.allclose(out_image[:, out_mask == 1], torch.tensor(200 / 255))


def test_train_transform_flip_applies_to_both():
    mask = blocks(40, 40, 1)
    image = torch.from_numpy(image_of(mask)).permute(2, 0, 1)
    kept = SegTrainTransform(32, hflip=0.0)(image, torch.from_numpy(mask), None, 5)
    flipped = SegTrainTransform(32, hflip=1.0)(image, torch.from_numpy(mask), None, 5)
    assert torch.equal(flipped[0], kept[0].flip(-1)) and torch.equal(flipped[1], kept[1].flip(-1))
    assert not torch.equal(flipped[1], kept[1])


def test_train_transform_seeded():
    mask = blocks(40, 50, 2)
    image, mask_t = torch.from_numpy(image_of(mask)).permute(2, 0, 1), torch.from_numpy(mask)
    t = SegTrainTransform(32)
    state = torch.get_rng_state()
    a, b = t(image, mask_t, None, 11), t(image, mask_t, None, 11)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [t(image, mask_t, None, s) for s in range(12, 16)]
    assert any(not torch.equal(a[1], o[1]) for o in others)
    assert t(image, mask_t, 24, 11)[0].shape == (3, 24, 24)  # the sampler's size wins
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(t(image, mask_t, None, g1)[1], t(image, mask_t, None, g2)[1])
    pil = t(Image.fromarray(image_of(mask)), Image.fromarray(mask.astype(np.uint8)), None, 11)
    assert torch.equal(pil[0], a[0]) and torch.equal(pil[1], a[1])


def test_train_transform_rejects_mismatch():
    with pytest.raises(ValueError, match="sizes differ"):
        SegTrainTransform(32)(torch.zeros(3, 10, 12, dtype=torch.uint8), torch.zeros(10, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="scale"):
        SegTrainTransform(32, scale=(2.0, 1.0))


def test_eval_transform():
    mask = blocks(30, 50, 3)
    image = torch.from_numpy(image_of(mask)).permute(2, 0, 1)
    out_image, out_mask = SegEvalTransform(64)(image, torch.from_numpy(mask))
    assert out_image.shape == (3, 64, 64) and torch.equal(out_mask, torch.from_numpy(mask))
    assert SegEvalTransform(64)(image, torch.from_numpy(mask), 32)[0].shape == (3, 32, 32)


def test_collate_segmentation():
    a = (torch.zeros(3, 8, 8), torch.zeros(8, 8, dtype=torch.long))
    b = (torch.ones(3, 8, 8), torch.ones(10, 6, dtype=torch.long))
    images, masks, skipped = collate_segmentation([a, None, a])
    assert images.shape == (2, 3, 8, 8) and masks.shape == (2, 8, 8) and skipped == 1
    images, masks, skipped = collate_segmentation([a, b])
    assert isinstance(masks, list) and [m.shape for m in masks] == [(8, 8), (10, 6)] and skipped == 0
    images, masks, skipped = collate_segmentation([None, None])
    assert images.shape[0] == 0 and masks.shape[0] == 0 and skipped == 2
    with pytest.raises(ValueError, match="different sizes"):
        collate_segmentation([a, (torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long))])


# ------------------------------------------------------------------------------------------- bad input


def test_missing_mask_or_image_named(voc: Path):
    (voc / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(DataError, match=r"missing.*SegmentationClass/b\.png"):
        VOCSegmentation(voc, "train")
    (voc / "JPEGImages" / "c.jpg").unlink()
    with pytest.raises(DataError, match=r"JPEGImages/c\.jpg"):
        VOCSegmentation(voc, "val")


def test_empty_or_missing_split_file(voc: Path):
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no image ids"):
        VOCSegmentation(voc, "train")
    with pytest.raises(DataError, match=r"no such split file \(available: train, val\)"):
        VOCSegmentation(voc, "trainaug")


def test_mask_folder_unmatched_files(folder: Path):
    save_mask(folder / "masks" / "stray.png", np.zeros((4, 4)))
    with pytest.raises(DataError, match=r"mask\(s\) without an image: .*stray\.png"):
        MaskFolder(folder, num_classes=3)
    (folder / "masks" / "stray.png").unlink()
    (folder / "masks" / "y.png").unlink()
    with pytest.raises(DataError, match=r"image\(s\) without a mask: .*y\.png"):
        MaskFolder(folder, num_classes=3)


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return " | ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("values", r"mask .*a\.png: values 30, 99 outside the 21 classes"),
        ("size", r"mask .*a\.png is 20x10 but image .*a\.jpg is 40x30"),
        ("corrupt_image", r"unreadable image .*a\.jpg"),
        ("corrupt_mask", r"unreadable mask .*a\.png"),
        ("rgb_mask", r"unreadable mask .*a\.png: a RGB mask"),
    ],
)
def test_bad_items_skipped_and_counted(voc: Path, caplog: pytest.LogCaptureFixture, damage: str, expected: str):
    path = voc / "SegmentationClass" / "a.png"
    if damage == "values":
        mask = blocks(30, 40, 0)
        mask[5, 5], mask[6, 6] = 30, 99
        save_mask(path, mask)
    elif damage == "size":
        save_mask(path, np.zeros((10, 20)))
    elif damage == "corrupt_image":
        (voc / "JPEGImages" / "a.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    elif damage == "corrupt_mask":
        path.write_bytes(path.read_bytes()[:60])
    else:
        Image.new("RGB", (40, 30), (128, 0, 0)).save(path)
    ds = VOCSegmentation(voc, "train", SegTrainTransform(32))
    with caplog.at_level(logging.WARNING, logger="mobilevit.data"):
        assert ds[(0, 32, 1)] is None and ds[0] is None
        images, masks, skipped = collate_segmentation([ds[(i, 32, 1)] for i in range(len(ds))])
    assert skipped == 1 and images.shape == (1, 3, 32, 32) and masks.shape == (1, 32, 32)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "logged once per file"
    assert re.search(expected, _warnings(caplog))


def test_open_mask_modes(tmp_path: Path):
    values = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    Image.fromarray(values).save(tmp_path / "m16.png")
    assert np.array_equal(open_mask(tmp_path / "m16.png"), values)
    Image.fromarray(np.eye(4, dtype=bool)).save(tmp_path / "m1.png")
    assert np.array_equal(open_mask(tmp_path / "m1.png"), np.eye(4, dtype=np.uint8))
