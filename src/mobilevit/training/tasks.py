"""What differs between tasks in the one training loop (:mod:`mobilevit.training.trainer`).

A :class:`Task` builds the datasets, computes the loss (and the training accuracy, where it has one) of
a batch, evaluates a model and names the metric that picks ``best.safetensors``. Everything else (DDP, AMP, EMA,
accumulation, multi-scale batches, checkpoints, exact resume, NaN stop, unreadable-item skipping,
logs) is the trainer's and the same for every task. The task follows from the model name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..checkpoints.hub import WEIGHTS
from ..checkpoints.io import read_peer_header
from ..data.datasets import TrainTransform, build_dataset, collate, split_holdout
from ..data.detection import loss_target
from ..data.segmentation import IGNORE_INDEX
from ..data.transforms import BatchMix, EvalTransform
from ..factory import create_model, list_models, load_checkpoint, model_task
from ..models.peers import PREFIX as PEER_PREFIX
from .evaluate import evaluate, evaluate_detection, evaluate_segmentation
from .recipe import TrainConfig

#: ``(images, targets, skipped)`` batches from a task's collate function.
Batch = tuple[Tensor, Any, int]


@dataclass
class TaskData:
    """A task's datasets, class names, batch collation and the eval preprocessing saved with the weights."""

    train_set: Dataset
    val_set: Dataset | None
    classes: list[str]
    collate: Callable[[list[Any]], Batch]
    preprocess: dict[str, Any]


class Task:
    """Interface of a task; see :class:`ClassificationTask`, :class:`SegmentationTask`, :class:`DetectionTask`."""

    name: str
    train_metric: str | None  # metrics.csv column ``train_<train_metric>``: accuracy on the training batches
    eval_metrics: tuple[str, ...]  # columns ``val_<m>`` (and ``ema_val_<m>``) after ``val_loss``
    score: str  # the eval metric (higher is better) that chooses best.safetensors

    def check_config(self, cfg: TrainConfig) -> None:
        """Refuse options this task does not support (advanced augmentation and distillation: classifiers only)."""
        unsupported = cfg.classification_only()
        if unsupported:
            raise ValueError(
                f"{', '.join(unsupported)}: classification only, but {cfg.model} is a {self.name} model; "
                "drop these options"
            )

    def build_data(self, cfg: TrainConfig) -> TaskData:
        raise NotImplementedError

    def batch_mix(self, cfg: TrainConfig, num_classes: int) -> BatchMix | None:
        """The MixUp / CutMix of training batches that ``cfg`` asks for (None: batches are not mixed)."""
        return None

    def loss(self, outputs: Tensor, targets: Tensor, cfg: TrainConfig) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, correct, total)`` of a batch; ``correct / total`` is the training accuracy."""
        raise NotImplementedError

    def forward_loss(
        self, net: nn.Module, images: Tensor, targets: Any, cfg: TrainConfig, teacher: nn.Module | None = None
    ) -> tuple[Tensor, ...]:
        """The training forward pass of ``net`` (maybe DDP-wrapped) on a batch: ``(loss, correct, total)``."""
        return self.loss(net(images), targets, cfg)

    def to_device(self, targets: Any, device: torch.device) -> Any:
        """A batch's targets on ``device``."""
        return targets.to(device, non_blocking=True)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device, amp: str) -> dict[str, Any]:
        """``{"loss": ..., <eval_metrics>...}`` over ``batches`` (this process's shard; totals are summed)."""
        raise NotImplementedError

    def placeholder_batch(self, size: int) -> tuple[Tensor, Tensor]:
        """Two blank samples: the zero-weight batch a DDP rank runs when its batch had < 2 readable items."""
        raise NotImplementedError

    def metric_fields(self) -> list[str]:
        """The columns of metrics.csv."""
        val = ["loss", *self.eval_metrics]
        train = [f"train_{self.train_metric}"] if self.train_metric else []
        return [
            "epoch", "step", "lr", "train_loss", *train,
            *[f"val_{m}" for m in val], *[f"ema_val_{m}" for m in val],
            "epoch_seconds", "images_per_second", "skipped_images",
        ]  # fmt: skip


def _split(full: Any, cfg: TrainConfig, eval_transform: Any, build_val: Callable[[], Any]) -> tuple[Any, Any]:
    """Train and validation sets: a seeded hold-out of the training split, or the ``val_split`` of the data."""
    if cfg.val_fraction > 0:
        train_idx, val_idx = split_holdout(len(full), cfg.val_fraction, cfg.seed)
        return full.subset(train_idx), full.subset(val_idx, eval_transform)
    return full, (build_val() if cfg.val_split else None)


