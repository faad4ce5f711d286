"""Evaluation over a data loader (top-1 / top-5 for classifiers, mIoU for segmenters), sharded across processes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..data.segmentation import IGNORE_INDEX
from .distributed import all_sum


@dataclass
class EvalResult:
    loss: float
    top1: float  # percent
    top5: float  # percent
    count: int
    skipped: int = 0
    targets: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False)
    preds: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False)

    def to_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "top1": self.top1, "top5": self.top5, "count": self.count, "skipped": self.skipped}


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """Autocast context for ``amp`` in {"none", "bf16", "fp16"}."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor, int]],
    device: torch.device,
    amp: str = "none",
    keep_predictions: bool = False,
    progress: bool = False,
    hflip: bool = False,
) -> EvalResult:
    """Mean cross-entropy, top-1 and top-5 accuracy (in %) over ``batches`` of ``(images, labels, skipped)``.

    ``hflip`` averages the logits of each image and its mirror image (test-time augmentation; twice the compute).
    When distributed, each process passes its own shard and the totals are summed over processes.
    """
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, count, skipped = 0.0, 0.0, 0.0, 0, 0
    targets, preds = [], []
    for images, labels, n_skipped in tqdm(batches, desc="eval", disable=not progress, leave=False):
        skipped += n_skipped
        if labels.numel() == 0:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images).float()
            if hflip:
                logits = (logits + model(images.flip(-1)).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk == labels[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        count += labels.numel()
        if keep_predictions:
            targets.append(labels.cpu())
            preds.append(topk[:, 0].cpu())
    model.train(was_training)
    loss_sum, top1, top5, count, skipped = all_sum([loss_sum, top1, top5, count, skipped], device)
    n = max(count, 1)
    result = EvalResult(loss_sum / n, 100 * top1 / n, 100 * top5 / n, int(count), int(skipped))
    if keep_predictions and targets:
        result.targets, result.preds = torch.cat(targets), torch.cat(preds)
    return result


@dataclass
class SegmentationResult:
    """Metrics from a confusion matrix over every labelled pixel of a set (label 255 ignored)."""

    loss: float  # mean cross-entropy per labelled pixel
    miou: float  # percent: mean over the classes present in the labels or the predictions
    pixel_acc: float  # percent
    iou: list[float]  # percent per class; NaN for a class absent from labels and predictions
    confusion: Tensor  # [C, C] pixel counts, rows = label, columns = prediction
    count: int  # images
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss, "miou": self.miou, "pixel_acc": self.pixel_acc, "iou": self.iou,
            "count": self.count, "skipped": self.skipped,
        }  # fmt: skip


def segmentation_metrics(confusion: Tensor) -> tuple[float, float, list[float]]:
    """``(mIoU %, pixel accuracy %, per-class IoU %)`` of a ``[C, C]`` confusion matrix (rows: labels)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    miou = 100 * iou.nanmean().item() if (union > 0).any() else 0.0
    pixel_acc = 100 * (tp.sum() / confusion.sum().clamp(min=1)).item()
    return miou, pixel_acc, (100 * iou).tolist()


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | list[Tensor], int]],
    device: torch.device,
    amp: str = "none",
    progress: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> SegmentationResult:
    """mIoU, pixel accuracy and loss over ``batches`` of ``(images, masks, skipped)``.

    Predictions are compared at each mask's own size, as the official evaluation does: logits of another
    size are resized to the mask (nearest) before the argmax. ``masks`` is a ``[B, H, W]`` tensor or a list of
    ``[H_i, W_i]`` tensors. When distributed, each process passes its shard; the matrices are summed.
    """
    was_training = model.training
    model.eval()
    num_classes: int | None = getattr(model, "num_classes", None)  # known up front: every rank reduces C x C
    confusion = torch.zeros((num_classes or 0) ** 2, dtype=torch.float64, device=device)
    loss_sum, pixels, count, skipped = 0.0, 0, 0, 0
    for images, masks, n_skipped in tqdm(batches, desc="eval", disable=not progress, leave=False):
        skipped += n_skipped
        if len(masks) == 0:
            continue
        with autocast(device, amp):
            logits = model(images.to(device, non_blocking=True)).float()
        if not num_classes:
            num_classes = logits.shape[1]
            confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
        for scores, mask in zip(logits, masks, strict=True):
            mask = mask.to(device)
            if scores.shape[-2:] != mask.shape:
                scores = F.interpolate(scores[None], size=mask.shape, mode="nearest")[0]
            valid = mask != ignore_index
            labels, preds = mask[valid], scores.argmax(0)[valid]
            if labels.numel() and int(labels.max()) >= num_classes:
                raise ValueError(f"a mask holds label {int(labels.max())} but the model predicts {num_classes} classes")
            loss_sum += F.cross_entropy(scores[None], mask[None], ignore_index=ignore_index, reduction="sum").item()
            pixels += int(valid.sum())
            confusion += torch.bincount(labels * num_classes + preds, minlength=num_classes**2).double()
        count += len(masks)
    model.train(was_training)
    num_classes = num_classes or 0
    totals = all_sum([loss_sum, pixels, count, skipped, *confusion.tolist()], device)
    loss_sum, pixels, count, skipped = totals[:4]
    matrix = torch.tensor(totals[4:], dtype=torch.float64).reshape(num_classes, num_classes)
    miou, pixel_acc, iou = segmentation_metrics(matrix)
    return SegmentationResult(loss_sum / max(pixels, 1), miou, pixel_acc, iou, matrix, int(count), int(skipped))
