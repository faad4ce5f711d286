"""SSDLite with a MobileViT backbone: the paper's object detector (official ml-cvnets v0.1, COCO at 320x320)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from .anchors import SSDAnchors, center_to_corner, corner_to_center, decode, encode, match
from .backbone import MobileViT, _check_input
from .config import VARIANTS, MobileViTConfig, TaskConfig


class SSDOutput(NamedTuple):
    """Raw detector outputs in the official order (levels, rows, columns, anchors per cell)."""

    box_regression: Tensor  # [B, N, 4]
    class_logits: Tensor  # [B, N, C], class 0 = background
    anchors: Tensor  # [N, 4], normalised cx, cy, w, h


@dataclass(frozen=True)
class SSDLiteConfig(TaskConfig):
    """An SSDLite detector on a MobileViT backbone (no classifier, no final 1x1 expansion, stride 32).

    Levels: the backbone's stride-16 and stride-32 features, three extra separable stride-2 layers
    (``proj_channels[2:5]`` wide) and a global level (``proj_channels[5]``). Class 0 is background.
    """

    backbone: MobileViTConfig
    num_classes: int = 81
    proj_channels: tuple[int, ...] = (512, 256, 256, 128, 128, 64)
    aspect_ratios: tuple[tuple[int, ...], ...] = ((2, 3),) * 5 + ((2,),)
    min_scale: float = 0.1
    max_scale: float = 1.05
    center_variance: float = 0.1
    size_variance: float = 0.2
    iou_threshold: float = 0.5  # matching ground truth to anchors
    neg_pos_ratio: int = 3  # hard-negative mining
    score_thresh: float = 0.05
    nms_iou: float = 0.5
    topk_per_class: int = 200
    task: str = field(default="detection", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "proj_channels", tuple(int(c) for c in self.proj_channels))
        object.__setattr__(self, "aspect_ratios", tuple(tuple(int(r) for r in a) for a in self.aspect_ratios))
        if self.num_classes < 2:
            raise ValueError(f"a detector needs num_classes >= 2 (background + objects), got {self.num_classes}")
        if len(self.proj_channels) != 6 or len(self.aspect_ratios) != 6:
            raise ValueError("SSDLite has 6 levels: give 6 proj_channels and 6 aspect_ratios")
        if self.backbone.num_classes or self.backbone.last_channels or self.backbone.output_stride != 32:
            object.__setattr__(
                self, "backbone", self.backbone.replace(num_classes=0, last_channels=0, output_stride=32)
            )

    @property
    def anchor_counts(self) -> list[int]:
        """Anchors per cell at each level: two squares, then two per aspect ratio."""
        return [2 + 2 * len(set(r)) for r in self.aspect_ratios]


#: The official SSDLite-MobileViT models (COCO: 80 classes + background).
DETECTION_VARIANTS: dict[str, SSDLiteConfig] = {
    f"{arch}_ssdlite": SSDLiteConfig(VARIANTS[arch].replace(num_classes=0, last_channels=0))
    for arch in ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s")
}


class ConvBN(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional ReLU, 'same' padding."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, groups: int = 1, act: bool = True
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU() if act else nn.Identity()


class SeparableConv(nn.Module):
    """Depthwise 3x3 + BatchNorm (no activation), then pointwise 1x1: with BN + ReLU, or a plain conv with bias."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, head: bool = False):
        super().__init__()
        self.dw = ConvBN(in_ch, in_ch, 3, stride, groups=in_ch, act=False)
        self.pw: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if head else ConvBN(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw(self.dw(x))


class GlobalLevel(nn.Module):
    """The last level: global average pooling -> 1x1 conv (no bias, no norm) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))


class SSDHead(nn.Module):
    """One level's predictor: optional 1x1 projection, then ``anchors * (4 + classes)`` outputs per cell."""

    def __init__(self, in_ch: int, proj_ch: int, num_anchors: int, num_classes: int, global_level: bool = False):
        super().__init__()
        self.proj: nn.Module = ConvBN(in_ch, proj_ch, 1) if proj_ch != in_ch and not global_level else nn.Identity()
        ch = in_ch if isinstance(self.proj, nn.Identity) else proj_ch
        out = num_anchors * (4 + num_classes)
        self.pred: nn.Module = nn.Conv2d(ch, out, 1) if global_level else SeparableConv(ch, out, head=True)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.pred(self.proj(x)).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4 + self.num_classes)
        return y[..., :4], y[..., 4:]


