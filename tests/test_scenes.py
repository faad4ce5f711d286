"""The Fashion-MNIST scene generator: VOC and COCO layouts readable by the loaders, consistency, determinism."""

from __future__ import annotations

import gzip
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import idx_bytes, needs_fashion_mnist
from mobilevit.data import scenes
from mobilevit.data.datasets import FASHION_MNIST_CLASSES, DataError
from mobilevit.data.scenes import SCENE_CLASSES, generate_scenes
from mobilevit.data.segmentation import SegTrainTransform, VOCSegmentation, build_segmentation_dataset

N_TRAIN, N_TEST = 100, 30
COUNTS = {"train": 10, "val": 4, "test": 6}


def blob_images(n: int, seed: int) -> np.ndarray:
    """Fashion-MNIST-like items: bright ellipses with a darker interior pattern on black, uint8 [n, 28, 28]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:28, :28]
    out = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        cy, cx, ry, rx = rng.uniform(11, 17), rng.uniform(11, 17), rng.uniform(5, 13), rng.uniform(4, 13)
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        out[i][inside] = rng.integers(60, 256, inside.sum())
    return out


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    for prefix, n, seed in (("train", N_TRAIN, 1), ("t10k", N_TEST, 2)):
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(blob_images(n, seed))))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes((np.arange(n) % 10).astype(np.uint8)))
    return root


def make(out: Path, mnist: Path, **kw) -> dict:
    args = dict(num_train=COUNTS["train"], num_val=COUNTS["val"], num_test=COUNTS["test"], size=64)
    return generate_scenes(out, **{**args, **kw}, fashion_mnist_dir=mnist, progress=False)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory, mnist: Path) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "out"
    make(root, mnist)
    return root


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_summary(tmp_path: Path, mnist: Path):
    summary = make(tmp_path / "o", mnist)
    root = tmp_path / "o"
    assert summary["out_dir"] == str(root) and summary["classes"] == SCENE_CLASSES
    assert {k: v["scenes"] for k, v in summary["splits"].items()} == COUNTS
    assert (root / "labels.txt").read_text().splitlines() == ["background", *FASHION_MNIST_CLASSES]
    for split, n in COUNTS.items():
        ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert ids == [f"{split}_{i:06d}" for i in range(n)]
        assert (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split() == ids
        for name in ids:
            for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png"), ("Annotations", "xml")):
                assert (root / sub / f"{name}.{ext}").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["o"], "no temporary directory left behind"
    assert json.loads((root / "scenes.json").read_text())["splits"] == summary["splits"]


def test_voc_loader_reads_scenes(out: Path):
    for split, n in COUNTS.items():
        ds = build_segmentation_dataset(out, split)
        assert isinstance(ds, VOCSegmentation) and len(ds) == n and ds.classes == SCENE_CLASSES
    ds = VOCSegmentation(out, "train", SegTrainTransform(48))
    for i in range(len(ds)):
        image, mask = ds[(i, 48, i)]
        assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
        assert set(mask.unique().tolist()) <= set(range(11)) | {255}
    with Image.open(ds.paths(0)[1]) as png:
        assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]  # VOC colours
    image, mask = VOCSegmentation(out, "val")[0]
    assert image.shape == (3, 64, 64) and (mask > 0).any()


def coco(out: Path, split: str) -> dict:
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def test_coco_structure_and_pycocotools(out: Path):
    ids = set()
    for split, n in COUNTS.items():
        data = coco(out, split)
        assert len(data["images"]) == n
        assert [c["id"] for c in data["categories"]] == list(range(1, 11))
        assert [c["name"] for c in data["categories"]] == FASHION_MNIST_CLASSES
        image_ids = {im["id"] for im in data["images"]}
        assert len(image_ids) == n and not ids & image_ids
        ids |= image_ids
        for im in data["images"]:
            assert (out / "JPEGImages" / im["file_name"]).is_file() and im["width"] == im["height"] == 64
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids) and data["annotations"]
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            assert a["image_id"] in image_ids and 1 <= a["category_id"] <= 10 and a["iscrowd"] == 0
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
            assert 0 < a["area"] <= w * h
    try:
        from pycocotools.coco import COCO
    except ImportError:
        return
    api = COCO(str(out / "annotations" / "instances_train.json"))
    assert len(api.getImgIds()) == COUNTS["train"] and len(api.getCatIds()) == 10


def test_masks_match_boxes_and_xml(out: Path):
    for split in COUNTS:
        data = coco(out, split)
        by_image: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for im in data["images"]:
            name = im["file_name"].removesuffix(".jpg")
            with Image.open(out / "SegmentationClass" / f"{name}.png") as png:
                mask = np.array(png)
            anns = by_image.get(im["id"], [])
            assert set(np.unique(mask).tolist()) - {0} == {a["category_id"] for a in anns}
            for a in anns:
                x, y, w, h = a["bbox"]
                inside = mask[y : y + h, x : x + w] == a["category_id"]
                # tight: the item reaches every edge of its box; its visible pixels are all inside it
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                assert inside.sum() >= a["area"]
            root = ET.parse(out / "Annotations" / f"{name}.xml").getroot()
            assert root.findtext("filename") == f"{name}.jpg" and root.findtext("size/width") == "64"
            voc_boxes = sorted(
                (
                    FASHION_MNIST_CLASSES.index(o.findtext("name")) + 1,
                    *(int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")),
                )
                for o in root.iter("object")
            )
            assert all(o.findtext("difficult") == "0" for o in root.iter("object"))
            coco_boxes = sorted(
                (
                    a["category_id"],
                    a["bbox"][0] + 1,
                    a["bbox"][1] + 1,
                    a["bbox"][0] + a["bbox"][2],
                    a["bbox"][1] + a["bbox"][3],
                )
                for a in anns
            )
            assert voc_boxes == coco_boxes  # VOC: 1-based inclusive; COCO: 0-based x, y, w, h


def test_item_sources_disjoint(out: Path):
    n_val = round(N_TRAIN * scenes.VAL_FRACTION)
    sources = {
        split: {(a["source_split"], a["source_index"]) for a in coco(out, split)["annotations"]} for split in COUNTS
    }
    assert all(s == "train" and i < N_TRAIN - n_val for s, i in sources["train"])
    assert all(s == "train" and i >= N_TRAIN - n_val for s, i in sources["val"])
    assert all(s == "test" and i < N_TEST for s, i in sources["test"])
    labels = np.arange(N_TRAIN) % 10
    for a in coco(out, "train")["annotations"]:
        assert a["category_id"] == labels[a["source_index"]] + 1


def test_deterministic(tmp_path: Path, mnist: Path, out: Path):
    make(tmp_path / "again", mnist)
    assert files_of(tmp_path / "again") == files_of(out)
    make(tmp_path / "other", mnist, seed=1)
    other = files_of(tmp_path / "other")
    assert (
        other.keys() == files_of(out).keys()
        and other["JPEGImages/train_000000.jpg"] != files_of(out)["JPEGImages/train_000000.jpg"]
    )
    # a scene depends on (seed, split, index), not on the other counts
    make(tmp_path / "fewer", mnist, num_train=3, num_val=1, num_test=1)
    assert (
        files_of(tmp_path / "fewer")["SegmentationClass/val_000000.png"]
        == files_of(out)["SegmentationClass/val_000000.png"]
    )


def test_existing_output_and_interruption(tmp_path: Path, mnist: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "o"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        make(target, mnist)
    assert (target / "keep.txt").read_text() == "mine"
    make(target, mnist, num_train=2, num_val=1, num_test=1, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "JPEGImages" / "train_000001.jpg").is_file()

    calls = {"n": 0}
    render = scenes.render_scene

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return render(*args, **kw)

    monkeypatch.setattr(scenes, "render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "cut", mnist)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"], "nothing half-written left"


def test_missing_fashion_mnist(tmp_path: Path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        generate_scenes(tmp_path / "o", fashion_mnist_dir=tmp_path / "nowhere", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        generate_scenes(tmp_path / "o", fashion_mnist_dir=tmp_path / "empty", progress=False)
    assert not (tmp_path / "o").exists()


def test_bad_arguments(tmp_path: Path, mnist: Path):
    for kw in (dict(num_train=-1), dict(min_items=3, max_items=2), dict(min_scale=0.7, max_scale=0.5), dict(seed=-1)):
        with pytest.raises(ValueError):
            make(tmp_path / "o", mnist, **kw)


@needs_fashion_mnist
def test_real_fashion_mnist(tmp_path: Path):
    summary = generate_scenes(tmp_path / "o", num_train=8, num_val=4, num_test=4, progress=False)
    assert summary["splits"]["val"]["items_from"] == "fashion-mnist train[54000:60000]"
    image, mask = VOCSegmentation(tmp_path / "o", "test")[0]
    assert image.shape == (3, 128, 128) and mask.dtype == torch.int64 and (mask > 0).sum() > 50
