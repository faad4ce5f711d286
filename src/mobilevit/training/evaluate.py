"""Evaluation over a data loader (top-1 / top-5 for classifiers, mIoU for segmenters, COCO mAP for detectors).

Sharded across processes: every process passes its own shard and the metrics cover the whole set.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from tqdm import tqdm

from ..data.detection import loss_target
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


@dataclass
class DetectionResult:
    """COCO box metrics (pycocotools ``COCOeval``) over a set, AP in percent; NaN where COCO reports -1 (no objects)."""

    loss: float  # mean validation loss per image; NaN when the model has no ``forward_raw`` / ``loss``
    map: float  # AP@[.5:.95], all areas, 100 detections per image
    map50: float
    map75: float
    map_small: float
    map_medium: float
    map_large: float
    per_class_ap: list[float]  # AP@[.5:.95] of classes 1..K; NaN for a class without (non-crowd) ground truth
    num_images: int
    num_detections: int
    stats: list[float]  # COCOeval's 12 summary numbers as it gives them: fractions, -1 when undefined
    skipped: int = 0
    #: every detection as a COCO annotation (``id, image_id, category_id, bbox [x, y, w, h], score, area``), in
    #: original pixels: ``json.dump`` it for a COCO results file
    detections: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss, "map": self.map, "map50": self.map50, "map75": self.map75,
            "map_small": self.map_small, "map_medium": self.map_medium, "map_large": self.map_large,
            "per_class_ap": self.per_class_ap, "num_images": self.num_images,
            "num_detections": self.num_detections, "skipped": self.skipped,
        }  # fmt: skip


@torch.no_grad()
def evaluate_detection(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, list[dict[str, Any]], int]],
    device: torch.device,
    amp: str = "none",
    num_classes: int | None = None,
    progress: bool = False,
) -> DetectionResult:
    """COCO mAP (pycocotools) and mean loss of a detector over ``batches`` of ``(images, targets, skipped)``.

    Boxes (detections and ground truth, input pixels) are scaled back to each target's ``orig_size`` and the
    detections clipped to it. A model with ``forward_raw`` / ``loss`` / ``postprocess`` gives both the loss and the
    detections from one forward pass; any other returns detections from ``model(images)`` (loss NaN).
    ``model.loss(raw, targets, image_size)`` is taken as a mean over the batch (crowd boxes left out). ``num_classes`` is K, the number of foreground classes
    (labels 1..K; 0 is background); by default the largest label seen.
    When distributed, each process passes its shard; the per-image results are gathered so every process
    computes the same metrics over the union (an image id met twice, e.g. sampler padding, counts once).
    """
    was_training = model.training
    model.eval()
    raw_path = all(callable(getattr(model, name, None)) for name in ("forward_raw", "loss", "postprocess"))
    records: list[dict[str, Any]] = []
    loss_sum, loss_images, skipped = 0.0, 0, 0
    for images, targets, n_skipped in tqdm(batches, desc="eval", disable=not progress, leave=False):
        skipped += n_skipped
        if len(targets) == 0:
            continue
        images = images.to(device, non_blocking=True)
        size = (images.shape[-2], images.shape[-1])
        if raw_path:
            with autocast(device, amp):
                raw = model.forward_raw(images)
            raw = _float32(raw)  # decode boxes in float32: bf16 pixel coordinates are off by whole pixels
            loss_targets = [{k: v.to(device) for k, v in loss_target(t).items()} for t in targets]
            losses = model.loss(raw, loss_targets, size)
            loss_sum += sum(float(v) for k, v in losses.items() if k.startswith("loss")) * len(targets)
            loss_images += len(targets)
            outputs = model.postprocess(raw, image_sizes=[size] * len(targets))
        else:
            with autocast(device, amp):
                outputs = model(images)
        records += [_detection_record(out, target, size) for out, target in zip(outputs, targets, strict=True)]
    model.train(was_training)
    if _distributed():
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    loss_sum, loss_images, skipped = all_sum([loss_sum, loss_images, skipped], device)
    unique: dict[int, dict[str, Any]] = {}
    for record in records:
        unique.setdefault(record["id"], record)
    loss = loss_sum / loss_images if raw_path and loss_images else math.nan
    return _coco_metrics(list(unique.values()), num_classes, loss, int(skipped))


def _float32(obj: Any) -> Any:
    """``obj`` (tensors nested in dicts, lists, tuples) with floating-point tensors in float32."""
    if isinstance(obj, Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        return type(obj)(*(_float32(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_float32(v) for v in obj)
    return obj


def _numpy(t: Any, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    array = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
    return array.astype(dtype, copy=False).reshape(shape)


def _detection_record(output: dict[str, Tensor], target: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """One image's detections and ground truth as numpy arrays, boxes in ``orig_size`` pixels."""
    h, w = (int(v) for v in target["orig_size"])
    scale = np.array([w / size[1], h / size[0]] * 2)
    boxes = _numpy(output["boxes"], np.float64, (-1, 4)) * scale
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    gt_boxes = _numpy(target["boxes"], np.float64, (-1, 4)) * scale
    n = len(gt_boxes)
    area = target.get("area")
    iscrowd = target.get("iscrowd")
    return {
        "id": int(target["image_id"]), "height": h, "width": w,
        "boxes": boxes, "scores": _numpy(output["scores"], np.float64, (-1,)),
        "labels": _numpy(output["labels"], np.int64, (-1,)),
        "gt_boxes": gt_boxes, "gt_labels": _numpy(target["labels"], np.int64, (-1,)),
        "iscrowd": np.zeros(n, np.int64) if iscrowd is None else _numpy(iscrowd, np.int64, (-1,)),
        "area": np.prod(gt_boxes[:, 2:] - gt_boxes[:, :2], axis=1) if area is None else _numpy(area, np.float64, (-1,)),
    }  # fmt: skip


