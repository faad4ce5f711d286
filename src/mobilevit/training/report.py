"""Training reports as PNG files: learning curves, confusion matrices, prediction grids, segmentation overlays and
detection boxes.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
backend change) and written atomically.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from ..checkpoints.io import atomic_path
from ..data.segmentation import IGNORE_INDEX, voc_colormap

#: (CSV column, legend label) of the curves in each panel of :func:`plot_curves`.
LOSS_CURVES = (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "EMA val"))
ACCURACY_CURVES = (("train_top1", "train"), ("val_top1", "val"), ("ema_val_top1", "EMA val"))
MIOU_CURVES = (("train_pixel_acc", "train pixel accuracy"), ("val_miou", "val mIoU"), ("ema_val_miou", "EMA val mIoU"))
MAP_CURVES = (
    ("val_map", "val mAP"),
    ("val_map50", "val AP50"),
    ("ema_val_map", "EMA val mAP"),
    ("ema_val_map50", "EMA val AP50"),
)
_MAX_ANNOTATED_CLASSES = 40  # beyond this a confusion matrix has no per-cell counts or class ticks


def read_metrics(csv_path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a trainer ``metrics.csv`` with numeric values; empty or non-numeric cells are left out."""
    with open(csv_path, newline="") as f:
        rows = [{k: _to_float(v) for k, v in row.items() if k} for row in csv.DictReader(f)]
    return [{k: v for k, v in row.items() if v is not None} for row in rows]


def _to_float(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def plot_curves(csv_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path:
    """Plot loss and top-1 accuracy (segmentation: mIoU; detection: COCO AP) in percent per epoch from ``metrics.csv``.

    Columns that are absent or empty are skipped; rows without ``epoch`` are numbered 1, 2, ...
    """
    rows = read_metrics(csv_path)
    fig = _figure((11, 4))
    if any("val_map" in row for row in rows):
        scores = (MAP_CURVES, "COCO AP (%)")
    elif any("val_miou" in row or "train_pixel_acc" in row for row in rows):
        scores = (MIOU_CURVES, "mIoU / pixel accuracy (%)")
    else:
        scores = (ACCURACY_CURVES, "top-1 accuracy (%)")
    panels = ((LOSS_CURVES, "loss"), scores)
    for ax, (curves, ylabel) in zip(fig.subplots(1, 2), panels, strict=True):
        drawn = False
        for column, label in curves:
            points = [(row.get("epoch", i + 1), row[column]) for i, row in enumerate(rows) if column in row]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
                drawn = True
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, png_path)


def confusion_matrix(targets: Tensor, preds: Tensor, num_classes: int) -> Tensor:
    """Counts ``[true, pred]`` (int64, ``num_classes`` x ``num_classes``) of integer labels."""
    targets, preds = targets.reshape(-1).long().cpu(), preds.reshape(-1).long().cpu()
    if targets.shape != preds.shape:
        raise ValueError(f"targets and preds differ in length: {targets.numel()} vs {preds.numel()}")
    for name, t in (("targets", targets), ("preds", preds)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{t.min()}, {t.max()}]")
    counts = torch.bincount(targets * num_classes + preds, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def plot_confusion(matrix: Tensor, classes: list[str], png_path: str | os.PathLike, title: str = "") -> Path:
    """Heat map of a confusion matrix: colour = row-normalised rate, cells show counts.

    Y tick labels carry each class's recall; the title carries overall accuracy.
    """
    n = len(classes)
    if matrix.shape != (n, n):
        raise ValueError(f"matrix shape {tuple(matrix.shape)} does not match {n} classes")
    counts = matrix.detach().cpu().long()
    totals = counts.sum(1)
    rates = counts.double() / totals.clamp(min=1).unsqueeze(1)
    total = int(totals.sum())
    accuracy = 100.0 * int(counts.diag().sum()) / max(total, 1)
    side = min(max(5.0, 0.55 * n + 3), 30.0)
    fig = _figure((side + 1.5, side))
    ax = fig.subplots()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= _MAX_ANNOTATED_CLASSES:
        recalls = [f"{c} ({100.0 * rates[i, i]:.0f}%)" if totals[i] else f"{c} (-)" for i, c in enumerate(classes)]
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), recalls)
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=color, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true (recall)")
    heading = f"accuracy {accuracy:.2f}% of {total}"
    ax.set_title(f"{title} — {heading}" if title else heading)
    return _save(fig, png_path)


