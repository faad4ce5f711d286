"""Known pretrained weights, their metadata, and download into a local checksummed cache."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from ..data.transforms import EvalTransform
from .io import atomic_path

_CVNETS_URL = "https://docs-assets.developer.apple.com/ml-research/models/cvnets/classification/{file}"


@cache
def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names, in index order."""
    return resources.files(__package__).joinpath("imagenet_classes.txt").read_text().splitlines()


@dataclass(frozen=True)
class Weights:
    """A published checkpoint: where it lives and how to use it (torchvision-style metadata)."""

    name: str
    arch: str
    url: str
    sha256: str | None = None
    layout: str = "cvnets"
    num_classes: int = 1000
    transform: EvalTransform = field(default_factory=EvalTransform)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def categories(self) -> list[str]:
        return imagenet_categories() if self.num_classes == 1000 else []

    def transforms(self) -> EvalTransform:
        """The preprocessing these weights were evaluated with."""
        return self.transform


WEIGHTS: dict[str, Weights] = {
    w.name: w
    for w in (
        Weights("mobilevit_xxs.cvnets_in1k", "mobilevit_xxs", _CVNETS_URL.format(file="mobilevit_xxs.pt"),
                metrics={"imagenet-1k/top1": 69.0, "imagenet-1k/top5": 88.9}),
        Weights("mobilevit_xs.cvnets_in1k", "mobilevit_xs", _CVNETS_URL.format(file="mobilevit_xs.pt"),
                metrics={"imagenet-1k/top1": 74.7, "imagenet-1k/top5": 92.3}),
        Weights("mobilevit_s.cvnets_in1k", "mobilevit_s", _CVNETS_URL.format(file="mobilevit_s.pt"),
                metrics={"imagenet-1k/top1": 78.3, "imagenet-1k/top5": 94.1}),
    )
}  # fmt: skip


def list_weights(arch: str | None = None) -> list[str]:
    """Names of known pretrained weights, optionally only those of one architecture."""
    return [n for n, w in WEIGHTS.items() if arch is None or w.arch == arch]


def get_weights(name: str) -> Weights:
    """Metadata of a known checkpoint, e.g. ``"mobilevit_s.cvnets_in1k"``."""
    if name not in WEIGHTS:
        raise KeyError(f"unknown weights {name!r}; known: {', '.join(WEIGHTS)}")
    return WEIGHTS[name]


def cache_dir() -> Path:
    """``$MOBILEVIT_CACHE`` or ``~/.cache/mobilevit``."""
    return Path(os.environ.get("MOBILEVIT_CACHE", Path.home() / ".cache" / "mobilevit"))


def resolve_url(weights: Weights) -> str:
    """The URL to fetch; ``$MOBILEVIT_WEIGHTS_MIRROR`` (a base URL) replaces the host for offline mirrors."""
    mirror = os.environ.get("MOBILEVIT_WEIGHTS_MIRROR")
    if not mirror:
        return weights.url
    return mirror.rstrip("/") + "/" + urllib.parse.urlparse(weights.url).path.rsplit("/", 1)[-1]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, sha256: str | None = None, *, dest_dir: Path | None = None, progress: bool = True) -> Path:
    """Download ``url`` into the cache (once) and verify its SHA-256.

    With no published checksum the first download's hash is recorded next to the file and later
    uses are checked against it. A mismatch deletes the download and raises.
    """
    dest_dir = dest_dir or cache_dir()
    dest = dest_dir / Path(urllib.parse.urlparse(url).path).name
    recorded = dest.with_name(dest.name + ".sha256")
    expected = sha256 or (recorded.read_text().strip() if recorded.exists() else None)
    if not dest.exists():
        try:
            with urllib.request.urlopen(url) as response, atomic_path(dest) as tmp, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(
                f"could not download {url}: {e}. Download the file yourself and give its local path as the weights, "
                "or set MOBILEVIT_WEIGHTS_MIRROR to a base URL (e.g. file:///data/weights/) holding it"
            ) from e
    actual = sha256_file(dest)
    if expected is None:
        warnings.warn(f"{dest.name} has no published checksum; recorded sha256 {actual} for later checks", stacklevel=2)
        recorded.write_text(actual + "\n")
    elif actual != expected:
        dest.unlink()
        raise ValueError(f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}; the file was removed")
    return dest


def fetch_weights(weights: Weights, progress: bool = True) -> Path:
    """Local path of ``weights``, downloading them into the cache first if needed."""
    return download(resolve_url(weights), weights.sha256, progress=progress)


__all__ = ["WEIGHTS", "Weights", "download", "fetch_weights", "get_weights", "imagenet_categories", "list_weights"]
