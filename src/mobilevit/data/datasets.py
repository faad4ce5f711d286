"""Training data: Fashion-MNIST and image-folder datasets, seeded augmentations, skipping collate.

A dataset is indexed by a plain index or by a sampler key ``(index, size, aug_seed)``: the transform is then
called as ``transform(image, size, generator)`` with a generator seeded by ``aug_seed``, so augmentations are
reproducible whatever the worker, rank or resumption. Unreadable images give ``None`` (logged once), which
:func:`collate` counts and leaves out.
"""

from __future__ import annotations

import copy
import functools
import gzip
import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from .sampler import SampleKey
from .transforms import apply_auto_augment, auto_augment, random_seed

logger = logging.getLogger("mobilevit.data")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fashionmnist")
#: File suffixes (lower case) of the images that :class:`ImageFolder` picks up.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
INTERPOLATIONS = ("bilinear", "bicubic")

#: ``transform(image, size, generator)``: a PIL image or uint8 ``[C, H, W]`` tensor to a float ``[3, h, w]`` one.
Transform = Callable[..., Tensor]

_ATTEMPTS = 10  # RandomResizedCrop tries before falling back to a centre crop
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A dataset that cannot be used (missing, empty or corrupt files); the message says why and what to do."""


# --------------------------------------------------------------------------------------------- files


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed, as a native-endian array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: IDX file {problem} ({len(raw)} bytes, expected {expected} for shape {shape})")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: Path, stamp: tuple[int, int]) -> np.ndarray:
    return read_idx(path)


def open_image(path: Path) -> Image.Image:
    """Fully decode ``path`` as an RGB image, applying its EXIF orientation."""
    if not path.exists():
        raise FileNotFoundError("no such file or directory")
    if path.is_dir():
        raise IsADirectoryError("is a directory")
    with Image.open(path) as img:
        img.load()  # decode now: truncated or corrupt data raises here, not later
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")


def split_holdout(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` at random (seeded) into sorted train and validation indices."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * val_fraction)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


# ---------------------------------------------------------------------------------------- transforms


def _as_uint8_chw(image: Image.Image | Tensor) -> Tensor:
    """A PIL image as a uint8 ``[3, H, W]`` tensor; tensors (``[1|3, H, W]``, uint8 or float) pass through."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a [1 or 3, H, W] image tensor, got shape {tuple(image.shape)}")
    return image


def _resize(image: Tensor, size: tuple[int, int] | None, interpolation: str) -> Tensor:
    """A ``[1|3, H, W]`` tensor resized to ``size`` as float ``[3, h, w]`` in [0, 1] (grayscale broadcast)."""
    x = image.float().div_(255) if image.dtype == torch.uint8 else image.float()
    if size is not None and tuple(x.shape[-2:]) != size:
        # antialias: PIL's filters (for bilinear, they only differ when downscaling)
        antialias = interpolation == "bicubic" or x.shape[-2] > size[0] or x.shape[-1] > size[1]
        x = F.interpolate(x[None], size=size, mode=interpolation, align_corners=False, antialias=antialias)[0]
        if interpolation == "bicubic":
            x = x.clamp_(0, 1)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")


