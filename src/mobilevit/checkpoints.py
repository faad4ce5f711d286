"""Reading and writing MobileViT checkpoints of every ecosystem, with format auto-detection.

Readers never execute pickled code: ``.safetensors`` files go through safetensors and everything
else through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import VARIANTS, MobileViTConfig
from .layouts import CHANNEL_ORDER, LAYOUTS, OPTIONAL_SUFFIXES, expected_keys, flip_stem_channels, from_ours, to_ours
from .model import MobileViT

FORMAT_NAME = "mobilevit"
FORMAT_VERSION = "1"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A file that is not a usable MobileViT checkpoint; the message says why and what to do."""


@dataclass
class Checkpoint:
    """A checkpoint converted to our names, stem in RGB order, with the config it implies."""

    state_dict: dict[str, Tensor]
    layout: str
    config: MobileViTConfig
    arch: str | None
    meta: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike, layout: str | None = None) -> Checkpoint:
    """Read any supported checkpoint: our format, timm, ml-cvnets, Hugging Face dir, mmpretrain.

    ``layout`` forces a layout instead of detecting it from the keys.
    """
    path = Path(path)
    raw, meta, hf_config = _read_raw(path)
    if layout is None:
        layout = FORMAT_NAME if meta.get("format") == FORMAT_NAME else detect_layout(raw, path)
    elif layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    config = MobileViTConfig.from_dict(json.loads(meta["config"])) if "config" in meta else None
    depths = config.transformer_depths if config else (2, 4, 3)
    _check_keys(raw, layout, depths, path)
    state = to_ours(raw, layout, depths)
    if CHANNEL_ORDER[layout] == "BGR":
        state = flip_stem_channels(state)
    arch = meta.get("arch") or infer_arch(state)
    if config is None:
        if arch is None:
            raise CheckpointError(f"{path}: MobileViT keys, but tensor shapes match none of {sorted(VARIANTS)}")
        config = VARIANTS[arch].replace(num_classes=_num_classes(state), **_hf_overrides(hf_config))
    extra = {k: json.loads(v) for k, v in meta.items() if k not in _HEADER_KEYS and layout == FORMAT_NAME}
    if hf_config and "id2label" in hf_config:
        labels = [hf_config["id2label"][str(i)] for i in range(len(hf_config["id2label"]))]
        if not all(lbl.startswith("LABEL_") for lbl in labels):
            extra["categories"] = labels
    return Checkpoint(state, layout, config, arch, extra)


def detect_layout(state: dict[str, Tensor], source: str | os.PathLike = "checkpoint") -> str:
    """Name of the layout whose keys best match ``state``; a clear error when none does."""
    keys = set(state)
    scores = {name: len(keys & set(expected_keys(name))) for name in LAYOUTS}
    best = max(scores, key=scores.get)
    if scores[best] == 0:
        sample = ", ".join(sorted(keys)[:5])
        raise CheckpointError(
            f"{source} is not a MobileViT v1 checkpoint: none of its {len(keys)} keys ({sample}, ...) belong to any "
            f"known layout ({', '.join(LAYOUTS)})"
        )
    return best


def _check_keys(state: dict[str, Tensor], layout: str, depths: tuple[int, ...], source: Path) -> None:
    want = expected_keys(layout, depths)
    missing = [k for k in want if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in set(want)]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} looks like a {layout} MobileViT checkpoint but its keys differ: "
            f"{len(missing)} missing {_few(missing)}, {len(unexpected)} unexpected {_few(unexpected)}"
        )


def _few(keys: list[str], n: int = 6) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


def _num_classes(state: dict[str, Tensor]) -> int:
    return state["fc.weight"].shape[0] if "fc.weight" in state else 0


@functools.cache
def _variant_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MobileViT(VARIANTS[arch])
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_arch(state: dict[str, Tensor]) -> str | None:
    """The standard variant whose backbone tensor shapes equal ``state``'s, if any."""
    for arch in VARIANTS:
        shapes = _variant_shapes(arch)
        if all(tuple(state[k].shape) == s for k, s in shapes.items() if k in state and not k.startswith("fc.")):
            return arch
    return None


def shape_mismatches(state: dict[str, Tensor], model_state: dict[str, Tensor]) -> list[str]:
    """Keys (classifier excluded) whose shapes differ between a checkpoint and a model."""
    return [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model_state.items()
        if not k.startswith("fc.") and k in state and state[k].shape != v.shape
    ]


def _hf_overrides(hf_config: dict[str, Any] | None) -> dict[str, Any]:
    if not hf_config:
        return {}
    out: dict[str, Any] = {}
    if "patch_size" in hf_config:
        out["patch_sizes"] = (int(hf_config["patch_size"]),) * 3
    for ours, theirs in (
        ("dropout", "hidden_dropout_prob"),
        ("attn_dropout", "attention_probs_dropout_prob"),
        ("classifier_dropout", "classifier_dropout_prob"),
    ):
        if theirs in hf_config:
            out[ours] = float(hf_config[theirs])
    return out


