"""Inference latency of our model, its deploy form, exported files and peer libraries, measured in one run.

Every implementation of one (model, batch) gets the same input and is timed in two blocks of
consecutive calls (all implementations in order, then in reverse order), so a slow drift of the
machine's speed hits all of them alike. Latency is the median of ``repeats`` calls after ``warmup``. The FLOP floor is ``2 * MACs / sgemm``, with
the sgemm rate measured in the same run with the same number of threads.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .deploy import deploy
from .factory import create_model
from .flops import count_macs
from .model import MobileViT

#: Implementations in table order: peers first, then ours.
IMPLS = ("timm", "hf", "ours", "deploy", "compile", "torchscript", "onnx", "onnx-int8", "executorch")
#: The peer every speed-up is relative to.
BASELINE = "timm"


@dataclass
class BenchRow:
    """One implementation at one (model, batch, size): latency in ms per batch and images per second."""

    model: str
    impl: str
    batch: int
    size: int
    median_ms: float
    throughput: float
    speedup: float | None = None  # baseline median / this median
    floor_ratio: float | None = None  # this median / FLOP floor

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def malloc_name() -> str:
    """The memory allocator of this process: tcmalloc, jemalloc or mimalloc when one is preloaded, else the C library's.

    Large tensors make the allocator matter on CPU: glibc's malloc returns big blocks to the system
    and faults them in again on the next call (see docs/benchmarks.md).
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system malloc"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc malloc"


