"""Model builders: ``create_model``, ``list_models`` and weight loading."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoints import Checkpoint, CheckpointError, read_checkpoint, shape_mismatches
from .config import VARIANTS
from .model import MobileViT
from .transforms import EvalTransform
from .weights import WEIGHTS, download, fetch_weights, imagenet_categories

log = logging.getLogger(__name__)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(VARIANTS)


def resolve_weights(weights: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Local path of ``weights`` (known name, URL or path) and the metadata known about it."""
    text = str(weights)
    if text in WEIGHTS:
        w = WEIGHTS[text]
        return fetch_weights(w), {"categories": w.categories, "preprocess": w.transform.to_dict(), "name": w.name}
    if "://" in text:
        return download(text), {}
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"weights {text!r} are neither a local path nor a known name ({', '.join(WEIGHTS)})")
    return path, {}


def load_checkpoint(weights: str | os.PathLike, layout: str | None = None) -> Checkpoint:
    """Read weights given by known name, URL or local path (layout detected unless given)."""
    path, meta = resolve_weights(weights)
    ckpt = read_checkpoint(path, layout)
    ckpt.meta = meta | ckpt.meta | {"source": str(weights)}
    return ckpt


def create_model(
    name: str,
    *,
    weights: str | os.PathLike | Checkpoint | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> MobileViT:
    """Build ``mobilevit_xxs``, ``mobilevit_xs`` or ``mobilevit_s``, optionally with weights.

    Args:
        name: architecture, see :func:`list_models`.
        weights: a known name (``"mobilevit_s.cvnets_in1k"``), a URL, or a local checkpoint file /
            Hugging Face directory in any supported layout (detected automatically), or a
            :class:`Checkpoint` already read with :func:`load_checkpoint`.
        num_classes: classifier size. Defaults to the checkpoint's (or 1000). When it differs from
            the checkpoint's, the backbone is loaded and a fresh classifier is created (fine-tuning).
        overrides: other :class:`~mobilevit.config.MobileViTConfig` fields, e.g.
            ``patch_sizes=(8, 4, 2)``, ``dropout=0.0``, ``classifier_dropout=0.2``.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    ckpt = weights if isinstance(weights, Checkpoint) or weights is None else load_checkpoint(weights)
    if num_classes is None:
        num_classes = ckpt.config.num_classes if ckpt else 1000
    config = VARIANTS[name].replace(num_classes=num_classes, **overrides)
    if ckpt and "patch_sizes" not in overrides:
        config = config.replace(patch_sizes=ckpt.config.patch_sizes)
    model = MobileViT(config)
    if ckpt is not None:
        load_into(model, ckpt, ckpt.meta.get("source", "checkpoint"))
    return model


def load_into(model: MobileViT, ckpt: Checkpoint, source: str = "checkpoint") -> None:
    """Copy ``ckpt``'s tensors into ``model``; a classifier of another size is left freshly initialised."""
    model_state = model.state_dict()
    bad = shape_mismatches(ckpt.state_dict, model_state)
    if bad:
        looks_like = ckpt.arch or "a non-standard MobileViT"
        raise CheckpointError(
            f"{source} is {looks_like} ({ckpt.layout} layout) but the model is "
            f"{arch_name(model)}: {len(bad)} tensors differ in shape, e.g. {'; '.join(bad[:3])}"
        )
    state = dict(ckpt.state_dict)
    head_kept = "fc.weight" in state and state["fc.weight"].shape == model_state.get("fc.weight", torch.empty(0)).shape
    if not head_kept:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        log.info("%s: classifier not loaded (checkpoint has %d classes, model %d)", source,
                 ckpt.config.num_classes, model.num_classes)  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [
        k for k in missing if not k.endswith("num_batches_tracked") and not (k.startswith("fc.") and not head_kept)
    ]
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    model.weights_meta = {
        "source": source,
        "categories": ckpt.meta.get("categories", []) if head_kept else [],
        "preprocess": ckpt.meta.get("preprocess", EvalTransform().to_dict()),
    }


def arch_name(model: MobileViT) -> str:
    """The variant name (``mobilevit_xs``) of ``model``, judged by its widths."""
    for name, cfg in VARIANTS.items():
        if cfg.channels == model.config.channels and cfg.transformer_dims == model.config.transformer_dims:
            return name
    return "a custom MobileViT"


def model_transform(model: MobileViT) -> EvalTransform:
    """The eval preprocessing bound to the model's weights (official default otherwise)."""
    meta = getattr(model, "weights_meta", {})
    return EvalTransform(**meta.get("preprocess", {}))


def model_categories(model: MobileViT) -> list[str]:
    """Class names of the model's classifier: from its weights, ImageNet-1k for 1000 classes, else indices."""
    cats = getattr(model, "weights_meta", {}).get("categories") or []
    if len(cats) == model.num_classes:
        return list(cats)
    if model.num_classes == 1000:
        return imagenet_categories()
    return [str(i) for i in range(model.num_classes)]