def plot_samples(
    images: Tensor,
    targets: Tensor,
    preds: Tensor,
    classes: list[str],
    png_path: str | os.PathLike,
    ncols: int = 8,
    probs: Tensor | None = None,
) -> Path:
    """Grid of ``images`` (N, 3, H, W in [0, 1]) titled with the prediction, green if right, red if wrong.

    ``probs`` is either the confidence of each prediction (N,) or class probabilities (N, C); shown in percent.
    Wrong predictions also show the true label.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    count = images.shape[0]
    targets, preds = targets.reshape(-1).tolist(), preds.reshape(-1).tolist()
    if len(targets) != count or len(preds) != count:
        raise ValueError(f"{count} images but {len(targets)} targets and {len(preds)} preds")
    if probs is not None:
        probs = probs.detach().float().cpu()
        probs = probs[torch.arange(count), torch.tensor(preds)] if probs.ndim == 2 else probs.reshape(-1)
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    fig = _figure((1.9 * ncols, 2.2 * nrows))
    axes: list[Axes] = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    pixels = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= count:
            continue
        ax.imshow(pixels[i].squeeze(-1) if pixels.shape[-1] == 1 else pixels[i], cmap="gray", vmin=0, vmax=1)
        label = classes[preds[i]] + (f" ({100.0 * float(probs[i]):.0f}%)" if probs is not None else "")
        correct = preds[i] == targets[i]
        if not correct:
            label += f"\ntrue: {classes[targets[i]]}"
        ax.set_title(label, color="green" if correct else "red", fontsize=9)
    return _save(fig, png_path)


def label_colors(num_classes: int) -> Tensor:
    """``[num_classes, 3]`` uint8 colours of the PASCAL VOC colour map (class 0 black)."""
    return torch.from_numpy(voc_colormap(num_classes))


def overlay(image: Tensor, mask: Tensor, alpha: float = 0.55, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``image`` ([3, H, W] in [0, 1]) with ``mask`` ([H, W] class indices) blended on top in VOC colours.

    Background (0) and ``ignore_index`` pixels keep the image; returns a [3, H, W] tensor in [0, 1].
    """
    mask = mask.long().cpu()
    labelled = mask[mask != ignore_index]
    colors = label_colors(int(labelled.max()) + 1 if labelled.numel() else 1).float() / 255
    painted = colors[mask.clamp(max=len(colors) - 1)].permute(2, 0, 1)
    keep = ((mask == 0) | (mask == ignore_index))[None]
    image = image.detach().float().cpu().clamp(0, 1).expand(3, -1, -1)
    return torch.where(keep, image, (1 - alpha) * image + alpha * painted)