class MobileViTSSDLite(nn.Module):
    """SSDLite-MobileViT (arXiv 2110.02178, MS-COCO at 320x320).

    Expects RGB images in [0, 1] (no mean/std), any size. :meth:`forward_raw` gives the raw outputs
    with their anchors; :meth:`postprocess` turns them into detections. ``model(images)`` in eval mode
    returns torchvision-style detections in pixels; in training mode ``model(images, targets)`` (targets
    with ``boxes`` in pixels x1, y1, x2, y2 and ``labels`` in 1..C-1) returns the SSD multibox loss.
    """

    def __init__(self, config: SSDLiteConfig):
        super().__init__()
        self.config = c = config
        #: Where loaded weights came from, their class names and eval preprocessing.
        self.weights_meta: dict[str, Any] = {}
        self.backbone = MobileViT(c.backbone)
        self.anchor_generator = SSDAnchors(c.aspect_ratios, c.min_scale, c.max_scale)
        p = c.proj_channels
        c4, c5 = c.backbone.channels[3], c.backbone.channels[4]
        self.extra = nn.ModuleList(
            [
                SeparableConv(c5, p[2], 2),
                SeparableConv(p[2], p[3], 2),
                SeparableConv(p[3], p[4], 2),
                GlobalLevel(p[4], p[5]),
            ]
        )
        level_channels = [c4, c5, *p[2:]]
        self.heads = nn.ModuleList(
            SSDHead(ch, proj, n, c.num_classes, global_level=i == 5)
            for i, (ch, proj, n) in enumerate(zip(level_channels, p, c.anchor_counts, strict=True))
        )
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def reset_parameters(self) -> None:
        """Initialisation for training from scratch: the backbone's own; Xavier-uniform convs in the head."""
        self.backbone.reset_parameters()
        for m in [*self.extra.modules(), *self.heads.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh prediction layers for ``num_classes`` (background included): fine-tuning on other classes."""
        device = self.backbone.stem.conv.weight.device
        self.config = self.config.replace(num_classes=num_classes)
        for head, n in zip(self.heads, self.config.anchor_counts, strict=True):
            old = head.pred.pw if isinstance(head.pred, SeparableConv) else head.pred
            new = nn.Conv2d(old.in_channels, n * (4 + num_classes), 1).to(device)
            nn.init.xavier_uniform_(new.weight)
            nn.init.zeros_(new.bias)
            if isinstance(head.pred, SeparableConv):
                head.pred.pw = new
            else:
                head.pred = new
            head.num_classes = num_classes

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the backbone."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The six levels' feature maps (strides 16, 32, 64, 128, 256 and global)."""
        c4, c5 = self.backbone.forward_intermediates(x, (3, 4))
        feats = [c4, c5]
        for layer in self.extra:
            feats.append(layer(feats[-1]))
        return feats

    def forward_raw(self, x: Tensor) -> SSDOutput:
        """Raw outputs in the official order (levels, rows, columns, anchors) and their anchors."""
        _check_input(x, self.config.in_chans)
        feats = self.forward_features(x)
        outs = [head(f) for head, f in zip(self.heads, feats, strict=True)]
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in feats]).to(x.device)
        return SSDOutput(torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1), anchors)

    def decode_boxes(self, raw: SSDOutput) -> Tensor:
        """Normalised corner boxes ``[B, N, 4]`` of every anchor."""
        c = self.config
        return center_to_corner(decode(raw.box_regression.float(), raw.anchors, c.center_variance, c.size_variance))

    def postprocess(
        self,
        raw: SSDOutput,
        score_thresh: float | None = None,
        nms_iou: float | None = None,
        topk_per_class: int | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections per image as the official predict: softmax; per class 1..C-1 scores above
        ``score_thresh``, NMS at ``nms_iou``, the best ``topk_per_class``; concatenated in class order.

        Boxes are normalised ``x1, y1, x2, y2`` (unclipped) without ``image_sizes``, else in pixels of
        each ``(h, w)`` and clipped to the image. Defaults come from the config (0.05, 0.5, 200).
        """
        c = self.config
        score_thresh = c.score_thresh if score_thresh is None else score_thresh
        nms_iou = c.nms_iou if nms_iou is None else nms_iou
        topk = c.topk_per_class if topk_per_class is None else topk_per_class
        boxes_all = self.decode_boxes(raw)
        scores_all = raw.class_logits.float().softmax(-1)[..., 1:]
        if image_sizes is not None and len(image_sizes) != len(boxes_all):
            raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {len(boxes_all)}")
        results = []
        for i, (boxes, scores) in enumerate(zip(boxes_all, scores_all, strict=True)):
            anchor, cls = torch.nonzero(scores > score_thresh, as_tuple=True)
            cand_boxes, cand_scores, labels = boxes[anchor], scores[anchor, cls], cls + 1
            keep = batched_nms(cand_boxes, cand_scores, labels, nms_iou)  # per-class NMS, by decreasing score
            keep = keep[torch.sort(labels[keep], stable=True).indices]  # class order, by score within a class
            kept_labels = labels[keep]
            first = torch.searchsorted(kept_labels, kept_labels)  # each class's first position
            keep = keep[torch.arange(len(keep), device=keep.device) - first < topk]
            out_boxes = cand_boxes[keep]
            if image_sizes is not None:
                h, w = image_sizes[i]
                out_boxes = (out_boxes * out_boxes.new_tensor([w, h, w, h])).clamp(min=0)
                out_boxes = torch.min(out_boxes, out_boxes.new_tensor([w, h, w, h]))
            results.append({"boxes": out_boxes, "scores": cand_scores[keep], "labels": labels[keep]})
        return results

    def match(
        self, raw: SSDOutput, targets: list[dict[str, Tensor]], image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Per-anchor ``(labels [B, N], regression targets [B, N, 4])`` of ``targets`` (pixel boxes)."""
        h, w = image_size
        scale = raw.anchors.new_tensor([w, h, w, h])
        labels, regression = [], []
        for t in targets:
            boxes, cls = match(t["boxes"].float() / scale, t["labels"], raw.anchors, self.config.iou_threshold)
            labels.append(cls)
            regression.append(
                encode(corner_to_center(boxes), raw.anchors, self.config.center_variance, self.config.size_variance)
            )
        return torch.stack(labels), torch.stack(regression)

    def loss(self, raw: SSDOutput, targets: list[dict[str, Tensor]], image_size: tuple[int, int]) -> dict[str, Tensor]:
        """The official SSD multibox loss: smooth-L1 over positive anchors + cross-entropy over the positives and
        the ``neg_pos_ratio`` x as many hardest negatives per image, each divided by the number of positives."""
        labels, regression = self.match(raw, targets, image_size)
        logits = raw.class_logits.float()
        positive = labels > 0
        with torch.no_grad():
            background = -F.log_softmax(logits, -1)[..., 0]
            background[positive] = -torch.inf
            rank = background.argsort(1, descending=True).argsort(1)
            negative = rank < positive.sum(1, keepdim=True) * self.config.neg_pos_ratio
        chosen = positive | negative
        num_pos = positive.sum().clamp(min=1)
        cls_loss = F.cross_entropy(logits[chosen], labels[chosen], reduction="sum")
        box_loss = F.smooth_l1_loss(raw.box_regression.float()[positive], regression[positive], reduction="sum")
        return {"loss_box": box_loss / num_pos, "loss_cls": cls_loss / num_pos}

    def forward(
        self, images: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        """Eval: detections in pixels of ``images``. Training (with ``targets``): the loss terms."""
        raw = self.forward_raw(images)
        size = (images.shape[-2], images.shape[-1])
        if targets is not None:
            return self.loss(raw, targets, size)
        if self.training:
            raise ValueError("in training mode the detector needs targets: model(images, targets)")
        return self.postprocess(raw, image_sizes=[size] * images.shape[0])
