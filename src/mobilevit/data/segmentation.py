"""Semantic segmentation data: PASCAL VOC and images/masks folders, joint image/mask transforms, collate.

Same conventions as :mod:`mobilevit.data.datasets`: a dataset is indexed by a plain index or by a sampler key
``(index, size, aug_seed)``; the transform is then called as ``transform(image, mask, size, aug_seed)`` and
its randomness comes only from ``aug_seed``, so augmentations are reproducible whatever the worker, rank or
resumption. An item is ``(image float [3, h, w] in [0, 1] RGB, mask int64 [h, w])``; an unreadable or bad
item (corrupt file, image/mask size mismatch, class index out of range) gives ``None``, logged once with the
file name and the problem, and :func:`collate_segmentation` counts and drops it. Mask value ``255`` means
"ignore" (void) everywhere.
"""

from __future__ import annotations

import functools
import logging
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

logger = logging.getLogger("mobilevit.data")

IGNORE_INDEX = 255
VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
#: Suffixes (lower case) of mask files: lossless formats only.
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
_MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "LA", "PA")

#: ``transform(image, mask, size=None, seed=None) -> (float [3, h, w] image, int64 [h, w] mask)``.
SegTransform = Callable[..., tuple[Tensor, Tensor]]
#: What a segmentation dataset item is: the transformed pair, or None when it cannot be used.
SegItem = tuple[Tensor, Tensor] | None


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette as uint8 ``[n, 3]``: class ``k``'s colour spreads its bits over R, G, B."""
    k = np.arange(n)
    cmap = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            cmap[:, channel] |= ((k >> (3 * shift + channel)) & 1) << (7 - shift)
    return cmap.astype(np.uint8)


def open_mask(path: Path) -> np.ndarray:
    """Class indices of a mask file as an integer ``[H, W]`` array (palette indices for palette PNGs, not RGB).

    Palette, grayscale, 1-bit and 16/32-bit integer images are accepted; an RGB mask raises ``ValueError``.
    """
    if not path.exists():
        raise FileNotFoundError("no such file or directory")
    with Image.open(path) as img:
        img.load()
        if img.mode not in _MASK_MODES:
            raise ValueError(f"a {img.mode} mask: expected class indices in a palette or single-channel image")
        array = np.array(img)
    if array.ndim == 3:  # LA / PA: the index channel
        array = array[..., 0]
    return array.astype(np.uint8) if array.dtype == bool else array


def read_class_names(path: Path) -> list[str]:
    """One class name per line (index = line number); trailing blank lines ignored, blank names refused."""
    names = path.read_text(encoding="utf-8").splitlines()
    while names and not names[-1].strip():
        names.pop()
    names = [name.strip() for name in names]
    if not names:
        raise DataError(f"{path}: no class names (one name per line)")
    if not all(names):
        raise DataError(f"{path}: blank class name on line {names.index('') + 1}")
    return names


# ---------------------------------------------------------------------------------------- transforms


def _as_image(image: Image.Image | Tensor | np.ndarray) -> tv_tensors.Image:
    """A uint8 (or float) ``[3, H, W]`` image tensor; PIL images converted to RGB, grayscale broadcast."""
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a [1 or 3, H, W] image, got shape {tuple(image.shape)}")
    return tv_tensors.Image(image.expand(3, -1, -1) if image.shape[0] == 1 else image)


def _as_mask(mask: Image.Image | Tensor | np.ndarray) -> tv_tensors.Mask:
    """An integer ``[H, W]`` mask (uint8 kept, any other integer type as int64)."""
    if isinstance(mask, Image.Image):
        mask = np.array(mask)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask.astype(np.int64) if mask.dtype != np.uint8 else np.ascontiguousarray(mask))
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or mask.dtype.is_floating_point:
        raise ValueError(f"expected an integer [H, W] mask, got {mask.dtype} of shape {tuple(mask.shape)}")
    return tv_tensors.Mask(mask if mask.dtype == torch.uint8 else mask.long())


def _to_float(image: Tensor) -> Tensor:
    return TF.to_dtype(image.as_subclass(Tensor), torch.float32, scale=True)


def _as_seed(seed: int | torch.Generator | None) -> int | None:
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**62, (), generator=seed))
    return seed


def seg_to_tensor(
    image: Image.Image | Tensor, mask: Image.Image | Tensor | np.ndarray, size: int | None = None, seed: object = None
) -> tuple[Tensor, Tensor]:
    """The pair as tensors, unresized (the default transform): float ``[3, H, W]`` in [0, 1], int64 ``[H, W]``."""
    return _to_float(_as_image(image)), _as_mask(mask).as_subclass(Tensor).long()


