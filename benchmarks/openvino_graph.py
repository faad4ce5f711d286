"""Whose graph runs fastest in OpenVINO: ours against timm's and Hugging Face's, and where the time goes.

Exports our ``deploy(model)`` the way ``mobilevit export --format openvino`` does, the same with the previous
transformer layers (``--ablation qkv``: one ``qkv`` projection split in three, LayerNorm affines kept) and the
peers' eval models the way their users would (``torch.onnx.export`` with a dynamic batch, then
``openvino.convert_model``), all with our weights. Then, for each batch size, compiles every IR alike (fp32
hint, one stream, LATENCY hint, ``--threads`` threads), times them in interleaved rounds (median ms) and
profiles the first batch size with ``PERF_COUNT``: ms per call summed by executed layer type
(``Convolution``, ``FullyConnected``, ``Subgraph`` = OpenVINO's fused attention, ``Reorder``, ...). The
profile's total is below the wall time: the rest is the runtime's per-layer overhead, which grows with the
number of executed layers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/openvino_graph.py --model mobilevit_xs --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import mobilevit as mv
from mobilevit.deployment.bench import _hf_model, _timm_model, describe_cpu
from mobilevit.deployment.export import export_model
from mobilevit.deployment.fuse import FoldedTransformerLayer
from mobilevit.deployment.runtime import openvino_core
from mobilevit.models.layers import TransformerLayer

CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}


def with_unfolded_layers(deployed: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """``deployed`` with the training form's transformer layers back (one qkv projection, LayerNorm affines)."""
    originals = iter(copy.deepcopy([m for m in model.modules() if isinstance(m, TransformerLayer)]))
    for parent in list(deployed.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FoldedTransformerLayer):
                setattr(parent, name, next(originals).eval())
    return deployed


def peer_ir(ov, peer: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(peer, (x,), str(path.with_suffix(".onnx")), dynamo=True, verbose=False,
                          input_names=["images"], dynamic_axes={"images": {0: "batch"}})  # fmt: skip
    ov.save_model(ov.convert_model(str(path.with_suffix(".onnx"))), str(path), compress_to_fp16=False)
    return path


def wall_ms(requests: dict, x, rounds: int) -> dict[str, float]:
    """Median ms per call over interleaved rounds (order reversed every other round), two calls per round."""
    for r in requests.values():
        r.infer([x])
    times: dict[str, list[float]] = collections.defaultdict(list)
    for i in range(rounds):
        for k in list(requests)[:: 1 if i % 2 == 0 else -1]:
            for _ in range(2):
                t = time.perf_counter()
                requests[k].infer([x])
                times[k].append(1e3 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def profile(core, xml: Path, x, threads: int, calls: int) -> tuple[dict[str, float], int]:
    """(ms per call by executed layer type, executed layers) of one IR."""
    config = CONFIG | {"INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    request = core.compile_model(core.read_model(str(xml)), "CPU", config).create_infer_request()
    for _ in range(3):
        request.infer([x])
    by_type: dict[str, float] = collections.Counter()
    layers = 0
    for _ in range(calls):
        request.infer([x])
        executed = [p for p in request.profiling_info if p.status.name == "EXECUTED"]
        layers = len(executed)
        for p in executed:
            by_type[p.node_type] += p.real_time.total_seconds() * 1e3 / calls
    return dict(by_type), layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilevit_xs")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=20, help="profiled calls")
    args = p.parse_args()
    import openvino as ov

    torch.set_num_threads(args.threads)
    core = openvino_core()
    model = mv.create_model(args.model).eval()
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = Path(tmp)
        size = (args.size, args.size)
        files = {
            "ours": export_model(model, tmp / "ours.xml", "openvino", image_size=size),
            "ours, qkv (ablation)": export_model(
                with_unfolded_layers(mv.deploy(model, channels_last=False), model),
                tmp / "qkv.xml",
                "openvino",
                image_size=size,
            ),
            "timm": peer_ir(ov, _timm_model(args.model, model), x, tmp / "timm.xml"),
            "hf": peer_ir(ov, _hf_model(model, tmp), x, tmp / "hf.xml"),
        }
        batches = [int(b) for b in args.batch_sizes.split(",")]
        print(f"{args.model}, {args.size}x{args.size}, {args.threads} threads, OpenVINO {ov.__version__} fp32; "
              f"{describe_cpu()}\n")  # fmt: skip
        print("| batch | " + " | ".join(f"{n} ms" for n in files) + " | ours vs fastest peer |")
        print("|---|" + "---:|" * (len(files) + 1))
        for b in batches:
            xb = torch.rand(b, 3, *size).numpy()
            config = CONFIG | {"INFERENCE_NUM_THREADS": args.threads}
            requests = {n: core.compile_model(core.read_model(str(f)), "CPU", config).create_infer_request()
                        for n, f in files.items()}  # fmt: skip
            ms = wall_ms(requests, xb, args.rounds)
            peer = min(ms["timm"], ms["hf"])
            print(f"| {b} | " + " | ".join(f"{ms[n]:.1f}" for n in files) + f" | {peer / ms['ours']:.3f}x |",
                  flush=True)  # fmt: skip
        xb = torch.rand(batches[0], 3, *size).numpy()
        results = {n: profile(core, f, xb, args.threads, args.calls) for n, f in files.items()}
    print(f"\nPER_COUNT profile, batch {batches[0]}, ms per call by executed layer type ({args.calls} calls):\n")
    types = sorted({t for r, _ in results.values() for t in r}, key=lambda t: -results["ours"][0].get(t, 0.0))
    print("| executed type | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for t in types:
        print(f"| {t} | " + " | ".join(f"{r.get(t, 0.0):.2f}" for r, _ in results.values()) + " |")
    print("| **total** | " + " | ".join(f"**{sum(r.values()):.2f}**" for r, _ in results.values()) + " |")
    print("| executed layers | " + " | ".join(str(n) for _, n in results.values()) + " |")


if __name__ == "__main__":
    main()
