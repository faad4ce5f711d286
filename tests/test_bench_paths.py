"""`mobilevit bench`: the peers' compile / ONNX / OpenVINO paths, our OpenVINO rows, floors and the summary."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilevit.deployment import bench
from mobilevit.deployment.bench import BenchRow, Floors

SIZE = 64
TOL = 1e-4  # largest difference from the eager model, relative to its largest output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One export directory for the module: exports are reused across tests as across batches in a run."""
    return tmp_path_factory.mktemp("bench")


@functools.cache
def _model(name: str) -> bench.Model:
    """Our model ``name``, one per test module, as ``run_bench`` builds one per run (exports are cached by name)."""
    return bench.build_model(name)


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _tensors(outputs) -> tuple[torch.Tensor, ...]:
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return tuple(torch.as_tensor(np.asarray(o)) if not isinstance(o, torch.Tensor) else o for o in outputs)


def assert_same(got, expected) -> None:
    for g, e in zip(_tensors(got), _tensors(expected), strict=True):
        assert g.shape == e.shape
        rel = ((g - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
        assert rel <= TOL, rel


def _build(impl: str, name: str, model, workdir: Path, batch: int = 2, notes: list[str] | None = None):
    return bench.build_impl(impl, name, model, batch, SIZE, 1, workdir, notes)


# ------------------------------------------------------------------------------------ peers' paths


@pytest.fixture
def legacy_onnx(monkeypatch):
    """The torch.export-based ONNX exporter fails (as it may for some models): peers' ONNX files then come from
    the TorchScript-based one, with a note. (It also keeps these tests fast: 0.5 s per export instead of 13 s.)"""
    pytest.importorskip("onnxruntime")
    real_export = torch.onnx.export

    def export(*args, dynamo: bool = True, **kw):
        if dynamo:
            raise RuntimeError("cannot capture this model")
        return real_export(*args, dynamo=False, **kw)

    monkeypatch.setattr(torch.onnx, "export", export)


@pytest.fixture
def onnx_route_only(monkeypatch):
    """OpenVINO cannot convert the PyTorch model: peers reach OpenVINO from their ONNX file, with a note."""
    ov = pytest.importorskip("openvino")

    def convert_model(*args, **kw):
        raise RuntimeError("cannot convert this model")

    monkeypatch.setattr(ov, "convert_model", convert_model)


def test_timm_onnx_and_openvino_run_timms_model(workdir, legacy_onnx):
    pytest.importorskip("timm")
    pytest.importorskip("openvino")
    model = _model("mobilevit_xxs")
    x, notes = _images(2), []
    with torch.inference_mode():
        expected = _build("timm", "mobilevit_xxs", model, workdir)(x)
        assert_same(_build("timm-onnx", "mobilevit_xxs", model, workdir, notes=notes)(x), expected)
        assert_same(_build("timm-openvino", "mobilevit_xxs", model, workdir, notes=notes)(x), expected)
        # one file for every batch size (the batch axis is dynamic)
        assert_same(_build("timm-openvino", "mobilevit_xxs", model, workdir, 1, notes)(x[:1]), expected[:1])
    assert (workdir / f"mobilevit_xxs_timm_{SIZE}.onnx").exists()
    assert (workdir / f"mobilevit_xxs_timm_{SIZE}.pytorch.xml").exists()  # openvino.convert_model(timm's model)
    routes = [n for n in notes if "timm-openvino: OpenVINO" in n]
    assert len(routes) == 2 and all("convert_model(model)" in n and "from ONNX" in n and "kept" in n for n in routes)


@pytest.mark.parametrize("faster", bench.OPENVINO_ROUTES)
def test_peer_openvino_keeps_the_faster_route(monkeypatch, workdir, legacy_onnx, faster):
    pytest.importorskip("timm")
    pytest.importorskip("openvino")
    model, x = _model("mobilevit_xxs"), _images(2)
    monkeypatch.setattr(bench, "_quick_ms", lambda fns, x: {r: 1.0 if r == faster else 2.0 for r in fns})
    notes: list[str] = []
    with torch.inference_mode():
        got = _build("timm-openvino", "mobilevit_xxs", model, workdir, notes=notes)(x)
        assert_same(got, _build("timm", "mobilevit_xxs", model, workdir)(x))  # either route runs timm's model
    assert notes[-1].endswith(f"kept {faster}")


def test_hf_classifier_paths_fall_back_to_the_other_exporter_and_route(workdir, legacy_onnx, onnx_route_only):
    pytest.importorskip("transformers")
    model, x, notes = _model("mobilevit_xxs"), _images(2), []
    with torch.inference_mode():
        expected = _build("hf", "mobilevit_xxs", model, workdir)(x)
        assert expected.shape == (2, model.num_classes)
        assert_same(_build("hf-onnx", "mobilevit_xxs", model, workdir, notes=notes)(x), expected)
        assert_same(_build("hf-openvino", "mobilevit_xxs", model, workdir, notes=notes)(x), expected)
    assert "hf-onnx: torch.export-based ONNX export failed (cannot capture this model)" in notes[0]
    assert "hf-openvino: openvino.convert_model of the PyTorch model failed (cannot convert" in notes[1]


def test_hf_segmentation_peer_has_our_weights_and_its_paths_match(workdir, legacy_onnx, onnx_route_only):
    pytest.importorskip("transformers")
    name = "mobilevit_xxs_deeplabv3"
    model, x = _model(name), _images(1)
    with torch.inference_mode():
        hf = _build("hf", name, model, workdir)
        expected = hf(x)
        assert expected.shape == (1, model.num_classes, SIZE, SIZE)  # upsampled to the input size, as ours
        assert_same(hf(x.flip(1)), model(x))  # our weights (Hugging Face's stem takes BGR)
        assert_same(_build("hf-onnx", name, model, workdir, 1)(x), expected)
        assert_same(_build("hf-openvino", name, model, workdir, 1)(x), expected)


def test_torchvision_ssdlite_openvino_matches_its_network_forward(workdir, onnx_route_only):
    pytest.importorskip("torchvision")
    name = "mobilevit_xxs_ssdlite"
    model, x = _model(name), _images(1)
    with torch.inference_mode():
        expected = _build("tv-ssdlite", name, model, workdir, 1)(x)
        got = _build("tv-ssdlite-openvino", name, model, workdir, 1)(x)
    assert isinstance(got, tuple) and len(got) == 2  # boxes and scores
    assert_same(got, expected)


def test_peer_compile_rows_compile_the_peers_model(monkeypatch, workdir):
    pytest.importorskip("timm")
    import torch._inductor.config as inductor_config

    old_freezing = inductor_config.freezing  # restored by hand: monkeypatch's undo deletes a config entry
    inductor_config.freezing = False
    compiled = []
    real_compile = torch.compile

    def eager_compile(module, **kw):  # dynamo captures the model; the eager backend skips inductor's minute
        compiled.append((module, kw))
        return real_compile(module, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    model, x = _model("mobilevit_xxs"), _images(2)
    try:
        with torch.inference_mode():
            reference = _build("timm", "mobilevit_xxs", model, workdir)
            assert_same(_build("timm-compile", "mobilevit_xxs", model, workdir)(x), reference(x))
        [(module, kw)] = compiled
        assert type(module) is type(reference) and type(module).__module__.startswith("timm")
        assert kw == {"dynamic": False}
        assert inductor_config.freezing  # the same settings as our compile row
    finally:
        inductor_config.freezing = old_freezing


# ----------------------------------------------------------------------------------------- ours


def test_our_openvino_rows(workdir):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import openvino as ov

    model, x = _model("mobilevit_xxs"), _images(2)
    with torch.inference_mode():
        expected = model(x)
        assert_same(_build("openvino", "mobilevit_xxs", model, workdir)(x), expected)
        int8 = _tensors(_build("openvino-int8", "mobilevit_xxs", model, workdir)(x))[0]
    assert int8.shape == expected.shape and torch.isfinite(int8).all()
    ops = ov.Core().read_model(str(workdir / "mobilevit_xxs_p2-2-2.int8.xml")).get_ops()
    assert sum(op.get_type_name() == "FakeQuantize" for op in ops) > 10  # quantized convolutions


# --------------------------------------------------------------------------------- floors and summary


def test_floors_are_positive_and_each_the_fastest_of_its_kernels():
    floors = bench.measure_floors(1, n=256, repeats=3, bf16=False)
    assert floors.fp32 > 0 and floors.kernels["fp32"]["torch sgemm"] > 0
    assert floors.bf16 is None and "bf16" not in floors.kernels
    for precision, kernels in floors.kernels.items():
        assert floors.rate(precision) == max(kernels.values())
    if floors.int8 is not None:
        assert min(floors.kernels["int8"].values()) > 0.05 * floors.fp32  # optimised kernels, no reference loops
        macs = 10**9
        assert floors.floor_ms(macs, "int8") == pytest.approx(floors.floor_ms(macs) * floors.fp32 / floors.int8)
        if bench.cpu_info()["features"].get("VNNI"):  # int8 dot products: int8 beats fp32 (not so on plain AVX2)
            assert floors.int8 > floors.fp32


def _fake_run(monkeypatch, delays: dict[str, float], bf16: bool = False, **kw) -> bench.BenchRun:
    """run_bench with implementations that sleep for their delay (ms; None: the first call fails) and fixed floors."""
    floors = Floors(100.0, 200.0 if bf16 else None, 400.0, 1, {"fp32": {"fake": 100.0}, "int8": {"fake": 400.0}})
    monkeypatch.setattr(bench, "measure_floors", lambda threads, bf16=None: floors)
    monkeypatch.setattr(bench, "has_native_bf16", lambda info=None: bf16)

    def run(impl: str, x: torch.Tensor) -> None:
        if delays[impl] is None:
            raise RuntimeError(f"{impl} cannot run\nmore detail")
        time.sleep(delays[impl] / 1e3)

    monkeypatch.setattr(bench, "build_impl", lambda impl, *args, **kw: lambda x: run(impl, x))
    return bench.run_bench(["mobilevit_xxs"], [1], 32, list(delays), threads=1, warmup=0, repeats=3, **kw)


def test_run_bench_skips_bf16_without_native_bf16_and_uses_each_precisions_floor(monkeypatch):
    delays = {"timm": 40, "timm-openvino": 20, "hf-onnx": 25, "deploy": 30, "openvino": 15}
    delays |= {"openvino-bf16": 12, "onnx-int8": 14, "openvino-int8": 8}
    run = _fake_run(monkeypatch, delays)
    rows = {r.impl: r for r in run.rows}
    assert "openvino-bf16" not in rows and any("openvino-bf16 skipped" in n for n in run.notes)
    assert list(rows) == ["timm", "timm-openvino", "hf-onnx", "deploy", "openvino", "onnx-int8", "openvino-int8"]
    macs = rows["deploy"].macs
    assert macs and all(r.macs == macs for r in rows.values())
    for r in rows.values():
        rate = 400.0 if r.impl.endswith("int8") else 100.0
        assert r.precision == ("int8" if rate == 400.0 else "fp32")
        assert r.floor_ratio == pytest.approx(r.median_ms / (2 * macs / (rate * 1e9) * 1e3))
    [summary] = run.summary()
    assert summary["peer"] == {"impl": "timm-openvino", "median_ms": rows["timm-openvino"].median_ms}
    assert summary["fp32"]["impl"] == "openvino" and summary["int8"]["impl"] == "openvino-int8"
    assert summary["bf16"] is None
    ours = rows["openvino-int8"]
    assert summary["int8"]["speedup"] == pytest.approx(rows["timm-openvino"].median_ms / ours.median_ms)
    assert summary["int8"]["x_floor"] == pytest.approx(ours.floor_ratio)
    assert summary["floors_ms"]["int8"] == pytest.approx(summary["floors_ms"]["fp32"] / 4)


def test_run_bench_keeps_bf16_where_the_cpu_has_it(monkeypatch):
    run = _fake_run(monkeypatch, {"timm": 10, "openvino-bf16": 5}, bf16=True)
    [row] = [r for r in run.rows if r.impl == "openvino-bf16"]
    assert row.precision == "bf16" and not run.notes
    assert row.floor_ratio == pytest.approx(row.median_ms / (2 * row.macs / 200e9 * 1e3))
    assert run.summary()[0]["bf16"]["impl"] == "openvino-bf16"


def test_bf16_rows_of_peers_and_of_the_int8_file_need_native_bf16_and_stay_out_of_the_fp32_peer(monkeypatch):
    delays = {"timm": 30, "timm-openvino": 20, "hf-openvino-bf16": 6, "openvino": 15, "openvino-int8": 12}
    delays |= {"openvino-int8-bf16": 8}
    run = _fake_run(monkeypatch, delays)
    assert {r.impl for r in run.rows} == {"timm", "timm-openvino", "openvino", "openvino-int8"}
    assert any(n.startswith("hf-openvino-bf16 and openvino-int8-bf16 skipped") for n in run.notes)
    run = _fake_run(monkeypatch, delays, bf16=True)
    rows = {r.impl: r for r in run.rows}
    assert rows["hf-openvino-bf16"].precision == "bf16" and rows["openvino-int8-bf16"].precision == "int8"
    [summary] = run.summary()
    assert summary["peer"]["impl"] == "timm-openvino"  # the fastest *fp32* peer path, though a bf16 one is faster
    assert summary["int8"]["impl"] == "openvino-int8-bf16"


def test_our_int8_file_runs_its_float_layers_in_bf16_in_the_int8_bf16_row(monkeypatch, workdir):
    calls = []
    monkeypatch.setattr(bench, "openvino_core", lambda: pytest.fail("the int8 file is cached"), raising=False)
    import mobilevit.deployment.runtime as runtime

    monkeypatch.setattr(runtime, "load_exported", lambda path, threads, precision: calls.append((path.name, precision)))
    (workdir / "m.int8.xml").write_text("")
    for impl in ("openvino-int8", "openvino-int8-bf16", "openvino-bf16"):
        bench._our_openvino(impl, "m", 32, 1, workdir, lambda fmt, suffix, **kw: workdir / f"m{suffix}")
    assert calls == [("m.int8.xml", "fp32"), ("m.int8.xml", "bf16"), ("m.bf16.xml", "bf16")]


def _row(model: str, impl: str, ms: float, patches: str | None = "2,2,2", batch: int = 1) -> BenchRow:
    return BenchRow(model, impl, batch, 256, ms, batch / ms * 1e3, None, None, patches, bench.precision_of(impl), 10**9)


def test_summary_picks_the_fastest_peer_path_of_our_architecture():
    rows = [
        _row("mobilevit_xs_deeplabv3", "hf", 100),
        _row("mobilevit_xs_deeplabv3", "hf-openvino", 60),
        _row("mobilevit_xs_deeplabv3", "tv-lraspp", 10, None),  # another architecture: not the peer to beat
        _row("mobilevit_xs_deeplabv3", "onnx", 50),
        _row("mobilevit_xs_deeplabv3", "onnx", 40, "8,4,2"),
        _row("mobilevit_xs_ssdlite", "tv-ssdlite", 80, None),
        _row("mobilevit_xs_ssdlite", "tv-ssdlite-openvino", 30, None),
        _row("mobilevit_xs_ssdlite", "tv-ssdlite+post", 20, None),  # post-processing too: left out
        _row("mobilevit_xs_ssdlite", "openvino", 24),
        _row("mobilevit_xs_ssdlite", "deploy+post", 5),
    ]
    floors = Floors(100.0, None, 400.0, 2, {"fp32": {"torch sgemm": 100.0}, "int8": {"onnxruntime": 400.0}})
    summary = bench.summarize(rows, floors)
    assert [(s["model"], s["patch_sizes"]) for s in summary] == [
        ("mobilevit_xs_deeplabv3", "2,2,2"),
        ("mobilevit_xs_deeplabv3", "8,4,2"),
        ("mobilevit_xs_ssdlite", "2,2,2"),
    ]
    seg, seg842, det = summary
    assert seg["peer"]["impl"] == "hf-openvino" and seg842["peer"]["impl"] == "hf-openvino"
    assert seg["fp32"]["speedup"] == pytest.approx(60 / 50) and seg842["fp32"]["speedup"] == pytest.approx(60 / 40)
    assert seg["fp32"]["x_floor"] == pytest.approx(50 / 20) and seg["int8"] is None  # floor: 2 GFLOP at 100 GFLOP/s
    assert det["peer"]["impl"] == "tv-ssdlite-openvino" and det["fp32"]["impl"] == "openvino"
    assert det["fp32"]["speedup"] == pytest.approx(30 / 24)
    text = bench.format_summary(
        summary, floors, {"model": "CPU X", "logical_cpus": 2, "features": {"AVX2": True}, "torch_capability": "AVX2"}
    )
    assert text.startswith("CPU: CPU X, 2 logical CPUs; AVX2;") and "bf16 n/a" in text
    assert (
        "| mobilevit_xs_ssdlite | 1 | 2,2,2 | tv-ssdlite-openvino 30.0 | 20.0 / - / 5.0 | openvino 24.0 | 1.25x |"
        in text
    )


def test_run_bench_leaves_out_a_row_that_fails_with_a_note(monkeypatch):
    run = _fake_run(monkeypatch, {"timm": 10, "compile": None, "deploy": 5})
    assert [r.impl for r in run.rows] == ["timm", "deploy"]
    assert run.notes == ["mobilevit_xxs batch 1 compile (2,2,2): not measured (compile cannot run)"]
    with pytest.raises(RuntimeError, match="compile cannot run"):
        _fake_run(monkeypatch, {"timm": 10, "compile": None}, keep_going=False)
