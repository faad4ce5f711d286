"""SSDLite-MobileViT: architecture, anchors, box coding, post-processing and the multibox loss.

Parity with the official ml-cvnets code is in test_detection_checkpoints.py (a recorded fixture); here
the anchors are checked against torchvision's independent generator and the post-processing and loss
against plain loops written from the official algorithm's description.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.ops import nms

from mobilevit import create_model, list_models
from mobilevit.models.anchors import SSDAnchors, box_iou, center_to_corner, corner_to_center, decode, encode, match
from mobilevit.models.ssdlite import DETECTION_VARIANTS, MobileViTSSDLite, SSDLiteConfig, SSDOutput

OFFICIAL_RATIOS = [[2, 3]] * 5 + [[2]]


@pytest.fixture(scope="module")
def model() -> MobileViTSSDLite:
    torch.manual_seed(0)
    return create_model("mobilevit_xxs_ssdlite").eval()


@pytest.mark.parametrize(
    "name,params",
    [("mobilevit_xxs_ssdlite", 1_755_050), ("mobilevit_xs_ssdlite", 2_742_042), ("mobilevit_s_ssdlite", 5_738_826)],
)
def test_parameter_counts(name, params):
    with torch.device("meta"):
        model = MobileViTSSDLite(DETECTION_VARIANTS[name])
    assert sum(p.numel() for p in model.parameters()) == params


def test_listed_and_config_round_trip():
    assert list_models("detection") == ["mobilevit_xxs_ssdlite", "mobilevit_xs_ssdlite", "mobilevit_s_ssdlite"]
    config = DETECTION_VARIANTS["mobilevit_xs_ssdlite"].replace(num_classes=11, patch_sizes=(4, 4, 2))
    assert SSDLiteConfig.from_dict(config.to_dict()) == config
    assert config.backbone.last_channels == 0 and config.backbone.num_classes == 0
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SSDLiteConfig(config.backbone, num_classes=1)


@pytest.mark.parametrize("size", [(320, 320), (384, 512), (300, 300), (97, 131)])
def test_raw_output_shapes_at_any_size(model, size):
    raw = model.forward_raw(torch.rand(2, 3, *size))
    grids = [(-(-size[0] // s), -(-size[1] // s)) for s in (16, 32)]
    for _ in range(3):
        grids.append(((grids[-1][0] - 1) // 2 + 1, (grids[-1][1] - 1) // 2 + 1))
    n = sum(h * w * 6 for h, w in grids) + 4
    assert raw.box_regression.shape == (2, n, 4)
    assert raw.class_logits.shape == (2, n, 81)
    assert raw.anchors.shape == (n, 4)


@pytest.mark.parametrize(
    "grids",
    [[(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)], [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]],
)
def test_anchors_equal_torchvision_generator(grids):
    # torchvision's generator with the official scales and ratios is an independent implementation
    tv = DefaultBoxGenerator(OFFICIAL_RATIOS, scales=torch.linspace(0.1, 1.05, 7).tolist())
    expected = tv._grid_default_boxes(grids, [320, 320])
    assert torch.allclose(SSDAnchors(OFFICIAL_RATIOS)(grids), expected, atol=1e-6)
    wrong = SSDAnchors(OFFICIAL_RATIOS, min_scale=0.2, max_scale=0.95)(grids)
    assert not torch.allclose(wrong, expected, atol=1e-3)


def test_anchor_order_is_rows_columns_anchors():
    anchors = SSDAnchors([[2, 3]])([(2, 3)])
    assert anchors.shape == (36, 4)
    cells = anchors[::6, :2]
    expected = torch.tensor([[(x + 0.5) / 3, (y + 0.5) / 2] for y in range(2) for x in range(3)])
    assert torch.allclose(cells, expected)
    first = anchors[:6, 2:]
    s0, s1 = 0.1, (0.1 * 1.05) ** 0.5  # one level: linspace(0.1, 1.05, 2)
    r2, r3 = 2**0.5, 3**0.5
    want = torch.tensor(
        [[s0, s0], [s1, s1], [s0 * r2, s0 / r2], [s0 / r2, s0 * r2], [s0 * r3, s0 / r3], [s0 / r3, s0 * r3]]
    )
    assert torch.allclose(first, want.float())


def test_box_coding_round_trip():
    anchors = SSDAnchors(OFFICIAL_RATIOS)([(4, 4), (2, 2), (1, 1), (1, 1), (1, 1), (1, 1)])
    boxes = torch.rand(len(anchors), 2) * 0.5
    boxes = torch.cat([boxes, boxes + 0.1 + torch.rand(len(anchors), 2) * 0.4], 1)
    reg = encode(corner_to_center(boxes), anchors)
    assert torch.allclose(center_to_corner(decode(reg, anchors)), boxes, atol=1e-5)
    # variances: a unit regression moves the centre by 0.1 anchor widths and scales the size by e^0.2
    unit = decode(torch.ones(1, 4), anchors[:1])
    a = anchors[0]
    assert torch.allclose(
        unit[0], torch.stack([a[0] + 0.1 * a[2], a[1] + 0.1 * a[3], a[2] * 2.718281828**0.2, a[3] * 2.718281828**0.2])
    )


def _match_loop(boxes, labels, anchors, threshold=0.5):
    """The official assignment spelled out: best box per anchor, every box claims its best anchor, threshold."""
    if len(boxes) == 0:
        return torch.zeros(len(anchors), 4), torch.zeros(len(anchors), dtype=torch.long)
    corners = center_to_corner(anchors)
    ious = torch.stack([torch.stack([box_iou(b, a) for b in boxes]) for a in corners])  # [N, G]
    best = [int(ious[i].argmax()) for i in range(len(anchors))]
    best_iou = [float(ious[i].max()) for i in range(len(anchors))]
    for g in range(len(boxes)):
        a = int(ious[:, g].argmax())
        best[a], best_iou[a] = g, 2.0
    out = torch.tensor([int(labels[b]) if v >= threshold else 0 for b, v in zip(best, best_iou, strict=True)])
    return boxes[best], out


def test_match_forces_each_box_its_best_anchor():
    anchors = SSDAnchors([[2]])([(3, 3)])
    boxes = torch.tensor([[0.0, 0.0, 0.3, 0.3], [0.45, 0.45, 0.5, 0.52], [0.6, 0.1, 0.95, 0.4]])
    labels = torch.tensor([3, 7, 2])
    got_boxes, got = match(boxes, labels, anchors)
    want_boxes, want = _match_loop(boxes, labels, anchors)
    assert torch.equal(got, want) and torch.equal(got_boxes[got > 0], want_boxes[want > 0])
    assert 7 in got.tolist()  # the tiny box overlaps nothing at 0.5 but still gets its best anchor
    empty_boxes, empty = match(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), anchors)
    assert empty.eq(0).all() and empty_boxes.shape == (len(anchors), 4)


def _loss_loop(raw: SSDOutput, targets, size, ratio=3):
    """Multibox loss from its description: per image, positives + the 3*pos hardest negatives by background loss."""
    h, w = size
    cls_sum, box_sum, num_pos = 0.0, 0.0, 0
    for b, t in enumerate(targets):
        boxes, labels = _match_loop(t["boxes"] / torch.tensor([w, h, w, h]), t["labels"], raw.anchors)
        logits = raw.class_logits[b]
        pos = labels > 0
        bg = -F.log_softmax(logits, -1)[:, 0]
        negatives = sorted([i for i in range(len(labels)) if not pos[i]], key=lambda i: -float(bg[i]))
        chosen = [i for i in range(len(labels)) if pos[i]] + negatives[: int(pos.sum()) * ratio]
        cls_sum += F.cross_entropy(logits[chosen], labels[chosen], reduction="sum")
        reg = encode(corner_to_center(boxes), raw.anchors)
        box_sum += F.smooth_l1_loss(raw.box_regression[b][pos], reg[pos], reduction="sum")
        num_pos += int(pos.sum())
    return {"loss_box": box_sum / max(num_pos, 1), "loss_cls": cls_sum / max(num_pos, 1)}


def test_loss_equals_the_algorithm_spelled_out():
    torch.manual_seed(1)
    model = create_model("mobilevit_xxs_ssdlite", num_classes=5).eval()
    images = torch.rand(3, 3, 96, 128)
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 80.0], [70.0, 5.0, 120.0, 40.0]]), "labels": torch.tensor([1, 4])},
        {"boxes": torch.tensor([[0.0, 0.0, 128.0, 96.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    with torch.no_grad():
        raw = model.forward_raw(images)
        got = model.loss(raw, targets, (96, 128))
        want = _loss_loop(raw, targets, (96, 128))
    for key in ("loss_box", "loss_cls"):
        assert torch.allclose(got[key], torch.as_tensor(want[key]), rtol=1e-5), key
    # the image size normalises pixel boxes: a wrong one changes the matching
    assert not torch.allclose(model.loss(raw, targets, (128, 96))["loss_box"], got["loss_box"])


def test_training_forward_returns_finite_losses_and_gradients():
    model = create_model("mobilevit_xxs_ssdlite", num_classes=3).train()
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 56.0]]), "labels": torch.tensor([2])}] * 2
    losses = model(torch.rand(2, 3, 64, 64), targets)
    assert set(losses) == {"loss_box", "loss_cls"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.heads[0].pred.pw.weight.grad.abs().sum() > 0
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    assert all(torch.isfinite(v) for v in model(torch.rand(2, 3, 64, 64), empty).values())
    with pytest.raises(ValueError, match="needs targets"):
        model(torch.rand(2, 3, 64, 64))


def _postprocess_loop(raw: SSDOutput, thresh=0.05, iou=0.5, topk=200):
    """The official predict, one image at a time and one class at a time."""
    out = []
    for b in range(raw.class_logits.shape[0]):
        scores = raw.class_logits[b].softmax(-1)
        boxes = center_to_corner(decode(raw.box_regression[b], raw.anchors))
        rows = []
        for c in range(1, scores.shape[1]):
            mask = scores[:, c] > thresh
            if mask.any():
                keep = nms(boxes[mask], scores[mask, c], iou)[:topk]
                rows += [(c, float(scores[mask, c][k]), boxes[mask][k]) for k in keep]
        out.append(rows)
    return out


def _biased_raw(model, images, generator):
    raw = model.forward_raw(images)
    bias = torch.zeros_like(raw.class_logits)
    bias[..., [1, 3]] += 3.0 + torch.rand(*raw.class_logits.shape[:2], 2, generator=generator) * 2
    return raw._replace(class_logits=raw.class_logits + bias)


def test_postprocess_equals_official_predict(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        raw = _biased_raw(model, torch.rand(2, 3, 128, 160, generator=g), g)
        got = model.postprocess(raw, topk_per_class=7)
    want = _postprocess_loop(raw, topk=7)
    for det, rows in zip(got, want, strict=True):
        assert len(rows) > 7 and len(det["labels"]) == len(rows)
        assert det["labels"].tolist() == [r[0] for r in rows]  # class order
        assert torch.allclose(det["scores"], torch.tensor([r[1] for r in rows]))
        assert torch.allclose(det["boxes"], torch.stack([r[2] for r in rows]), atol=1e-6)
        assert max(det["labels"].tolist().count(c) for c in (1, 3)) <= 7


def test_postprocess_in_pixels_is_clipped_and_scaled(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        raw = _biased_raw(model, torch.rand(1, 3, 96, 96, generator=g), g)
        norm = model.postprocess(raw)[0]
        pix = model.postprocess(raw, image_sizes=[(200, 300)])[0]
    scale = torch.tensor([300.0, 200.0, 300.0, 200.0])
    assert torch.allclose(pix["boxes"], (norm["boxes"] * scale).clamp(min=0).minimum(scale))
    assert pix["boxes"].min() >= 0 and (pix["boxes"] <= scale).all()
    none = model.postprocess(raw, score_thresh=1.0)[0]
    assert none["boxes"].shape == (0, 4) and none["labels"].dtype == torch.long


def test_eval_forward_gives_detections_in_pixels(model):
    images = torch.rand(3, 3, 64, 96)
    with torch.no_grad():
        dets = model(images)
        raw = model.forward_raw(images)
    assert len(dets) == 3 and set(dets[0]) == {"boxes", "scores", "labels"}
    want = model.postprocess(raw, image_sizes=[(64, 96)] * 3)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(dets, want, strict=True))


def test_reset_classifier_keeps_the_rest():
    model = create_model("mobilevit_xxs_ssdlite").eval()
    before = model.heads[0].pred.dw.conv.weight.clone()
    model.reset_classifier(11)
    assert model.num_classes == 11 and model.forward_raw(torch.rand(1, 3, 64, 64)).class_logits.shape[-1] == 11
    assert torch.equal(model.heads[0].pred.dw.conv.weight, before)
