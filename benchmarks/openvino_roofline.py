"""What is left to the floor, layer by layer: our OpenVINO fp32 graph against a roofline measured in the same run.

``mobilevit bench`` compares each row with an arithmetic floor, ``2 x MACs / rate`` at the rate of a large
(1024^3) fp32 matrix product. That floor assumes every layer can run at the peak of a large matrix product. Many
of MobileViT's layers cannot: a depthwise 3x3 convolution does 9 multiply-adds per element it reads and writes, a
residual add none. This script profiles every executed node of our IR (``PERF_COUNT``; the IR is the one
``mobilevit export --format openvino`` writes) and gives each a roofline time, ``max(2 x MACs / peak,
bytes / bandwidth)``, where ``bytes`` are its inputs, weights and outputs read or written once (fp32) and the
bandwidth is the best an element-wise OpenVINO kernel (``y = x + 1``) reached with that much data or more (so
data that stays in a cache is charged at that cache's speed, and the kernel's fixed cost at small sizes is not),
both measured in this run. It prints, per kind of layer, the measured time, the
arithmetic floor, the roofline and the achieved rate; then the totals against the wall time of a call.

``--ablation pointwise-linear`` also profiles our graph with every 1x1 convolution of the inverted residual blocks
and the final expansion written as a Linear layer over channels (permute, MatMul, permute back): the question is
whether OpenVINO's matrix-product kernels, faster than its 1x1 convolutions at the tokens' shapes, pay for the
transposes around them.

The roofline is still a floor no implementation can beat without changing the arithmetic or fusing layers to skip
memory traffic; the distance from it is what kernels, fusions and layouts can still win.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4 OMP_NUM_THREADS=2 \\
      .venv/bin/python benchmarks/openvino_roofline.py --model mobilevit_xs --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from openvino_graph import CONFIG
from torch import nn

import mobilevit as mv
from mobilevit.deployment import fuse
from mobilevit.deployment.bench import describe_cpu, measure_floors
from mobilevit.deployment.export import export_model
from mobilevit.deployment.runtime import openvino_core
from mobilevit.models.flops import count_macs

#: Sizes (bytes) at which the element-wise bandwidth is measured: from inside L1/L2 to main memory.
BANDWIDTH_SIZES = tuple(2**k for k in range(14, 28, 2))


@dataclass
class Node:
    kind: str
    ms: float
    macs: int
    bytes: int


class PointwiseLinear(nn.Module):
    """A 1x1 :class:`~mobilevit.deployment.fuse.FusedConv` as a Linear layer over the channels of ``[B, C, H, W]``."""

    def __init__(self, conv: fuse.FusedConv):
        super().__init__()
        self.weight, self.bias, self.act = conv.conv.weight.flatten(1), conv.conv.bias, conv.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias)).permute(0, 3, 1, 2)


def with_pointwise_linear(deployed: nn.Module) -> nn.Module:
    """``deployed`` with every ungrouped 1x1 FusedConv replaced by a :class:`PointwiseLinear`."""
    for parent in list(deployed.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, fuse.FusedConv) and child.conv.kernel_size == (1, 1) and child.conv.groups == 1:
                setattr(parent, name, PointwiseLinear(child))
    return deployed


def bandwidths(core, threads: int, calls: int) -> dict[int, float]:
    """GB/s of ``y = x + 1`` (fp32, one read and one write) by bytes moved, from the kernel's own profiled time."""
    import openvino as ov
    import openvino.opset13 as ops

    rates = {}
    for size in BANDWIDTH_SIZES:
        n = size // 8  # 4 bytes read + 4 written per element
        x = ops.parameter([n], ov.Type.f32, name="x")
        model = ov.Model([ops.add(x, ops.constant(np.float32(1.0)))], [x])
        request = core.compile_model(model, "CPU", CONFIG | {"INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True})
        request = request.create_infer_request()
        data = np.random.rand(n).astype(np.float32)
        best = math.inf
        for _ in range(calls):
            request.infer([data], share_inputs=True)
            best = min(
                best, sum(p.real_time.total_seconds() for p in request.profiling_info if p.status.name == "EXECUTED")
            )  # the Add: inputs and outputs take no time
        rates[size] = size / best / 1e9
    return rates


def bandwidth_for(rates: dict[int, float], nbytes: int) -> float:
    """The best bandwidth measured at a size at least ``nbytes`` (main memory's beyond the largest).

    Small sizes are slowed by the kernel's fixed cost, which is not bandwidth: data of a size moves at
    least as fast as the best measured for any larger size.
    """
    larger = [r for size, r in rates.items() if size >= nbytes]
    return max(larger) if larger else rates[max(rates)]


def _shape(port) -> list[int]:
    return [int(d) for d in port.get_shape()]


def _kind_and_macs(op, out: list[int]) -> tuple[str, int]:
    """Our name for the node's kind of layer and its multiply-accumulates (0 for memory-only layers)."""
    layer = op.get_rt_info()["layerType"].astype(str)
    inputs = [(i.get_source_output().get_node().get_rt_info()["layerType"].astype(str), _shape(i))
              for i in op.inputs()]  # fmt: skip
    weights = [s for t, s in inputs if t == "Const"]
    if layer == "Convolution" and weights:
        w = weights[0]
        if len(w) == 5:  # [groups, out/group, in/group, kh, kw]
            kind = "depthwise conv" if w[2] == 1 else "grouped conv"
            return kind, math.prod(out) * math.prod(w[2:])
        kind = "1x1 conv" if w[2:] == [1, 1] else f"{w[2]}x{w[3]} conv"
        return kind, math.prod(out) * math.prod(w[1:])
    if layer == "FullyConnected" and weights:
        return "linear (tokens)", math.prod(out) * weights[0][-1]
    names = op.get_rt_info()["originalLayersNames"].astype(str)
    if layer == "Subgraph" and "Softmax" in names:  # q [B, N, h, d], k [B, h, d, N]: q @ k^T and attn @ v
        q = inputs[0][1]
        return "attention (fused)", 2 * math.prod(q) * q[1]
    return {"Eltwise": "element-wise", "Reorder": "reorder (layout)"}.get(layer, layer.lower()), 0


def profile_nodes(core, xml: Path, x: np.ndarray, threads: int, calls: int) -> tuple[list[Node], float]:
    """Every executed node (kind, ms per call, MACs, bytes) and the median wall ms per call."""
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", CONFIG | {"INFERENCE_NUM_THREADS": threads,
                                                                            "PERF_COUNT": True})  # fmt: skip
    request = compiled.create_infer_request()
    for _ in range(3):
        request.infer([x], share_inputs=True)
    times: dict[str, float] = collections.Counter()
    walls = []
    for _ in range(calls):
        t = time.perf_counter()
        request.infer([x], share_inputs=True)
        walls.append(1e3 * (time.perf_counter() - t))
        for p in request.profiling_info:
            if p.status.name == "EXECUTED":
                times[p.node_name] += p.real_time.total_seconds() * 1e3 / calls
    nodes = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        name = op.get_friendly_name()
        if name not in times or op.get_rt_info()["layerType"].astype(str) in ("Input", "Output", "Const"):
            continue
        out = _shape(op.output(0))
        kind, macs = _kind_and_macs(op, out)
        moved = sum(math.prod(_shape(i)) for i in op.inputs()) + sum(math.prod(_shape(o)) for o in op.outputs())
        moved = 0 if kind == "reshape" else moved  # a view: nothing is read or written
        nodes.append(Node(kind, times[name], macs, 4 * moved))
    return nodes, statistics.median(walls)


