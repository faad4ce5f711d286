"""OpenVINO export: fp32 IR equal to PyTorch, metadata in rt_info, int8 (NNCF) close to fp32, bf16 hint, atomic writes."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import mobilevit as mv
from conftest import randomize, write_mnist
from mobilevit.cli import main
from mobilevit.deployment import openvino as ovx
from mobilevit.deployment import runtime
from mobilevit.deployment.export import ExportError, export_model, onnx_detections
from mobilevit.deployment.runtime import ExportedFileError, bf16_support, load_exported
from test_detection_deploy import assert_same_detections

ov = pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SIZE = 32
PREPROCESS = {"resize_size": 32, "crop_size": 32, "interpolation": "bilinear"}
CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with a bright 8x8 square in the quadrant of their class (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.5
    half = SIZE // 2
    for i, k in enumerate(labels.tolist()):
        dy, dx = torch.randint(0, half - 8, (2,), generator=g).tolist()
        top, left = (k // 2) * half + dy, (k % 2) * half + dx
        x[i, k % 3, top : top + 8, left : left + 8] += 0.5
    return x.clamp(0, 1), labels


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """An XXS classifier trained for 40 steps on :func:`blobs` (about 99% accuracy), with class names."""
    torch.manual_seed(0)
    model = mv.create_model("mobilevit_xxs", num_classes=4)
    x, y = blobs(512, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        i = torch.randint(0, len(x), (32,))
        loss = nn.functional.cross_entropy(model.train()(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # settle the BatchNorm statistics
        for _ in range(20):
            model(x[torch.randint(0, len(x), (64,))])
    model.eval().weights_meta = {"categories": CLASSES, "preprocess": PREPROCESS}
    return model


@pytest.fixture(scope="module")
def fp32_ir(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / "m.xml"
    return export_model(
        mv.deploy(trained, channels_last=False), path, "openvino", image_size=(SIZE, SIZE), dynamic=True
    )


@pytest.fixture(scope="module")
def int8_ir(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("ov8") / "m.int8.xml"
    calibration = blobs(64, seed=2)[0]  # never the evaluation images (seed 3)
    return export_model(
        trained, path, "openvino", image_size=(SIZE, SIZE), dynamic=True, precision="int8", calibration=calibration
    )


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_fp32_ir_equals_pytorch_with_a_dynamic_batch(trained, fp32_ir):
    assert sorted(p.name for p in fp32_ir.parent.iterdir()) == ["m.bin", "m.xml"]  # nothing else left behind
    model = load_exported(fp32_ir, threads=1)
    assert model.format == "openvino" and model.input_shape == ["?", 3, SIZE, SIZE]
    for batch in (3, 1):
        x = blobs(batch, seed=batch)[0]
        got, expected = model(x), logits(trained, x)
        assert got.shape == (batch, 4)
        assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    # the tight tolerance means something: the same images in [0, 255] or BGR give other logits
    x = blobs(2, seed=5)[0]
    assert (model(x) - logits(trained, x * 255)).abs().max() > 1e-2
    assert (model(x) - logits(trained, x.flip(1))).abs().max() > 1e-2


def test_fp32_ir_metadata_round_trip(fp32_ir):
    model = load_exported(fp32_ir)
    assert model.task == "classification" and model.image_size == (SIZE, SIZE) and model.num_classes == 4
    assert model.categories == CLASSES and model.preprocess == PREPROCESS
    assert model.metadata["precision"] == "fp32" and model.metadata["inference_precision"] == "f32"
    assert model.metadata["num_classes"] == "4" and model.metadata["image_size"] == f"{SIZE}x{SIZE}"
    assert model.metadata["input"].startswith("float32 RGB in [0, 1]")
    assert model.weights_meta["preprocess"] == PREPROCESS and mv.model_transform(model).crop_size == SIZE
    # read back with OpenVINO alone: the rt_info section
    info = ov.Core().read_model(str(fp32_ir)).get_rt_info(["mobilevit", "categories"]).astype(str)
    assert json.loads(info) == CLASSES
    # explicit f32, so that CPUs with AMX do not switch to bf16 by themselves
    assert str(model._runner.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    assert model._runner.compiled.get_property("NUM_STREAMS") == 1


def test_int8_ir_keeps_the_predictions(trained, fp32_ir, int8_ir):
    text = int8_ir.read_text()
    assert text.count('type="FakeQuantize"') >= 20  # the convolutions are quantized
    model = load_exported(int8_ir)
    assert model.metadata["precision"] == "int8" and json.loads(model.metadata["quantization"])["preset"] == "mixed"
    x, y = blobs(256, seed=3)
    fp32, int8 = load_exported(fp32_ir)(x), model(x)
    assert (fp32.argmax(1) == y).float().mean() > 0.95
    assert (int8.argmax(1) == fp32.argmax(1)).float().mean() >= 0.97
    assert (int8.argmax(1) == y).float().mean() > 0.93
    error = ((int8 - fp32).norm() / fp32.norm()).item()
    assert 0 < error < 0.2  # quantized (not the fp32 graph), and close


@pytest.mark.parametrize("flags", [{"avx2", "fma"}, {"avx2", "avx_vnni"}, {"avx512f", "avx512_vnni"}])
def test_int8_files_warn_on_cpus_without_int8_dot_products(int8_ir, fp32_ir, flags, monkeypatch, recwarn):
    """On AVX2 CPUs without VNNI int8 runs no faster than fp32: loading an int8 file there says so; fp32 files
    and CPUs with VNNI load silently."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    load_exported(fp32_ir)
    assert not [w for w in recwarn if "int8" in str(w.message)]
    load_exported(int8_ir)
    said = [str(w.message) for w in recwarn if "int8" in str(w.message)]
    if flags & set(runtime.INT8_CPU_FLAGS):
        assert not said and runtime.int8_support() == (True, sorted(flags & set(runtime.INT8_CPU_FLAGS)))
    else:
        assert len(said) == 1 and "no int8 dot-product instructions" in said[0] and "avx512_vnni" in said[0]
        assert runtime.int8_support() == (False, [])


