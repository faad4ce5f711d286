"""Training throughput and peak memory of our MobileViT vs timm's, under one identical training loop.

One step = forward, cross-entropy with label smoothing 0.1, backward, AdamW step, on a fixed random
batch. Each library builds the model with its own defaults (ours keeps the official dropout, timm's
has none).

For every model, ours and timm's run in two fresh worker processes that take turns step by step
(ABBA order), so that load from anything else on the machine hits both alike and neither inherits
the other's memory. Reported after the warm-up steps: images/s from the median step time, the
speed ratio ours/timm as the median of the per-pair ratios, and peak memory:

* CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps (tensor memory).
* CPU: the worker's peak resident set size (``getrusage`` ``ru_maxrss``) and, to separate the
  training step from the interpreter + torch + model baseline, its growth over the RSS measured
  just before the first step (activations, gradients, optimizer state, allocator caches).

With ``--teacher T`` it measures the cost of knowledge distillation instead (``mobilevit train teacher=...``):
ours alone against ours with the teacher ``T`` (an architecture name such as ``mobilevit_xs``, random weights
and the same cost, or any weights ``create_model`` loads), the teacher run in eval mode under ``no_grad`` on
the same batch and the loss that of the trainer (``(1 - 0.5) * CE + 0.5 * KL``); the table then reports
images/s without and with the teacher and their ratio.

Example (CPU, 2 threads)::

    python benchmarks/train_throughput.py --device cpu --threads 2 --batch-size 16 --image-size 256
    python benchmarks/train_throughput.py --device cpu --threads 2 --models mobilevit_xxs --teacher mobilevit_xs
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODELS = ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s")
LIBRARIES = ("mobilevit", "timm")
DISTILL = ("mobilevit", "mobilevit+teacher")  # the pair compared with --teacher


def variants(args: argparse.Namespace) -> tuple[str, str]:
    """The two variants compared: ours and timm's, or ours without and with the teacher."""
    return DISTILL if args.teacher else LIBRARIES


def build_model(library: str, name: str) -> nn.Module:
    """A fresh 1000-class model from ``library`` with that library's default configuration."""
    if library.startswith("mobilevit"):
        import mobilevit

        return mobilevit.create_model(name, num_classes=1000)
    import timm

    return timm.create_model(name, num_classes=1000)


