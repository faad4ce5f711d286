"""What differs between tasks in the one training loop (:mod:`mobilevit.training.trainer`).

A :class:`Task` builds the datasets, computes the loss (and the training accuracy, where it has one) of
a batch, evaluates a model and names the metric that picks ``best.safetensors``. Everything else (DDP, AMP, EMA,
accumulation, multi-scale batches, checkpoints, exact resume, NaN stop, unreadable-item skipping,
logs) is the trainer's and the same for every task. The task follows from the model name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..data.datasets import TrainTransform, build_dataset, collate, split_holdout
from ..data.detection import loss_target
from ..data.segmentation import IGNORE_INDEX
from ..data.transforms import EvalTransform
from ..factory import model_task
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

    def build_data(self, cfg: TrainConfig) -> TaskData:
        raise NotImplementedError

    def loss(self, outputs: Tensor, targets: Tensor, cfg: TrainConfig) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, correct, total)`` of a batch; ``correct / total`` is the training accuracy."""
        raise NotImplementedError

    def forward_loss(self, net: nn.Module, images: Tensor, targets: Any, cfg: TrainConfig) -> tuple[Tensor, ...]:
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

    def build_data(self, cfg: TrainConfig) -> TaskData:
        train_tf = TrainTransform(
            size=cfg.base_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip, erase=cfg.random_erase
        )
        eval_tf = EvalTransform(cfg.eval_resize, cfg.eval_size)
        full = build_dataset(cfg.data, "train", train_tf)
        train_set, val_set = _split(full, cfg, eval_tf, lambda: build_dataset(cfg.data, cfg.val_split, eval_tf))
        return TaskData(train_set, val_set, list(full.classes), collate, eval_tf.to_dict())

    def loss(self, outputs: Tensor, targets: Tensor, cfg: TrainConfig) -> tuple[Tensor, Tensor, Tensor]:
        loss = F.cross_entropy(outputs.float(), targets, label_smoothing=cfg.label_smoothing)
        return loss, (outputs.argmax(1) == targets).sum(), torch.tensor(targets.numel())

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device, amp: str) -> dict[str, Any]:
        result = evaluate(model, batches, device, amp)
        return {"loss": result.loss, "top1": result.top1, "top5": result.top5}

    def placeholder_batch(self, size: int) -> tuple[Tensor, Tensor]:
        return torch.zeros(2, 3, size, size), torch.zeros(2, dtype=torch.long)


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

    def forward_loss(self, net: nn.Module, images: Tensor, targets: Any, cfg: TrainConfig) -> tuple[Tensor, ...]:
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
