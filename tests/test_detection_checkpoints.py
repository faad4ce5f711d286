"""SSDLite-MobileViT checkpoints: official ml-cvnets v0.1 files load with the official outputs, detections and loss.

The reference is a fixture recorded once from the official code (tests/fixtures/record_cvnets_ssdlite.py):
its state-dict keys and shapes in its own order, a seed, calibrated BatchNorm statistics, head biases that
make some classes score above the threshold, and at 320x320, 384x512 and 300x300 its anchors, box
regressions, a summary of its logits (4 classes in full, per-anchor sum and sum of squares) and its
``predict`` detections; plus the matched labels and the loss of two annotated images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

import mobilevit as mv
from mobilevit.checkpoints.layouts import expected_keys, from_ours
from mobilevit.cli import main as cli_main
from mobilevit.models.ssdlite import DETECTION_VARIANTS, MobileViTSSDLite
from test_segmentation_checkpoints import STATS_PREFIX, official_inputs, official_random_state

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = "cvnets_v0.1_ssdlite_mobilevit_xxs"
XXS = "mobilevit_xxs_ssdlite"
TOL = 1e-4  # max |difference| relative to the largest |value| of the reference


def _rel(ours: Tensor, reference: Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def fixture():
    info = json.loads((FIXTURES / f"{FIXTURE}.json").read_text())
    return info, load_file(FIXTURES / f"{FIXTURE}.safetensors")


def _official_state(info, tensors) -> dict[str, Tensor]:
    state = official_random_state(info["keys"], info["seed"])
    state |= {k.removeprefix(STATS_PREFIX): v for k, v in tensors.items() if k.startswith(STATS_PREFIX)}
    return state | {k.removeprefix("head_bias/"): v for k, v in tensors.items() if k.startswith("head_bias/")}


@pytest.fixture(scope="module")
def official(fixture, tmp_path_factory):
    """An official-layout file (official names, BGR) and our model read from it."""
    info, tensors = fixture
    path = tmp_path_factory.mktemp("cvnets") / "ssd_mobilevit_xxs_320.pt"
    torch.save(_official_state(info, tensors), path)
    return path, mv.create_model(XXS, weights=path).eval()


def test_official_keys_are_ours(fixture):
    info, _ = fixture
    assert len(info["keys"]) == 394 and info["params"] == 1_755_050
    assert sorted(expected_keys("cvnets", task="detection")) == sorted(k for k, _ in info["keys"])
    written = from_ours(mv.create_model(XXS).state_dict(), "cvnets", task="detection")
    assert [[k, list(v.shape)] for k, v in written.items()] == info["keys"]  # same names, shapes and order


def test_official_file_reads_as_detection(official):
    ckpt = mv.read_checkpoint(official[0])
    assert (ckpt.layout, ckpt.task, ckpt.arch) == ("cvnets", "detection", XXS)
    assert ckpt.config == DETECTION_VARIANTS[XXS]


@pytest.mark.parametrize("size", [(320, 320), (384, 512), (300, 300)])
def test_raw_outputs_and_anchors_equal_official(fixture, official, size):
    info, ref = fixture
    sizes = [tuple(s) for s in info["sizes"]]
    x = official_inputs(sizes, info["seed"])[sizes.index(size)]
    key = f"{size[0]}x{size[1]}"
    model = official[1]
    with torch.no_grad():
        raw = model.forward_raw(x.flip(1))  # the official model reads BGR; ours RGB
        swapped = model.forward_raw(x)
    cols = info["logit_classes"]
    logits = raw.class_logits[0]
    moments = torch.stack([logits.sum(-1), logits.square().sum(-1)], -1)
    assert raw.anchors.shape == ref[f"anchors_{key}"].shape
    assert _rel(raw.anchors, ref[f"anchors_{key}"]) <= 1e-6
    assert _rel(raw.box_regression[0], ref[f"locations_{key}"]) <= TOL
    assert _rel(logits[:, cols], ref[f"logits_{key}"]) <= TOL
    assert _rel(moments, ref[f"logit_moments_{key}"]) <= TOL
    assert _rel(swapped.box_regression[0], ref[f"locations_{key}"]) > 1e-2  # no BGR -> RGB flip would fail


def test_wrong_head_order_or_anchor_scale_would_fail(fixture, official):
    info, ref = fixture
    x = official_inputs([(320, 320)], info["seed"])[0].flip(1)
    model = official[1]
    with torch.no_grad():
        raw = model.forward_raw(x)
    # the 85 outputs of each anchor are [4 box | 81 classes]: the other order mixes boxes into logits
    per_anchor = torch.cat([raw.box_regression[0], raw.class_logits[0]], -1)
    assert _rel(per_anchor[:, -4:], ref["locations_320x320"]) > 1e-2
    # levels run fine to coarse; rows before columns
    grid = raw.box_regression[0, :2400].reshape(20, 20, 6, 4).transpose(0, 1).reshape(-1, 4)
    assert _rel(grid, ref["locations_320x320"][:2400]) > 1e-2
    other = mv.create_model(XXS, weights=official[0], min_scale=0.2).eval()
    with torch.no_grad():
        assert _rel(other.forward_raw(x).anchors, ref["anchors_320x320"]) > 1e-2


def _as_rows(labels: Tensor, scores: Tensor, boxes: Tensor) -> list[tuple[int, float, list[float]]]:
    return sorted(zip(labels.tolist(), scores.tolist(), boxes.tolist(), strict=True))


@pytest.mark.parametrize("size", [(320, 320), (384, 512), (300, 300)])
def test_detections_equal_official_predict(fixture, official, size):
    info, ref = fixture
    sizes = [tuple(s) for s in info["sizes"]]
    x = official_inputs(sizes, info["seed"])[sizes.index(size)].flip(1)
    key = f"{size[0]}x{size[1]}"
    with torch.no_grad():
        det = official[1].postprocess(official[1].forward_raw(x))[0]
    assert len(det["labels"]) == info["predict"]["num_detections"][key] > 20
    assert torch.equal(det["labels"], ref[f"det_labels_{key}"])  # class order, as the official predict
    ours = _as_rows(det["labels"], det["scores"], det["boxes"])
    theirs = _as_rows(ref[f"det_labels_{key}"], ref[f"det_scores_{key}"], ref[f"det_boxes_{key}"])
    for (la, sa, ba), (lb, sb, bb) in zip(ours, theirs, strict=True):
        assert la == lb and abs(sa - sb) <= 1e-5
        assert max(abs(p - q) for p, q in zip(ba, bb, strict=True)) <= 1e-4


def test_matching_and_loss_equal_official(fixture, official):
    info, ref = fixture
    spec = info["loss"]
    h, w = spec["size"]
    images = torch.cat(official_inputs([(h, w)] * 2, info["seed"])).flip(1)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    targets = [
        {"boxes": torch.tensor(b) * scale, "labels": torch.tensor(lbl)}
        for b, lbl in zip(spec["gt_boxes"], spec["gt_labels"], strict=True)
    ]
    model = official[1]
    with torch.no_grad():
        raw = model.forward_raw(images)
        labels, regression = model.match(raw, targets, (h, w))
        loss = model.loss(raw, targets, (h, w))
    for i in range(2):
        assert torch.equal(labels[i], ref[f"match_labels_{i}"])
        assert _rel(regression[i][labels[i] > 0], ref[f"match_targets_positive_{i}"]) <= 1e-5
    assert _rel(regression.sum(1), ref["match_targets_sum"]) <= 1e-4
    total = (loss["loss_box"] + loss["loss_cls"]).item()
    assert total == pytest.approx(spec["value"], rel=1e-4)


def test_round_trip_and_conversion_keep_outputs(tmp_path, official, capsys):
    src = official[0]
    ours = tmp_path / "ours.safetensors"
    assert cli_main(["convert", str(src), str(ours)]) == 0
    assert "(detection), 81 classes" in capsys.readouterr().out
    back = tmp_path / "back.pt"
    assert cli_main(["convert", str(ours), str(back), "--to", "cvnets"]) == 0
    original = torch.load(src, weights_only=True)
    written = torch.load(back, weights_only=True)
    assert sorted(written) == sorted(original) and all(torch.equal(written[k], original[k]) for k in original)
    ckpt = mv.read_checkpoint(ours)
    assert (ckpt.layout, ckpt.task, ckpt.arch) == ("mobilevit", "detection", XXS)


def test_hf_layout_is_refused_for_detection(tmp_path, official):
    with pytest.raises(mv.CheckpointError, match="cannot write a detection model in the hf layout"):
        mv.save_checkpoint(official[1].state_dict(), official[1].config, tmp_path / "hf", "hf")


def test_new_num_classes_keeps_all_but_the_predictors(official, caplog):
    with caplog.at_level(logging.INFO):
        model = mv.create_model(XXS, weights=official[0], num_classes=11)
    assert model.num_classes == 11 and "classifier not loaded" in caplog.text
    base = official[1].state_dict()
    for k, v in model.state_dict().items():
        if ".pred.pw." in k or k.startswith("heads.5.pred."):
            assert v.shape != base[k].shape
        else:
            assert torch.equal(v, base[k]), k


@pytest.mark.parametrize("layout", ["mobilevit", "cvnets"])
def test_classification_checkpoint_fills_the_backbone(tmp_path, caplog, layout):
    classifier = mv.create_model("mobilevit_xxs", num_classes=10)
    path = mv.save_checkpoint(
        classifier.state_dict(),
        classifier.config,
        tmp_path / f"c.{'pt' if layout == 'cvnets' else 'safetensors'}",
        layout,
    )
    with caplog.at_level(logging.INFO):
        model = mv.create_model(XXS, weights=path, num_classes=11)
    assert "into a detection model" in caplog.text
    backbone = classifier.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(v, backbone[k.removeprefix("backbone.")]), k


def test_detector_does_not_fill_other_tasks(official):
    with pytest.raises(mv.CheckpointError, match="detection checkpoint"):
        mv.create_model("mobilevit_xxs_deeplabv3", weights=official[0])
    other = mv.create_model("mobilevit_xs_ssdlite")
    with pytest.raises(mv.CheckpointError, match="tensors differ in shape"):
        mv.create_model("mobilevit_xs_ssdlite", weights=official[0])
    assert isinstance(other, MobileViTSSDLite)


def test_our_format_keeps_the_detection_config(tmp_path):
    src = mv.create_model(XXS, num_classes=5, min_scale=0.2, max_scale=0.95, score_thresh=0.3, patch_sizes=(4, 4, 2))
    path = mv.save_checkpoint(src.state_dict(), src.config, tmp_path / "det.safetensors", arch=XXS)
    assert mv.read_checkpoint(path).config == src.config
    model = mv.create_model(XXS, weights=path)  # anchors and thresholds follow the checkpoint
    assert model.config == src.config
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64)
        assert torch.equal(model.eval().forward_raw(x).anchors, src.eval().forward_raw(x).anchors)
    assert mv.create_model(XXS, weights=path, score_thresh=0.1).config.score_thresh == 0.1
