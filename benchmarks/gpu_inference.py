"""GPU inference latency: ours against timm's best path, eager and torch.compile, fp32 / fp16 / bf16.

For issue 19's GPU part ("the same bench on the GPU ... against timm's best path at batch 1 and 128"). Every row
of one (model, batch) is timed in two interleaved blocks (all rows in order, then in reverse), CUDA events
around ``--repeats`` calls after ``--warmup``; the median is reported. Rows:

* ``ours``: the training-form model in eval mode; ``deploy``: :func:`mobilevit.deploy` (BatchNorm folded,
  LayerNorm affines folded into the projections, fused attention);
* ``timm``: timm's model with our weights (the same network);
* ``-compile``: ``torch.compile(mode="reduce-overhead")`` of the row's module (CUDA graphs: the
  lowest-overhead path torch offers without minutes of autotuning), static shapes;
* each in fp32 (TF32 off), and in fp16 / bf16 as the module and input cast to that type.

TensorRT (torch-tensorrt) is not a row: it needs torch-tensorrt of the lent machine's torch and NVIDIA's
``tensorrt-cu13-libs``, which PyPI serves only as a stub that downloads from pypi.nvidia.com, unreachable here.

Prints a table per (model, batch) and the best peer path against our best; ``--json`` writes every row as it is
measured, so a run cut off by its time limit keeps what it finished. ``--budget S`` skips the rest after S seconds.

    python benchmarks/gpu_inference.py --json out/gpu_inference.json --budget 420
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import mobilevit
from mobilevit.deployment.bench import _timm_model

MODELS = ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_rows(name: str, precisions: list[str], compile_precisions: list[str], device: torch.device) -> dict:
    """``{row name: (module, dtype)}`` for one model: ours, deploy and timm, eager in every precision, compiled
    in ``compile_precisions``."""
    torch.manual_seed(0)
    model = mobilevit.create_model(name).eval()
    bases = {"ours": model, "deploy": mobilevit.deploy(model), "timm": _timm_model(name, model)}
    rows: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype]] = {}
    for base, module in bases.items():
        for p in precisions:
            m = _copy_to(module, device, DTYPES[p])
            rows[f"{base} {p}"] = (m, DTYPES[p])
            if p in compile_precisions and base != "ours":
                rows[f"{base}-compile {p}"] = (torch.compile(m, mode="reduce-overhead", dynamic=False), DTYPES[p])
    return rows


def _copy_to(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(module).to(device=device, dtype=dtype).eval()


@torch.inference_mode()
def time_calls(fn: Callable, x: torch.Tensor, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn(x)
            times.append(1000 * (time.perf_counter() - t))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 128])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--precisions", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--compile", nargs="*", default=["fp16"], choices=list(DTYPES), help="precisions compiled too")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget", type=float, default=float("inf"), help="seconds; later (model, batch) are skipped")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}; {args.size}x{args.size}; median of {args.repeats} calls, ms", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("")
    t0 = time.monotonic()
    for model_name in args.models:
        rows = build_rows(model_name, args.precisions, args.compile or [], device)
        for batch in args.batches:
            if time.monotonic() - t0 > args.budget:
                print(f"budget spent: {model_name} batch {batch} skipped", flush=True)
                continue
            x = torch.rand(batch, 3, args.size, args.size, device=device)
            inputs = {dtype: x.to(dtype) for dtype in {d for _, d in rows.values()}}
            times: dict[str, list[float]] = {r: [] for r in rows}
            half = max(1, args.repeats // 2)
            for order in (list(rows), list(reversed(rows))):  # interleaved blocks
                for r in order:
                    fn, dtype = rows[r]
                    times[r] += time_calls(fn, inputs[dtype], args.warmup, half, device)
            medians = {r: statistics.median(t) for r, t in times.items()}
            ours = min((m, r) for r, m in medians.items() if not r.startswith("timm"))
            peer = min((m, r) for r, m in medians.items() if r.startswith("timm"))
            print(f"\n{model_name}, batch {batch}")
            for r, m in medians.items():
                print(f"  {r:<22} {m:9.3f} ms  {batch / m * 1000:10.0f} img/s")
            print(f"  best peer path: {peer[1]} {peer[0]:.3f} ms; ours: {ours[1]} {ours[0]:.3f} ms; "
                  f"speed-up {peer[0] / ours[0]:.2f}x", flush=True)  # fmt: skip
            if args.json:
                record = {"model": model_name, "batch": batch, "device": name, "torch": torch.__version__,
                          "median_ms": medians, "best_peer": peer[1], "best_ours": ours[1]}  # fmt: skip
                with args.json.open("a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
