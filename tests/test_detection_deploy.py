"""SSDLite-MobileViT in inference form and exported: same raw outputs and detections as the training form.

The detector's BatchNorm statistics and class logits are calibrated on images (see
:func:`mobilevit.deployment.bench.calibrate_detector`) so that about as many scores pass the 0.05 threshold
as for a trained detector, and its boxes are enlarged so that neighbours overlap and NMS suppresses many:
post-processing then has real work, and detections are compared as sets (boxes within 1e-4, scores
within 1e-5). Core ML and ExecuTorch conversions take minutes on a busy 2-core machine: set
MOBILEVIT_SLOW_TESTS=1 to run them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import mobilevit as mv
from conftest import randomize
from mobilevit.cli import main
from mobilevit.deployment import export
from mobilevit.deployment.bench import calibrate_detector
from mobilevit.deployment.export import DetectionGraph, ExportError, non_max_suppression, onnx_detections
from mobilevit.deployment.fuse import DeployedSSDLite, FusedConv
from mobilevit.models.ssdlite import DETECTION_VARIANTS, MobileViTSSDLite

TOL = 1e-4  # raw outputs, relative to the largest magnitude
BOX_TOL, SCORE_TOL = 1e-4, 1e-5  # detections of an exported file vs the module it was exported from
DEPLOY_SCORE_TOL = 1e-4  # the inference form's scores vs the training form's (BatchNorm folded: other rounding)
CLASSES = 11
slow = pytest.mark.skipif(
    not os.environ.get("MOBILEVIT_SLOW_TESTS"), reason="minutes on 2 cores; set MOBILEVIT_SLOW_TESTS=1"
)


def images(batch: int, size: tuple[int, int] = (320, 320), seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def calibrated(**overrides) -> MobileViTSSDLite:
    """XXS SSDLite, random weights, ~1500 candidates per image, boxes ~2x their anchors (so NMS suppresses)."""
    config = DETECTION_VARIANTS["mobilevit_xxs_ssdlite"].replace(num_classes=CLASSES, **overrides)
    model = randomize(MobileViTSSDLite(config))
    calibrate_detector(model, images(4, seed=100), candidates=1500, spread=1.0)
    with torch.no_grad():
        for head in model.heads:
            conv = head.pred.pw if hasattr(head.pred, "pw") else head.pred
            channel = torch.arange(conv.out_channels) % (4 + CLASSES)
            conv.weight[channel < 4] *= 0.3
            conv.bias[(channel == 2) | (channel == 3)] += 4.0  # w, h: exp(0.2 * 4) = 2.2 x the anchor
    model.weights_meta = {"categories": [f"class {i}" for i in range(CLASSES)]}
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> MobileViTSSDLite:
    return calibrated()


@pytest.fixture(scope="module")
def capped() -> MobileViTSSDLite:
    """At most 100 detections per class, so that the cap binds for some classes and not for others."""
    return calibrated(topk_per_class=100)


def assert_parity(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel <= TOL, rel


def assert_same_detections(
    got: list[dict], expected: list[dict], scale: float = 1.0, score_tol: float = SCORE_TOL
) -> int:
    """Same detections per image as sets (box within BOX_TOL normalised, so ``scale`` x that in pixels of an image
    whose longer side is ``scale``; score within ``score_tol``; same label), ``got`` in class order and by
    decreasing score within a class; returns the number of detections."""
    assert len(got) == len(expected)
    total = 0
    for g, e in zip(got, expected, strict=True):
        labels = g["labels"]
        assert torch.equal(labels, e["labels"])  # both in class order: the same number per class
        assert bool((labels[1:] >= labels[:-1]).all())
        for c in labels.unique():
            gb, gs = g["boxes"][labels == c], g["scores"][labels == c]
            eb, es = e["boxes"][labels == c], e["scores"][labels == c]
            assert bool((gs[1:] <= gs[:-1]).all())
            close = (gb[:, None] - eb[None]).abs().amax(-1) <= BOX_TOL * scale
            close &= (gs[:, None] - es[None]).abs() <= score_tol
            used = torch.zeros(len(eb), dtype=torch.bool)
            for row in close:
                free = torch.nonzero(row & ~used).flatten()
                assert len(free), "a detection has no counterpart"
                used[free[0]] = True
        total += len(labels)
    return total


def postprocessed(model: nn.Module, x: torch.Tensor, pixels: bool = False) -> list[dict]:
    with torch.no_grad():
        if pixels:
            return model(x)
        return model.postprocess(model.forward_raw(x))


# ---------------------------------------------------------------------------------------- deploy


@pytest.mark.parametrize("size", [(320, 320), (300, 412)])
def test_deploy_matches_the_training_form(model, size):
    fast = mv.deploy(model)
    x = images(2, size, seed=1)
    with torch.no_grad():
        ref, raw = model.forward_raw(x), fast.forward_raw(x)
        assert_parity(raw.box_regression, ref.box_regression)
        assert_parity(raw.class_logits, ref.class_logits)
        assert torch.equal(raw.anchors, ref.anchors)
        assert_parity(fast.decode_boxes(raw), model.decode_boxes(ref))
    got, expected = postprocessed(fast, x, pixels=True), postprocessed(model, x, pixels=True)
    assert assert_same_detections(got, expected, max(size), DEPLOY_SCORE_TOL) > 1000
    assert_same_detections(fast.postprocess(raw), model.postprocess(ref), score_tol=DEPLOY_SCORE_TOL)


def test_deploy_form_folds_batchnorm_and_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = mv.deploy(model)
    assert isinstance(fast, DeployedSSDLite) and fast.config == model.config and fast.num_classes == CLASSES
    assert fast.weights_meta == model.weights_meta
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    # extra layers: dw + pw (ReLU) x 3; heads: the projections of levels 0 and 1 (ReLU), the dw of levels 0-4
    extra = [m for m in fast.extra.modules() if isinstance(m, FusedConv)]
    heads = [m for m in fast.heads.modules() if isinstance(m, FusedConv)]
    assert [m.onednn_act for m in extra] == ["none", "relu"] * 3
    assert [m.onednn_act for m in heads] == ["relu", "none", "relu", "none", "none", "none", "none"]
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last) for m in fast.modules() if isinstance(m, nn.Conv2d)
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


# ------------------------------------------------------------------------------------------ ONNX


def test_onnx_raw_outputs_at_320_and_detections_on_the_host(model, tmp_path):
    """The default export: fixed 320x320, ``boxes`` and ``scores``; NMS done by :func:`onnx_detections`."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = export.export_model(model, tmp_path / "d.onnx", "onnx")
    proto = onnx.load(str(path))
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert dims == {"boxes": [1, 3232, 4], "scores": [1, 3232, CLASSES]}
    assert "NonMaxSuppression" not in {n.op_type for n in proto.graph.node}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["task"] == "detection" and meta["image_size"] == "320x320" and meta["outputs"] == "boxes,scores"
    assert json.loads(meta["postprocess"]) == {"score_thresh": 0.05, "nms_iou": 0.5, "topk_per_class": 200}
    assert json.loads(meta["categories"])[-1] == "class 10"
    x = images(1, seed=2)
    boxes, scores = export.run_onnx(path, x)
    with torch.no_grad():
        raw = model.forward_raw(x)
    assert_parity(boxes, model.decode_boxes(raw))
    assert_parity(scores, raw.class_logits.softmax(-1))
    assert assert_same_detections(onnx_detections(boxes, scores), postprocessed(model, x)) > 100
    assert_same_detections(onnx_detections(boxes.numpy(), scores.numpy(), image_sizes=[(320, 320)]), model(x), 320)