class ClassificationTask(Task):
    name = "classification"
    train_metric = "top1"
    eval_metrics = ("top1", "top5")
    score = "top1"

    def check_config(self, cfg: TrainConfig) -> None:
        """Every option applies to classifiers."""

    def build_data(self, cfg: TrainConfig) -> TaskData:
        train_tf = TrainTransform(
            size=cfg.base_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip, erase=cfg.random_erase,
            auto_augment=cfg.auto_augment, randaugment_ops=cfg.randaugment_ops,
            randaugment_magnitude=cfg.randaugment_magnitude,
        )  # fmt: skip
        eval_tf = EvalTransform(cfg.eval_resize, cfg.eval_size)
        full = build_dataset(cfg.data, "train", train_tf)
        train_set, val_set = _split(full, cfg, eval_tf, lambda: build_dataset(cfg.data, cfg.val_split, eval_tf))
        return TaskData(train_set, val_set, list(full.classes), collate, eval_tf.to_dict())

    def batch_mix(self, cfg: TrainConfig, num_classes: int) -> BatchMix | None:
        if not cfg.mixing:
            return None
        return BatchMix(num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_switch_prob)

    def forward_loss(
        self, net: nn.Module, images: Tensor, targets: Tensor, cfg: TrainConfig, teacher: nn.Module | None = None
    ) -> tuple[Tensor, ...]:
        teacher_logits = None
        if teacher is not None:  # at the student's (augmented, mixed) input
            with torch.no_grad():
                teacher_logits = teacher(images)
        return self.loss(net(images), targets, cfg, teacher_logits)

    def loss(
        self, outputs: Tensor, targets: Tensor, cfg: TrainConfig, teacher_logits: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        loss = classification_loss(
            outputs, targets, cfg.label_smoothing, teacher_logits, cfg.distill_alpha, cfg.distill_temperature
        )
        return loss, (outputs.argmax(1) == dominant_label(targets)).sum(), torch.tensor(len(targets))

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device, amp: str) -> dict[str, Any]:
        result = evaluate(model, batches, device, amp)
        return {"loss": result.loss, "top1": result.top1, "top5": result.top5}

    def placeholder_batch(self, size: int) -> tuple[Tensor, Tensor]:
        return torch.zeros(2, 3, size, size), torch.zeros(2, dtype=torch.long)


def dominant_label(targets: Tensor) -> Tensor:
    """Integer labels as they are; of soft ``[B, K]`` targets (mixed batches) the class with the largest weight:
    the label of the image that dominates the mix (larger lambda or area), or the shared label of both."""
    return targets.argmax(1) if targets.ndim == 2 else targets