def test_a_broken_quantization_is_refused_and_nothing_is_replaced(trained, tmp_path, monkeypatch):
    """Calibration ranges 20x too small saturate every activation: the export check must refuse the file,
    leaving the previous .xml/.bin pair as it was and no temporary behind."""
    path = tmp_path / "m.xml"
    path.write_text("old xml")
    path.with_suffix(".bin").write_text("old bin")
    real = ovx.quantize_ir
    fast = dataclasses.replace(ovx.DEFAULT_QUANTIZATION, fast_bias_correction=True)
    monkeypatch.setattr(ovx, "quantize_ir", lambda model, images, *a: real(model, images * 0.05, fast))
    with pytest.raises(ExportError, match=r"too far from PyTorch's.*relative error"):
        export_model(trained, path, "openvino", image_size=(SIZE, SIZE), precision="int8", calibration=blobs(64, 2)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    assert path.read_text() == "old xml" and path.with_suffix(".bin").read_text() == "old bin"


def test_a_failed_check_leaves_no_xml_without_bin(trained, tmp_path, monkeypatch):
    def wrong(path, reference, inputs):
        raise ExportError("OpenVINO export failed: outputs differ")

    monkeypatch.setattr(ovx, "_check_float", wrong)
    with pytest.raises(ExportError, match="outputs differ"):
        export_model(trained, tmp_path / "m.xml", "openvino", image_size=(SIZE, SIZE))
    assert list(tmp_path.iterdir()) == []


def test_bf16_is_a_runtime_hint(trained, tmp_path):
    path = export_model(trained, tmp_path / "m.xml", "openvino", image_size=(SIZE, SIZE), precision="bf16")
    assert load_exported(path, precision="fp32").metadata["inference_precision"] == "bf16"
    x = blobs(1, seed=4)[0]
    assert (load_exported(path, precision="fp32")(x) - logits(trained, x)).abs().max() < 1e-4  # weights stay fp32
    supported, _ = bf16_support()
    if not supported:
        with pytest.raises(ExportedFileError, match=r"lacks the CPU flags avx512_bf16.*precision='fp32'"):
            load_exported(path)
    else:
        model = load_exported(path)
        assert model.precision == "bf16"
        assert (model(x) - logits(trained, x)).abs().max() < 0.1 * logits(trained, x).abs().max()


def test_openvino_export_argument_errors(trained, tmp_path):
    with pytest.raises(ExportError, match=r"end in '\.xml'"):
        export_model(trained, tmp_path / "m.onnx", "openvino")
    with pytest.raises(ValueError, match="calibration images"):
        export_model(trained, tmp_path / "m.xml", "openvino", precision="int8")
    with pytest.raises(ExportError, match="not precision='bf16'"):
        export_model(trained, tmp_path / "m.onnx", "onnx", precision="bf16")
    with pytest.raises(ExportError, match="calibration images are for precision='int8'"):
        export_model(trained, tmp_path / "m.xml", "openvino", calibration=torch.rand(4, 3, SIZE, SIZE))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A few 48 px Fashion-MNIST scenes (10 classes + background) in the VOC and COCO layouts."""
    from mobilevit.data.scenes import generate_scenes

    root = tmp_path_factory.mktemp("scenes")
    write_mnist(root / "mnist", n_train=20, n_test=10)
    generate_scenes(
        root / "s", num_train=4, num_val=6, num_test=2, size=48, fashion_mnist_dir=root / "mnist", progress=False
    )
    return root / "s"


def _dense_checkpoint(name: str, path):
    model = randomize(mv.create_model(name, num_classes=11))
    return model, mv.save_checkpoint(model.state_dict(), model.config, path, arch=name)


def _eval_json(capsys, *argv) -> dict:
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_segmentation_ir_logits_and_eval_equal_the_weights(capsys, scenes, tmp_path):
    model, ckpt = _dense_checkpoint("mobilevit_xxs_deeplabv3", tmp_path / "seg.safetensors")
    xml = tmp_path / "seg.xml"
    assert main(["export", "--weights", str(ckpt), "--format", "openvino", "--size", "48", "-o", str(xml)]) == 0
    assert "wrote" in capsys.readouterr().out
    seg = load_exported(xml)
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    got, expected = seg(x), logits(model, x)
    assert seg.task == "segmentation" and got.shape == (2, 11, 48, 48)  # logits at the input size
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    base = ["eval", "--data", scenes, "--split", "val", "--num-workers", 0, "--json"]
    by_weights = _eval_json(capsys, *base, "--weights", ckpt, "--size", 48)
    by_file = _eval_json(capsys, *base, "--weights", xml)
    assert by_file["size"] == 48 and by_file["model"] == str(xml)
    assert by_file["miou"] == pytest.approx(by_weights["miou"], abs=1e-3)
    assert by_file["pixel_acc"] == pytest.approx(by_weights["pixel_acc"], abs=1e-3)


def test_detector_ir_with_postprocessing_gives_the_detections_and_the_map(capsys, scenes, tmp_path):
    model, ckpt = _dense_checkpoint("mobilevit_xxs_ssdlite", tmp_path / "det.safetensors")
    xml = tmp_path / "det.xml"
    export = ["export", "--weights", str(ckpt), "--format", "openvino", "--size", "128", "--postprocess"]
    assert main([*export, "-o", str(xml)]) == 0
    assert "wrote" in capsys.readouterr().out
    det = load_exported(xml)
    assert det.task == "detection" and det.output_names == ["boxes", "scores", "selected"]
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    boxes, scores, selected = det(x)
    with torch.no_grad():
        raw = copy.deepcopy(model).eval().forward_raw(x)
        expected = model.postprocess(raw, image_sizes=[(128, 128)] * 2)
    got = det.detections(x)
    assert len(selected) > 0
    assert assert_same_detections(got, expected, scale=128) > 0
    # the in-graph NMS selects what the PyTorch post-processing of the file's own boxes and scores selects
    assert assert_same_detections(got, onnx_detections(boxes, scores, None, [(128, 128)] * 2), scale=128) > 0
    base = ["eval", "--data", scenes, "--split", "val", "--num-workers", 0, "--json"]
    by_weights = _eval_json(capsys, *base, "--weights", ckpt, "--size", 128)
    by_file = _eval_json(capsys, *base, "--weights", xml)
    assert by_file["images"] == by_weights["images"] == 6 and by_file["detections"] == by_weights["detections"] > 0
    assert by_file["map"] == pytest.approx(by_weights["map"], abs=1e-3)
