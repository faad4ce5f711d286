"""Detection datasets (COCO, VOC), box-aware transforms, collate and bad input."""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import idx_bytes
from mobilevit.data.datasets import DataError
from mobilevit.data.detection import (
    CocoDetection,
    DetEvalTransform,
    DetTrainTransform,
    VOCDetection,
    build_detection_dataset,
    collate_detection,
    with_background,
)
from mobilevit.data.sampler import MultiScaleBatchSampler
from mobilevit.data.scenes import SCENE_CLASSES, generate_scenes
from mobilevit.data.segmentation import VOC_CLASSES

# --------------------------------------------------------------------------------------------- helpers


def blob_images(n: int, seed: int) -> np.ndarray:
    """Fashion-MNIST-like items: bright ellipses on black, uint8 [n, 28, 28]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:28, :28]
    out = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        cy, cx, ry, rx = rng.uniform(11, 17), rng.uniform(11, 17), rng.uniform(5, 13), rng.uniform(4, 13)
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        out[i][inside] = rng.integers(60, 256, inside.sum())
    return out


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated scene dataset (VOC and COCO layouts): 6 train, 3 val, no test scenes at 64 px."""
    mnist = tmp_path_factory.mktemp("fmnist")
    for prefix, n, seed in (("train", 40, 1), ("t10k", 10, 2)):
        (mnist / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(blob_images(n, seed))))
        (mnist / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes((np.arange(n) % 10).astype(np.uint8)))
    out = tmp_path_factory.mktemp("scenes") / "out"
    generate_scenes(out, num_train=6, num_val=3, num_test=0, size=64, fashion_mnist_dir=mnist, progress=False)
    return out


@pytest.fixture
def scenes_copy(scenes: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(scenes, tmp_path / "scenes"))


def save_png(path: Path, h: int, w: int, colour: tuple[int, int, int] = (90, 120, 150)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    """Images (solid PNGs) under ``root/imgs`` and ``root/ann.json``; returns the JSON path."""
    for im in images:
        save_png(root / "imgs" / im["file_name"], im["height"], im["width"])
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


CATS = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 12, "name": "twelve"}]
IMAGES = [
    {"id": 1, "file_name": "a.png", "height": 30, "width": 40},
    {"id": 2, "file_name": "b.png", "height": 20, "width": 20},
    {"id": 5, "file_name": "c.png", "height": 16, "width": 24},
]
ANNS = [
    {"id": 10, "image_id": 1, "category_id": 12, "bbox": [1, 2, 10, 5], "area": 33.0, "iscrowd": 0},
    {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 1},
    {"id": 12, "image_id": 5, "category_id": 7, "bbox": [2.5, 3, 6, 6], "area": 30.0, "iscrowd": 0},
]


def voc_xml(size: tuple[int, int] | None, objects: list[tuple]) -> str:
    """A VOC annotation; ``size`` (h, w) or None to leave it out; objects ``(name, xmin, ymin, xmax, ymax, difficult)``."""
    parts = ["<annotation><filename>x.jpg</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>")
    for name, x0, y0, x1, y1, difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """train = a (30x40, a dog and a difficult cat partly outside), b (24x24, no object); val = a."""
    root = tmp_path / "voc"
    for name, (h, w) in {"a": (30, 40), "b": (24, 24)}.items():
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (200, 10, 10)).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text(voc_xml((30, 40), [("dog", 1, 1, 10, 20, 0), ("cat", 5, 6, 45, 30, 1)]))
    (root / "Annotations" / "b.xml").write_text(voc_xml((24, 24), []))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    (root / "labels.txt").write_text("background\ncat\ndog\n")
    return root


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -------------------------------------------------------------------------------------------- datasets


