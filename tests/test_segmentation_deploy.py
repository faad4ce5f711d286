"""DeepLabv3-MobileViT in inference form and exported: same per-pixel logits as the training form.

BatchNorm statistics are calibrated on images (not left at random values), so that the logits depend
on the input: a colour-order or upsampling mistake then moves them far beyond the 1e-4 tolerance.
Core ML and ExecuTorch conversions take minutes on a busy 2-core machine: set MOBILEVIT_SLOW_TESTS=1
to run them.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mobilevit as mv
from conftest import randomize
from mobilevit.cli import main
from mobilevit.deployment import export
from mobilevit.deployment.export import ExportError
from mobilevit.deployment.fuse import DeployedDeepLabV3, FusedConv
from mobilevit.models.deeplabv3 import SEGMENTATION_VARIANTS, MobileViTDeepLabV3

TOL = 1e-4  # relative to the largest logit
CATEGORIES = [f"class {i}" for i in range(21)]
PREPROCESS = {"resize_size": 512, "crop_size": 512, "interpolation": "bilinear"}
slow = pytest.mark.skipif(
    not os.environ.get("MOBILEVIT_SLOW_TESTS"), reason="minutes on 2 cores; set MOBILEVIT_SLOW_TESTS=1"
)


def calibrated(patch_sizes: tuple[int, int, int] = (2, 2, 2), **overrides) -> MobileViTDeepLabV3:
    """XXS DeepLabv3 with random weights and BatchNorm statistics measured on random images."""
    config = SEGMENTATION_VARIANTS["mobilevit_xxs_deeplabv3"].replace(patch_sizes=patch_sizes, **overrides)
    model = randomize(MobileViTDeepLabV3(config))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
        bn.train()
    with torch.no_grad():
        model(images(4, size=(128, 128), seed=100))
    for bn in norms:
        bn.momentum = 0.1
    model.weights_meta = {"categories": CATEGORIES, "preprocess": PREPROCESS}
    return model.eval()


def images(batch: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_logits(x) if logits else model(x)


def assert_parity(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``got`` equals ``expected`` within :data:`TOL` of its largest magnitude; returns the relative difference."""
    assert got.shape == expected.shape
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel <= TOL, rel
    return rel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> MobileViTDeepLabV3:
    return calibrated()


@pytest.fixture(scope="module")
def model_842() -> MobileViTDeepLabV3:
    return calibrated((8, 4, 2))


def test_calibrated_logits_depend_on_the_input(model):
    """The parity tests can fail: other images, BGR order or align_corners=True move the logits by far more than TOL."""
    x = images(1, (128, 160))
    ref = outputs(model, x)
    scale = ref.abs().max()
    assert (outputs(model, images(1, (128, 160), seed=1)) - ref).abs().max() > 100 * TOL * scale
    assert (outputs(model, x.flip(1)) - ref).abs().max() > 100 * TOL * scale
    corners = F.interpolate(outputs(model, x, logits=True), size=x.shape[-2:], mode="bilinear", align_corners=True)
    assert (corners - ref).abs().max() > 100 * TOL * scale


# ---------------------------------------------------------------------------------------- deploy


@pytest.mark.parametrize("size", [(512, 512), (375, 500)])
def test_deploy_matches_the_training_form(model, size):
    fast = mv.deploy(model)
    x = images(1, size, seed=2)
    assert_parity(outputs(fast, x), outputs(model, x))
    logits = outputs(fast, x, logits=True)
    assert logits.shape == (1, 21, math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    assert_parity(logits, outputs(model, x, logits=True))


def test_deploy_form_folds_batchnorm_fuses_relu_and_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = mv.deploy(model)
    assert isinstance(fast, DeployedDeepLabV3) and fast.config == model.config and fast.num_classes == 21
    assert fast.weights_meta["categories"] == CATEGORIES
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)) for m in fast.modules())
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    head = [m for m in fast.aspp.modules() if isinstance(m, FusedConv)]
    assert len(head) == 6 and all(m.onednn_act == "relu" for m in head)  # 4 branches, pooling, projection
    assert fast.aspp.branches[3].conv.dilation == (18, 18)
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last) for m in fast.modules() if isinstance(m, nn.Conv2d)
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


def test_deploy_with_patch_sizes_8_4_2_and_contiguous_layout(model_842):
    fast = mv.deploy(model_842, channels_last=False)
    x = images(2, (375, 500), seed=3)
    assert_parity(outputs(fast, x), outputs(model_842, x))


def test_deploy_rejects_other_modules():
    with pytest.raises(TypeError, match="MobileViT or MobileViTDeepLabV3"):
        mv.deploy(nn.Conv2d(3, 3, 1))