def test_onnx_postprocess_in_the_graph_with_dynamic_batch_and_size(capped, tmp_path):
    """NonMaxSuppression in the graph, anchors computed in the graph: the detections of ``model(x)`` at any size."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = export.export_model(
        capped, tmp_path / "d.onnx", "onnx", dynamic=True, dynamic_size=True, postprocess=True
    )  # checked by the export at 320x320 and 241x403
    proto = onnx.load(str(path))
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert dims == {
        "boxes": ["batch", "anchors", 4],
        "scores": ["batch", "anchors", CLASSES],
        "selected": ["detections", 3],
    }
    (nms,) = [n for n in proto.graph.node if n.op_type == "NonMaxSuppression"]
    assert [(a.name, a.i) for a in nms.attribute] == [("center_point_box", 0)]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["image_size"] == "dynamic" and "at most 100 per class" in meta["output"]
    fast = mv.deploy(capped, channels_last=False)  # what the file was made from
    for batch, size in ((2, (320, 320)), (1, (300, 412))):
        x = images(batch, size, seed=3)
        boxes, scores, selected = export.run_onnx(path, x)
        assert selected.dtype == torch.int64 and selected[:, 1].min() >= 1  # no background
        n = assert_same_detections(onnx_detections(boxes, scores, selected), postprocessed(fast, x))
        got = onnx_detections(boxes, scores, selected, image_sizes=[size] * batch)
        assert_same_detections(got, postprocessed(fast, x, pixels=True), max(size))
        assert_same_detections(got, postprocessed(capped, x, pixels=True), max(size), DEPLOY_SCORE_TOL)
        per_class = torch.bincount(got[0]["labels"], minlength=CLASSES)[1:]
        assert per_class.max() == 100 and per_class.min() < 100  # the cap binds for some classes only
        candidates = (scores[..., 1:] > 0.05).sum().item()
        assert n < 0.7 * candidates  # NMS and the cap removed many candidates


def test_onnx_nms_operator_semantics_are_ours():
    """onnxruntime's NonMaxSuppression keeps scores strictly above the threshold and drops boxes whose IoU is
    strictly above iou_threshold, per class, best first, at most max_out: exactly :func:`non_max_suppression`."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    g = torch.Generator().manual_seed(4)
    centres, sizes = torch.rand(2, 300, 2, generator=g), torch.rand(2, 300, 2, generator=g) * 0.3 + 0.05
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], -1)
    boxes[:, :3] = torch.tensor([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.25], [0, 0, 0.5, 0.26]])  # IoU with box 0: 0.5, 0.52
    scores = torch.rand(2, 4, 300, generator=g) * 0.2
    scores[:, :, :3] = torch.tensor([0.9, 0.8, 0.7])
    scores[:, :, 3:8] = 0.05  # exactly at the threshold
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_out", "iou", "score"], ["selected"])],
        "nms",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [2, 300, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 4, 300]),
        ],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3])],
        initializer=[
            helper.make_tensor("max_out", TensorProto.INT64, [1], [20]),
            helper.make_tensor("iou", TensorProto.FLOAT, [1], [0.5]),
            helper.make_tensor("score", TensorProto.FLOAT, [1], [0.05]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})[0])
    assert torch.equal(got, non_max_suppression(boxes, scores, 20, 0.5, 0.05))  # same rows, same order
    kept = got[:, 2]
    assert (kept == 1).sum() == 8 and not (kept == 2).any()  # IoU 0.5 kept, 0.52 suppressed (8 = 2 images x 4)
    assert not ((kept >= 3) & (kept < 8)).any() and len(got) == 2 * 4 * 20  # at the threshold: dropped; the cap