def to_tensor(image: Image.Image | Tensor, size: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The image as a float ``[3, H, W]`` tensor in [0, 1], unresized (the default transform)."""
    return _resize(_as_uint8_chw(image), None, "bilinear")


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop to a square ``size`` and horizontal flip, as a float ``[3, size, size]`` tensor in [0, 1].

    Crops cover a ``scale`` fraction of the area with aspect ratio in ``ratio`` (log-uniform); ``hflip`` is
    the flip probability. With probability ``erase``, a rectangle of the result (``erase_scale`` of its area,
    aspect ratio in ``erase_ratio``, log-uniform) is then filled with uniform noise (random erasing, Zhong et
    al. 2017; gray noise for grayscale images). ``auto_augment``, torchvision's ``"randaugment"``
    (``randaugment_ops`` operations of magnitude ``randaugment_magnitude``, 0..30) or ``"trivialaugment"``, is
    applied to the resized crop before erasing (timm's order), its choices following a seed drawn from
    ``generator``. Randomness comes only from ``generator`` (torch's global RNG when it is None). Accepts a PIL
    image or a ``[1|3, H, W]`` tensor (uint8, or float in [0, 1]); grayscale is broadcast to RGB (an expanded
    view when nothing was erased or augmented: stack or clone it before writing in place).
    """

    size: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bilinear"
    erase: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 1 / 3)
    erase_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    auto_augment: str = "none"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    _augment: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        _check_interpolation(self.interpolation)
        augment = auto_augment(self.auto_augment, self.randaugment_ops, self.randaugment_magnitude)
        object.__setattr__(self, "_augment", augment)
        for name in ("scale", "erase_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"invalid {name} {(lo, hi)}: need 0 < low <= high <= 1")
        for name in ("ratio", "erase_ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"invalid {name} {(lo, hi)}: need 0 < low <= high")
        if not 0 <= self.erase <= 1:
            raise ValueError(f"erase is a probability in [0, 1], got {self.erase}")

    def crop_box(self, height: int, width: int, uniforms: Sequence[float]) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a crop of a ``height x width`` image from ``4 * _ATTEMPTS`` uniforms in [0, 1)."""
        box = _random_box(height, width, self.scale, self.ratio, uniforms)
        if box is not None:
            return box
        # no luck: the whole image, centre-cropped to the nearest allowed aspect ratio
        h, w = height, width
        if width / height < self.ratio[0]:
            h = round(width / self.ratio[0])
        elif width / height > self.ratio[1]:
            w = round(height * self.ratio[1])
        return (height - h) // 2, (width - w) // 2, h, w

    def plan(
        self, height: int, width: int, channels: int, size: int | None = None, generator: torch.Generator | None = None
    ) -> AugmentPlan:
        """Every random choice of the augmentation of one ``channels x height x width`` image, drawn from ``generator``
        in a fixed order (crop and flip, the auto-augment seed, erasing): :meth:`__call__` and the batched
        :mod:`mobilevit.data.device` path draw the same plan for the same seed."""
        uniforms = torch.rand(4 * _ATTEMPTS + 1, generator=generator).tolist()
        side = size or self.size
        plan = AugmentPlan(self.crop_box(height, width, uniforms), uniforms[-1] < self.hflip, side)
        if self._augment is not None:
            plan.augment_seed = random_seed(generator)
        if self.erase and torch.rand(1, generator=generator).item() < self.erase:
            box = _random_box(
                side, side, self.erase_scale, self.erase_ratio, torch.rand(4 * _ATTEMPTS, generator=generator).tolist()
            )
            if box is not None:
                plan.erase_box = box
                plan.erase_noise = torch.rand(channels, box[2], box[3], generator=generator)
        return plan

    def augment(self, image: Tensor, seed: int) -> Tensor:
        """The auto-augmentation (on) of a float ``[C, H, W]`` image in [0, 1], its choices following ``seed``."""
        return apply_auto_augment(self._augment, image, seed)

    def __call__(
        self, image: Image.Image | Tensor, size: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        image = _as_uint8_chw(image)
        plan = self.plan(image.shape[-2], image.shape[-1], image.shape[0], size, generator)
        top, left, h, w = plan.crop
        crop = image[:, top : top + h, left : left + w]
        if plan.flip:
            crop = crop.flip(-1)
        out = _resize(crop, (plan.size, plan.size), self.interpolation)
        if plan.augment_seed is not None:  # on the crop's own channels (one for grayscale), then broadcast again
            augmented = self.augment(out[: crop.shape[0]], plan.augment_seed)
            out = augmented.expand(3, -1, -1) if augmented.shape[0] == 1 else augmented
        if plan.erase_box is not None:
            top, left, h, w = plan.erase_box
            out = out.clone()  # may be an expanded grayscale view
            out[:, top : top + h, left : left + w] = plan.erase_noise
        return out


@dataclass
class AugmentPlan:
    """The random choices of :class:`TrainTransform` for one image: crop ``(top, left, h, w)``, mirroring, output
    ``size``, the seed of its auto-augmentation (None: off) and the erased box with its noise ``[C, h, w]``."""

    crop: tuple[int, int, int, int]
    flip: bool
    size: int
    augment_seed: int | None = None
    erase_box: tuple[int, int, int, int] | None = None
    erase_noise: Tensor | None = None


def _random_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], uniforms: Sequence[float]
) -> tuple[int, int, int, int] | None:
    """``(top, left, h, w)`` of a random box of ``scale`` x the area and aspect ratio in ``ratio`` (log-uniform),
    from ``4 * _ATTEMPTS`` uniforms in [0, 1); None when no attempt fits."""
    area, (lo, hi) = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(_ATTEMPTS):
        u_area, u_ratio, u_top, u_left = uniforms[4 * k : 4 * k + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(lo + (hi - lo) * u_ratio)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    return None


# ------------------------------------------------------------------------------------------ datasets


class SampleView(Dataset):
    """A view of a dataset's samples: the positions ``indices`` in its full list, a transform, subsets that
    share the list (nothing is read or scanned again) and a warning once per sample that cannot be used.

    The base of every dataset here: classification, segmentation and detection.
    """

    def __init__(self, num_samples: int, transform: Any):
        self.indices = np.arange(num_samples)
        self.transform = transform
        self._warned: set[int] = set()

    def subset(self, indices: Sequence[int], transform: Any = None) -> Self:
        """The samples at ``indices`` (positions in this dataset), read with ``transform`` (default: this one's)."""
        picked = np.asarray(indices, dtype=np.int64).reshape(-1)
        if picked.size and not (picked.min() >= 0 and picked.max() < len(self)):
            raise IndexError(f"indices out of range for a dataset of {len(self)} samples")
        part = copy.copy(self)
        part.indices = self.indices[picked]
        part.transform = transform or self.transform
        part._warned = set()
        return part

    def __len__(self) -> int:
        return len(self.indices)

    def _skip(self, source: int, what: str, name: str, error: Exception) -> None:
        """Log once that sample ``source`` (of the full list) is skipped and why."""
        if source not in self._warned:
            self._warned.add(source)
            logger.warning("skipping %s %s: %s", what, name, str(error) or type(error).__name__)


class ImageDataset(SampleView):
    """Base of the classification datasets: labels, transform calls and unreadable-image skipping.

    Subclasses set ``classes`` and implement ``_load`` and ``_describe`` on indices of the full dataset
    (and ``_pixels`` where a faster, equivalent input for the transform exists).
    """

    classes: list[str]

    def __init__(self, labels: Sequence[int] | np.ndarray, transform: Transform | None):
        super().__init__(len(labels), transform or to_tensor)
        self.targets: list[int] = np.asarray(labels).tolist()

    def subset(self, indices: Sequence[int], transform: Transform | None = None) -> Self:
        part = super().subset(indices, transform)
        part.targets = [self.targets[i] for i in np.asarray(indices, dtype=np.int64).reshape(-1).tolist()]
        return part

    def load(self, index: int) -> Image.Image:
        """Sample ``index`` (of this subset) as a decoded RGB PIL image; raises if it cannot be read."""
        return self._load(int(self.indices[index]))

    def __getitem__(self, key: int | SampleKey) -> tuple[Tensor, int] | None:
        """``(float [3, H, W] tensor, label)``, or None when the image cannot be read (logged once)."""
        plain = isinstance(key, (int, np.integer))
        index, size, aug_seed = (key, None, None) if plain else key
        source = int(self.indices[index])
        try:
            image = self._pixels(source)
        except Exception as e:  # any decoder failure skips this one image, never the batch
            self._skip(source, "unreadable image", self._describe(source), e)
            return None
        if plain:
            return self.transform(image), self.targets[index]
        return self.transform(image, size, torch.Generator().manual_seed(aug_seed)), self.targets[index]

    def in_memory(self) -> Tensor | None:
        """This subset's images as one uint8 ``[N, C, H, W]`` tensor when the dataset holds them in memory, else None
        (see :mod:`mobilevit.data.device`)."""
        return None

    def _pixels(self, source: int) -> Image.Image | Tensor:
        return self._load(source)

    def _load(self, source: int) -> Image.Image:
        raise NotImplementedError

    def _describe(self, source: int) -> str:
        raise NotImplementedError


class FashionMNIST(ImageDataset):
    """Fashion-MNIST (10 classes, 28x28 grayscale, 60k train / 10k test), held in memory as uint8.

    ``load`` gives RGB PIL images; ``__getitem__`` hands the transform the equivalent uint8 ``[1, 28, 28]``
    tensor (no PIL round trip), which the transforms of this module broadcast to RGB.
    """

    def __init__(
        self,
        root: str | Path = FASHION_MNIST_DIR,
        split: str = "train",
        transform: Transform | None = None,
    ):
        if split not in ("train", "test"):
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        self.root, self.split = Path(root), split
        prefix = "train" if split == "train" else "t10k"
        images = _read_idx_cached(*_idx_file(self.root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx_cached(*_idx_file(self.root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
            raise DataError(f"{self.root}: {split} images {images.shape} and labels {labels.shape} do not match")
        if labels.size and not 0 <= labels.min() <= labels.max() < len(FASHION_MNIST_CLASSES):
            raise DataError(f"{self.root}: {split} labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
        self.classes = list(FASHION_MNIST_CLASSES)
        self.images = torch.from_numpy(images)
        super().__init__(labels, transform)

    def in_memory(self) -> Tensor:
        return self.images[torch.from_numpy(self.indices)][:, None]

    def _pixels(self, source: int) -> Tensor:
        return self.images[source][None]

    def _load(self, source: int) -> Image.Image:
        return Image.fromarray(self.images[source].numpy()).convert("RGB")

    def _describe(self, source: int) -> str:
        return f"{self.root} {self.split} #{source}"


def _idx_file(root: Path, name: str) -> tuple[Path, tuple[int, int]]:
    """The plain or ``.gz`` IDX file ``name`` in ``root`` and its (mtime, size) stamp for caching."""
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            stat = path.stat()
            return path, (stat.st_mtime_ns, stat.st_size)
    raise DataError(
        f"Fashion-MNIST file {name}[.gz] not found in {root}: install the dataset with "
        "`apt-get install -y dataset-fashion-mnist`, or pass --data DIR with the IDX files"
    )


class ImageFolder(ImageDataset):
    """Images in ``root/<class>/**/<file>``: classes are the sorted subdirectory names.

    Files with an image suffix (any case) are found recursively; hidden files and directories are ignored.
    """

    def __init__(self, root: str | Path, transform: Transform | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such directory")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.samples: list[tuple[Path, int]] = [
            (path, label) for label, name in enumerate(self.classes) for path in _find_images(self.root / name)
        ]
        if not self.samples:
            raise DataError(
                f"{self.root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class subdirectories ROOT/CLASS/FILE"
            )
        super().__init__([label for _, label in self.samples], transform)

    def _load(self, source: int) -> Image.Image:
        return open_image(self.samples[source][0])

    def _describe(self, source: int) -> str:
        return str(self.samples[source][0])


def _find_images(directory: Path) -> list[Path]:
    found = (p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(directory).parts))


def data_location(name_or_path: str | Path) -> Path:
    """The directory that a ``data`` option names: ``"fashion-mnist"`` is the Debian package's, a path is itself."""
    if str(name_or_path).lower() in FASHION_MNIST_NAMES:
        return FASHION_MNIST_DIR
    return Path(name_or_path).expanduser().resolve()


def build_dataset(
    name_or_path: str | Path, split: str, transform: Transform | None = None
) -> FashionMNIST | ImageFolder:
    """The ``split`` ("train", "val" or "test") of ``"fashion-mnist"``, of a directory of IDX files or of an
    image folder (its ``train/`` and ``val/`` or ``test/`` subdirectories when it has them)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    mnist_split = "train" if split == "train" else "test"
    if str(name_or_path).lower() in FASHION_MNIST_NAMES:
        return FashionMNIST(data_location(name_or_path), mnist_split, transform)
    root = Path(name_or_path).expanduser()
    if not root.is_dir():
        raise DataError(f"{name_or_path}: not a directory, nor a known dataset ({', '.join(FASHION_MNIST_NAMES)})")
    if any((root / f"{p}-images-idx3-ubyte{gz}").is_file() for p in ("train", "t10k") for gz in ("", ".gz")):
        return FashionMNIST(root, mnist_split, transform)
    candidates = ["train"] if split == "train" else [split, "val" if split == "test" else "test"]
    if any((root / d).is_dir() for d in ("train", "val", "test")):
        for name in candidates:
            if (root / name).is_dir():
                return ImageFolder(root / name, transform)
        raise DataError(f"{root}: no {' or '.join(candidates)} subdirectory for the {split} split")
    return ImageFolder(root, transform)


def collate(items: Sequence[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor, int]:
    """``(images, labels, skipped)``: the readable samples stacked, and how many were unreadable (None)."""
    ok = [item for item in items if item is not None]
    if not ok:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(items)
    images = torch.stack([image for image, _ in ok])
    return images, torch.tensor([label for _, label in ok], dtype=torch.long), len(items) - len(ok)