# ------------------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize("patches", [(2, 2, 2), (8, 4, 2)])
def test_onnx_with_dynamic_batch_and_size_follows_the_input(model, model_842, patches, tmp_path):
    """One file, traced at 128x128, gives the PyTorch logits at other batches and sizes (not multiples of 16)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    raw = model if patches == (2, 2, 2) else model_842
    given = raw if patches == (2, 2, 2) else mv.deploy(raw, channels_last=False)  # raw models are deployed first
    path = export.export_model(
        given, tmp_path / "seg.onnx", "onnx", image_size=(128, 128), dynamic=True, dynamic_size=True
    )
    proto = onnx.load(str(path))
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*proto.graph.input, *proto.graph.output)
    ]
    assert dims == [["batch", 3, "height", "width"], ["batch", 21, "height", "width"]]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["task"] == "segmentation" and meta["image_size"] == "dynamic"
    assert json.loads(meta["categories"]) == CATEGORIES and json.loads(meta["preprocess"]) == PREPROCESS
    assert "[batch, num_classes, H, W]" in meta["output"]
    for batch, size in ((2, (256, 256)), (1, (375, 500))):
        x = images(batch, size, seed=4)
        assert_parity(export.run_onnx(path, x), outputs(raw, x))


def test_onnx_static_export_of_the_inference_form(tmp_path):
    """The default export (fixed H and W, dynamic batch) also compares segmentation outputs and names the task.

    The ``torch.export``-based exporter takes half a minute for the full XXS here: one transformer layer per block.
    """
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = calibrated(transformer_depths=(1, 1, 1))
    path = export.export_onnx(
        mv.deploy(model, channels_last=False), tmp_path / "s.onnx", image_size=(96, 128), dynamic=True
    )
    proto = onnx.load(str(path))
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [
        "batch",
        21,
        96,
        128,
    ]
    assert {p.key: p.value for p in proto.metadata_props}["image_size"] == "96x128"
    x = images(3, (96, 128), seed=5)
    assert_parity(export.run_onnx(path, x), outputs(model, x))


def test_onnx_parity_check_refuses_a_file_that_differs(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    real = export._outputs
    monkeypatch.setattr(export, "_outputs", lambda model, x: real(model, x) + 1e-2)
    with pytest.raises(ExportError, match=r"onnxruntime's outputs for input \[1, 3, 16, 16\] differ from PyTorch's"):
        export.export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "c.onnx", image_size=(16, 16))
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- TorchScript


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_and_carries_the_metadata(model_842, tmp_path):
    path = export.export_model(
        mv.deploy(model_842), tmp_path / "s.pt", "torchscript", image_size=(160, 144), dynamic=True
    )
    extra = {"mobilevit.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["mobilevit.json"])
    assert meta["task"] == "segmentation" and meta["image_size"] == "160x144" and "[0, 1]" in meta["input"]
    assert json.loads(meta["categories"]) == CATEGORIES
    x = images(2, (160, 144), seed=6)
    with torch.no_grad():
        assert_parity(loaded(x), outputs(model_842, x))


@pytest.mark.parametrize("format", ["torchscript", "coreml", "executorch"])
def test_fixed_size_formats_refuse_dynamic_size(model, tmp_path, format):
    with pytest.raises(ExportError, match=rf"{format} files have a fixed H and W .* use ONNX for dynamic H and W"):
        export.export_model(model, tmp_path / f"m{export.SUFFIXES[format]}", format, dynamic_size=True)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- Core ML / ExecuTorch


@slow
def test_coreml_segmentation_package(tmp_path):
    """Core ML predicts only on macOS: here the conversion and the spec (output [1, 21, H, W], metadata)."""
    ct = pytest.importorskip("coremltools")
    small = calibrated(transformer_depths=(1, 1, 1))
    path = export.export_model(mv.deploy(small), tmp_path / "s.mlpackage", "coreml", image_size=(128, 96))
    spec = ct.utils.load_spec(str(path))
    assert [o.name for o in spec.description.output] == ["logits"]
    assert list(spec.description.output[0].type.multiArrayType.shape) == [1, 21, 128, 96]
    assert spec.description.metadata.userDefined["task"] == "segmentation"
    assert '"class 20"' in spec.description.metadata.userDefined["categories"]


@slow
def test_executorch_segmentation_matches_pytorch(tmp_path):
    pytest.importorskip("executorch")
    small = calibrated(transformer_depths=(1, 1, 1))
    path = export.export_model(mv.deploy(small), tmp_path / "s.pte", "executorch", image_size=(128, 96))
    x = images(1, (128, 96), seed=7)
    assert_parity(export.run_executorch(path, x), outputs(small, x))


# ----------------------------------------------------------------------------------------- bench


def test_bench_segmentation_rows_with_peers_and_patch_sizes(capsys, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    argv = ["bench", "--models", "mobilevit_xxs_deeplabv3", "--size", "32", "--batch-sizes", "1"]
    argv += ["--impl", "hf,tv-lraspp,ours,deploy", "--patch-sizes", "2,2,2", "8,4,2"]
    code = main([*argv, "--threads", "1", "--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("CPU: ") and "speed-up vs hf" in out
    assert "| mobilevit_xxs_deeplabv3 | 1 | deploy | 8,4,2 |" in out and "| tv-lraspp | - |" in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert set(result["cpu"]["features"]) >= {"AVX2", "AVX-512", "VNNI", "BF16", "AMX"} or not result["cpu"]["features"]
    rows = {(r["impl"], r["patch_sizes"]): r for r in result["rows"]}
    assert list(rows) == [
        ("hf", "2,2,2"),
        ("tv-lraspp", None),
        ("ours", "2,2,2"),
        ("deploy", "2,2,2"),
        ("ours", "8,4,2"),
        ("deploy", "8,4,2"),
    ]
    assert rows["hf", "2,2,2"]["speedup"] == pytest.approx(1.0) and rows["tv-lraspp", None]["floor_ratio"] is None
    assert all(r["median_ms"] > 0 and r["size"] == 32 for r in rows.values())
