"""load_exported: one way to run ONNX, OpenVINO, TorchScript and ExecuTorch files; predict/eval with exported files."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from torch import nn

import mobilevit as mv
from conftest import randomize, write_mnist
from mobilevit.cli import main
from mobilevit.deployment.export import export_model
from mobilevit.deployment.runtime import ExportedFileError, exported_format, load_exported

SIZE = 32
PREPROCESS = {"resize_size": 36, "crop_size": 32, "interpolation": "bilinear"}
CLASSES = ["a", "b", "c", "d", "e"]
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt", "executorch": ".pte"}
NEEDS = {"onnx": "onnxruntime", "openvino": "openvino", "torchscript": "torch", "executorch": "executorch"}


class Tiny(nn.Module):
    """A small classifier (fast to export in every format) with class names and preprocessing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
        )
        self.weights_meta = {"categories": CLASSES, "preprocess": PREPROCESS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return Tiny().eval()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("exported")
    files = {}
    for fmt, suffix in SUFFIXES.items():
        try:
            __import__(NEEDS[fmt])
        except ImportError:
            continue
        kw = {"dynamic": True, "batch_size": 4} if fmt == "executorch" else {"dynamic": True}
        files[fmt] = export_model(tiny, root / f"m{suffix}", fmt, image_size=(SIZE, SIZE), **kw)
    return files


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", list(SUFFIXES))
def test_every_format_gives_the_models_logits(tiny, exported, fmt):
    if fmt not in exported:
        pytest.skip(f"{NEEDS[fmt]} is not installed")
    model = load_exported(exported[fmt], threads=1)
    assert model.format == fmt and model.task == "classification" and model.image_size == (SIZE, SIZE)
    assert model.num_classes == 5 and model.output_names == ["logits"]
    for batch in (3, 1):
        x = images(batch, seed=batch)
        got = model(x)
        with torch.no_grad():
            expected = tiny(x)
        assert isinstance(got, torch.Tensor) and got.shape == (batch, 5)
        assert (got - expected).abs().max() <= 1e-5
    if fmt == "executorch":  # the one format without metadata
        assert model.categories == [] and model.preprocess == {} and model.metadata == {}
    else:
        assert model.categories == CLASSES and model.preprocess == PREPROCESS
        assert model.metadata["task"] == "classification" and model.metadata["image_size"] == "32x32"
        assert mv.model_categories(model) == CLASSES and mv.model_transform(model).resize_size == 36


def test_runtime_settings(exported):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    options = load_exported(exported["onnx"], threads=1)._runner.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    compiled = load_exported(exported["openvino"], threads=1)._runner.compiled
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1 and compiled.get_property("NUM_STREAMS") == 1
    assert str(compiled.get_property("PERFORMANCE_HINT")).upper().endswith("LATENCY")


def test_a_file_for_one_image_runs_any_batch(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    path = export_model(tiny, tmp_path / "b1.onnx", "onnx", image_size=(SIZE, SIZE))
    model = load_exported(path)
    assert model.input_shape == [1, 3, SIZE, SIZE]
    x = images(3)
    with torch.no_grad():
        assert (model(x) - tiny(x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"takes images shaped \[1, 3, 32, 32\], got \[1, 3, 48, 48\]"):
        model(torch.rand(1, 3, 48, 48))


def test_bad_files_give_clear_errors(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none\.onnx.*mobilevit export --format onnx"):
        load_exported(tmp_path / "none.onnx")
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(ExportedFileError, match=r"m\.h5.*unknown exported file type.*\.onnx, \.xml, \.pt, \.pte"):
        load_exported(tmp_path / "m.h5")
    for name in ("bad.onnx", "bad.pte", "bad.pt"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 10)
        with pytest.raises(ExportedFileError, match=rf"{name}: not a readable .*mobilevit export --format"):
            load_exported(tmp_path / name)
    (tmp_path / "bad.xml").write_text("<model/>")
    with pytest.raises(ExportedFileError, match=r"bad\.xml: not an OpenVINO IR \(root element <model>"):
        load_exported(tmp_path / "bad.xml")
    if "openvino" in exported:
        lone = tmp_path / "lone.xml"
        lone.write_bytes(exported["openvino"].read_bytes())  # without its .bin
        with pytest.raises(ExportedFileError, match=r"lone\.xml: its weights file lone\.bin is missing"):
            load_exported(lone)
        with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16"):
            load_exported(exported["openvino"], precision="fp16")
    if "onnx" in exported:
        with pytest.raises(ValueError, match="OpenVINO runtime setting"):
            load_exported(exported["onnx"], precision="bf16")
        with pytest.raises(ValueError, match=r"takes images shaped \['batch', 3, 32, 32\], got \[2, 3, 40, 40\]"):
            load_exported(exported["onnx"])(torch.rand(2, 3, 40, 40))


def test_torchscript_files_are_told_from_checkpoints(exported, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, ckpt)
    assert exported_format(ckpt) is None and exported_format(exported["torchscript"]) == "torchscript"
    assert zipfile.is_zipfile(ckpt)  # both are zip archives: told apart by TorchScript's code/
    assert exported_format("m.onnx") == "onnx" and exported_format("m.xml") == "openvino"
    with pytest.raises(ExportedFileError, match=r"ckpt\.pt: not a readable TorchScript file \(a checkpoint\?"):
        load_exported(ckpt)


# -------------------------------------------------------------------------------- command line


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 10-class XXS checkpoint (class names, 32 px preprocessing), a few images and an IDX directory."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    model = randomize(mv.create_model("mobilevit_xxs", num_classes=10))
    with torch.no_grad():
        model.fc.weight.mul_(20)  # image-dependent predictions
    meta = {"preprocess": {"resize_size": 32, "crop_size": 32, "interpolation": "bilinear"}}
    meta["categories"] = [f"class {i}" for i in range(10)]
    ckpt = mv.save_checkpoint(model.state_dict(), model.config, root / "m.safetensors", arch="mobilevit_xxs", meta=meta)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(root / f"img{i}.png")
    write_mnist(root / "fm", n_train=12, n_test=12)
    return ckpt, root


def test_predict_and_eval_of_an_exported_file_equal_the_weights(capsys, checkpoint):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    ckpt, root = checkpoint
    exported_file = root / "m.xml"  # OpenVINO here; ONNX in test_deploy_cli.py
    code, _, _ = _run(capsys, "export", "--weights", ckpt, "--format", "openvino", "-o", exported_file)
    assert code == 0
    predict = ["predict", root / "img0.png", root / "img1.png", root / "img2.png", "--json", "--topk", 3]
    code, out, _ = _run(capsys, *predict, "--weights", ckpt)
    by_weights = [json.loads(line) for line in out.splitlines()]
    code, out, _ = _run(capsys, *predict, "--weights", exported_file)
    by_file = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(by_file) == len(by_weights) == 3
    for a, b in zip(by_file, by_weights, strict=True):
        assert [p["label"] for p in a["topk"]] == [p["label"] for p in b["topk"]]
        assert a["topk"][0]["label"].startswith("class ")  # class names from the file's metadata
        assert a["topk"][0]["probability"] == pytest.approx(b["topk"][0]["probability"], abs=1e-5)
    evaluate = ["eval", "--data", root / "fm", "--num-workers", 0, "--batch-size", 5, "--json"]
    _, out, _ = _run(capsys, *evaluate, "--weights", ckpt)
    code, out_file, _ = _run(capsys, *evaluate, "--weights", exported_file)
    a, b = json.loads(out_file), json.loads(out)
    assert code == 0 and a["count"] == b["count"] == 12 and a["model"] == str(exported_file)
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"] and a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_files_without_metadata_need_metadata_from(capsys, exported, checkpoint, tmp_path):
    """An ExecuTorch program records no preprocessing: predict says which option to pass, then gives what the
    same model's ONNX file (which records it) gives."""
    if not {"executorch", "onnx"} <= set(exported):
        pytest.skip("needs executorch and onnxruntime")
    _, root = checkpoint
    meta = {"categories": CLASSES, "preprocess": PREPROCESS}  # what the Tiny model's ONNX file records
    model = mv.create_model("mobilevit_xxs", num_classes=5)
    ckpt = mv.save_checkpoint(model.state_dict(), model.config, tmp_path / "m5.safetensors", meta=meta)
    predict = ["predict", root / "img0.png", root / "img1.png", "--json", "--topk", 2]
    code, _, err = _run(capsys, *predict, "--weights", exported["executorch"])
    assert code == 2 and "records no preprocessing" in err and "--metadata-from WEIGHTS" in err
    code, out, _ = _run(capsys, *predict, "--weights", exported["executorch"], "--metadata-from", ckpt)
    _, expected, _ = _run(capsys, *predict, "--weights", exported["onnx"])
    assert code == 0 and len(out.splitlines()) == 2
    for line, want_line in zip(out.splitlines(), expected.splitlines(), strict=True):
        got, want = json.loads(line)["topk"], json.loads(want_line)["topk"]
        assert [p["label"] for p in got] == [p["label"] for p in want] and got[0]["label"] in CLASSES
        assert got[0]["probability"] == pytest.approx(want[0]["probability"], abs=1e-5)
    code, _, err = _run(capsys, *predict, "--weights", ckpt, "--precision", "fp32")
    assert code == 2 and "--precision and --metadata-from are for exported files" in err
    code, _, err = _run(capsys, *predict, "--weights", exported["onnx"], "--model", "mobilevit_s")
    assert code == 2 and "--model is for checkpoints" in err


def test_cpu_fields_read_the_first_processor_and_name_its_features(tmp_path, monkeypatch):
    """/proc/cpuinfo: the first processor's block (x86 ``flags``, Arm ``Features``) decides the features the bench
    tables name and whether int8 files warn."""
    from mobilevit.deployment import bench, runtime

    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 fma avx512f avx512_vnni\n\n"
        "processor\t: 1\nmodel name\t: Other CPU\nflags\t\t: fpu\n"
    )
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    read = runtime.cpu_fields.__wrapped__  # uncached
    assert read(str(x86))["model name"] == "Test CPU"
    assert read(str(tmp_path / "missing")) == {}
    for path, flags in [(x86, {"fpu", "avx2", "fma", "avx512f", "avx512_vnni"}), (arm, {"fp", "asimd", "bf16"})]:
        monkeypatch.setattr(runtime, "cpu_fields", lambda path=str(path): read(path))
        assert runtime.cpu_flags() == flags
    monkeypatch.setattr(bench, "cpu_fields", lambda: read(str(x86)))
    monkeypatch.setattr(bench, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}))
    info = bench.cpu_info()
    assert info["model"] == "Test CPU"
    assert info["features"] == {"AVX2": True, "FMA": True, "AVX-512": True, "VNNI": True, "BF16": False, "AMX": False}
    assert "Test CPU" in bench.describe_cpu(info) and "(no BF16 AMX)" in bench.describe_cpu(info)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert runtime.int8_support() == (False, [])