def test_coco_and_voc_of_scenes_agree(scenes: Path):
    coco = build_detection_dataset(scenes, "train")
    voc = VOCDetection(scenes, "train")
    assert isinstance(coco, CocoDetection) and coco.image_dir == scenes / "JPEGImages"
    assert coco.classes == voc.classes == SCENE_CLASSES and coco.num_classes == 11 and len(coco) == len(voc) == 6
    assert coco.category_ids == list(range(1, 11)) and coco.dropped_boxes == voc.dropped_boxes == 0
    data = json.loads((scenes / "annotations" / "instances_train.json").read_text())
    total = 0
    for i, im in enumerate(data["images"]):
        (ci, ct), (vi, vt) = coco[i], voc[i]
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
        assert torch.equal(ct["boxes"], expected.reshape(-1, 4)) and torch.equal(vt["boxes"], ct["boxes"])
        assert torch.equal(ct["labels"], torch.tensor([a["category_id"] for a in anns])) and torch.equal(
            vt["labels"], ct["labels"]
        )
        assert torch.equal(ct["area"], torch.tensor([float(a["area"]) for a in anns]))
        assert ct["image_id"] == im["id"] and vt["image_id"] == i and ct["orig_size"] == vt["orig_size"] == (64, 64)
        assert torch.equal(ci, vi) and ci.shape == (3, 64, 64) and ci.dtype == torch.float32
        assert ct["boxes"].dtype == torch.float32 and ct["labels"].dtype == ct["iscrowd"].dtype == torch.int64
        total += len(anns)
    assert total > 6


def test_build_detection_dataset(scenes_copy: Path, tmp_path: Path):
    root = scenes_copy
    assert len(build_detection_dataset(root, "val")) == 3
    assert len(build_detection_dataset(root, "test")) == 3  # no test split: falls back to val
    shutil.rmtree(root / "annotations")
    voc = build_detection_dataset(root, "train")
    assert isinstance(voc, VOCDetection) and len(voc) == 6 and voc.classes == SCENE_CLASSES
    outer = tmp_path / "download" / "VOCdevkit"
    outer.mkdir(parents=True)
    root.rename(outer / "VOC2007")
    assert isinstance(build_detection_dataset(outer.parent, "val"), VOCDetection)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"looked for COCO .*annotations/instances_train\.json and VOC ImageSets/Main"):
        build_detection_dataset(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="no such directory"):
        build_detection_dataset(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="split"):
        build_detection_dataset(tmp_path / "empty", "trainval")


def test_build_coco_2017_layout(tmp_path: Path):
    root = tmp_path / "coco"
    write_coco(root / "tmp", IMAGES, ANNS, CATS)
    (root / "annotations").mkdir()
    (root / "tmp" / "ann.json").rename(root / "annotations" / "instances_val2017.json")
    (root / "tmp" / "imgs").rename(root / "val2017")
    (root / "train").mkdir()  # a decoy: the image directory is the one holding the files
    ds = build_detection_dataset(root, "val")
    assert isinstance(ds, CocoDetection) and ds.image_dir == root / "val2017" and len(ds) == 3