def sgemm_gflops(threads: int, n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 matrix-multiply rate (GFLOP/s) with ``threads`` threads: the arithmetic ceiling here."""
    torch.set_num_threads(threads)
    a, b = torch.rand(n, n), torch.rand(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def _timm_model(name: str, model: MobileViT) -> Callable[[torch.Tensor], Any]:
    import timm

    from .layouts import from_ours

    peer = timm.create_model(name, num_classes=model.num_classes)
    peer.load_state_dict(from_ours(model.state_dict(), "timm"))
    return peer.eval()


def _hf_model(model: MobileViT, workdir: Path) -> Callable[[torch.Tensor], Any]:
    import transformers

    from .checkpoints import save_checkpoint

    save_checkpoint(model.state_dict(), model.config, workdir / "hf", layout="hf")
    peer = transformers.MobileViTForImageClassification.from_pretrained(workdir / "hf").eval()
    return lambda x: peer(pixel_values=x).logits


def _compiled(model: MobileViT) -> Callable[[torch.Tensor], Any]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant-fold weights: prepacked oneDNN convolutions with fused activations
    return torch.compile(deploy(model), dynamic=False)


def _onnx_session(path: Path, threads: int) -> Callable[[torch.Tensor], Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def _executorch_method(path: Path) -> Callable[[torch.Tensor], Any]:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return lambda x: method.execute([x])[0]


def build_impl(
    impl: str, name: str, model: MobileViT, batch: int, size: int, threads: int, workdir: Path
) -> Callable[[torch.Tensor], Any]:
    """A callable running ``impl`` of ``model`` on a ``[batch, 3, size, size]`` tensor (exports go to ``workdir``).

    The int8 model is calibrated on random images: its speed, not its accuracy, is what is measured here.
    """
    if impl == "timm":
        return _timm_model(name, model)
    if impl == "hf":
        return _hf_model(model, workdir)
    if impl == "ours":
        return model
    if impl == "deploy":
        return deploy(model)
    if impl == "compile":
        return _compiled(model)
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    from .export import export_model

    def exported(fmt: str, suffix: str, **kw: Any) -> Path:  # one file per model, reused across batch sizes
        path = workdir / f"{name}{suffix}"
        if not path.exists():
            export_model(deploy(model, channels_last=False), path, fmt, image_size=(size, size), **kw)
        return path

    if impl == "torchscript":
        return torch.jit.load(exported("torchscript", ".pt", dynamic=True)).eval()
    if impl == "onnx":
        return _onnx_session(exported("onnx", ".onnx", dynamic=True), threads)
    if impl == "onnx-int8":
        from .quantize import quantize_onnx

        int8 = workdir / f"{name}.int8.onnx"
        if not int8.exists():
            images = torch.rand(32, 3, size, size, generator=torch.Generator().manual_seed(0))
            quantize_onnx(exported("onnx", ".onnx", dynamic=True), int8, images)
        return _onnx_session(int8, threads)
    return _executorch_method(exported("executorch", f"_b{batch}.pte", batch_size=batch))


def available_impls() -> list[str]:
    """The implementations whose packages are installed here."""
    import importlib.util

    needs = {
        "timm": "timm",
        "hf": "transformers",
        "onnx": "onnxruntime",
        "onnx-int8": "onnxruntime",
        "executorch": "executorch",
    }
    return [i for i in IMPLS if importlib.util.find_spec(needs.get(i, "torch")) is not None]


def run_bench(
    models: Sequence[str] = ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s"),
    batch_sizes: Sequence[int] = (1, 8),
    size: int = 256,
    impls: Sequence[str] | None = None,
    threads: int = 2,
    warmup: int = 5,
    repeats: int = 20,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[BenchRow], float]:
    """Measure every implementation; returns the rows and the sgemm rate (GFLOP/s) used for the floor."""
    impls = list(impls or available_impls())
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    torch.set_num_threads(threads)
    gflops = sgemm_gflops(threads)
    say = progress or (lambda _msg: None)
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="mobilevit-bench-") as tmp:
        for name in models:
            model = create_model(name).eval()
            for batch in batch_sizes:
                x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
                floor_ms = 2 * count_macs(model, (size, size), batch) / (gflops * 1e9) * 1e3
                fns: dict[str, Callable] = {}
                for impl in impls:
                    say(f"{name} batch {batch}: preparing {impl}")
                    fns[impl] = build_impl(impl, name, model, batch, size, threads, Path(tmp))
                times = _timed_blocks(fns, x, warmup, repeats, say, f"{name} batch {batch}")
                base = statistics.median(times[BASELINE]) if BASELINE in times else None
                for impl, ts in times.items():
                    ms = statistics.median(ts) * 1e3
                    rows.append(
                        BenchRow(
                            name,
                            impl,
                            batch,
                            size,
                            ms,
                            batch / ms * 1e3,
                            speedup=base * 1e3 / ms if base else None,
                            floor_ratio=ms / floor_ms,
                        )
                    )
    return rows, gflops


@torch.inference_mode()
def _timed_blocks(
    fns: dict[str, Callable], x: torch.Tensor, warmup: int, repeats: int, say: Callable[[str], None], label: str
) -> dict[str, list[float]]:
    """Time each implementation in blocks of consecutive calls: a pass in order, then one in reverse order.

    Runtimes keep their worker threads spinning for a while after a call (OpenMP, onnxruntime,
    XNNPACK), which would slow down whichever implementation runs next: so calls are not interleaved
    one by one. One untimed call starts every block, after the threads of the previous block have settled.
    """
    for impl, fn in fns.items():
        say(f"{label}: warming up {impl}")
        for _ in range(warmup):
            fn(x)
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    halves = (repeats + 1) // 2, repeats // 2
    for order, n in zip((list(fns), list(fns)[::-1]), halves, strict=True):
        for impl in order:
            say(f"{label}: timing {impl}")
            time.sleep(0.05)
            fns[impl](x)
            for _ in range(n):
                t = time.perf_counter()
                fns[impl](x)
                times[impl].append(time.perf_counter() - t)
    return times


def format_table(rows: Sequence[BenchRow], gflops: float) -> str:
    """Markdown table of the rows, with speed-up against the baseline and distance to the FLOP floor."""
    lines = [
        f"sgemm: {gflops:.0f} GFLOP/s ({torch.get_num_threads()} threads); floor = 2 x MACs / sgemm; "
        f"allocator: {malloc_name()}",
        "",
        f"| model | batch | implementation | median ms | images/s | speed-up vs {BASELINE} | x FLOP floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
        lines.append(
            f"| {r.model} | {r.batch} | {r.impl} | {r.median_ms:.1f} | {r.throughput:.1f} | {speedup} | {r.floor_ratio:.2f} |"
        )
    return "\n".join(lines)


def plot_bench(rows: Sequence[BenchRow], path: str | Path) -> Path:
    """Bar chart of speed-up against the baseline, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in rows})
    models = list(dict.fromkeys(r.model for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    width = 0.8 / len(impls)
    for ax, batch in zip(axes[0], batches, strict=True):
        for k, impl in enumerate(impls):
            values = [
                next((r.throughput for r in rows if (r.model, r.impl, r.batch) == (m, impl, batch)), np.nan)
                for m in models
            ]
            ax.bar(np.arange(len(models)) + k * width, values, width, label=impl)
        ax.set_xticks(
            np.arange(len(models)) + width * (len(impls) - 1) / 2, [m.removeprefix("mobilevit_") for m in models]
        )
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("images / s (higher is better)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
