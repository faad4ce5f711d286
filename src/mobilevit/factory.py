"""Model builders: ``create_model``, ``list_models`` and weight loading, for every task."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from .checkpoints.hub import WEIGHTS, download, fetch_weights, imagenet_categories
from .checkpoints.io import (
    ARCHITECTURES,
    Checkpoint,
    CheckpointError,
    backbone_config,
    config_task,
    read_checkpoint,
    read_peer_header,
    shape_mismatches,
    task_arch,
)
from .checkpoints.layouts import TASKS
from .data.transforms import EvalTransform
from .models.backbone import MobileViT
from .models.config import VARIANTS
from .models.deeplabv3 import MobileViTDeepLabV3
from .models.peers import PREFIX as PEER_PREFIX
from .models.peers import TorchvisionModel, load_peer_state, peer_task
from .models.ssdlite import MobileViTSSDLite

log = logging.getLogger(__name__)


#: A model of any task.
Model = MobileViT | MobileViTDeepLabV3 | MobileViTSSDLite
_MODEL_CLASSES = {"classification": MobileViT, "segmentation": MobileViTDeepLabV3, "detection": MobileViTSSDLite}


def list_models(task: str | None = "classification") -> list[str]:
    """Names accepted by :func:`create_model`: the classifiers, another task's models, or all (``task=None``)."""
    if task is not None and task not in ARCHITECTURES:
        raise ValueError(f"unknown task {task!r}; choose one of {list(ARCHITECTURES)} or None")
    return [name for t, archs in ARCHITECTURES.items() if task in (None, t) for name in archs]


def model_task(name: str) -> str:
    """The task of the model ``name`` (``"classification"``, ``"segmentation"``, ``"detection"``), a peer's too."""
    if name.startswith(PEER_PREFIX):
        return peer_task(name)
    task = next((t for t, archs in ARCHITECTURES.items() if name in archs), None)
    if task is None:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models(None)}")
    return task


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
) -> Model:
    """Build a classifier (``mobilevit_xxs/xs/s``), segmenter (``mobilevit_*_deeplabv3``) or detector (``*_ssdlite``).

    Args:
        name: architecture, see :func:`list_models` (``list_models(None)`` for every task).
        weights: a known name (``"mobilevit_s.cvnets_in1k"``), a URL, or a local checkpoint file /
            Hugging Face directory in any supported layout (detected automatically), or a
            :class:`Checkpoint` already read with :func:`load_checkpoint`. A segmentation or detection
            model also takes a classification checkpoint: its backbone is loaded, the head stays fresh.
        num_classes: classifier size. Defaults to the checkpoint's (else 1000, 21 for segmentation,
            81 for detection: background included). When it differs from the checkpoint's, everything
            but the classifier (a detector's prediction layers) is loaded and a fresh one is created.
        overrides: other config fields, e.g. ``patch_sizes=(8, 4, 2)``, ``dropout=0.0``,
            ``output_stride=8``, ``aspp_dropout=0.2``, ``min_scale=0.2``. Unless overridden, ``patch_sizes``
            (a segmentation checkpoint's ``output_stride`` and ``aspp_rates``, a detection checkpoint's
            anchors, box coder and post-processing settings) follow the checkpoint.
    """
    task = model_task(name)
    if name.startswith(PEER_PREFIX):  # torchvision peers, trained by the same loop for comparisons
        if overrides or isinstance(weights, Checkpoint):
            raise ValueError(f"{name} takes no overrides and only weights files written by `mobilevit train`")
        return _create_peer(name, weights, num_classes)
    ckpt = weights if isinstance(weights, Checkpoint) or weights is None else load_checkpoint(weights)
    base = ARCHITECTURES[task][name]
    inherited: dict[str, Any] = {}
    if ckpt is not None:
        inherited["patch_sizes"] = backbone_config(ckpt.config).patch_sizes
        if ckpt.task == task == "segmentation":
            inherited |= {"output_stride": ckpt.config.backbone.output_stride, "aspp_rates": ckpt.config.aspp_rates}
        if ckpt.task == task == "detection":  # anchors, box coder, matching and post-processing settings
            head = ckpt.config.to_dict()
            inherited |= {k: v for k, v in head.items() if k not in ("task", "backbone", "num_classes")}
        if num_classes is None and ckpt.task == task:
            num_classes = ckpt.config.num_classes
    config = base.replace(
        num_classes=base.num_classes if num_classes is None else num_classes, **(inherited | overrides)
    )
    model = _MODEL_CLASSES[task](config)
    if ckpt is not None:
        load_into(model, ckpt, ckpt.meta.get("source", "checkpoint"))
    return model