class _RandomShortSideResize(v2.RandomResize):
    """v2.RandomResize with masks resized by centre-aligned nearest (``NEAREST_EXACT``), so that they stay on
    the image's pixel grid (plain ``NEAREST`` picks ``floor(dst * scale)``, up to half a source pixel off)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        mode = v2.InterpolationMode.NEAREST_EXACT if isinstance(inpt, tv_tensors.Mask) else self.interpolation
        return self._call_kernel(TF.resize, inpt, params["size"], interpolation=mode, antialias=self.antialias)


@functools.lru_cache(maxsize=32)
def _train_pipeline(size: int, scale: tuple[float, float], hflip: float) -> v2.Compose:
    return v2.Compose(
        [
            # shorter side uniform in [scale[0] * size, scale[1] * size]: bilinear, antialiased
            _RandomShortSideResize(max(1, round(scale[0] * size)), max(1, round(scale[1] * size)) + 1),
            v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(hflip),
        ]
    )


@dataclass(frozen=True)
class SegTrainTransform:
    """The official DeepLabv3 augmentation: random resize, random ``size`` x ``size`` crop, horizontal flip.

    The shorter side is resized to a uniform ``[scale[0], scale[1]] * size`` (bilinear with antialiasing for
    the image, centre-aligned nearest for the mask; the official 256..1024 for a 512 crop is the default
    ``(0.5, 2.0)``); where the result is smaller than the crop it is padded (image 0, mask 255 = ignore);
    then both are flipped with probability ``hflip``. Called as ``transform(image, mask, size, seed)``: ``size`` overrides
    the crop size (the sampler's per-batch size), ``seed`` (an int, or a generator to draw one from) makes
    it reproducible without touching torch's global RNG; ``None`` uses the global RNG.
    """

    size: int = 512
    scale: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"invalid scale {self.scale}: need 0 < low <= high")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}")

    def __call__(
        self,
        image: Image.Image | Tensor,
        mask: Image.Image | Tensor | np.ndarray,
        size: int | None = None,
        seed: int | torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        image, mask = _as_image(image), _as_mask(mask)
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape[-2:])} and mask {tuple(mask.shape)} sizes differ")
        pipeline = _train_pipeline(size or self.size, tuple(self.scale), self.hflip)
        seed = _as_seed(seed)
        if seed is None:
            image, mask = pipeline(image, mask)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image, mask = pipeline(image, mask)
        return _to_float(image), mask.as_subclass(Tensor).long()


@dataclass(frozen=True)
class SegEvalTransform:
    """The official evaluation input: the image resized to ``size`` x ``size`` (aspect ratio not kept, bilinear,
    antialiased as the classification eval does); the mask kept at its original size, where the prediction is
    compared (resize the logits back). ``size`` in the call overrides; ``seed`` is ignored."""

    size: int = 512

    def __call__(
        self,
        image: Image.Image | Tensor,
        mask: Image.Image | Tensor | np.ndarray,
        size: int | None = None,
        seed: object = None,
    ) -> tuple[Tensor, Tensor]:
        side = size or self.size
        image = TF.resize(_as_image(image), [side, side], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        return _to_float(image), _as_mask(mask).as_subclass(Tensor).long()


# ------------------------------------------------------------------------------------------ datasets


class SegmentationDataset(SampleView):
    """Base of the segmentation datasets: ``(image file, mask file)`` pairs, subsets, sampler keys, bad-item skipping.

    ``classes`` are the class names (index = class id); mask values must be below ``len(classes)`` or 255.
    """

    def __init__(self, samples: Sequence[tuple[Path, Path]], classes: Sequence[str], transform: SegTransform | None):
        super().__init__(len(samples), transform or seg_to_tensor)
        self.samples: list[tuple[Path, Path]] = list(samples)
        self.classes: list[str] = list(classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def paths(self, index: int) -> tuple[Path, Path]:
        """``(image file, mask file)`` of sample ``index`` (of this subset)."""
        return self.samples[int(self.indices[index])]

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Sample ``index`` (of this subset) as an RGB PIL image and its checked ``[H, W]`` class-index array;
        raises ``ValueError`` naming the file and the problem if the pair cannot be used."""
        image_path, mask_path = self.paths(index)
        try:
            image = open_image(image_path)
        except Exception as e:
            raise ValueError(f"unreadable image {image_path}: {str(e) or type(e).__name__}") from e
        try:
            mask = open_mask(mask_path)
        except Exception as e:
            raise ValueError(f"unreadable mask {mask_path}: {str(e) or type(e).__name__}") from e
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                f"{image.width}x{image.height}"
            )
        bad = (mask >= len(self.classes)) & (mask != IGNORE_INDEX)
        if bad.any():
            values = ", ".join(str(v) for v in np.unique(mask[bad])[:8].tolist())
            raise ValueError(
                f"mask {mask_path}: values {values} outside the {len(self.classes)} classes 0..{len(self.classes) - 1} "
                f"(and {IGNORE_INDEX} = ignore)"
            )
        return image, mask

    def __getitem__(self, key: int | SampleKey) -> SegItem:
        """``(float [3, h, w] image, int64 [h, w] mask)``, or None when the pair cannot be used (logged once)."""
        plain = isinstance(key, (int, np.integer))
        index, size, aug_seed = (key, None, None) if plain else key
        try:
            image, mask = self.load(index)
        except Exception as e:  # any bad pair skips this one sample, never the batch
            source = int(self.indices[index])
            self._skip(source, "segmentation sample", self.samples[source][0].stem, e)
            return None
        if plain:
            return self.transform(image, mask)
        return self.transform(image, mask, size, aug_seed)


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC layout: ``JPEGImages/{id}.jpg``, ``SegmentationClass/{id}.png`` (palette PNGs: the palette
    indices are the classes), ``ImageSets/Segmentation/{split}.txt`` (one id per line).

    Class names come from ``root/labels.txt`` when present (one name per line), else the 21 VOC classes.
    Every listed id must have its image and mask (``DataError`` naming the missing files otherwise).
    """

    def __init__(self, root: str | Path, split: str = "train", transform: SegTransform | None = None):
        self.root, self.split = Path(root), split
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(p.stem for p in split_file.parent.glob("*.txt")) if split_file.parent.is_dir() else []
            have = f" (available: {', '.join(available)})" if available else ""
            raise DataError(f"{split_file}: no such split file{have}")
        self.ids = [line.split()[0] for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not self.ids:
            raise DataError(f"{split_file}: lists no image ids")
        images = _index_dir(self.root / "JPEGImages", IMAGE_SUFFIXES, prefer=".jpg")
        masks = _index_dir(self.root / "SegmentationClass", MASK_SUFFIXES, prefer=".png")
        missing = [str(self.root / "JPEGImages" / f"{i}.jpg") for i in self.ids if i not in images]
        missing += [str(self.root / "SegmentationClass" / f"{i}.png") for i in self.ids if i not in masks]
        if missing:
            raise DataError(f"{split_file} lists {len(missing)} missing file(s): {_first(missing)}")
        labels = self.root / "labels.txt"
        classes = read_class_names(labels) if labels.is_file() else VOC_CLASSES
        super().__init__([(images[i], masks[i]) for i in self.ids], classes, transform)


class MaskFolder(SegmentationDataset):
    """``root/images/`` and ``root/masks/`` matched by file stem (relative path without suffix); masks are
    single-channel or palette images holding class indices.

    Class names come from ``labels_file`` (default ``root/labels.txt``) when it exists, else ``"0"`` ..
    ``"K-1"`` for ``num_classes=K``. An image without a mask or a mask without an image is a ``DataError``
    naming the files.
    """

    def __init__(
        self,
        root: str | Path,
        transform: SegTransform | None = None,
        num_classes: int | None = None,
        *,
        labels_file: str | Path | None = None,
    ):
        self.root = Path(root)
        for sub in ("images", "masks"):
            if not (self.root / sub).is_dir():
                raise DataError(f"{self.root}: no {sub}/ directory (expected ROOT/images/ and ROOT/masks/)")
        images = _index_dir(self.root / "images", IMAGE_SUFFIXES, recursive=True)
        masks = _index_dir(self.root / "masks", MASK_SUFFIXES, recursive=True)
        if not images:
            raise DataError(f"{self.root / 'images'}: no images ({', '.join(IMAGE_SUFFIXES)})")
        no_mask = [str(images[k]) for k in sorted(images.keys() - masks.keys())]
        no_image = [str(masks[k]) for k in sorted(masks.keys() - images.keys())]
        if no_mask or no_image:
            problems = [f"{len(no_mask)} image(s) without a mask: {_first(no_mask)}"] if no_mask else []
            problems += [f"{len(no_image)} mask(s) without an image: {_first(no_image)}"] if no_image else []
            raise DataError(f"{self.root}: " + "; ".join(problems))
        labels = Path(labels_file) if labels_file is not None else self.root / "labels.txt"
        if labels.is_file():
            classes = read_class_names(labels)
            if num_classes is not None and num_classes != len(classes):
                raise DataError(f"{labels} names {len(classes)} classes but num_classes={num_classes}")
        elif num_classes is not None and num_classes > 0:
            classes = [str(k) for k in range(num_classes)]
        else:
            raise DataError(f"{self.root}: no labels.txt (one class name per line); pass num_classes instead")
        super().__init__([(images[k], masks[k]) for k in sorted(images)], classes, transform)


def _index_dir(
    directory: Path, suffixes: Sequence[str], *, prefer: str | None = None, recursive: bool = False
) -> dict[str, Path]:
    """Files of ``directory`` with one of ``suffixes`` (any case) by stem (relative path without suffix).

    Hidden files are skipped; two files with one stem are ambiguous (``DataError``) unless one has ``prefer``.
    """
    if not directory.is_dir():
        return {}
    found: dict[str, list[Path]] = {}
    for path in directory.rglob("*") if recursive else directory.iterdir():
        rel = path.relative_to(directory)
        if path.suffix.lower() in suffixes and not any(p.startswith(".") for p in rel.parts) and path.is_file():
            found.setdefault(rel.with_suffix("").as_posix(), []).append(path)
    out = {}
    for stem, paths in found.items():
        if len(paths) > 1:
            preferred = [p for p in paths if p.suffix.lower() == prefer]
            if len(preferred) != 1:
                raise DataError(
                    f"{directory}: ambiguous files for {stem!r}: {', '.join(sorted(p.name for p in paths))}"
                )
            paths = preferred
        out[stem] = paths[0]
    return out


def _first(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _voc_root(root: Path) -> Path | None:
    """The VOC root in ``root`` (itself, ``VOC2012/`` or ``VOCdevkit/VOC2012/``), if any."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    return None