def test_parity_check_of_detectors_names_the_output(model):
    x = images(1, seed=5)
    graph = DetectionGraph(mv.deploy(model, channels_last=False), postprocess=True).eval()
    expected = graph.reference(x)
    boxes, scores, selected = (t.clone() for t in expected)
    assert len(selected) > 50 and graph.mismatch([boxes, scores, selected], expected) is None
    with torch.no_grad():
        assert graph.mismatch(list(graph(x)), expected) is None  # the traced path (anchors in the graph)
    assert graph.mismatch([boxes, scores, selected[1:]], expected).startswith("selected: 1 of")
    assert graph.mismatch([boxes + 1e-3, scores, selected], expected).startswith("boxes: largest difference")
    assert graph.mismatch([boxes, scores], expected) == "2 outputs instead of 3"


def test_detector_export_refusals(model, tmp_path):
    with pytest.raises(
        ExportError, match=r"supported in ONNX and OpenVINO files only, not torchscript.*onnx_detections"
    ):
        export.export_model(model, tmp_path / "d.pt", "torchscript", postprocess=True)
    with pytest.raises(ExportError, match="postprocess=True is for detectors; this is a classification model"):
        export.export_model(mv.create_model("mobilevit_xxs"), tmp_path / "c.onnx", "onnx", postprocess=True)
    peer = mv.create_model("torchvision:ssdlite320_mobilenet_v3_large", num_classes=3)
    with pytest.raises(ExportError, match=r"takes mobilevit's SSDLite detectors .*not TorchvisionModel"):
        export.export_model(peer, tmp_path / "p.onnx", "onnx")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- TorchScript


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_raw_outputs(model, tmp_path):
    path = export.export_model(mv.deploy(model), tmp_path / "d.pt", "torchscript", dynamic=True)
    extra = {"mobilevit.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["mobilevit.json"])
    assert meta["task"] == "detection" and meta["image_size"] == "320x320" and meta["outputs"] == "boxes,scores"
    x = images(3, seed=6)
    with torch.no_grad():
        boxes, scores = loaded(x)
        raw = model.forward_raw(x)
    assert_parity(boxes, model.decode_boxes(raw))
    assert_parity(scores, raw.class_logits.softmax(-1))


# --------------------------------------------------------------------------- Core ML / ExecuTorch


@slow
def test_coreml_detector_package(tmp_path):
    ct = pytest.importorskip("coremltools")
    small = calibrated(transformer_depths=(1, 1, 1))
    path = export.export_model(mv.deploy(small), tmp_path / "d.mlpackage", "coreml")
    spec = ct.utils.load_spec(str(path))
    outputs = {o.name: list(o.type.multiArrayType.shape) for o in spec.description.output}
    assert outputs == {"boxes": [1, 3232, 4], "scores": [1, 3232, CLASSES]}
    assert spec.description.metadata.userDefined["task"] == "detection"


@slow
def test_executorch_detector_matches_pytorch(tmp_path):
    pytest.importorskip("executorch")
    small = calibrated(transformer_depths=(1, 1, 1))
    path = export.export_model(mv.deploy(small), tmp_path / "d.pte", "executorch")
    x = images(1, seed=7)
    boxes, scores = export.run_executorch(path, x)
    with torch.no_grad():
        raw = small.forward_raw(x)
    assert_parity(boxes, small.decode_boxes(raw))
    assert_parity(scores, raw.class_logits.softmax(-1))


# ----------------------------------------------------------------------------------------- bench


def test_bench_detection_rows_with_the_torchvision_peer(capsys, tmp_path):
    pytest.importorskip("torchvision")
    argv = ["bench", "--models", "mobilevit_xxs_ssdlite", "--size", "64", "--batch-sizes", "1"]
    argv += ["--impl", "tv-ssdlite,tv-ssdlite+post,ours,deploy,deploy+post,timm"]
    code = main([*argv, "--threads", "1", "--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert code == 0 and "speed-up vs tv-ssdlite" in out
    assert "| mobilevit_xxs_ssdlite | 1 | deploy+post | 2,2,2 |" in out
    rows = {r["impl"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert list(rows) == ["tv-ssdlite", "tv-ssdlite+post", "ours", "deploy", "deploy+post"]  # timm: not for detection
    assert rows["tv-ssdlite"]["speedup"] == pytest.approx(1.0) and rows["tv-ssdlite"]["floor_ratio"] is None
    assert all(r["median_ms"] > 0 and r["size"] == 64 for r in rows.values())