def report(nodes: list[Node], wall: float, macs: int, peak: float, rates: dict[int, float]) -> None:
    roof = [max(2 * n.macs / peak / 1e6, n.bytes / bandwidth_for(rates, n.bytes) / 1e6) for n in nodes]
    kinds = collections.defaultdict(lambda: [0, 0.0, 0, 0, 0.0])  # layers, ms, macs, bytes, roofline ms
    for n, r in zip(nodes, roof, strict=True):
        k = kinds[n.kind]
        k[0] += 1
        k[1] += n.ms
        k[2] += n.macs
        k[3] += n.bytes
        k[4] += r
    print("| kind of layer | layers | measured ms | MACs (M) | MB moved | arithmetic floor ms | roofline ms "
          "| x roofline | achieved GFLOP/s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, (count, ms, m, b, r) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        gflops = f"{2 * m / ms / 1e6:.0f}" if m else "-"
        x_roof = f"{ms / r:.1f}" if r else "-"
        print(f"| {kind} | {count} | {ms:.2f} | {m / 1e6:.1f} | {b / 1e6:.1f} | {2 * m / peak / 1e6:.2f} | {r:.2f} "
              f"| {x_roof} | {gflops} |")  # fmt: skip
    measured, roofline, node_macs = sum(n.ms for n in nodes), sum(roof), sum(n.macs for n in nodes)
    print(f"| **all executed layers** | {len(nodes)} | **{measured:.2f}** | {node_macs / 1e6:.1f} "
          f"| {sum(n.bytes for n in nodes) / 1e6:.1f} | {2 * node_macs / peak / 1e6:.2f} | **{roofline:.2f}** "
          f"| **{measured / roofline:.2f}** | {2 * node_macs / measured / 1e6:.0f} |\n")  # fmt: skip
    floor = 2 * macs / peak / 1e6
    print(f"wall {wall:.2f} ms per call (profiled layers {measured:.2f} ms; the difference is the runtime's "
          f"per-call and per-layer overhead); the bench's arithmetic floor (2 x {macs / 1e6:.0f} M MACs counted on "
          f"the PyTorch model / {peak:.0f} GFLOP/s) {floor:.2f} ms: wall x floor {wall / floor:.2f}, wall x roofline "
          f"{wall / roofline:.2f}, roofline x floor {roofline / floor:.2f}\n")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilevit_xs")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=30, help="profiled calls per batch size")
    p.add_argument("--ablation", choices=["pointwise-linear"], help="also profile this variant of our graph")
    args = p.parse_args()
    import openvino as ov

    torch.set_num_threads(args.threads)
    core = openvino_core()
    peak = measure_floors(args.threads, bf16=False).fp32
    rates = bandwidths(core, args.threads, args.calls)
    model = mv.create_model(args.model).eval()
    print(f"{args.model}, {args.size}x{args.size}, {args.threads} threads, OpenVINO {ov.__version__} fp32; "
          f"{describe_cpu()}\n")  # fmt: skip
    print(
        f"peak fp32 (1024^3 matrix product, best of torch and OpenVINO): {peak:.0f} GFLOP/s; element-wise "
        "bandwidth by bytes moved: " + ", ".join(f"{s // 1024} KiB {r:.0f} GB/s" for s, r in rates.items()) + "\n"
    )
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        size = (args.size, args.size)
        graphs = {"ours": export_model(model, Path(tmp) / "ours.xml", "openvino", image_size=size)}
        if args.ablation:
            variant = with_pointwise_linear(mv.deploy(model, channels_last=False))
            graphs[args.ablation] = export_model(variant, Path(tmp) / "ablation.xml", "openvino", image_size=size)
        for b in (int(b) for b in args.batch_sizes.split(",")):
            x = torch.rand(b, 3, *size, generator=torch.Generator().manual_seed(0)).numpy()
            for graph, xml in graphs.items():
                nodes, wall = profile_nodes(core, xml, x, args.threads, args.calls)
                print(f"### batch {b}" + ("" if graph == "ours" else f", ablation: {graph}") + "\n")
                report(nodes, wall, count_macs(model, size, b), peak, rates)


if __name__ == "__main__":
    main()