def _coco_metrics(records: list[dict[str, Any]], num_classes: int | None, loss: float, skipped: int) -> DetectionResult:
    """Run COCOeval (bbox) on in-memory ground truth and detections built from ``records``."""
    gt_labels = np.concatenate([r["gt_labels"] for r in records]) if records else np.zeros(0, np.int64)
    dt_labels = np.concatenate([r["labels"] for r in records]) if records else np.zeros(0, np.int64)
    if num_classes is None:
        num_classes = int(max(gt_labels.max(initial=0), dt_labels.max(initial=0)))
    elif gt_labels.size and (gt_labels.min() < 1 or gt_labels.max() > num_classes):
        raise ValueError(f"ground-truth labels span [{gt_labels.min()}, {gt_labels.max()}], not 1..{num_classes}")
    images = [{"id": r["id"], "height": r["height"], "width": r["width"]} for r in records]
    gt_anns: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    for r in records:
        boxes = r["gt_boxes"].copy()
        boxes[:, 2:] -= boxes[:, :2]
        gt_anns += [
            {"id": len(gt_anns) + i + 1, "image_id": r["id"], "category_id": c, "bbox": b, "area": a, "iscrowd": z}
            for i, (b, c, a, z) in enumerate(
                zip(boxes.tolist(), r["gt_labels"].tolist(), r["area"].tolist(), r["iscrowd"].tolist(), strict=True)
            )
        ]
        boxes = r["boxes"].copy()
        boxes[:, 2:] -= boxes[:, :2]
        columns = boxes.tolist(), r["labels"].tolist(), r["scores"].tolist(), (boxes[:, 2] * boxes[:, 3]).tolist()
        detections += [
            {"id": len(detections) + i + 1, "image_id": r["id"], "category_id": c, "bbox": b, "score": s, "area": a}
            for i, (b, c, s, a) in enumerate(zip(*columns, strict=True))
        ]
    stats = [-1.0] * 12
    per_class = [math.nan] * num_classes
    if records and num_classes > 0:
        coco = _cocoeval(images, gt_anns, detections, num_classes)
        stats = [float(v) for v in coco.stats]
        precision = coco.eval["precision"][:, :, :, 0, -1]  # [IoU thresholds, recalls, classes], all areas, 100 dets
        for k in range(num_classes):
            p = precision[:, :, k]
            per_class[k] = 100 * float(p[p > -1].mean()) if (p > -1).any() else math.nan
    pct = [100 * v if v >= 0 else math.nan for v in stats]
    return DetectionResult(
        loss, *pct[:6], per_class_ap=per_class, num_images=len(records), num_detections=len(detections),
        stats=stats, skipped=skipped, detections=detections,
    )  # fmt: skip


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _cocoeval(images: list[dict], gt_anns: list[dict], dt_anns: list[dict], num_classes: int) -> COCOeval:
    """pycocotools' COCOeval (bbox) of in-memory annotations, evaluated, accumulated and summarised (stdout silenced).

    Its per-image matching is pure Python and per class: when distributed, each process evaluates every
    world-size-th class and the per-class precision / recall tables are gathered before the summary.
    """
    categories = [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()  # built in memory: COCO.loadRes cannot take zero detections
        coco_gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
        coco_dt.dataset = {"images": images, "annotations": dt_anns, "categories": categories}
        coco_gt.createIndex()
        coco_dt.createIndex()
        coco = COCOeval(coco_gt, coco_dt, iouType="bbox")
        rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        p = coco.params
        cat_ids = list(p.catIds)
        p.catIds = cat_ids[rank::world]
        if p.catIds:
            coco.evaluate()
            coco.accumulate()
        if world > 1:
            mine = {k: coco.eval[k] for k in ("precision", "recall")} if coco.eval else None
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, mine)
            p.catIds = cat_ids
            counts = [len(p.iouThrs), len(p.recThrs), len(cat_ids), len(p.areaRng), len(p.maxDets)]
            precision, recall = np.full(counts, -1.0), np.full(counts[:1] + counts[2:], -1.0)
            for r, part in enumerate(parts):
                if part is not None:
                    precision[:, :, r::world], recall[:, r::world] = part["precision"], part["recall"]
            coco.eval = {"params": p, "counts": counts, "precision": precision, "recall": recall}
        coco.summarize()
    return coco
