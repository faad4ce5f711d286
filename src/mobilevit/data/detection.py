"""Object detection data: COCO and PASCAL VOC layouts, box-aware transforms, collate.

Same conventions as :mod:`mobilevit.data.segmentation`: a dataset is indexed by a plain index or by a sampler
key ``(index, size, aug_seed)``; the transform is then called as ``transform(image, target, size, aug_seed)``
and its randomness comes only from ``aug_seed``, so augmentations are reproducible whatever the worker, rank or
resumption. An item is ``(image, target)``: a float ``[3, h, w]`` RGB image in [0, 1] and a dict

* ``boxes``: float32 ``[n, 4]`` ``x1, y1, x2, y2`` in pixels of the transformed image (``x2``, ``y2``
  exclusive: a box of one pixel at ``(0, 0)`` is ``[0, 0, 1, 1]``),
* ``labels``: int64 ``[n]`` in ``1..K`` (0 is the background: ``classes[0] == "background"``),
* ``image_id``: int (the COCO image id; for VOC the 0-based position of the id in the split file),
* ``orig_size``: ``(h, w)`` of the image file,
* ``iscrowd``: int64 ``[n]``, 1 for boxes that evaluation ignores (COCO crowds, VOC ``difficult`` objects),
* ``area``: float32 ``[n]``, the annotation's area in original pixels (COCO's ``area``, else the box area).

Annotations are read and checked when the dataset is built: unknown categories, dangling image ids, missing
files and malformed XML are a :class:`~mobilevit.data.datasets.DataError` naming the file and the entry; boxes
partly outside the image are clipped to it; empty or non-finite boxes are dropped, counted
(``dataset.dropped_boxes``) and logged once. An image that cannot be decoded at load time (or whose size
differs from the annotation's) gives ``None``, logged once, and :func:`collate_detection` counts and drops it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from .datasets import IMAGE_SUFFIXES, DataError, SampleView, open_image
from .sampler import SampleKey
from .segmentation import VOC_CLASSES, _as_image, _as_seed, _first, _index_dir, _to_float, read_class_names

logger = logging.getLogger("mobilevit.data")

BACKGROUND = "background"
_BACKGROUND_NAMES = ("background", "__background__")

#: ``dataset[i]``'s target: ``boxes``, ``labels``, ``image_id``, ``orig_size``, ``iscrowd``, ``area``.
DetTarget = dict[str, Any]
#: ``transform(image, target, size=None, seed=None) -> (float [3, h, w] image, target)``.
DetTransform = Callable[..., tuple[Tensor, DetTarget]]
#: What a detection dataset item is: the transformed pair, or None when the image cannot be used.
DetItem = tuple[Tensor, DetTarget] | None


def with_background(names: Sequence[str]) -> list[str]:
    """Detection class names: ``names`` with ``"background"`` in front unless it already starts with one."""
    names = [str(name).strip() for name in names]
    if names and names[0].lower() in _BACKGROUND_NAMES:
        return names
    return [BACKGROUND, *names]


# ---------------------------------------------------------------------------------------- transforms


def _target_tensors(target: DetTarget, canvas: tuple[int, int]) -> dict[str, Tensor]:
    """The per-box entries of ``target`` as tensors: XYXY ``BoundingBoxes`` on ``canvas`` (h, w) and the rest."""
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    labels = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
    iscrowd = torch.as_tensor(target.get("iscrowd", torch.zeros(n)), dtype=torch.int64).reshape(-1)
    area = target.get("area")
    area = (boxes[:, 2:] - boxes[:, :2]).prod(1) if area is None else torch.as_tensor(area, dtype=torch.float32)
    if not len(labels) == len(iscrowd) == len(area.reshape(-1)) == n:
        raise ValueError(f"{n} boxes but {len(labels)} labels, {len(iscrowd)} iscrowd, {area.numel()} areas")
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=canvas),
        "labels": labels,
        "iscrowd": iscrowd,
        "area": area.reshape(-1).float(),
    }


def _finish(image: Tensor, boxes: dict[str, Tensor], target: DetTarget) -> tuple[Tensor, DetTarget]:
    """Float image in [0, 1] and ``target`` with its per-box entries replaced by plain tensors."""
    out = dict(target)
    out.update({k: v.as_subclass(Tensor).contiguous() for k, v in boxes.items()})
    return _to_float(image), out


def det_to_tensor(
    image: Image.Image | Tensor, target: DetTarget, size: int | None = None, seed: object = None
) -> tuple[Tensor, DetTarget]:
    """The pair unresized (the default transform): float ``[3, H, W]`` image in [0, 1], target as tensors."""
    image = _as_image(image)
    return _finish(image, _target_tensors(target, tuple(image.shape[-2:])), target)


def _box_fields(inputs: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``labels_getter`` of SanitizeBoundingBoxes: the tensors that follow the boxes (dropped with them)."""
    fields = inputs[1]
    return fields["labels"], fields["iscrowd"], fields["area"]