def load_into(model: Model, ckpt: Checkpoint, source: str = "checkpoint") -> None:
    """Copy ``ckpt``'s tensors into ``model``; a classifier of another size is left freshly initialised.

    A classification checkpoint fills a segmentation model's backbone only (its final 1x1 conv
    and classifier are not used); the head keeps its initialisation.
    """
    task = config_task(model.config)
    state = _as_task(ckpt, task, source)
    model_state = model.state_dict()
    bad = shape_mismatches(state, model_state, task)
    if bad:
        looks_like = ckpt.arch or "a non-standard MobileViT"
        raise CheckpointError(
            f"{source} is {looks_like} ({ckpt.layout} layout) but the model is "
            f"{arch_name(model)}: {len(bad)} tensors differ in shape, e.g. {'; '.join(bad[:3])}"
        )
    classifier = tuple(f"{m}." for m in TASKS[task].classifier)
    weight = f"{TASKS[task].classifier[0]}.weight"
    head_kept = weight in state and weight in model_state and state[weight].shape == model_state[weight].shape
    if not head_kept:
        state = {k: v for k, v in state.items() if not k.startswith(classifier)}
        if ckpt.task == task:
            log.info("%s: classifier not loaded (checkpoint has %d classes, model %d)", source,
                     ckpt.config.num_classes, model.num_classes)  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = classifier if ckpt.task == task else tuple(k for k in model_state if not k.startswith(TASKS[task].prefix))
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith(fresh)]
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    model.weights_meta = {
        "source": source,
        "categories": ckpt.meta.get("categories", []) if head_kept else [],
        "preprocess": ckpt.meta.get("preprocess", EvalTransform().to_dict()),
    }


def _as_task(ckpt: Checkpoint, task: str, source: str) -> dict[str, Tensor]:
    """``ckpt``'s tensors named as in a ``task`` model: a classifier's backbone goes under the task's prefix."""
    if ckpt.task == task:
        return ckpt.state_dict
    spec = TASKS[task]
    if ckpt.task != "classification":
        raise CheckpointError(
            f"{source} is a {ckpt.task} checkpoint ({ckpt.arch or 'non-standard'}, {ckpt.layout} layout); it cannot "
            f"fill a {task} model. Build {ckpt.arch or 'the matching ' + ckpt.task + ' model'} instead"
        )
    state = {spec.prefix + k: v for k, v in ckpt.state_dict.items() if k.split(".")[0] not in spec.dropped}
    log.info("%s: loaded the backbone of %s (%s layout, %d tensors) into a %s model; not used: %s; the head stays "
             "freshly initialised", source, ckpt.arch or "a classifier", ckpt.layout, len(state), task,
             ", ".join(spec.dropped))  # fmt: skip
    return state


def arch_name(model: Model) -> str:
    """The architecture name (``mobilevit_xs``, ``mobilevit_xs_deeplabv3``) of ``model``, judged by its widths."""
    c, task = backbone_config(model.config), config_task(model.config)
    for name, cfg in VARIANTS.items():
        if cfg.channels == c.channels and cfg.transformer_dims == c.transformer_dims:
            return task_arch(name, task)
    return "a custom MobileViT" + ("" if task == "classification" else f" {task} model")


def model_transform(model: Model) -> EvalTransform:
    """The eval preprocessing bound to the model's weights (official default otherwise)."""
    meta = getattr(model, "weights_meta", {})
    return EvalTransform(**meta.get("preprocess", {}))


def model_categories(model: Model) -> list[str]:
    """Class names of the model's classifier: from its weights, ImageNet-1k for 1000 classes, else indices."""
    cats = getattr(model, "weights_meta", {}).get("categories") or []
    if len(cats) == model.num_classes:
        return list(cats)
    if model.num_classes == 1000:
        return imagenet_categories()
    return [str(i) for i in range(model.num_classes)]


def _create_peer(name: str, weights: str | os.PathLike | None, num_classes: int | None) -> TorchvisionModel:
    """A ``torchvision:`` model, optionally with a weights file that ``mobilevit train`` wrote for a peer."""
    if weights is None:
        return TorchvisionModel(name, num_classes or 1000)
    header = read_peer_header(weights)
    if header is None:
        raise CheckpointError(f"{weights} is not a torchvision peer weights file (written by `mobilevit train`)")
    saved = header["config"]
    model = TorchvisionModel(name, num_classes or saved["num_classes"])
    head_kept = load_peer_state(model, load_file(str(weights)), saved["peer"], str(weights))
    model.weights_meta = {
        "source": str(weights),
        "categories": header.get("categories", []) if head_kept else [],
        "preprocess": header.get("preprocess", {}),
    }
    return model
