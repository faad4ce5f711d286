"""Reading and writing MobileViT checkpoints of every ecosystem and task, with format auto-detection.

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

from ..models.backbone import MobileViT
from ..models.config import VARIANTS, MobileViTConfig
from ..models.deeplabv3 import SEGMENTATION_VARIANTS, DeepLabV3Config
from ..models.peers import TorchvisionModel
from ..models.ssdlite import DETECTION_VARIANTS, SSDLiteConfig
from .layouts import (
    CHANNEL_ORDER,
    LAYOUTS,
    OPTIONAL_SUFFIXES,
    TASKS,
    expected_keys,
    flip_stem_channels,
    from_ours,
    to_ours,
)

FORMAT_NAME = "mobilevit"
FORMAT_VERSION = "1"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

#: A model's config: a classifier's, or a dense-prediction model's (which says its ``task``).
ModelConfig = MobileViTConfig | DeepLabV3Config | SSDLiteConfig
#: The standard architectures of each task; a task's names are the classifier's plus a suffix.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "classification": VARIANTS,
    "segmentation": SEGMENTATION_VARIANTS,
    "detection": DETECTION_VARIANTS,
}
_ARCH_SUFFIX = {"classification": "", "segmentation": "_deeplabv3", "detection": "_ssdlite"}
_CONFIG_CLASSES = {"classification": MobileViTConfig, "segmentation": DeepLabV3Config, "detection": SSDLiteConfig}


class CheckpointError(ValueError):
    """A file that is not a usable MobileViT checkpoint; the message says why and what to do."""


def config_task(config: ModelConfig) -> str:
    """``"classification"`` or the ``task`` a dense-prediction config names."""
    return getattr(config, "task", "classification")


def backbone_config(config: ModelConfig) -> MobileViTConfig:
    """The MobileViT part of ``config`` (the config itself for a classifier)."""
    return getattr(config, "backbone", config)


def task_arch(arch: str, task: str) -> str:
    """The ``task`` model built on the classifier ``arch``, e.g. ``mobilevit_xs_deeplabv3``."""
    return arch + _ARCH_SUFFIX[task]


@dataclass
class Checkpoint:
    """A checkpoint converted to our names, stem in RGB order, with the config it implies.

    ``config`` is a :class:`MobileViTConfig` for a classifier, a :class:`DeepLabV3Config` for a
    segmentation model (keys ``backbone.*``, ``aspp.*``, ``classifier.*``) and an :class:`SSDLiteConfig`
    for a detector (``backbone.*``, ``extra.*``, ``heads.*``); ``arch`` names the standard architecture,
    e.g. ``mobilevit_xs``, ``mobilevit_xs_deeplabv3`` or ``mobilevit_xs_ssdlite``.
    """

    state_dict: dict[str, Tensor]
    layout: str
    config: ModelConfig
    arch: str | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return config_task(self.config)


def read_checkpoint(path: str | os.PathLike, layout: str | None = None) -> Checkpoint:
    """Read any supported checkpoint: our format, timm, ml-cvnets, Hugging Face dir, mmpretrain.

    Classifiers, segmentation models (ours, ml-cvnets, Hugging Face) and detectors (ours, ml-cvnets) alike; ``layout`` forces a
    layout instead of detecting it (and the task) from the keys.
    """
    path = Path(path)
    raw, meta, hf_config = _read_raw(path)
    if layout is not None and layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    if meta.get("format") == FORMAT_NAME:
        layout = layout or FORMAT_NAME
    config = _config_from_dict(json.loads(meta["config"])) if "config" in meta else None
    layout, task = detect_layout(raw, path, layout, config_task(config) if config else None)
    depths = backbone_config(config).transformer_depths if config else (2, 4, 3)
    _check_keys(raw, layout, depths, path, task)
    state = to_ours(raw, layout, depths, task)
    if CHANNEL_ORDER[layout] == "BGR":
        state = flip_stem_channels(state, task)
    arch = meta.get("arch") or infer_arch(state, task)
    if config is None:
        if arch is None:
            names = sorted(ARCHITECTURES[task])
            raise CheckpointError(f"{path}: MobileViT {task} keys, but tensor shapes match none of {names}")
        config = ARCHITECTURES[task][arch].replace(**_hf_overrides(hf_config, task) | _head_fields(state, task))
    extra = {k: json.loads(v) for k, v in meta.items() if k not in _HEADER_KEYS and layout == FORMAT_NAME}
    if hf_config and "id2label" in hf_config:
        labels = [hf_config["id2label"][str(i)] for i in range(len(hf_config["id2label"]))]
        if not all(lbl.startswith("LABEL_") for lbl in labels):
            extra["categories"] = labels
    return Checkpoint(state, layout, config, arch, extra)


def _config_from_dict(d: dict[str, Any]) -> ModelConfig:
    task = d.get("task", "classification")
    if task not in _CONFIG_CLASSES:
        raise CheckpointError(f"the checkpoint is of task {task!r}; this version reads {list(_CONFIG_CLASSES)}")
    return _CONFIG_CLASSES[task].from_dict(d)


def detect_layout(
    state: dict[str, Tensor],
    source: str | os.PathLike = "checkpoint",
    layout: str | None = None,
    task: str | None = None,
) -> tuple[str, str]:
    """``(layout, task)`` whose keys best match ``state`` (those given are kept); a clear error when none does."""
    if layout is not None and task is not None:
        return layout, task
    keys = set(state)
    scores = {
        (name, t): len(keys & set(expected_keys(name, task=t)))
        for t in ([task] if task else TASKS)
        for name in ([layout] if layout else TASKS[t].prefixes)
        if name in TASKS[t].prefixes
    }
    best = max(scores, key=scores.get)  # the first best: classification wins a tie
    if scores[best] == 0 and layout is None:
        sample = ", ".join(sorted(keys)[:5])
        raise CheckpointError(
            f"{source} is not a MobileViT v1 checkpoint: none of its {len(keys)} keys ({sample}, ...) belong to any "
            f"known layout ({', '.join(LAYOUTS)}) of any task ({', '.join(TASKS)})"
        )
    return best


def _check_keys(state: dict[str, Tensor], layout: str, depths: tuple[int, ...], source: Path, task: str) -> None:
    want = expected_keys(layout, depths, task)
    missing = [k for k in want if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in set(want)]
    if missing or unexpected:
        raise CheckpointError(
            f"{source} looks like a {layout} MobileViT {task} checkpoint but its keys differ: "
            f"{len(missing)} missing {_few(missing)}, {len(unexpected)} unexpected {_few(unexpected)}"
        )


def _few(keys: list[str], n: int = 6) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


def _head_fields(state: dict[str, Tensor], task: str) -> dict[str, int]:
    """Config fields read off the head's shapes: the number of classes (0: no classifier), ASPP width."""
    weight = state.get(f"{TASKS[task].classifier[0]}.weight")
    fields = {"num_classes": weight.shape[0] if weight is not None else 0}
    if task == "segmentation" and weight is not None:
        fields["aspp_channels"] = weight.shape[1]
    if task == "detection" and weight is not None:  # anchors x (4 box + classes) outputs at the first level
        n_anchors = DETECTION_VARIANTS["mobilevit_xxs_ssdlite"].anchor_counts[0]  # the official 6
        fields["num_classes"] = weight.shape[0] // n_anchors - 4
    return fields