def plot_segmentation(
    images: Tensor,
    targets: Tensor | None,
    preds: Tensor,
    classes: list[str],
    png_path: str | os.PathLike,
    title: str = "",
) -> Path:
    """One row per image: the image, the ground truth (when given) and the prediction, in VOC colours.

    ``images`` [N, 3, H, W] in [0, 1]; ``targets`` and ``preds`` [N, H, W] class indices. A legend names the
    classes that appear.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    columns = [("image", None), *([("ground truth", targets)] if targets is not None else []), ("prediction", preds)]
    count = images.shape[0]
    fig = _figure((2.6 * len(columns) + 1.6, 2.6 * count))
    axes = fig.subplots(count, len(columns), squeeze=False)
    colors = label_colors(len(classes)).float() / 255
    shown: set[int] = set()
    for i in range(count):
        for j, (name, masks) in enumerate(columns):
            ax: Axes = axes[i, j]
            ax.axis("off")
            picture = images[i] if masks is None else overlay(images[i], masks[i])
            ax.imshow(picture.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
            if masks is not None:
                shown |= {int(c) for c in masks[i].unique() if 0 < int(c) < len(classes)}
            if i == 0:
                ax.set_title(name, fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[c].tolist(), label=classes[c]) for c in sorted(shown)]
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, png_path)


def _uint8_rgb(image: Tensor) -> Tensor:
    """``image`` ([1 or 3, H, W], float in [0, 1] or uint8) as a uint8 [3, H, W] CPU tensor."""
    image = image.detach().cpu()
    if image.is_floating_point():
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.to(torch.uint8).expand(3, -1, -1).contiguous()


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None = None,
    classes: list[str] | None = None,
    score_thresh: float = 0.3,
    width: int = 2,
) -> Tensor:
    """``image`` ([3, H, W], float in [0, 1] or uint8) with ``boxes`` ([n, 4] x1, y1, x2, y2 pixels) drawn on it.

    Each class has its VOC colour (:func:`label_colors`); captions read "name score" (``classes`` is indexed by
    label, ``classes[0]`` being background; the label number without it). Boxes scoring below ``score_thresh``
    are left out; higher scores are drawn on top. Returns a uint8 [3, H, W] tensor.
    """
    picture = _uint8_rgb(image)
    boxes = torch.as_tensor(boxes).detach().float().cpu().reshape(-1, 4)
    labels = torch.as_tensor(labels).detach().long().cpu().reshape(-1).clamp(min=0)
    keep = (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    if scores is not None:
        scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
        keep &= scores >= score_thresh
        order = scores[keep].argsort()
        boxes, labels, scores = boxes[keep][order], labels[keep][order], scores[keep][order]
    else:
        boxes, labels = boxes[keep], labels[keep]
    if len(boxes) == 0:
        return picture
    palette = label_colors(int(labels.max()) + 1)
    colors = [tuple(palette[c].tolist()) for c in labels]
    text = ["black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white" for r, g, b in colors]
    names = [classes[c] if classes is not None and c < len(classes) else str(c) for c in labels.tolist()]
    captions = names if scores is None else [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist(), strict=True)]
    return draw_bounding_boxes(
        picture, boxes, labels=captions, colors=colors, width=width, label_colors=text, fill_labels=True,
        label_background_colors=colors,
    )  # fmt: skip


def plot_detections(
    images: Tensor | list[Tensor],
    predictions: list[dict[str, Tensor]],
    targets: list[dict[str, Tensor]] | None,
    classes: list[str] | None,
    png_path: str | os.PathLike,
    title: str = "",
    score_thresh: float = 0.3,
    cols: int = 4,
) -> Path:
    """Grid of ``images`` ([N, 3, H, W] or a list of [3, H, W], in [0, 1]) with their detections.

    ``predictions`` (per image ``boxes``, ``labels``, ``scores``) are drawn in class colours and captioned (see
    :func:`draw_detections`) over the ground truth of ``targets`` (``boxes``; thin white lines) when given;
    boxes are in the pixels of the image shown.
    """
    count = len(images)
    if count == 0:
        raise ValueError("no images to plot")
    if len(predictions) != count or (targets is not None and len(targets) != count):
        raise ValueError(
            f"{count} images but {len(predictions)} predictions and {len(targets) if targets else 0} targets"
        )
    cols = max(1, min(cols, count))
    rows = math.ceil(count / cols)
    fig = _figure((3.2 * cols, 3.4 * rows))
    axes: list[Axes] = list(fig.subplots(rows, cols, squeeze=False).flat)
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= count:
            continue
        picture = _uint8_rgb(images[i])
        heading = ""
        if targets is not None:
            truth = torch.as_tensor(targets[i]["boxes"]).detach().float().cpu().reshape(-1, 4)
            truth = truth[(truth[:, 2] >= truth[:, 0]) & (truth[:, 3] >= truth[:, 1])]
            if len(truth):
                picture = draw_bounding_boxes(picture, truth, colors="white", width=1)
            heading = f", {len(truth)} objects"
        pred = predictions[i]
        scores = pred.get("scores")
        shown = len(pred["boxes"]) if scores is None else int((torch.as_tensor(scores) >= score_thresh).sum())
        picture = draw_detections(picture, pred["boxes"], pred["labels"], scores, classes, score_thresh)
        ax.imshow(picture.permute(1, 2, 0).numpy())
        ax.set_title(f"{shown} detections{heading}", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, png_path)


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, png_path: str | os.PathLike) -> Path:
    path = Path(png_path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path
