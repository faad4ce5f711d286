"""Where an OpenVINO MobileViT spends its time in fp32, bf16 and int8: wall time and per-layer shares.

For one model at one batch (random weights, 256x256 by default), our IR (``export_model(..., "openvino")``) is
compiled in four ways: fp32 at the ``f32`` inference precision, fp32 at ``bf16``, and int8 (NNCF, the export's
default settings: convolutions in int8) at ``f32`` and at ``bf16`` (its float layers in bf16; the
``openvino-int8-bf16`` row of ``mobilevit bench``); ``--all-int8`` adds int8 with the transformers' matmuls
quantized too. Each variant's wall time is measured without profiling, interleaved (``speed`` of
``openvino_int8_fashion_mnist.py``: median over rounds of the best of a few calls); then each is
profiled (``PERF_COUNT``) and the time of its executed nodes is summed per (layer type, kernel), printed as shares
of the profiled total (profiling adds a per-node cost, so the shares, not the profiled milliseconds, are what to
read). The kernel names say which instructions ran (``amx``: AMX tiles; ``I8``/``bf16``/``f32``: the precision).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4 OMP_NUM_THREADS=2 \\
      .venv/bin/python benchmarks/openvino_precision_profile.py --model mobilevit_xs --batch 8 --all-int8
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import numpy as np
import torch
from openvino_int8_fashion_mnist import speed  # the same interleaved timing as the int8 search

import mobilevit as mv
from mobilevit.deployment.bench import describe_cpu, has_native_bf16, openvino_config
from mobilevit.deployment.export import export_model
from mobilevit.deployment.openvino import DEFAULT_QUANTIZATION, QuantizationSettings, quantize_ir
from mobilevit.deployment.runtime import openvino_core


def profile(compiled, x: np.ndarray, calls: int) -> collections.Counter:
    """Mean ms per call of each (layer type, kernel) over ``calls`` profiled calls."""
    request = compiled.create_infer_request()
    for _ in range(3):
        request.infer([x])
    shares: collections.Counter = collections.Counter()
    for _ in range(calls):
        request.infer([x])
        for node in request.profiling_info:
            shares[(node.node_type, node.exec_type)] += node.real_time.total_seconds() * 1e3 / calls
    return shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilevit_xs")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    p.add_argument("--calls", type=int, default=10, help="profiled calls per variant")
    p.add_argument("--top", type=int, default=8, help="(layer type, kernel) lines printed per variant")
    p.add_argument("--all-int8", action="store_true", help="also int8 with the transformers' matmuls quantized")
    args = p.parse_args()
    torch.manual_seed(0)
    core = openvino_core()
    model = mv.create_model(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        xml = export_model(
            mv.deploy(model, channels_last=False),
            Path(tmp) / "m.xml",
            "openvino",
            image_size=(args.size, args.size),
            dynamic=True,
        )
        fp32 = core.read_model(str(xml))
    calibration = torch.rand(64, 3, args.size, args.size)
    irs = {"fp32": fp32, "int8": quantize_ir(fp32.clone(), calibration, DEFAULT_QUANTIZATION)}
    if args.all_int8:
        irs["int8, matmuls too"] = quantize_ir(fp32.clone(), calibration, QuantizationSettings(ignored_types=()))
    hints = ("fp32", "bf16") if has_native_bf16() else ("fp32",)
    variants = {f"{k} @{h}": (ir, h) for k, ir in irs.items() for h in hints}
    x = np.random.default_rng(0).random((args.batch, 3, args.size, args.size), dtype=np.float32)
    compiled = {k: core.compile_model(ir, "CPU", openvino_config(args.threads, h)) for k, (ir, h) in variants.items()}
    ms = speed(compiled, torch.from_numpy(x), args.batch, args.rounds)
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads; {describe_cpu()}")
    print("\n| variant | wall ms | vs fp32 @fp32 |\n|---|---|---|")
    for k, t in ms.items():
        print(f"| {k} | {t:.1f} | {ms['fp32 @fp32'] / t:.2f}x |")
    for k, (ir, h) in variants.items():
        shares = profile(
            core.compile_model(ir, "CPU", openvino_config(args.threads, h) | {"PERF_COUNT": True}), x, args.calls
        )
        total = sum(shares.values())
        print(f"\n{k}: share of the profiled time per (layer type, kernel)")
        for (node_type, kernel), t in shares.most_common(args.top):
            print(f"  {100 * t / total:5.1f}%  {node_type:30s} {kernel}")


if __name__ == "__main__":
    main()
