"""A reproducible scene dataset from Fashion-MNIST, for segmentation and detection demos without VOC or COCO.

Each scene is a ``size`` x ``size`` crop of a bundled photo (random crop, scale, flip, channel order,
brightness and contrast) with 1..4 Fashion-MNIST items pasted at random scales and places: an item's
intensity is its alpha (so its shading shows and the background shows through its dark parts) and it is
tinted a random colour. Its mask is its pixels above :data:`MASK_THRESHOLD` (class id + 1; 0 = background,
11 classes in all); later items occlude earlier ones. A placement is rejected when its box overlaps an
earlier item's box with IoU > 0.3 or would leave an earlier item less than half visible, so every item
keeps a tight box around its visible pixels.

Train and val scenes take their items from Fashion-MNIST's training split (val from its last 10 %, train
from the rest: disjoint item images), test scenes from its test split. Output, in the VOC and COCO layouts::

    OUT/JPEGImages/{split}_{i:06d}.jpg       OUT/SegmentationClass/{id}.png (palette: VOC colours)
    OUT/Annotations/{id}.xml (VOC boxes)     OUT/ImageSets/{Segmentation,Main}/{split}.txt
    OUT/annotations/instances_{split}.json   OUT/labels.txt (background + the 10 names)   OUT/scenes.json

Everything is written into a hidden temporary directory beside ``OUT`` and renamed into place at the end,
so an interrupted run leaves no half-written dataset; the same arguments give byte-identical files.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, DataError, FashionMNIST
from .segmentation import voc_colormap

SCENE_CLASSES = ["background", *FASHION_MNIST_CLASSES]
SPLITS = ("train", "val", "test")
BACKGROUNDS_DIR = Path(__file__).with_name("backgrounds")
#: Item pixels with intensity above this (in [0, 1], after resizing) are the item's mask.
MASK_THRESHOLD = 0.1
VAL_FRACTION = 0.1  # of Fashion-MNIST's training split: the last 6,000 images feed the val scenes
MAX_BOX_IOU = 0.3
MIN_VISIBLE = 0.5
JPEG_QUALITY = 95
_PLACEMENT_TRIES = 20
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


@dataclass
class SceneObject:
    """One pasted item: class (0..9), Fashion-MNIST source, tight box ``(x0, y0, x1, y1)`` (inclusive pixel
    indices) and pixel count of its visible mask."""

    label: int
    source_index: int
    box: tuple[int, int, int, int]
    area: int


# ------------------------------------------------------------------------------------------ rendering


def load_backgrounds(directory: Path = BACKGROUNDS_DIR) -> list[Image.Image]:
    """The background photos (``*.jpg``, ``*.png`` in ``directory``, sorted by name) as RGB images."""
    paths = sorted(p for p in directory.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise DataError(f"{directory}: no background photos (*.jpg, *.png); the package data is incomplete")
    photos = []
    for path in paths:
        with Image.open(path) as img:
            photos.append(img.convert("RGB"))
    return photos


def _background(rng: np.random.Generator, photos: Sequence[Image.Image], size: int) -> np.ndarray:
    """A random square crop of a photo, resized to ``size``, flipped, channel-shuffled and jittered (float32 HWC)."""
    photo = photos[int(rng.integers(len(photos)))]
    side = rng.uniform(0.35, 1.0) * min(photo.size)
    x0, y0 = rng.uniform(0, photo.width - side), rng.uniform(0, photo.height - side)
    crop = photo.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    canvas = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    canvas = canvas[:, :, rng.permutation(3)]  # a copy: writable, contiguous
    contrast, brightness = rng.uniform(0.6, 1.2), rng.uniform(0.7, 1.2)
    mean = float(canvas.mean())
    canvas *= contrast
    canvas += mean * (brightness - contrast)
    return canvas


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two inclusive pixel boxes ``(x0, y0, x1, y1)``."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``, inclusive, of the True pixels of a non-empty 2-D mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def render_scene(
    rng: np.random.Generator,
    photos: Sequence[Image.Image],
    items: np.ndarray,
    labels: np.ndarray,
    pool: range,
    *,
    size: int,
    min_items: int,
    max_items: int,
    min_scale: float,
    max_scale: float,
) -> tuple[np.ndarray, np.ndarray, list[SceneObject]]:
    """One scene: uint8 ``[size, size, 3]`` RGB image, uint8 ``[size, size]`` class mask, its objects.

    Items are drawn from ``items[pool]`` (uint8 ``[N, 28, 28]``, classes ``labels``) with all randomness from
    ``rng``; item sides are ``min_scale..max_scale`` times ``size``.
    """
    canvas = _background(rng, photos, size)
    instance = np.zeros((size, size), dtype=np.int32)  # 0 = background, k = k-th placed item
    placed: list[tuple[int, int, tuple[int, int, int, int], int]] = []  # label, source, full box, pixels
    visible = np.zeros(0, dtype=np.int64)  # visible pixels of each placed item
    for _ in range(int(rng.integers(min_items, max_items + 1))):
        source = pool[int(rng.integers(len(pool)))]
        side = max(2, round(rng.uniform(min_scale, max_scale) * size))
        item = Image.fromarray(items[source]).resize((side, side), Image.Resampling.BILINEAR)
        alpha_src = np.asarray(item, dtype=np.float32) / 255
        if rng.random() < 0.5:
            alpha_src = alpha_src[:, ::-1]
        mask = alpha_src > MASK_THRESHOLD
        tint = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.75, 1.0)), np.float32)
        opacity = rng.uniform(0.85, 1.0)
        tries = rng.integers(0, size - side + 1, size=(_PLACEMENT_TRIES, 2))
        if not mask.any():
            continue
        lx0, ly0, lx1, ly1 = _tight_box(mask)
        pixels = int(mask.sum())
        keep = visible - MIN_VISIBLE * np.array([p[3] for p in placed])  # pixels each item may still lose
        for top, left in tries.tolist():
            box = (left + lx0, top + ly0, left + lx1, top + ly1)
            if any(_box_iou(box, other[2]) > MAX_BOX_IOU for other in placed):
                continue
            if placed:
                lost = np.bincount(instance[top : top + side, left : left + side][mask], minlength=len(placed) + 1)
                if (lost[1:] > keep).any():
                    continue
                visible -= lost[1:]
            alpha = (opacity * np.clip(alpha_src / 0.35, 0, 1))[:, :, None]
            colour = tint * 255 * (0.3 + 0.7 * alpha_src[:, :, None])
            region = canvas[top : top + side, left : left + side]
            region *= 1 - alpha
            region += colour * alpha
            instance[top : top + side, left : left + side][mask] = len(placed) + 1
            placed.append((int(labels[source]), source, box, pixels))
            visible = np.append(visible, pixels)
            break
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    class_of = np.array([0] + [label + 1 for label, *_ in placed], dtype=np.uint8)
    objects = []
    for k, (label, source, (x0, y0, x1, y1), pixels) in enumerate(placed, start=1):
        if visible[k - 1] >= MIN_VISIBLE * pixels:  # guaranteed by the placement test; kept as the rule
            bx0, by0, bx1, by1 = _tight_box(instance[y0 : y1 + 1, x0 : x1 + 1] == k)
            objects.append(SceneObject(label, source, (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1), int(visible[k - 1])))
    return image, class_of[instance], objects


# -------------------------------------------------------------------------------------------- writing


def _voc_xml(image_id: str, size: int, objects: Sequence[SceneObject]) -> bytes:
    """VOC detection annotation: boxes 1-based inclusive (xmin = x0 + 1, xmax = x1 + 1)."""
    parts = [
        "<annotation>\n  <folder>JPEGImages</folder>\n",
        f"  <filename>{escape(image_id)}.jpg</filename>\n",
        "  <source>\n    <database>Fashion-MNIST scenes</database>\n  </source>\n",
        f"  <size>\n    <width>{size}</width>\n    <height>{size}</height>\n    <depth>3</depth>\n  </size>\n",
        "  <segmented>1</segmented>\n",
    ]
    for obj in objects:
        x0, y0, x1, y1 = (v + 1 for v in obj.box)
        parts.append(
            f"  <object>\n    <name>{escape(FASHION_MNIST_CLASSES[obj.label])}</name>\n"
            "    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n    <difficult>0</difficult>\n"
            f"    <bndbox>\n      <xmin>{x0}</xmin>\n      <ymin>{y0}</ymin>\n"
            f"      <xmax>{x1}</xmax>\n      <ymax>{y1}</ymax>\n    </bndbox>\n  </object>\n"
        )
    parts.append("</annotation>\n")
    return "".join(parts).encode()


def _item_pools(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray, range]]:
    """``split -> (images, labels, pool of indices)`` for the scene splits."""
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST not found: {root} is not a directory. Install the Debian package "
            "dataset-fashion-mnist (`apt-get install -y dataset-fashion-mnist`, files in "
            f"{FASHION_MNIST_DIR}) or pass the directory holding its IDX files"
        )
    try:
        train, test = FashionMNIST(root, "train"), FashionMNIST(root, "test")
    except DataError as e:
        raise DataError(
            f"{e}. The scene generator needs Fashion-MNIST's train and test IDX files: install the Debian "
            "package dataset-fashion-mnist or pass the directory holding them"
        ) from e
    n_val = max(1, round(len(train) * VAL_FRACTION))
    if len(train) <= n_val or not len(test):
        raise DataError(f"{root}: too few Fashion-MNIST images ({len(train)} train, {len(test)} test) for scenes")
    train_images, train_labels = train.images.numpy(), np.asarray(train.targets)
    return {
        "train": (train_images, train_labels, range(0, len(train) - n_val)),
        "val": (train_images, train_labels, range(len(train) - n_val, len(train))),
        "test": (test.images.numpy(), np.asarray(test.targets), range(len(test))),
    }


def generate_scenes(
    out_dir: str | Path,
    *,
    num_train: int = 2000,
    num_val: int = 500,
    num_test: int = 1000,
    size: int = 128,
    min_items: int = 1,
    max_items: int = 4,
    min_scale: float = 0.2,
    max_scale: float = 0.6,
    seed: int = 0,
    fashion_mnist_dir: str | Path | None = None,
    progress: bool | None = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the scene dataset to ``out_dir`` (VOC and COCO layouts, see the module doc); return a summary.

    ``min_scale`` / ``max_scale``: item side (the 28 px image) as a fraction of ``size`` (defaults: 26..77 px
    at 128). Scene ``i`` of a split depends only on ``(seed, split, i)`` and the arguments that shape scenes.
    ``progress``: a tqdm bar (None: only on a terminal). An existing non-empty ``out_dir`` is an error unless
    ``overwrite``. The summary: ``out_dir``, ``size``, ``seed``, ``classes``, per split ``scenes`` / ``objects``
    / ``items_from``, ``seconds``.
    """
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if any(n < 0 for n in counts.values()) or not sum(counts.values()):
        raise ValueError(f"scene counts must be >= 0 and not all 0, got {counts}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    if not 1 <= min_items <= max_items:
        raise ValueError(f"need 1 <= min_items <= max_items, got {min_items}, {max_items}")
    if not 0 < min_scale <= max_scale <= 1 or max_scale * size < 4:
        raise ValueError(f"need 0 < min_scale <= max_scale <= 1 (item side / size), got {min_scale}, {max_scale}")
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not empty: remove it, choose another directory or overwrite it")
    start = time.perf_counter()
    pools = _item_pools(Path(fashion_mnist_dir) if fashion_mnist_dir is not None else FASHION_MNIST_DIR)
    photos = load_backgrounds()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        (tmp / "annotations").mkdir()
        palette = voc_colormap().tobytes()
        shape = dict(min_items=min_items, max_items=max_items, min_scale=min_scale, max_scale=max_scale)
        categories = [
            {"id": k + 1, "name": name, "supercategory": "fashion"} for k, name in enumerate(SCENE_CLASSES[1:])
        ]
        image_id = annotation_id = 0
        splits: dict[str, dict[str, Any]] = {}
        with tqdm(
            total=sum(counts.values()), desc="scenes", unit="scene", disable=None if progress is None else not progress
        ) as bar:
            for split in SPLITS:
                if not counts[split]:
                    continue
                images, labels, pool = pools[split]
                ids, coco_images, coco_annotations = [], [], []
                per_class = [0] * len(FASHION_MNIST_CLASSES)
                for i in range(counts[split]):
                    rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
                    picture, mask, objects = render_scene(rng, photos, images, labels, pool, size=size, **shape)
                    name = f"{split}_{i:06d}"
                    Image.fromarray(picture).save(tmp / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY)
                    mask_image = Image.fromarray(mask)
                    mask_image.putpalette(palette)
                    mask_image.save(tmp / "SegmentationClass" / f"{name}.png")
                    (tmp / "Annotations" / f"{name}.xml").write_bytes(_voc_xml(name, size, objects))
                    image_id += 1
                    ids.append(name)
                    coco_images.append({"id": image_id, "file_name": f"{name}.jpg", "width": size, "height": size})
                    for obj in objects:
                        annotation_id += 1
                        x0, y0, x1, y1 = obj.box
                        coco_annotations.append(
                            {
                                "id": annotation_id,
                                "image_id": image_id,
                                "category_id": obj.label + 1,
                                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                                "area": obj.area,
                                "iscrowd": 0,
                                "source_split": "test" if split == "test" else "train",
                                "source_index": obj.source_index,
                            }
                        )
                        per_class[obj.label] += 1
                    bar.update()
                coco = {
                    "info": {"description": f"Fashion-MNIST scenes, {split} split", "version": "1"},
                    "licenses": [],
                    "images": coco_images,
                    "annotations": coco_annotations,
                    "categories": categories,
                }
                (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco) + "\n")
                listing = "".join(f"{name}\n" for name in ids)
                (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(listing)
                (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text(listing)
                source = "test" if split == "test" else "train"
                splits[split] = {
                    "scenes": len(ids),
                    "objects": len(coco_annotations),
                    "objects_per_class": dict(zip(FASHION_MNIST_CLASSES, per_class, strict=True)),
                    "items_from": f"fashion-mnist {source}[{pool.start}:{pool.stop}]",
                }
        (tmp / "labels.txt").write_text("".join(f"{name}\n" for name in SCENE_CLASSES), encoding="utf-8")
        meta = {"size": size, "seed": seed, **shape, "classes": SCENE_CLASSES, "splits": splits}
        (tmp / "scenes.json").write_text(json.dumps(meta, indent=1) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": str(out), **meta, "seconds": round(time.perf_counter() - start, 2)}


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, replacing an existing ``target`` (removed only once ``new`` is in place)."""
    if not target.exists():
        new.rename(target)
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        new.rename(target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    target.rename(old)
    new.rename(target)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
