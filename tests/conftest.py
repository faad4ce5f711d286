"""Shared fixtures: reference models from peer libraries (test-only dependencies) with random weights."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mobilevit.data.datasets import FASHION_MNIST_DIR

VARIANT_HF = {  # Hugging Face config fields of the three variants
    "mobilevit_xxs": dict(hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], expand_ratio=2.0),
    "mobilevit_xs": dict(hidden_sizes=[96, 120, 144], neck_hidden_sizes=[16, 32, 48, 64, 80, 96, 384]),
    "mobilevit_s": dict(hidden_sizes=[144, 192, 240], neck_hidden_sizes=[16, 32, 64, 96, 128, 160, 640]),
}

#: tests that read the real Fashion-MNIST (the Debian package) and are skipped without it
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="needs the Debian package dataset-fashion-mnist"
)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every tensor random, well-scaled values (incl. BN statistics) so outputs differ per class."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if _is_norm_weight(model, name) else 0.0))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
    return model.eval()


def _is_norm_weight(model: nn.Module, key: str) -> bool:
    module_name, _, param = key.rpartition(".")
    module = model.get_submodule(module_name)
    return param == "weight" and isinstance(module, (nn.BatchNorm2d, nn.LayerNorm))


@pytest.fixture(scope="session")
def timm_model():
    """``timm_model(name)`` -> a random-weight timm MobileViT in eval mode."""
    timm = pytest.importorskip("timm")
    return lambda name, seed=0: randomize(timm.create_model(name), seed)


@pytest.fixture(scope="session")
def hf_model():
    """``hf_model(name)`` -> a random-weight transformers MobileViTForImageClassification (BGR input)."""
    transformers = pytest.importorskip("transformers")

    def build(name: str, seed: int = 0, **kw):
        cfg = transformers.MobileViTConfig(**VARIANT_HF[name], num_labels=kw.pop("num_labels", 1000), **kw)
        return randomize(transformers.MobileViTForImageClassification(cfg), seed)

    return build


IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist(root: Path, n_train: int = 12, n_test: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST-like IDX files: gzip-compressed images, plain labels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
        data[prefix] = images, labels
    return data


def save_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
