"""SSD anchors (priors), the box coder and prior matching, as in the official ml-cvnets v0.1 SSD.

Boxes are normalised to [0, 1] by the image size. Anchors and encoded boxes are in centre form
``(cx, cy, w, h)``; ground truth and detections in corner form ``(x1, y1, x2, y2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


class SSDAnchors:
    """Anchors of every level for any feature-map sizes, in the order levels, rows, columns, anchors.

    Level ``i`` has scales ``s_i`` and ``sqrt(s_i * s_{i+1})`` from ``linspace(min_scale, max_scale,
    levels + 1)`` (square anchors), then for each aspect ratio ``r`` the pair ``s_i * (sqrt r, 1/sqrt r)``
    and its transpose. Centres are cell centres; everything is clamped to [0, 1].
    """

    def __init__(self, aspect_ratios: Sequence[Sequence[int]], min_scale: float = 0.1, max_scale: float = 1.05):
        self.aspect_ratios = [tuple(dict.fromkeys(r)) for r in aspect_ratios]  # unique, in order
        n = len(self.aspect_ratios)
        scales = np.linspace(min_scale, max_scale, n + 1).tolist()
        self._wh: list[Tensor] = []
        for i, ratios in enumerate(self.aspect_ratios):
            small, large = scales[i], math.sqrt(scales[i] * scales[i + 1])
            wh = [(small, small), (large, large)]
            for r in ratios:
                q = math.sqrt(r)
                wh += [(small * q, small / q), (small / q, small * q)]
            self._wh.append(torch.tensor(wh, dtype=torch.float64))
        self._cache: dict[tuple[tuple[int, int], ...], Tensor] = {}

    def __call__(self, grid_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """``[N, 4]`` float32 anchors ``(cx, cy, w, h)`` for feature maps of ``grid_sizes`` ``(h, w)``."""
        key = tuple((int(h), int(w)) for h, w in grid_sizes)
        if len(key) != len(self._wh):
            raise ValueError(f"expected {len(self._wh)} feature-map sizes, got {len(key)}")
        if key not in self._cache:
            levels = []
            for (h, w), wh in zip(key, self._wh, strict=True):
                cy, cx = torch.meshgrid(
                    (torch.arange(h, dtype=torch.float64) + 0.5) * (1.0 / h),
                    (torch.arange(w, dtype=torch.float64) + 0.5) * (1.0 / w),
                    indexing="ij",
                )
                centres = torch.stack([cx, cy], -1).reshape(-1, 1, 2).expand(-1, len(wh), 2)
                levels.append(torch.cat([centres, wh.expand(h * w, -1, 2)], -1).reshape(-1, 4))
            self._cache[key] = torch.cat(levels).float().clamp_(0.0, 1.0)
        return self._cache[key]


def center_to_corner(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h)`` -> ``(x1, y1, x2, y2)``."""
    return torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)


def corner_to_center(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2)`` -> ``(cx, cy, w, h)``."""
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)


def decode(regression: Tensor, anchors: Tensor, center_variance: float = 0.1, size_variance: float = 0.2) -> Tensor:
    """Boxes ``(cx, cy, w, h)`` from regression outputs and anchors (no clamping, as the official code)."""
    centres = regression[..., :2] * center_variance * anchors[..., 2:] + anchors[..., :2]
    sizes = torch.exp(regression[..., 2:] * size_variance) * anchors[..., 2:]
    return torch.cat([centres, sizes], -1)


def encode(boxes: Tensor, anchors: Tensor, center_variance: float = 0.1, size_variance: float = 0.2) -> Tensor:
    """Regression targets of centre-form ``boxes`` w.r.t. ``anchors`` (the inverse of :func:`decode`)."""
    centres = (boxes[..., :2] - anchors[..., :2]) / anchors[..., 2:] / center_variance
    sizes = torch.log(boxes[..., 2:] / anchors[..., 2:]) / size_variance
    return torch.cat([centres, sizes], -1)


def box_iou(a: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """IoU of corner-form boxes ``a`` [..., 4] and ``b`` [..., 4] (broadcast), with the official ``eps``."""
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return overlap / (area_a + area_b - overlap + eps)


def match(boxes: Tensor, labels: Tensor, anchors: Tensor, iou_threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Assign ground truth to anchors: ``(matched corner boxes [N, 4], labels [N])``, label 0 = background.

    Each anchor takes its best-overlapping box; each box also claims its best anchor (later boxes win
    a shared one); anchors whose best IoU is below ``iou_threshold`` are background.
    """
    if labels.numel() == 0:
        n = anchors.shape[0]
        return anchors.new_zeros(n, 4), torch.zeros(n, dtype=torch.long, device=anchors.device)
    ious = box_iou(boxes.unsqueeze(0), center_to_corner(anchors).unsqueeze(1))  # [N, G]
    best_iou, best_box = ious.max(1)
    best_anchor = ious.max(0).indices
    for g, a in enumerate(best_anchor.tolist()):
        best_box[a] = g
    best_iou[best_anchor] = 2.0
    matched = labels[best_box].clone()
    matched[best_iou < iou_threshold] = 0
    return boxes[best_box], matched