def build_segmentation_dataset(
    data: str | Path, split: str, transform: SegTransform | None = None, *, num_classes: int | None = None
) -> SegmentationDataset:
    """The ``split`` ("train", "val" or "test") of a segmentation dataset directory.

    A VOC layout (``ImageSets/Segmentation/{split}.txt``, also under ``VOC2012/`` or ``VOCdevkit/VOC2012/``;
    "test" falls back to ``val.txt`` and the other way round when only one exists), or an images/masks folder
    pair: ``data/{split}/{images,masks}`` (same fallback; ``labels.txt`` there or in ``data``) or
    ``data/{images,masks}`` for every split.
    ``num_classes`` is needed by a folder pair without ``labels.txt``; for VOC it is checked against the classes.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"{data}: no such directory (expected a VOC layout or images/ + masks/ folders)")
    candidates = [split] if split == "train" else [split, "val" if split == "test" else "test"]
    voc = _voc_root(root)
    if voc is not None:
        sets = voc / "ImageSets" / "Segmentation"
        name = next((c for c in candidates if (sets / f"{c}.txt").is_file()), split)
        if name != split:
            logger.info("no %s split in %s: using %s.txt", split, sets, name)
        dataset = VOCSegmentation(voc, name, transform)
        if num_classes is not None and num_classes != dataset.num_classes:
            raise DataError(f"{voc} has {dataset.num_classes} classes but num_classes={num_classes}")
        return dataset
    if (root / "images").is_dir() or (root / "masks").is_dir():
        return MaskFolder(root, transform, num_classes)
    if any((root / s / "images").is_dir() for s in ("train", "val", "test")):
        for name in candidates:
            if (root / name / "images").is_dir():
                labels = next((d / "labels.txt" for d in (root / name, root) if (d / "labels.txt").is_file()), None)
                return MaskFolder(root / name, transform, num_classes, labels_file=labels)
        raise DataError(f"{root}: no {' or '.join(f'{c}/images' for c in candidates)} for the {split} split")
    raise DataError(
        f"{root}: not a segmentation dataset: expected a VOC layout (ImageSets/Segmentation/{split}.txt, "
        "JPEGImages/, SegmentationClass/) or images/ + masks/ folders (optionally per split: train/images, ...)"
    )


def collate_segmentation(items: Sequence[SegItem]) -> tuple[Tensor, Tensor | list[Tensor], int]:
    """``(images [B, 3, h, w], masks, skipped)``: the usable samples stacked, and how many were None.

    ``masks`` is an int64 ``[B, h, w]`` tensor when all masks share one size, else a list of ``[h_i, w_i]``
    tensors (evaluation at the original sizes). Images must share one size (use a resizing transform).
    """
    ok = [item for item in items if item is not None]
    skipped = len(items) - len(ok)
    if not ok:
        return torch.empty(0, 3, 0, 0), torch.empty(0, 0, 0, dtype=torch.long), skipped
    shapes = {tuple(image.shape) for image, _ in ok}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)} in one batch: use a resizing transform")
    images = torch.stack([image for image, _ in ok])
    masks = [mask for _, mask in ok]
    if len({tuple(m.shape) for m in masks}) == 1:
        return images, torch.stack(masks), skipped
    return images, masks, skipped
