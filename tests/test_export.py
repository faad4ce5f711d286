"""Export to ONNX, TorchScript, Core ML and ExecuTorch: exported logits match PyTorch's; helpful errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import mobilevit as mv
from conftest import randomize
from mobilevit.deployment import export
from mobilevit.deployment.export import ExportError
from mobilevit.models.layers import ConvNormAct

SIZE = (128, 128)
ATOL = 1e-4


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return randomize(mv.create_model("mobilevit_xxs", num_classes=10))


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def images(batch: int, seed: int = 0, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def inference_form(model: nn.Module) -> nn.Module:
    """``mobilevit.deploy(model)`` when it exists, else a stand-in with the same kind of ops (BN folded into conv)."""
    model = copy.deepcopy(model).eval()
    if hasattr(mv, "deploy"):
        return mv.deploy(model)
    for module in model.modules():
        if isinstance(module, ConvNormAct):
            module.conv, module.bn = fuse_conv_bn_eval(module.conv, module.bn), nn.Identity()
    return model


# ------------------------------------------------------------------------------------------ ONNX


def test_onnx_matches_pytorch(model, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = export.export_model(model, tmp_path / "m.onnx", "onnx", image_size=SIZE)
    assert path == tmp_path / "m.onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["logits"]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 3, *SIZE]
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert "input" in {p.key for p in proto.metadata_props}
    x = images(1)
    assert max_diff(export.run_onnx(path, x), logits(model, x)) <= ATOL


def test_onnx_dynamic_batch_of_the_inference_form(model, tmp_path):
    """``mobilevit.deploy``'s form (conv with bias, no BatchNorm, channels_last weights) with a dynamic batch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    fast = inference_form(model)
    path = export.export_onnx(fast, tmp_path / "m.onnx", image_size=SIZE, dynamic=True)
    for batch in (3, 1):
        x = images(batch, seed=batch)
        assert max_diff(export.run_onnx(path, x), logits(fast, x)) <= ATOL
        assert max_diff(export.run_onnx(path, x), logits(model, x)) <= ATOL
    with pytest.raises(ValueError, match=r"takes images shaped \['batch', 3, 128, 128\]"):
        export.run_onnx(path, images(1, size=(96, 96)))


def test_onnx_falls_back_to_the_torchscript_exporter(model, tmp_path, monkeypatch, caplog):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    def broken(*args, **kwargs):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(export, "_onnx_dynamo", broken)
    path = export.export_onnx(model, tmp_path / "m.onnx", image_size=SIZE)
    assert "capture failed" in caplog.text
    x = images(1, seed=3)
    assert max_diff(export.run_onnx(path, x), logits(model, x)) <= ATOL
    # a dynamic batch is never left to tracing, which could silently fix it
    with pytest.raises(ExportError, match=r"dynamic batch failed \(RuntimeError: capture failed\).*dynamic=False"):
        export.export_onnx(model, tmp_path / "d.onnx", image_size=SIZE, dynamic=True)
    assert not (tmp_path / "d.onnx").exists()