def test_coco_category_mapping_and_empty_image(tmp_path: Path):
    ds = CocoDetection(tmp_path / "imgs", write_coco(tmp_path, IMAGES, ANNS, CATS))
    assert ds.classes == ["background", "three", "seven", "twelve"] and ds.category_ids == [3, 7, 12]
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and target["image_id"] == 1 and target["orig_size"] == (30, 40)
    assert torch.equal(target["boxes"], torch.tensor([[1.0, 2, 11, 7], [0, 0, 4, 4]]))
    assert target["labels"].tolist() == [3, 1] and target["iscrowd"].tolist() == [0, 1]
    assert target["area"].tolist() == [33.0, 16.0]  # the annotation's area, else the box's
    image, target = ds[1]  # no annotations: kept, with empty tensors
    assert image.shape == (3, 20, 20) and target["image_id"] == 2
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == target["iscrowd"].shape == target["area"].shape == (0,)
    for transform in (DetTrainTransform(32), DetEvalTransform(32)):
        image, target = ds.subset([1], transform)[(0, 32, 3)]
        assert image.shape == (3, 32, 32) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert ds[2][1]["labels"].tolist() == [2] and torch.allclose(ds[2][1]["boxes"], torch.tensor([[2.5, 3, 8.5, 9]]))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("category", r"ann\.json: 1 annotation\(s\) with an unknown category_id .*: annotation 11 \(category_id 99\)"),
        ("image_id", r"ann\.json: 1 annotation\(s\) with an image_id not in 'images': annotation 12 \(image_id 42\)"),
        ("files", r"ann\.json: 2 of 3 image files missing: .*imgs/a\.png, .*imgs/c\.png"),
        ("bbox", r"ann\.json: 1 annotation\(s\) without a numeric bbox .*annotation 10 \(bbox \[1, 2, 3\]\)"),
        ("json", r"ann\.json: not a readable COCO annotation file"),
        ("duplicate", r"ann\.json: image id 1 appears twice"),
    ],
)
def test_coco_bad_input_named(tmp_path: Path, damage: str, expected: str):
    images, anns = [dict(im) for im in IMAGES], [dict(a) for a in ANNS]
    if damage == "category":
        anns[1]["category_id"] = 99
    elif damage == "image_id":
        anns[2]["image_id"] = 42
    elif damage == "bbox":
        anns[0]["bbox"] = [1, 2, 3]
    elif damage == "duplicate":
        images[2]["id"] = 1
    path = write_coco(tmp_path, images, anns, CATS)
    if damage == "files":
        (tmp_path / "imgs" / "a.png").unlink()
        (tmp_path / "imgs" / "c.png").unlink()
    elif damage == "json":
        path.write_text(path.read_text()[:-5])
    with pytest.raises(DataError, match=expected):
        CocoDetection(tmp_path / "imgs", path)


def test_coco_boxes_clipped_or_dropped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    anns = [
        {"id": 20, "image_id": 1, "category_id": 3, "bbox": [-5, 20, 15, 20]},  # partly outside: clipped
        {"id": 21, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 5]},  # zero width
        {"id": 22, "image_id": 1, "category_id": 3, "bbox": [float("nan"), 1, 2, 2]},
        {"id": 23, "image_id": 1, "category_id": 7, "bbox": [50, 5, 5, 5]},  # wholly outside
        {"id": 24, "image_id": 5, "category_id": 7, "bbox": [10, 10, -3, 4]},
        {"id": 25, "image_id": 5, "category_id": 12, "bbox": [1, 1, 3, 3]},
    ]
    with caplog.at_level(logging.WARNING, logger="mobilevit.data"):
        ds = CocoDetection(tmp_path / "imgs", write_coco(tmp_path, IMAGES, anns, CATS))
    assert ds.dropped_boxes == 4 and ds.clipped_boxes == 1
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert re.search(
        r"ann\.json: dropped 4 degenerate box.*annotation 21, annotation 22, annotation 23, annotation 24", warnings[0]
    )
    target = ds[0][1]
    assert torch.equal(target["boxes"], torch.tensor([[0.0, 20, 10, 30]])) and target["area"].tolist() == [100.0]
    assert ds[2][1]["labels"].tolist() == [3] and len(ds[1][1]["boxes"]) == 0


def test_voc_boxes_difficult_and_classes(voc: Path):
    ds = VOCDetection(voc, "train")
    assert ds.classes == ["background", "cat", "dog"] and len(ds) == 2
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and target["image_id"] == 0 and target["orig_size"] == (30, 40)
    # 1-based inclusive -> 0-based, end exclusive: (1, 1, 10, 20) covers pixels 0..9 x 0..19
    assert torch.equal(target["boxes"], torch.tensor([[0.0, 0, 10, 20], [4, 5, 40, 30]]))  # the cat clipped at x 40
    assert target["labels"].tolist() == [2, 1] and target["iscrowd"].tolist() == [0, 1]  # difficult: ignored
    assert target["area"].tolist() == [200.0, 36.0 * 25]
    assert ds.clipped_boxes == 1 and ds.dropped_boxes == 0
    image, target = ds[1]
    assert target["image_id"] == 1 and target["boxes"].shape == (0, 4)
    (voc / "labels.txt").unlink()
    assert VOCDetection(voc, "val").classes == VOC_CLASSES
    with pytest.raises(DataError, match=r"a\.xml: object 0 has unknown class name 'dog'"):
        VOCDetection(voc, "val", classes=["cat"])
    assert VOCDetection(voc, "val", classes=["cat", "dog"]).classes == ["background", "cat", "dog"]
    assert with_background(["__background__", "x"]) == ["__background__", "x"]


