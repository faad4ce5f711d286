"""`mobilevit export`, `mobilevit eval --weights EXPORTED_FILE` and `mobilevit bench` from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mobilevit as mv
from conftest import randomize, write_mnist
from mobilevit.cli import main

PREPROCESS = {"resize_size": 64, "crop_size": 64, "interpolation": "bilinear"}


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fm_ckpt(tmp_path_factory) -> tuple[Path, Path]:
    """A 10-class XXS checkpoint with 64 px preprocessing, and a Fashion-MNIST-like IDX directory."""
    root = tmp_path_factory.mktemp("fm")
    write_mnist(root / "data", n_train=24, n_test=20)
    model = randomize(mv.create_model("mobilevit_xxs", num_classes=10))
    with torch.no_grad():
        model.fc.weight.mul_(20)  # image-dependent predictions
    path = mv.save_checkpoint(
        model.state_dict(), model.config, root / "fm.safetensors", arch="mobilevit_xxs", meta={"preprocess": PREPROCESS}
    )
    return path, root / "data"


@pytest.mark.parametrize(("fmt", "suffix"), [("onnx", ".onnx"), ("openvino", ".xml")])
def test_export_then_eval_it_matches_pytorch_eval(capsys, fm_ckpt, tmp_path, fmt, suffix):
    pytest.importorskip("onnxruntime")
    if fmt == "openvino":
        pytest.importorskip("openvino")
    ckpt, data = fm_ckpt
    exported = tmp_path / f"m{suffix}"
    code, out, _ = _run(capsys, "export", "--weights", ckpt, "--format", fmt, "--dynamic", "-o", exported)
    assert code == 0 and "input 64x64" in out and exported.is_file()
    base = ["eval", "--data", data, "--num-workers", 0, "--batch-size", 7, "--json"]
    code, out, _ = _run(capsys, *base, "--weights", ckpt)
    torch_metrics = json.loads(out)
    code, out, _ = _run(capsys, *base, "--weights", exported)
    onnx_metrics = json.loads(out)
    assert code == 0 and onnx_metrics["count"] == torch_metrics["count"] == 20
    assert onnx_metrics["top1"] == torch_metrics["top1"] and onnx_metrics["top5"] == torch_metrics["top5"]
    assert abs(onnx_metrics["loss"] - torch_metrics["loss"]) < 1e-4


def test_export_int8_with_calibration_and_eval(capsys, fm_ckpt, tmp_path):
    onnx = pytest.importorskip("onnx")
    ckpt, data = fm_ckpt
    out_path = tmp_path / "m.int8.onnx"
    args = ["export", "--weights", ckpt, "--format", "onnx", "--precision", "int8", "--calibration", data]
    code, out, _ = _run(capsys, *args, "--calibration-images", 16, "-o", out_path)
    assert code == 0 and "int8" in out
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out_path)).graph.node)
    code, out, _ = _run(capsys, "eval", "--weights", out_path, "--data", data, "--num-workers", 0)
    assert code == 0 and "top-1" in out and str(out_path) in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "coreml", "--precision", "int8", "--calibration", "x"], "not available for --format coreml"),
        (["--format", "onnx", "--precision", "bf16"], "--precision bf16 is not available for --format onnx"),
        (["--format", "onnx", "--precision", "int8"], "--precision int8 needs --calibration"),
        (["--format", "openvino", "--calibration", "fashion-mnist"], "--calibration is for --precision int8"),
        (["--format", "onnx", "--precision", "int8", "--calibration", "/no/such/dir"], "/no/such/dir"),
    ],
)
def test_export_option_errors_are_clear(capsys, fm_ckpt, tmp_path, extra, message):
    ckpt, _ = fm_ckpt
    code, _, err = _run(capsys, "export", "--weights", ckpt, *extra, "-o", tmp_path / "x.onnx")
    assert code == 2 and message in err and "Traceback" not in err


def test_eval_of_a_missing_exported_file_is_a_clear_error(capsys, fm_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    _, data = fm_ckpt
    code, _, err = _run(capsys, "eval", "--weights", tmp_path / "none.onnx", "--data", data)
    assert code == 2 and "none.onnx: no such file" in err and "mobilevit export --format onnx" in err
    code, _, _ = _run(capsys, "eval", "--weights", tmp_path / "none.onnx", "--onnx", "x.onnx")
    assert code == 2  # the old option is gone: one way to evaluate an exported file


def test_bench_table_json_and_plot(capsys, tmp_path):
    pytest.importorskip("timm")
    args = ["bench", "--models", "mobilevit_xxs", "--batch-sizes", "1,2", "--size", 64, "--impl", "timm,ours,deploy"]
    code, out, _ = _run(
        capsys, *args, "--warmup", 1, "--repeats", 2, "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png"
    )
    assert code == 0
    assert "| mobilevit_xxs | 1 | deploy |" in out and "| mobilevit_xxs | 2 | timm |" in out and "sgemm" in out
    assert out.count("CPU: ") == 2 and "Best peer path and ours:" in out  # the summary table names the CPU too
    result = json.loads((tmp_path / "b.json").read_text())
    rows = result["rows"]
    assert len(rows) == 6 and {r["impl"] for r in rows} == {"timm", "ours", "deploy"}
    for r in rows:
        assert r["median_ms"] > 0 and r["floor_ratio"] > 1  # nothing beats the arithmetic floor
        assert r["throughput"] == pytest.approx(r["batch"] / r["median_ms"] * 1e3)
        assert r["precision"] == "fp32" and r["macs"] > 0
        if r["impl"] == "timm":
            assert r["speedup"] == pytest.approx(1.0)
    floors = result["floors"]
    assert floors["fp32"] == result["sgemm_gflops"] == max(floors["kernels"]["fp32"].values()) > 0
    assert [(s["batch"], s["peer"]["impl"]) for s in result["summary"]] == [(1, "timm"), (2, "timm")]
    for s in result["summary"]:
        best = min((r for r in rows if r["batch"] == s["batch"] and r["impl"] != "timm"), key=lambda r: r["median_ms"])
        assert s["fp32"]["impl"] == best["impl"] and s["fp32"]["x_floor"] == pytest.approx(best["floor_ratio"])
        assert s["int8"] is None and s["bf16"] is None
    assert (tmp_path / "b.png").stat().st_size > 5000


def test_bench_bad_arguments(capsys):
    code, _, err = _run(capsys, "bench", "--impl", "tensorrt")
    assert code == 2 and "unknown implementation" in err
    code, _, err = _run(capsys, "bench", "--batch-sizes", "1,x")
    assert code == 2 and "--batch-sizes" in err
    code, _, err = _run(capsys, "bench", "--models", "mobilevit_l")
    assert code == 2 and "unknown model" in err


def _allocator_in_subprocess(preload: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | ({"LD_PRELOAD": preload} if preload else {})
    code = "from mobilevit.deployment.bench import malloc_name; print(malloc_name())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_bench_names_the_allocator():
    assert _allocator_in_subprocess(None).strip() == "glibc malloc"
    tcmalloc = next(iter(Path("/usr/lib").glob("*/libtcmalloc_minimal.so.4")), None)
    if tcmalloc is None:
        pytest.skip("libtcmalloc_minimal (Debian package libtcmalloc-minimal4) is not installed")
    assert _allocator_in_subprocess(str(tcmalloc)).strip() == "tcmalloc"