@functools.cache
def _variant_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MobileViT(VARIANTS[arch])
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_arch(state: dict[str, Tensor], task: str = "classification") -> str | None:
    """The standard ``task`` architecture whose backbone tensor shapes equal ``state``'s, if any."""
    prefix = TASKS[task].prefix
    backbone = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if "stem.conv.weight" not in backbone:
        return None
    for arch in VARIANTS:
        shapes = _variant_shapes(arch)
        if all(tuple(backbone[k].shape) == s for k, s in shapes.items() if k in backbone and not k.startswith("fc.")):
            return task_arch(arch, task)
    return None


def shape_mismatches(
    state: dict[str, Tensor], model_state: dict[str, Tensor], task: str = "classification"
) -> list[str]:
    """Keys (the ``task``'s classifier excluded) whose shapes differ between a checkpoint and a model."""
    classifier = tuple(f"{m}." for m in TASKS[task].classifier)
    return [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model_state.items()
        if not k.startswith(classifier) and k in state and state[k].shape != v.shape
    ]


# Hugging Face config fields -> ours: of the backbone and classifier, and of the segmentation head.
_HF_FIELDS = {
    "dropout": "hidden_dropout_prob",
    "attn_dropout": "attention_probs_dropout_prob",
    "classifier_dropout": "classifier_dropout_prob",
}
_HF_SEG_FIELDS = {
    "output_stride": "output_stride",
    "aspp_channels": "aspp_out_channels",
    "aspp_rates": "atrous_rates",
    "aspp_dropout": "aspp_dropout_prob",
}