# --------------------------------------------------------------------------------------- reading


def _read_raw(path: Path) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Any] | None]:
    """(tensors, safetensors metadata, HF config) of a file or Hugging Face directory."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_hf_dir(path)
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        return state, meta, None
    return _unwrap(_torch_load(path), path), {}, None


def _read_hf_dir(path: Path) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Any]]:
    cfg_file = path / "config.json"
    weights = next((path / f for f in _HF_WEIGHT_FILES if (path / f).exists()), None)
    if not cfg_file.exists() or weights is None:
        raise CheckpointError(
            f"{path} is a directory but not a Hugging Face model: it needs config.json and one of {_HF_WEIGHT_FILES}"
        )
    try:
        hf_config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if hf_config.get("model_type") != "mobilevit":
        raise CheckpointError(f"{cfg_file} has model_type={hf_config.get('model_type')!r}, expected 'mobilevit'")
    state = (
        _read_safetensors(weights)[0] if weights.suffix == ".safetensors" else _unwrap(_torch_load(weights), weights)
    )
    return state, {}, hf_config


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" not in str(e).lower():
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?)") from e
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects other than tensors, which could run code. "
            f"Re-save it as a plain state dict or safetensors ({str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {e}") from e


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The state dict inside common training-checkpoint wrappers, ``module.`` prefixes removed."""
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        what = f"dict with keys {_few(sorted(map(str, obj)))}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} does not hold a state dict of tensors (found {what})")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------- writing

#: Layouts :func:`save_checkpoint` can write, with their default file name or suffix.
_HEADER_KEYS = ("format", "format_version", "config", "arch")  # our header; other keys are JSON metadata
WRITABLE = {"mobilevit": ".safetensors", "timm": ".safetensors", "cvnets": ".pt", "mmpretrain": ".pth", "hf": ""}


@contextlib.contextmanager
def atomic_path(dst: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dst``; it replaces ``dst`` only if the block succeeds."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the result the usual permissions
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(
    state_dict: dict[str, Tensor],
    config: MobileViTConfig,
    path: str | os.PathLike,
    layout: str = FORMAT_NAME,
    arch: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write our (RGB) ``state_dict`` in ``layout``; files are written atomically.

    ``mobilevit`` is one safetensors file whose header holds the config and ``meta`` (categories,
    preprocessing) as JSON. ``hf`` writes a directory with config.json and model.safetensors.
    BGR layouts (cvnets, hf, mmpretrain) get their stem flipped back to BGR.
    """
    if layout not in WRITABLE:
        raise CheckpointError(f"cannot write layout {layout!r}; choose one of {sorted(WRITABLE)}")
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if CHANNEL_ORDER[layout] == "BGR":
        state = flip_stem_channels(state)
    state = from_ours(state, layout, config.transformer_depths)
    meta = meta or {}
    if layout == "hf":
        _write_hf_dir(state, config, path, meta.get("categories"))
    elif layout in ("mobilevit", "timm") and path.suffix == ".safetensors":
        header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": json.dumps(config.to_dict())}
        header |= {"arch": arch} if arch else {}
        header |= {k: json.dumps(v) for k, v in meta.items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=header if layout == FORMAT_NAME else None)
    elif layout == FORMAT_NAME:
        raise CheckpointError(f"our format is a .safetensors file; got {path.name}")
    else:
        obj: Any = {"meta": {"converted_by": "mobilevit"}, "state_dict": state} if layout == "mmpretrain" else state
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    return path


def _write_hf_dir(state: dict[str, Tensor], config: MobileViTConfig, path: Path, categories: list[str] | None) -> None:
    if config.transformer_depths != (2, 4, 3):
        raise CheckpointError(
            f"Hugging Face MobileViT has transformer depths (2, 4, 3); this model has {config.transformer_depths}"
        )
    if len(set(config.patch_sizes)) != 1:
        raise CheckpointError(f"Hugging Face MobileViT supports one patch size; this model has {config.patch_sizes}")
    c = config
    labels = categories or [f"LABEL_{i}" for i in range(c.num_classes)]
    hf_config = {
        "architectures": ["MobileViTForImageClassification"],
        "model_type": "mobilevit",
        "num_channels": c.in_chans,
        "image_size": 256,
        "patch_size": c.patch_sizes[0],
        "hidden_sizes": list(c.transformer_dims),
        "neck_hidden_sizes": [c.stem_channels, *c.channels, c.last_channels],
        "num_attention_heads": c.num_heads,
        "mlp_ratio": c.ffn_ratio,
        "expand_ratio": float(c.expansion),
        "hidden_act": "silu",
        "conv_kernel_size": 3,
        "output_stride": 32,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.attn_dropout,
        "classifier_dropout_prob": c.classifier_dropout,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "qkv_bias": True,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with atomic_path(path / "config.json") as tmp:
        tmp.write_text(json.dumps(hf_config, indent=2))