# ----------------------------------------------------------------------------------- TorchScript


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch_and_keeps_the_batch_dynamic(model, tmp_path):
    model.train()  # the export works on an eval copy and leaves the caller's model as it was
    path = export.export_model(model, tmp_path / "m.pt", "torchscript", image_size=SIZE, dynamic=True)
    assert model.training
    extra = {"mobilevit.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert "[0, 1]" in json.loads(extra["mobilevit.json"])["input"]
    x = images(2, seed=1)
    with torch.no_grad():
        assert max_diff(loaded(x), logits(model, x)) <= ATOL


# -------------------------------------------------------------------------------------- Core ML


def _mil_scale_of(spec, input_name: str) -> float:
    """The constant that the ML Program multiplies the image input by (the baked-in ImageType scale)."""
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
    for op in block.operations:
        if op.type == "mul" and op.inputs["x"].arguments[0].name == input_name:
            value = consts[op.inputs["y"].arguments[0].name].attributes["val"].immediateValue.tensor
            return value.floats.values[0]
    raise AssertionError(f"no scaling of {input_name!r} in the program")


def test_coreml_package_takes_an_rgb_image_scaled_by_1_over_255(model, tmp_path):
    ct = pytest.importorskip("coremltools")
    model.weights_meta = {"categories": [f"class {i}" for i in range(10)]}
    try:
        path = export.export_model(model, tmp_path / "m.mlpackage", "coreml", image_size=SIZE)
    finally:
        model.weights_meta = {}
    assert path.is_dir() and (path / "Manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]
    spec = ct.utils.load_spec(str(path))
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion >= 6  # iOS 15+
    (image,) = spec.description.input
    assert image.name == "image" and image.type.WhichOneof("Type") == "imageType"
    assert image.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert (image.type.imageType.height, image.type.imageType.width) == SIZE
    assert [o.name for o in spec.description.output] == ["logits"]
    assert list(spec.description.output[0].type.multiArrayType.shape) == [1, 10]
    assert _mil_scale_of(spec, "image") == pytest.approx(1 / 255, rel=1e-6)
    assert '"class 9"' in spec.description.metadata.userDefined["categories"]


def test_coreml_refuses_a_batch(model, tmp_path):
    for kwargs in ({"dynamic": True}, {"batch_size": 2}):
        with pytest.raises(ExportError, match=r"one image at a time.*predictions\(fromBatch:\)"):
            export.export_coreml(model, tmp_path / "m.mlpackage", **kwargs)


def test_atomic_directory_replaces_only_on_success(tmp_path):
    dst = tmp_path / "m.mlpackage"
    dst.mkdir()
    (dst / "old").write_text("old")
    with export._atomic_dir(dst) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in dst.iterdir()] == ["new"]
    with pytest.raises(RuntimeError), export._atomic_dir(dst) as tmp:
        tmp.mkdir()
        raise RuntimeError("conversion failed")
    assert [p.name for p in dst.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["m.mlpackage"]


# ----------------------------------------------------------------------------------- ExecuTorch


def test_executorch_runs_and_matches_pytorch_with_a_dynamic_batch(tmp_path):
    pytest.importorskip("executorch")
    # Lowering is slow (minutes for the full mobilevit_xxs on a busy 2-core machine), so this test
    # uses its widths with one transformer layer per MobileViT block: the same kinds of ops. The
    # inference form copies its input to channels_last, which ExecuTorch 1.5 gets wrong with a
    # dynamic batch unless the export turns that copy into a plain one.
    small = randomize(mv.create_model("mobilevit_xxs", num_classes=10, transformer_depths=(1, 1, 1)))
    fast = inference_form(small)
    path = export.export_model(fast, tmp_path / "m.pte", "executorch", image_size=SIZE, dynamic=True, batch_size=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pte"]
    for batch in (3, 1):
        x = images(batch, seed=batch)
        assert max_diff(export.run_executorch(path, x), logits(small, x)) <= ATOL
    with pytest.raises(ValueError, match=r"takes images shaped \['<=3', 3, 128, 128\], got \[4, 3, 128, 128\]"):
        export.run_executorch(path, images(4))


def test_executorch_rewrites_are_exact():
    q, k, v = torch.randn(3, 5, 4, 7, 8).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert max_diff(export._sdpa_as_bmm(q, k, v), expected) <= 1e-6
    scaled = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert max_diff(export._sdpa_as_bmm(q, k, v, scale=0.3), scaled) <= 1e-6
    assert export._sdpa_as_bmm(q, k, v, is_causal=True) is NotImplemented
    x = torch.randn(2, 3, 4)
    assert all(torch.equal(a, b) for a, b in zip(export._unbind_as_slices(x, 1), x.unbind(1), strict=True))
    y = torch.randn(2, 3, 4, 5)
    assert export._clone_contiguous(y) is NotImplemented
    assert export._clone_contiguous(y, memory_format=torch.channels_last).is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(export._unbind_as_slices(x, -1), x.unbind(-1), strict=True))


def test_executorch_dynamic_batch_needs_an_upper_bound(model, tmp_path):
    with pytest.raises(ExportError, match=r"plans memory for the largest batch.*batch_size=N"):
        export.export_executorch(model, tmp_path / "m.pte", dynamic=True)


# ---------------------------------------------------------------------------------------- errors


def test_unknown_format(model, tmp_path):
    with pytest.raises(ExportError, match=r"unknown export format 'tflite'; choose one of onnx, openvino, torchscript"):
        export.export_model(model, tmp_path / "m.tflite", "tflite")


@pytest.mark.parametrize("format", export.FORMATS)
def test_wrong_suffix(model, tmp_path, format):
    suffix = export.SUFFIXES[format]
    with pytest.raises(ExportError, match=rf"{format} files end in '{suffix}'.*m{suffix}"):
        export.export_model(model, tmp_path / "m.bin", format)
    assert not list(tmp_path.iterdir())


def test_bad_sizes(model, tmp_path):
    with pytest.raises(ExportError, match="image_size must be"):
        export.export_model(model, tmp_path / "m.pt", "torchscript", image_size=(0, 64))
    with pytest.raises(ExportError, match="batch_size must be"):
        export.export_model(model, tmp_path / "m.pt", "torchscript", batch_size=0)


@pytest.mark.parametrize(
    ("format", "package"),
    [("onnx", "onnx"), ("openvino", "openvino"), ("coreml", "coremltools"), ("executorch", "executorch")],
)
def test_missing_package_gives_the_install_hint(model, tmp_path, monkeypatch, format, package):
    real = export._import_module

    def fake(name):
        if name.split(".")[0] == package:
            raise ModuleNotFoundError(f"No module named {package!r}")
        return real(name)

    monkeypatch.setattr(export, "_import_module", fake)
    with pytest.raises(ExportError, match=rf"optional package '{package}'.*pip install 'mobilevit\[export\]'"):
        export.export_model(model, tmp_path / f"m{export.SUFFIXES[format]}", format)


def test_conversion_failure_is_wrapped(tmp_path):
    not_for_images = nn.Linear(5, 2)
    with pytest.raises(ExportError, match=r"^TorchScript export failed: RuntimeError: mat1 and mat2 shapes"):
        export.export_torchscript(not_for_images, tmp_path / "m.pt", image_size=(8, 8))
    with pytest.raises(ExportError, match=r"^ExecuTorch export failed: RuntimeError: .*\[5, 2\]"):
        export.export_executorch(not_for_images, tmp_path / "m.pte", image_size=(8, 8))
    assert not list(tmp_path.iterdir())