def _hf_overrides(hf_config: dict[str, Any] | None, task: str = "classification") -> dict[str, Any]:
    if not hf_config:
        return {}
    out: dict[str, Any] = {}
    if "patch_size" in hf_config:
        out["patch_sizes"] = (int(hf_config["patch_size"]),) * 3
    fields = _HF_FIELDS | (_HF_SEG_FIELDS if task == "segmentation" else {})
    for ours, theirs in fields.items():
        if theirs in hf_config:
            value = hf_config[theirs]
            out[ours] = tuple(value) if isinstance(value, list) else value
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
    config: ModelConfig,
    path: str | os.PathLike,
    layout: str = FORMAT_NAME,
    arch: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write our (RGB) ``state_dict`` of a model of any task in ``layout``, atomically.

    ``mobilevit`` is one safetensors file whose header holds the config and ``meta`` (categories,
    preprocessing) as JSON. ``hf`` writes a directory with config.json and model.safetensors.
    BGR layouts (cvnets, hf, mmpretrain) get their stem flipped back to BGR. Segmentation models
    can be written as ``mobilevit``, ``cvnets`` and ``hf``; detectors as ``mobilevit`` and ``cvnets``.
    """
    task = config_task(config)
    if layout not in WRITABLE:
        raise CheckpointError(f"cannot write layout {layout!r}; choose one of {sorted(WRITABLE)}")
    if layout not in TASKS[task].prefixes:
        raise CheckpointError(
            f"cannot write a {task} model in the {layout} layout; choose one of {list(TASKS[task].prefixes)}"
        )
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if CHANNEL_ORDER[layout] == "BGR":
        state = flip_stem_channels(state, task)
    try:
        state = from_ours(state, layout, backbone_config(config).transformer_depths, task)
    except KeyError as e:
        raise CheckpointError(f"cannot write {path}: the {layout} layout has no name for {e}") from e
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


_HF_ARCHITECTURES = {
    "classification": "MobileViTForImageClassification",
    "segmentation": "MobileViTForSemanticSegmentation",
}


def _write_hf_dir(state: dict[str, Tensor], config: ModelConfig, path: Path, categories: list[str] | None) -> None:
    c, task = backbone_config(config), config_task(config)
    if c.transformer_depths != (2, 4, 3):
        raise CheckpointError(
            f"Hugging Face MobileViT has transformer depths (2, 4, 3); this model has {c.transformer_depths}"
        )
    if len(set(c.patch_sizes)) != 1:
        raise CheckpointError(f"Hugging Face MobileViT supports one patch size; this model has {c.patch_sizes}")
    labels = categories or [f"LABEL_{i}" for i in range(config.num_classes)]
    hf_config = {
        "architectures": [_HF_ARCHITECTURES[task]],
        "model_type": "mobilevit",
        "num_channels": c.in_chans,
        "image_size": 512 if task == "segmentation" else 256,
        "patch_size": c.patch_sizes[0],
        "hidden_sizes": list(c.transformer_dims),
        # a segmentation backbone has no final 1x1 conv; HF still lists its (unused) width, 4 x C5
        "neck_hidden_sizes": [c.stem_channels, *c.channels, c.last_channels or 4 * c.channels[-1]],
        "num_attention_heads": c.num_heads,
        "mlp_ratio": c.ffn_ratio,
        "expand_ratio": float(c.expansion),
        "hidden_act": "silu",
        "conv_kernel_size": 3,
        "output_stride": c.output_stride,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.attn_dropout,
        "classifier_dropout_prob": config.classifier_dropout,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "qkv_bias": True,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    if task == "segmentation":
        hf_config |= {
            "aspp_out_channels": config.aspp_channels,
            "atrous_rates": list(config.aspp_rates),
            "aspp_dropout_prob": config.aspp_dropout,
            "semantic_loss_ignore_index": 255,
        }
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with atomic_path(path / "config.json") as tmp:
        tmp.write_text(json.dumps(hf_config, indent=2))


# ---------------------------------------------------------------------------- torchvision peers

PEER_FORMAT = "mobilevit-peer"


def save_peer(model: TorchvisionModel, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write a torchvision peer's weights (and ``meta``: categories, preprocessing) as one safetensors file."""
    header = {"format": PEER_FORMAT, "config": json.dumps(model.config.to_dict())}
    header |= {k: json.dumps(v) for k, v in (meta or {}).items()}
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp), metadata=header)
    return Path(path)


def read_peer_header(path: str | os.PathLike) -> dict[str, Any] | None:
    """The decoded header of a peer weights file (``config``, ``categories``, ...), None for any other file."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError):
        return None
    if header.get("format") != PEER_FORMAT:
        return None
    return {k: json.loads(v) for k, v in header.items() if k != "format"}