def test_voc_size_from_image_when_xml_has_none(voc: Path):
    (voc / "Annotations" / "a.xml").write_text(voc_xml(None, [("dog", 30, 25, 50, 40, 0)]))
    target = VOCDetection(voc, "val")[0][1]
    assert target["orig_size"] == (30, 40) and torch.equal(target["boxes"], torch.tensor([[29.0, 24, 40, 30]]))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("unknown", r"Annotations/a\.xml: object 1 has unknown class name 'horse'"),
        ("malformed", r"Annotations/a\.xml: malformed XML"),
        ("coordinate", r"Annotations/a\.xml: object 0 has no numeric bndbox/ymax \(got 'ten'\)"),
        ("no_xml", r"train\.txt lists 1 missing file\(s\): .*Annotations/b\.xml"),
        ("no_image", r"train\.txt lists 1 missing file\(s\): .*JPEGImages/b\.jpg"),
    ],
)
def test_voc_bad_input_named(voc: Path, damage: str, expected: str):
    xml = voc / "Annotations" / "a.xml"
    if damage == "unknown":
        xml.write_text(voc_xml((30, 40), [("dog", 1, 1, 10, 20, 0), ("horse", 1, 1, 5, 5, 0)]))
    elif damage == "malformed":
        xml.write_text(xml.read_text()[:-10])
    elif damage == "coordinate":
        xml.write_text(voc_xml((30, 40), [("dog", 1, 1, 10, "ten", 0)]))
    elif damage == "no_xml":
        (voc / "Annotations" / "b.xml").unlink()
    else:
        (voc / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DataError, match=expected):
        VOCDetection(voc, "train")


def test_voc_degenerate_boxes_dropped_and_counted(voc: Path, caplog: pytest.LogCaptureFixture):
    objects = [("dog", 10, 5, 9, 8, 0), ("cat", 3, 3, 6, 6, 0), ("cat", 50, 1, 60, 5, 0), ("dog", 2, 2, 2, 9, 0)]
    (voc / "Annotations" / "a.xml").write_text(voc_xml((30, 40), objects))
    with caplog.at_level(logging.WARNING, logger="mobilevit.data"):
        ds = VOCDetection(voc, "train")
    assert ds.dropped_boxes == 2  # xmax < xmin, and wholly right of the image; a one-pixel-wide box is kept
    assert torch.equal(ds[0][1]["boxes"], torch.tensor([[2.0, 2, 6, 6], [1, 1, 2, 9]]))
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and re.search(r"Annotations: dropped 2 .*a\.xml object 0, a\.xml object 2", warnings[0])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("corrupt", r"unreadable image .*train_000001\.jpg"),
        ("size", r"image .*train_000001\.jpg is 32x32 but its annotation says 64x64"),
    ],
)
def test_bad_image_skipped_and_counted(scenes_copy: Path, caplog: pytest.LogCaptureFixture, damage: str, expected: str):
    path = scenes_copy / "JPEGImages" / "train_000001.jpg"
    if damage == "corrupt":
        path.write_bytes(path.read_bytes()[:200])
    else:
        Image.new("RGB", (32, 32)).save(path)
    ds = build_detection_dataset(scenes_copy, "train", DetTrainTransform(48))
    with caplog.at_level(logging.WARNING, logger="mobilevit.data"):
        assert ds[(1, 48, 3)] is None and ds[1] is None
        images, targets, skipped = collate_detection([ds[(i, 48, i)] for i in range(len(ds))])
    assert skipped == 1 and images.shape == (5, 3, 48, 48) and len(targets) == 5
    warnings = _warnings(caplog)
    assert len(warnings) == 1, "logged once per file"
    assert re.search(expected, warnings[0])