def build_teacher(spec: str) -> nn.Module:
    """A 1000-class teacher: an architecture with random weights (same cost), or weights create_model loads."""
    import mobilevit
    from mobilevit.factory import load_checkpoint

    if spec in mobilevit.list_models():
        return mobilevit.create_model(spec, num_classes=1000)
    ckpt = load_checkpoint(spec)
    return mobilevit.create_model(ckpt.arch, weights=ckpt, num_classes=1000)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class TrainStep:
    """A model, its AdamW optimizer and a fixed batch; calling it runs one timed training step."""

    def __init__(self, library: str, name: str, args: argparse.Namespace):
        self.device = torch.device(args.device)
        self.warmup = args.warmup
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        self.model = build_model(library, name).to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.teacher = None
        if library == "mobilevit+teacher":  # as the trainer runs it: eval mode, frozen, no_grad, same batch
            self.teacher = build_teacher(args.teacher).to(self.device).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(self.device)
        self.labels = torch.randint(0, 1000, (args.batch_size,), generator=g).to(self.device)
        self.amp = args.amp
        self.steps_done = 0
        self.rss_before = _rss_mib()

    def __call__(self) -> float:
        """Run one step and return its wall time in seconds; peak memory counts from the first timed step."""
        if self.steps_done == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.teacher is None:
                loss = self.loss_fn(self.model(self.images), self.labels)
            else:
                from mobilevit.training.tasks import classification_loss

                with torch.no_grad():
                    teacher_logits = self.teacher(self.images)
                loss = classification_loss(self.model(self.images), self.labels, 0.1, teacher_logits, 0.5, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.steps_done += 1
        return time.perf_counter() - start

    def memory(self) -> dict[str, float]:
        """Peak memory in MiB (CPU: also the growth over the pre-training RSS as ``step_mib``)."""
        if self.device.type == "cuda":
            return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
        peak = _peak_rss_mib()
        return {"peak_mib": peak, "step_mib": peak - self.rss_before}


def worker(library: str, name: str, args: argparse.Namespace) -> None:
    """Serve ``step`` commands from stdin (answer: seconds); on ``done`` print parameters and memory as JSON."""
    step = TrainStep(library, name, args)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(step(), flush=True)
    params = sum(p.numel() for p in step.model.parameters()) / 1e6
    print(json.dumps({"library": library, "model": name, "params_m": params, **step.memory()}), flush=True)


class _Worker:
    def __init__(self, library: str, name: str, argv: list[str]):
        self.label = f"{library} {name}"
        cmd = [sys.executable, __file__, *argv, "--worker", f"{library}:{name}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command: str | None = None) -> str:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} worker exited with status {self.proc.wait()} (its stderr is above)")
        return line.strip()


def compare(name: str, args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Results of the two :func:`variants` of ``name``, measured in interleaved steps of two worker processes."""
    pair = variants(args)
    workers = {lib: _Worker(lib, name, argv) for lib in pair}
    try:
        for w in workers.values():
            if w.ask() != "ready":
                raise RuntimeError(f"{w.label} worker did not start")
        times: dict[str, list[float]] = {lib: [] for lib in pair}
        for i in range(args.warmup + args.steps):
            for lib in pair if i % 2 == 0 else pair[::-1]:
                times[lib].append(float(workers[lib].ask("step")))
        results = [json.loads(workers[lib].ask("done")) for lib in pair]
    finally:
        for w in workers.values():
            w.proc.kill()
            w.proc.wait()
    ours, ref = (times[lib][args.warmup :] for lib in pair)
    for r in results:
        r["step_seconds"] = times[r["library"]][args.warmup :]
        r["images_per_second"] = args.batch_size / statistics.median(r["step_seconds"])
    results[0]["speed_ratio"] = statistics.median(t / o for o, t in zip(ours, ref, strict=True))  # ours/other, paired
    return results


def _memory(r: dict[str, Any]) -> str:
    return f"{r['peak_mib']:.0f}" + (f" ({r['step_mib']:.0f})" if "step_mib" in r else "")


def format_table(results: list[dict[str, Any]], device: str, teacher: str | None = None) -> str:
    """Markdown table: one row per model, ours vs timm (or ours without vs with ``teacher``), with ratios."""
    mem, mem_key = ("peak RSS MiB (step MiB)", "step_mib") if device == "cpu" else ("peak MiB", "peak_mib")
    a, b = ("ours", "timm") if teacher is None else ("student", "with teacher")
    lines = [
        f"| model | params (M) | {a} img/s | {b} img/s | speed {a}/{b} | {a} {mem} | {b} {mem} | "
        f"{mem_key.replace('_mib', '')} memory {a}/{b} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["library"], r["model"]): r for r in results}
    other = "timm" if teacher is None else DISTILL[1]
    for name in dict.fromkeys(r["model"] for r in results):
        ours, ref = by_key[("mobilevit", name)], by_key[(other, name)]
        lines.append(
            f"| {name} | {ours['params_m']:.2f} | {ours['images_per_second']:.1f} | {ref['images_per_second']:.1f} | "
            f"{ours['speed_ratio']:.2f} | {_memory(ours)} | {_memory(ref)} | {ours[mem_key] / ref[mem_key]:.2f} |"
        )
    return "\n".join(lines)


def _version(package: str) -> str:
    """Installed version, or the module's ``__version__`` when it runs from a source tree (PYTHONPATH)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return importlib.import_module(package).__version__ + " (source)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model and library")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (on CPU too, where the CPU has bf16)")
    p.add_argument(
        "--teacher",
        help="measure distillation instead of timm: ours without and with this teacher (architecture or weights)",
    )
    p.add_argument("--json", type=Path, help="also write all results (incl. per-step times) here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker.split(":"), args)
        return
    results = []
    for name in args.models:
        pair = compare(name, args, argv)
        results += pair
        speeds = ", ".join(f"{r['library']} {r['images_per_second']:.1f} img/s" for r in pair)
        print(f"{name}: {speeds}", file=sys.stderr)
    versions = {lib: _version(lib) for lib in ("torch", *(("mobilevit",) if args.teacher else LIBRARIES))}
    amp = " bf16 autocast" if args.amp else ""
    setup = f"batch {args.batch_size} @ {args.image_size}px, {args.device} ({args.threads} threads){amp}"
    setup += f", teacher {args.teacher}" if args.teacher else ""
    if args.device == "cpu":
        from mobilevit.deployment.bench import describe_cpu

        setup += f"; CPU: {describe_cpu()}"
    timing = f"median of {args.steps} interleaved steps after {args.warmup} warm-up"
    print(f"\n{setup}, {timing}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
    print(format_table(results, args.device, args.teacher))
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k not in ("json", "worker")} | versions
        args.json.write_text(json.dumps({"config": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