@functools.lru_cache(maxsize=32)
def _train_pipeline(size: int, hflip: float, iou_crop: bool, photometric: bool) -> v2.Compose:
    steps: list[v2.Transform] = [v2.RandomPhotometricDistort()] if photometric else []
    if iou_crop:
        steps.append(v2.RandomIoUCrop())
    steps += [
        v2.RandomHorizontalFlip(hflip),
        v2.Resize((size, size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.SanitizeBoundingBoxes(labels_getter=_box_fields),
    ]
    return v2.Compose(steps)


@dataclass(frozen=True)
class DetTrainTransform:
    """The SSD augmentation (torchvision's reference recipe): photometric distortion, SSD IoU crop, horizontal
    flip, resize to ``size`` x ``size`` (aspect ratio not kept, bilinear, antialiased), then boxes smaller than a
    pixel or cropped away are removed with their labels, ``iscrowd`` and ``area`` (normal augmentation, not
    logged; ``area`` stays the original annotation's).

    Called as ``transform(image, target, size, seed)``: ``size`` overrides the output size (the sampler's
    per-batch size), ``seed`` (an int, or a generator to draw one from) makes it reproducible without
    touching torch's global RNG; ``None`` uses the global RNG.
    """

    size: int = 320
    hflip: float = 0.5
    iou_crop: bool = True
    photometric: bool = True

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}")

    def __call__(
        self,
        image: Image.Image | Tensor,
        target: DetTarget,
        size: int | None = None,
        seed: int | torch.Generator | None = None,
    ) -> tuple[Tensor, DetTarget]:
        image = _as_image(image)
        fields = _target_tensors(target, tuple(image.shape[-2:]))
        pipeline = _train_pipeline(size or self.size, self.hflip, self.iou_crop, self.photometric)
        seed = _as_seed(seed)
        if seed is None:
            image, fields = pipeline(image, fields)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image, fields = pipeline(image, fields)
        return _finish(image, fields, target)


@dataclass(frozen=True)
class DetEvalTransform:
    """The official evaluation input: resized to ``size`` x ``size`` (aspect ratio not kept, bilinear,
    antialiased), boxes scaled with it. ``size`` in the call overrides; ``seed`` is ignored."""

    size: int = 320

    def __call__(
        self, image: Image.Image | Tensor, target: DetTarget, size: int | None = None, seed: object = None
    ) -> tuple[Tensor, DetTarget]:
        side = size or self.size
        image = _as_image(image)
        fields = _target_tensors(target, tuple(image.shape[-2:]))
        image = TF.resize(image, [side, side], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        fields["boxes"] = TF.resize(fields["boxes"], [side, side])
        return _finish(image, fields, target)

    def to_dict(self) -> dict[str, int | str]:
        return {"size": self.size, "interpolation": "bilinear"}


# ------------------------------------------------------------------------------------------ datasets


@dataclass
class DetectionRecord:
    """One image and its checked boxes in original pixels (``x1, y1, x2, y2``, clipped, non-empty)."""

    path: Path
    image_id: int
    size: tuple[int, int]  # (h, w) the annotation gives
    boxes: np.ndarray  # float32 [n, 4]
    labels: np.ndarray  # int64 [n], 1..K
    iscrowd: np.ndarray  # int64 [n]
    area: np.ndarray  # float32 [n]


def _clip_boxes(boxes: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes clipped to the w x h image, kept: finite and non-empty, changed by clipping)``."""
    finite = np.isfinite(boxes).all(1)
    safe = np.where(finite[:, None], boxes, 0.0)
    clipped = safe.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, w)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, h)
    keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, keep, keep & (clipped != safe).any(1)


class _RecordBuilder:
    """Clips the boxes of each image, drops (and remembers) the degenerate ones, counts the clipped ones."""

    def __init__(self) -> None:
        self.records: list[DetectionRecord] = []
        self.dropped: list[str] = []
        self.clipped = 0

    def add(
        self,
        path: Path,
        image_id: int,
        size: tuple[int, int],
        objects: Sequence[tuple[str, Sequence[float], int, int, float]],
    ) -> None:
        """``objects``: ``(entry name for messages, x1 y1 x2 y2, label, iscrowd, area or nan)``."""
        boxes = np.array([o[1] for o in objects], dtype=np.float64).reshape(-1, 4)
        boxes, keep, changed = _clip_boxes(boxes, *size)
        self.dropped += [o[0] for o, k in zip(objects, keep.tolist(), strict=True) if not k]
        self.clipped += int(changed.sum())
        area = np.array([o[4] for o in objects], dtype=np.float64).reshape(-1)
        box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        area = np.where(np.isfinite(area) & (area > 0), area, box_area)
        self.records.append(
            DetectionRecord(
                path=path,
                image_id=int(image_id),
                size=(int(size[0]), int(size[1])),
                boxes=boxes[keep].astype(np.float32),
                labels=np.array([o[2] for o in objects], dtype=np.int64).reshape(-1)[keep],
                iscrowd=np.array([o[3] for o in objects], dtype=np.int64).reshape(-1)[keep],
                area=area[keep].astype(np.float32),
            )
        )

    def report(self, source: Path) -> None:
        if self.dropped:
            logger.warning(
                "%s: dropped %d degenerate box(es) (empty once clipped to the image, or not finite): %s",
                source,
                len(self.dropped),
                _first(self.dropped),
            )


def _header_size(path: Path) -> tuple[int, int]:
    """``(h, w)`` of an image file from its header (no decoding)."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except Exception as e:
        raise DataError(f"{path}: cannot read the image size ({str(e) or type(e).__name__})") from e


class DetectionDataset(SampleView):
    """Base of the detection datasets: checked records, subsets, sampler keys, bad-image skipping.

    ``classes`` are the class names, ``classes[0] == "background"``, objects labelled ``1..len(classes) - 1``;
    ``dropped_boxes`` / ``clipped_boxes`` count the annotations dropped as degenerate / clipped to the image.
    """

    def __init__(
        self, records: Sequence[DetectionRecord], classes: Sequence[str], transform: DetTransform | None, **counts: int
    ):
        super().__init__(len(records), transform or det_to_tensor)
        self.records: list[DetectionRecord] = list(records)
        self.classes: list[str] = list(classes)
        self.dropped_boxes: int = counts.get("dropped_boxes", 0)
        self.clipped_boxes: int = counts.get("clipped_boxes", 0)

    @property
    def num_classes(self) -> int:
        """Classes including the background: the detector's ``num_classes``."""
        return len(self.classes)

    def record(self, index: int) -> DetectionRecord:
        """The record of sample ``index`` (of this subset): file, image id, size and boxes in original pixels."""
        return self.records[int(self.indices[index])]

    def paths(self, index: int) -> Path:
        """The image file of sample ``index`` (of this subset)."""
        return self.record(index).path

    def load(self, index: int) -> tuple[Image.Image, DetTarget]:
        """Sample ``index`` (of this subset) as an RGB PIL image and its target in original pixels; raises
        ``ValueError`` naming the file if the image cannot be decoded or its size is not the annotation's."""
        rec = self.record(index)
        try:
            image = open_image(rec.path)
        except Exception as e:
            raise ValueError(f"unreadable image {rec.path}: {str(e) or type(e).__name__}") from e
        if (image.height, image.width) != rec.size:
            raise ValueError(
                f"image {rec.path} is {image.width}x{image.height} but its annotation says {rec.size[1]}x{rec.size[0]}"
            )
        target = {
            "boxes": torch.from_numpy(rec.boxes.copy()),
            "labels": torch.from_numpy(rec.labels.copy()),
            "image_id": rec.image_id,
            "orig_size": rec.size,
            "iscrowd": torch.from_numpy(rec.iscrowd.copy()),
            "area": torch.from_numpy(rec.area.copy()),
        }
        return image, target

    def __getitem__(self, key: int | SampleKey) -> DetItem:
        """``(float [3, h, w] image, target)``, or None when the image cannot be used (logged once)."""
        plain = isinstance(key, (int, np.integer))
        index, size, aug_seed = (key, None, None) if plain else key
        try:
            image, target = self.load(index)
        except Exception as e:  # a bad image skips this one sample, never the batch
            source = int(self.indices[index])
            self._skip(source, "detection sample", self.records[source].path.name, e)
            return None
        if plain:
            return self.transform(image, target)
        return self.transform(image, target, size, aug_seed)


def _load_coco(path: Path) -> dict[str, Any]:
    """The checked top level of a COCO annotation file, read with pycocotools (its prints silenced)."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise DataError(f"{path}: no such COCO annotation file")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            data = COCO(str(path)).dataset
    except Exception as e:
        raise DataError(f"{path}: not a readable COCO annotation file ({type(e).__name__}: {e})") from e
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise DataError(f"{path}: no {key!r} list (a COCO detection file needs images and categories)")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"{path}: 'annotations' is not a list")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(path: Path, what: str, entries: list[str]) -> DataError:
    return DataError(f"{path}: {len(entries)} {what}: {_first(entries)}")


class CocoDetection(DetectionDataset):
    """A COCO detection file (``instances_*.json``) and its images.

    Category ids map to labels ``1..K`` in increasing id order (``category_ids[label - 1]`` is the COCO id),
    ``classes`` is ``["background", *names]``. Images without annotations are kept. ``image_dir`` is the
    directory that ``file_name`` is relative to, or a sequence of candidates: the first holding the first
    listed image is used. Everything is checked here (unknown category or image ids, malformed boxes,
    missing image files: ``DataError``); boxes ``[x, y, w, h]`` become ``x1, y1, x2, y2``, clipped to the
    image; empty ones are dropped and counted.
    """

    def __init__(
        self,
        image_dir: str | Path | Sequence[str | Path],
        annotation_file: str | Path,
        transform: DetTransform | None = None,
    ):
        self.annotation_file = path = Path(annotation_file)
        data = _load_coco(path)
        names: dict[int, str] = {}
        for k, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
                raise DataError(f"{path}: categories[{k}] needs an integer 'id' and a 'name', got {cat!r}")
            if cat["id"] in names:
                raise DataError(f"{path}: category id {cat['id']} appears twice")
            names[cat["id"]] = cat["name"]
        self.category_ids: list[int] = sorted(names)
        label_of = {cid: k for k, cid in enumerate(self.category_ids, start=1)}

        images = data["images"]
        position: dict[int, int] = {}
        for k, im in enumerate(images):
            ok = isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)
            if not ok:
                raise DataError(f"{path}: images[{k}] needs an integer 'id' and a 'file_name', got {im!r}")
            if im["id"] in position:
                raise DataError(f"{path}: image id {im['id']} appears twice (images[{position[im['id']]}], [{k}])")
            position[im["id"]] = k
        dirs = [Path(image_dir)] if isinstance(image_dir, (str, Path)) else [Path(d) for d in image_dir]
        if not dirs:
            raise ValueError("no image directory given")
        self.image_dir = next((d for d in dirs if (d / images[0]["file_name"]).is_file()), dirs[0])
        files = [self.image_dir / im["file_name"] for im in images]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{path}: {len(missing)} of {len(images)} image files missing: {_first(missing)}")

        per_image: list[list[tuple[str, Sequence[float], int, int, float]]] = [[] for _ in images]
        unknown_image, unknown_category, bad = [], [], []
        for k, ann in enumerate(data.get("annotations", [])):
            aid = ann.get("id", f"#{k}") if isinstance(ann, dict) else f"#{k}"
            if not isinstance(ann, dict):
                bad.append(f"annotations[{k}] is not an object")
                continue
            image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
            if not isinstance(image_id, int) or image_id not in position:
                unknown_image.append(f"annotation {aid} (image_id {image_id!r})")
            elif not isinstance(category_id, int) or category_id not in label_of:
                unknown_category.append(f"annotation {aid} (category_id {category_id!r})")
            elif not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                bad.append(f"annotation {aid} (bbox {bbox!r})")
            else:
                x, y, w, h = (float(v) for v in bbox)
                area = ann.get("area")
                per_image[position[image_id]].append(
                    (
                        f"annotation {aid}",
                        (x, y, x + w, y + h),
                        label_of[category_id],
                        int(bool(ann.get("iscrowd", 0))),
                        float(area) if _is_number(area) else math.nan,
                    )
                )
        if unknown_image:
            raise _problem(path, "annotation(s) with an image_id not in 'images'", unknown_image)
        if unknown_category:
            known = ", ".join(str(c) for c in self.category_ids[:20])
            raise _problem(path, f"annotation(s) with an unknown category_id (known: {known})", unknown_category)
        if bad:
            raise _problem(path, "annotation(s) without a numeric bbox [x, y, w, h]", bad)

        builder = _RecordBuilder()
        for im, file, objects in zip(images, files, per_image, strict=True):
            h, w = im.get("height"), im.get("width")
            size = (int(h), int(w)) if _is_number(h) and _is_number(w) and h > 0 and w > 0 else _header_size(file)
            builder.add(file, im["id"], size, objects)
        builder.report(path)
        classes = [BACKGROUND, *(names[cid] for cid in self.category_ids)]
        super().__init__(
            builder.records,
            classes,
            transform,
            dropped_boxes=len(builder.dropped),
            clipped_boxes=builder.clipped,
        )


def _xml_number(obj: ET.Element, tag: str, xml: Path, k: int) -> float:
    text = obj.findtext(f"bndbox/{tag}")
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{xml}: object {k} has no numeric bndbox/{tag} (got {text!r})") from None


def _parse_voc_xml(
    xml: Path, label_of: dict[str, int], image: Path
) -> tuple[tuple[int, int], list[tuple[str, Sequence[float], int, int, float]]]:
    """``((h, w), objects)`` of a VOC annotation file; boxes 1-based inclusive -> 0-based ``[x1, x2)``."""
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{xml}: malformed XML ({e})") from e
    try:
        size = int(float(root.findtext("size/height", ""))), int(float(root.findtext("size/width", "")))
    except (ValueError, OverflowError):
        size = (0, 0)
    if min(size) <= 0:
        size = _header_size(image)
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in label_of:
            known = ", ".join(list(label_of)[:25])
            raise DataError(f"{xml}: object {k} has unknown class name {name!r} (known: {known})")
        xmin, ymin, xmax, ymax = (_xml_number(obj, tag, xml, k) for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true")
        entry = f"{xml.name} object {k}"
        objects.append((entry, (xmin - 1, ymin - 1, xmax, ymax), label_of[name], int(difficult), math.nan))
    return size, objects


class VOCDetection(DetectionDataset):
    """PASCAL VOC detection layout: ``ImageSets/Main/{split}.txt`` (one id per line), ``Annotations/{id}.xml``,
    ``JPEGImages/{id}.jpg``.

    Class names: ``classes`` when given, else ``root/labels.txt`` (one per line, as for segmentation), else
    the 20 VOC classes; ``"background"`` is put in front unless the list starts with it. VOC boxes are 1-based
    inclusive pixel indices: ``x1 = xmin - 1``, ``y1 = ymin - 1``, ``x2 = xmax``, ``y2 = ymax`` (0-based, end
    exclusive, as COCO's ``x + w``; width ``xmax - xmin + 1`` pixels). ``difficult`` objects are kept with
    ``iscrowd = 1``, so that evaluation ignores them (neither matched nor missed). ``image_id`` is the position
    of the id in the split file. Every file is read and checked here (``DataError`` naming the file).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: DetTransform | None = None,
        classes: Sequence[str] | None = None,
    ):
        self.root, self.split = Path(root), split
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(p.stem for p in split_file.parent.glob("*.txt")) if split_file.parent.is_dir() else []
            have = f" (available: {', '.join(available)})" if available else ""
            raise DataError(f"{split_file}: no such split file{have}")
        self.ids = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not self.ids:
            raise DataError(f"{split_file}: lists no image ids")
        images = _index_dir(self.root / "JPEGImages", IMAGE_SUFFIXES, prefer=".jpg")
        xmls = {i: self.root / "Annotations" / f"{i}.xml" for i in self.ids}
        missing = [str(self.root / "JPEGImages" / f"{i}.jpg") for i in self.ids if i not in images]
        missing += [str(x) for x in xmls.values() if not x.is_file()]
        if missing:
            raise DataError(f"{split_file} lists {len(missing)} missing file(s): {_first(missing)}")
        labels = self.root / "labels.txt"
        if classes is None:
            classes = read_class_names(labels) if labels.is_file() else VOC_CLASSES
        names = with_background(classes)
        label_of = {name: k for k, name in enumerate(names) if k > 0}
        builder = _RecordBuilder()
        for position, i in enumerate(self.ids):
            size, objects = _parse_voc_xml(xmls[i], label_of, images[i])
            builder.add(images[i], position, size, objects)
        builder.report(self.root / "Annotations")
        super().__init__(
            builder.records, names, transform, dropped_boxes=len(builder.dropped), clipped_boxes=builder.clipped
        )


# ------------------------------------------------------------------------------------------ building


def _coco_file(annotations: Path, split: str) -> Path | None:
    """``instances_{split}.json``, else the one ``instances_{split}<year>.json`` (e.g. ``instances_val2017``)."""
    exact = annotations / f"instances_{split}.json"
    if exact.is_file():
        return exact
    dated = sorted(p for p in annotations.glob(f"instances_{split}[0-9]*.json") if p.is_file())
    return dated[0] if len(dated) == 1 else None


def _voc_detection_root(root: Path, split: str) -> Path | None:
    """The VOC root with ``ImageSets/Main/{split}.txt``: ``root``, ``VOC2012/``, ``VOC2007/`` or under ``VOCdevkit/``."""
    for base in (root, root / "VOCdevkit"):
        for candidate in (base, base / "VOC2012", base / "VOC2007"):
            if (candidate / "ImageSets" / "Main" / f"{split}.txt").is_file():
                return candidate
    return None


def build_detection_dataset(
    data: str | Path, split: str, transform: DetTransform | None = None
) -> CocoDetection | VOCDetection:
    """The ``split`` ("train", "val" or "test") of a detection dataset directory.

    COCO: ``data/annotations/instances_{split}.json`` (or ``instances_{split}2017.json``), images in
    ``data/{split}``, ``data/images/{split}``, ``data/JPEGImages`` or ``data`` (the first holding the first
    listed ``file_name``). VOC: ``ImageSets/Main/{split}.txt`` in ``data``, ``VOC2012/``, ``VOC2007/`` or
    ``VOCdevkit/VOC20xx/``. COCO wins when both exist; "test" falls back to "val" and the other way round.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"{data}: no such directory (expected a COCO or VOC detection layout)")
    candidates = [split] if split == "train" else [split, "val" if split == "test" else "test"]
    for name in candidates:
        json_file = _coco_file(root / "annotations", name)
        if json_file is not None:
            if name != split:
                logger.info("no %s split in %s: using %s", split, root / "annotations", json_file.name)
            stem = json_file.stem.removeprefix("instances_")
            dirs = [root / stem, root / "images" / stem, root / name, root / "images" / name, root / "JPEGImages", root]
            return CocoDetection(list(dict.fromkeys(d for d in dirs if d.is_dir())), json_file, transform)
        voc = _voc_detection_root(root, name)
        if voc is not None:
            if name != split:
                logger.info("no %s split in %s: using %s.txt", split, voc / "ImageSets" / "Main", name)
            return VOCDetection(voc, name, transform)
    raise DataError(
        f"{root}: not a detection dataset for the {split} split: looked for COCO "
        f"{root / 'annotations' / f'instances_{split}.json'} and VOC ImageSets/Main/{split}.txt (in {root}, "
        "VOC2012/, VOC2007/ or VOCdevkit/VOC20xx/)"
    )


def loss_target(target: DetTarget) -> dict[str, Tensor]:
    """A target's boxes and labels for the loss: crowd (COCO) / difficult (VOC) boxes only count in evaluation."""
    keep = torch.as_tensor(target["iscrowd"]) == 0 if "iscrowd" in target else slice(None)
    return {"boxes": target["boxes"][keep], "labels": target["labels"][keep]}


def collate_detection(items: Sequence[DetItem]) -> tuple[Tensor, list[DetTarget], int]:
    """``(images [B, 3, h, w], targets, skipped)``: the usable samples, their targets, how many were None.

    Images must share one size (use a resizing transform); targets stay a list of dicts (boxes per image vary).
    """
    ok = [item for item in items if item is not None]
    skipped = len(items) - len(ok)
    if not ok:
        return torch.empty(0, 3, 0, 0), [], skipped
    shapes = {tuple(image.shape) for image, _ in ok}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)} in one batch: use a resizing transform")
    return torch.stack([image for image, _ in ok]), [target for _, target in ok], skipped