def test_subset_and_loader_with_multiscale_sampler(scenes: Path):
    ds = build_detection_dataset(scenes, "train", DetTrainTransform(48))
    part = ds.subset([4, 1], DetEvalTransform(32))
    assert len(part) == 2 and part.paths(0) == ds.paths(4) and part[1][1]["image_id"] == ds[1][1]["image_id"]
    assert part[0][0].shape == (3, 32, 32)
    with pytest.raises(IndexError):
        ds.subset([6])
    a, b = ds[(2, 40, 9)], ds[(2, 40, 9)]
    assert a[0].shape == (3, 40, 40) and torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    sampler = MultiScaleBatchSampler(len(ds), sizes=[(32, 3), (48, 3)], seed=3)
    seen = 0
    for images, targets, skipped in DataLoader(ds, batch_sampler=sampler, collate_fn=collate_detection):
        size = images.shape[-1]
        assert skipped == 0 and images.shape == (len(targets), 3, size, size) and size in (32, 48)
        for t in targets:
            assert t["boxes"].shape[1] == 4 and len(t["boxes"]) == len(t["labels"]) == len(t["iscrowd"])
            assert ((t["boxes"] >= 0) & (t["boxes"] <= size)).all() and (t["labels"] >= 1).all()
        seen += len(targets)
    assert seen == 6


# ------------------------------------------------------------------------------------------ transforms

COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}
RECTS = {1: (10, 10, 50, 40), 2: (60, 30, 120, 90), 3: (20, 60, 45, 85)}  # x1, y1, x2, y2 (end exclusive)


def rect_sample() -> tuple[torch.Tensor, dict]:
    """A 96x128 gray image with a red, a green and a blue rectangle, and their boxes."""
    image = torch.full((3, 96, 128), 128, dtype=torch.uint8)
    for label, (x1, y1, x2, y2) in RECTS.items():
        image[:, y1:y2, x1:x2] = torch.tensor(COLOURS[label], dtype=torch.uint8)[:, None, None]
    target = {
        "boxes": torch.tensor(list(RECTS.values()), dtype=torch.float32),
        "labels": torch.tensor([1, 2, 3]),
        "iscrowd": torch.tensor([0, 1, 0]),
        "area": torch.tensor([11.0, 22.0, 33.0]),
        "image_id": 17,
        "orig_size": (96, 128),
    }
    return image, target


def colour_mask(image: torch.Tensor, label: int) -> torch.Tensor:
    return ((image - torch.tensor(COLOURS[label])[:, None, None] / 255).abs() < 0.2).all(0)


def test_train_transform_boxes_follow_the_pixels():
    image, target = rect_sample()
    transform = DetTrainTransform(64, photometric=False)
    checked, cropped, dropped = 0, 0, 0
    for seed in range(30):
        out, t = transform(image, target, None, seed)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32 and 0 <= out.min() <= out.max() <= 1
        assert t["image_id"] == 17 and t["orig_size"] == (96, 128)
        labels = t["labels"].tolist()
        dropped += len(labels) < 3
        assert t["iscrowd"].tolist() == [{1: 0, 2: 1, 3: 0}[k] for k in labels]  # aligned after sanitizing
        assert t["area"].tolist() == [{1: 11.0, 2: 22.0, 3: 33.0}[k] for k in labels]
        for box, label in zip(t["boxes"].tolist(), labels, strict=True):
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            mask = colour_mask(out, label)
            ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
            inner = (xs > x1 + 3) & (xs < x2 - 3) & (ys > y1 + 3) & (ys < y2 - 3)
            outer = (xs > x1 - 3) & (xs < x2 + 3) & (ys > y1 - 3) & (ys < y2 + 3)
            assert mask[inner].all(), f"seed {seed}: box {box} of label {label} is not on its colour"
            assert not mask[~outer].any(), f"seed {seed}: colour of label {label} outside its box {box}"
            checked += int(inner.any())
        full = torch.tensor([RECTS[k] for k in labels], dtype=torch.float32) * torch.tensor([0.5, 2 / 3, 0.5, 2 / 3])
        flipped = torch.stack([64 - full[:, 2], full[:, 1], 64 - full[:, 0], full[:, 3]], 1)
        if not (torch.allclose(t["boxes"], full) or torch.allclose(t["boxes"], flipped)):
            cropped += 1
    assert checked > 40 and cropped > 5 and dropped > 0  # the IoU crop cropped and dropped boxes