def classification_loss(
    logits: Tensor,
    targets: Tensor,
    label_smoothing: float = 0.0,
    teacher_logits: Tensor | None = None,
    distill_alpha: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Cross-entropy with label smoothing, and knowledge distillation when ``teacher_logits`` are given.

    ``targets`` are integer labels ``[B]`` or soft targets ``[B, K]`` (mixed batches): smoothing turns a target
    ``y`` into ``(1 - eps) * y + eps / K`` either way, which for a mixed target equals smoothing each one-hot
    before mixing. With a teacher the loss is ``(1 - alpha) * CE + alpha * T^2 * KL(softmax(teacher / T) ||
    softmax(student / T))``, the KL averaged over the batch (Hinton et al. 2015). Computed in float32.
    """
    logits = logits.float()
    loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return loss
    student = F.log_softmax(logits / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return (1 - distill_alpha) * loss + distill_alpha * temperature**2 * kl


#: The normalisation every model of this library takes: RGB in [0, 1], no mean/std.
IDENTITY_NORMALISATION = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def load_teacher(weights: str, classes: list[str]) -> nn.Module:
    """The classifier in ``weights`` (a path, URL or known name, as ``create_model`` takes; a torchvision peer's
    weights file written by ``mobilevit train``), frozen in eval mode, to distil into a student of ``classes``.

    Its classes (count, and names and order when its weights name them) and its input normalisation must be
    the student's; errors say what differs.
    """
    if weights in list_models(None) or weights.startswith(PEER_PREFIX):
        raise ValueError(
            f"teacher={weights} is an architecture, not trained weights: give its weights file, URL or a known "
            f"weights name ({', '.join(WEIGHTS)})"
        )
    header = read_peer_header(weights)
    if header is not None:
        teacher = create_model(PEER_PREFIX + header["config"]["peer"], weights=weights)
    else:
        ckpt = load_checkpoint(weights)
        if ckpt.task != "classification" or ckpt.arch is None:
            raise ValueError(f"teacher={weights} is not a standard classifier ({ckpt.arch or 'custom'}, {ckpt.task})")
        teacher = create_model(ckpt.arch, weights=ckpt)
    meta = getattr(teacher, "weights_meta", {})
    if teacher.num_classes != len(classes):
        raise ValueError(
            f"teacher={weights} predicts {teacher.num_classes} classes, the student {len(classes)}: distil from a "
            "teacher trained on the student's classes (fine-tune it first: mobilevit train ... weights=...)"
        )
    names = meta.get("categories") or []
    if names and list(names) != list(classes):
        raise ValueError(
            f"teacher={weights} has other classes (or another order) than the student's data: {names[:5]}... vs "
            f"{list(classes)[:5]}..."
        )
    preprocess = meta.get("preprocess") or {}
    for key, identity in IDENTITY_NORMALISATION.items():
        value = preprocess.get(key, identity)
        if [float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)] != identity:
            raise ValueError(
                f"teacher={weights} expects inputs normalised with {key}={value}, but the student is trained on "
                f"RGB in [0, 1] ({key}={identity}); use a teacher trained on the same normalisation"
            )
    return teacher.eval().requires_grad_(False)


def state_digest(module: nn.Module) -> str:
    """A hash of ``module``'s tensors (names, dtypes, shapes and values): a teacher's identity across resumptions."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class SegmentationTask(Task):
    """Per-pixel classification: cross-entropy ignoring label 255, mIoU over the whole validation set."""

    name = "segmentation"
    train_metric = "pixel_acc"
    eval_metrics = ("miou", "pixel_acc")
    score = "miou"

    def build_data(self, cfg: TrainConfig) -> TaskData:
        from ..data.segmentation import (
            SegEvalTransform,
            SegTrainTransform,
            build_segmentation_dataset,
            collate_segmentation,
        )

        train_tf = SegTrainTransform(size=cfg.base_size, scale=cfg.resize_scale, hflip=cfg.hflip)
        eval_tf = SegEvalTransform(cfg.eval_size)
        full = build_segmentation_dataset(cfg.data, "train", train_tf)
        train_set, val_set = _split(
            full, cfg, eval_tf, lambda: build_segmentation_dataset(cfg.data, cfg.val_split, eval_tf)
        )
        preprocess = {"size": cfg.eval_size, "interpolation": "bilinear"}
        return TaskData(train_set, val_set, list(full.classes), collate_segmentation, preprocess)

    def loss(self, outputs: Tensor, targets: Tensor, cfg: TrainConfig) -> tuple[Tensor, Tensor, Tensor]:
        loss = F.cross_entropy(outputs.float(), targets, ignore_index=IGNORE_INDEX, label_smoothing=cfg.label_smoothing)
        valid = targets != IGNORE_INDEX
        return loss, ((outputs.argmax(1) == targets) & valid).sum(), valid.sum()

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device, amp: str) -> dict[str, Any]:
        result = evaluate_segmentation(model, batches, device, amp)
        return {"loss": result.loss, "miou": result.miou, "pixel_acc": result.pixel_acc}

    def placeholder_batch(self, size: int) -> tuple[Tensor, Tensor]:
        return torch.zeros(2, 3, size, size), torch.zeros(2, size, size, dtype=torch.long)


class DetectionTask(Task):
    """Boxes: the model computes its own loss (``model(images, targets)``), COCO mAP over the validation set."""

    name = "detection"
    train_metric = None
    eval_metrics = ("map", "map50", "map75")
    score = "map"

    def build_data(self, cfg: TrainConfig) -> TaskData:
        from ..data.detection import DetEvalTransform, DetTrainTransform, build_detection_dataset, collate_detection

        train_tf = DetTrainTransform(size=cfg.base_size, hflip=cfg.hflip)
        eval_tf = DetEvalTransform(cfg.eval_size)
        full = build_detection_dataset(cfg.data, "train", train_tf)
        train_set, val_set = _split(
            full, cfg, eval_tf, lambda: build_detection_dataset(cfg.data, cfg.val_split, eval_tf)
        )
        preprocess = {"size": cfg.eval_size, "interpolation": "bilinear"}
        return TaskData(train_set, val_set, list(full.classes), collate_detection, preprocess)

    def forward_loss(
        self, net: nn.Module, images: Tensor, targets: Any, cfg: TrainConfig, teacher: nn.Module | None = None
    ) -> tuple[Tensor, ...]:
        targets = [loss_target(t) for t in targets]
        losses = net(images, targets)
        zero = torch.zeros((), device=images.device)
        return sum(losses.values(), zero), zero, zero

    def to_device(self, targets: Any, device: torch.device) -> Any:
        return [
            {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets
        ]

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device, amp: str) -> dict[str, Any]:
        result = evaluate_detection(model, batches, device, amp)
        return {"loss": result.loss, "map": result.map, "map50": result.map50, "map75": result.map75}

    def placeholder_batch(self, size: int) -> tuple[Tensor, Any]:
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
        return torch.zeros(2, 3, size, size), [empty, dict(empty)]


TASKS: dict[str, Task] = {t.name: t for t in (ClassificationTask(), SegmentationTask(), DetectionTask())}


def task_of(model_name: str) -> Task:
    """The task of the model ``model_name`` (see :func:`mobilevit.factory.model_task`)."""
    return TASKS[model_task(model_name)]