def test_train_transform_flip():
    image, target = rect_sample()
    kept = DetTrainTransform(64, hflip=0.0)(image, target, None, 5)
    flipped = DetTrainTransform(64, hflip=1.0)(image, target, None, 5)
    assert torch.equal(flipped[0], kept[0].flip(-1))
    b = kept[1]["boxes"]
    assert torch.allclose(flipped[1]["boxes"], torch.stack([64 - b[:, 2], b[:, 1], 64 - b[:, 0], b[:, 3]], 1))
    assert torch.equal(flipped[1]["labels"], kept[1]["labels"])


def test_train_transform_seeded():
    image, target = rect_sample()
    t = DetTrainTransform(48)
    state = torch.get_rng_state()
    a, b = t(image, target, None, 11), t(image, target, None, 11)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(a[0], b[0]) and all(
        torch.equal(a[1][k], b[1][k]) for k in ("boxes", "labels", "iscrowd", "area")
    )
    others = [t(image, target, None, s) for s in range(12, 18)]
    assert any(not torch.equal(a[0], o[0]) for o in others)
    assert any(
        a[1]["boxes"].shape != o[1]["boxes"].shape or not torch.equal(a[1]["boxes"], o[1]["boxes"]) for o in others
    )
    out, t24 = t(image, target, 24, 11)  # the sampler's size wins
    assert out.shape == (3, 24, 24) and (t24["boxes"] <= 24).all()
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(t(image, target, None, g1)[0], t(image, target, None, g2)[0])
    pil = t(Image.fromarray(image.permute(1, 2, 0).numpy()), target, None, 11)
    assert torch.equal(pil[0], a[0]) and torch.equal(pil[1]["boxes"], a[1]["boxes"])
    assert target["boxes"].shape == (3, 4) and target["labels"].tolist() == [1, 2, 3]  # input left alone
    with pytest.raises(ValueError, match="hflip"):
        DetTrainTransform(32, hflip=2.0)


def test_eval_transform_scales_boxes():
    image = torch.zeros(3, 50, 100, dtype=torch.uint8)
    target = {
        "boxes": torch.tensor([[10.0, 5, 60, 45]]),
        "labels": torch.tensor([4]),
        "image_id": 3,
        "orig_size": (50, 100),
    }
    out, t = DetEvalTransform(64)(image, target)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert torch.allclose(t["boxes"], torch.tensor([[6.4, 6.4, 38.4, 57.6]]))
    assert t["labels"].tolist() == [4] and t["iscrowd"].tolist() == [0] and t["area"].tolist() == [2000.0]
    assert t["image_id"] == 3 and t["orig_size"] == (50, 100)
    out, t = DetEvalTransform(64)(image, target, 32)
    assert out.shape == (3, 32, 32) and torch.allclose(t["boxes"], torch.tensor([[3.2, 3.2, 19.2, 28.8]]))
    assert DetEvalTransform(320).to_dict() == {"size": 320, "interpolation": "bilinear"}


def test_collate_detection():
    t1 = {"boxes": torch.zeros(2, 4), "labels": torch.ones(2, dtype=torch.long)}
    t2 = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    images, targets, skipped = collate_detection([(torch.zeros(3, 8, 8), t1), None, (torch.ones(3, 8, 8), t2)])
    assert images.shape == (2, 3, 8, 8) and skipped == 1 and targets == [t1, t2]
    assert torch.equal(images[1], torch.ones(3, 8, 8))
    images, targets, skipped = collate_detection([None, None])
    assert images.shape == (0, 3, 0, 0) and targets == [] and skipped == 2
    with pytest.raises(ValueError, match="different sizes"):
        collate_detection([(torch.zeros(3, 8, 8), t1), (torch.zeros(3, 4, 4), t2)])
