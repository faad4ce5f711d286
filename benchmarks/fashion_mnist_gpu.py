"""Fashion-MNIST recipe search on one GPU inside a fixed wall-clock budget, selected on validation only.

Runs several variants of a training recipe side by side on one GPU (each is a plain ``mobilevit train``
process; a small model leaves the GPU mostly idle, so they share it well), then evaluates on the test
set only the variant with the best held-out validation top-1. The number of epochs is sized to the
budget: every variant first runs two calibration epochs (all side by side, as later), the wall time of
its second epoch sets how many epochs fit, and then each variant trains from scratch with that many.

    python benchmarks/fashion_mnist_gpu.py --data /usr/share/datasets/fashion-mnist --budget 360 \\
        --out runs/fm_gpu --run base "" --run erase "random_erase=0.25"

Writes ``OUT/NAME/`` (each variant's run directory), ``OUT/summary.json`` (epochs, epoch times, best
validation top-1, the ``mobilevit train`` command of every variant; test metrics of the selected one) and
the selected variant's ``best.safetensors``, ``curves.png``, ``confusion.png`` and ``samples.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mobilevit.training.report import read_metrics

CALIBRATION_EPOCHS = 2


def train_command(args: argparse.Namespace, overrides: str, epochs: int, output: Path) -> list[str]:
    return [
        sys.executable, "-m", "mobilevit", "train", "--config", args.config, f"data={args.data}",
        f"output={output}", f"epochs={epochs}", "progress=false", "tensorboard=false",
        *shlex.split(args.common), *shlex.split(overrides),
    ]  # fmt: skip


def metric_rows(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.csv"
    return read_metrics(path) if path.exists() else []


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", shlex.join(cmd), flush=True)
    with log.open("w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def calibrate(args: argparse.Namespace, runs: dict[str, str]) -> dict[str, float]:
    """Seconds per epoch (training + validation) of every variant, all running side by side."""
    procs, seen = {}, {name: [] for name in runs}
    for name, overrides in runs.items():
        out = args.out / "calibration" / name
        procs[name] = launch(train_command(args, overrides, 100, out), out / "log.txt")
    deadline, pending = time.monotonic() + args.calibration_timeout, set(runs)
    try:
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                while len(seen[name]) < min(len(metric_rows(args.out / "calibration" / name)), CALIBRATION_EPOCHS):
                    seen[name].append(time.monotonic())
                if len(seen[name]) == CALIBRATION_EPOCHS:
                    pending.discard(name)
                elif procs[name].poll() is not None:
                    print(f"{name}: training exited with {procs[name].returncode} (see its log.txt)")
                    pending.discard(name)
            time.sleep(0.2)
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    for name in runs:
        if len(seen[name]) < CALIBRATION_EPOCHS:
            print(f"dropping {name}: it did not finish {CALIBRATION_EPOCHS} calibration epochs")
    return {name: t[-1] - t[-2] for name, t in seen.items() if len(t) == CALIBRATION_EPOCHS}


def best_val(rows: list[dict[str, float]]) -> float:
    return max(r[k] for r in rows for k in ("val_top1", "ema_val_top1") if k in r)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, required=True, help="wall-clock seconds for calibration + training")
    p.add_argument("--config", default="mobilevit_xxs_fashion_mnist_full")
    p.add_argument("--run", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True)
    p.add_argument("--common", default="", help="overrides for every variant")
    p.add_argument("--startup", type=float, default=25.0, help="seconds a run needs before its first epoch")
    p.add_argument("--calibration-timeout", type=float, default=150.0)
    p.add_argument("--max-epochs", type=int, default=300)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = dict(args.run)
    start = time.monotonic()

    epoch_s = calibrate(args, runs)
    if not epoch_s:
        raise SystemExit("no variant finished its calibration epochs")
    runs = {name: runs[name] for name in epoch_s}
    left = args.budget - (time.monotonic() - start) - args.startup
    epochs = {name: max(1, min(args.max_epochs, int(left / (1.05 * s)))) for name, s in epoch_s.items()}
    print(f"seconds per epoch {epoch_s}; {left:.0f} s left -> epochs {epochs}", flush=True)

    procs = {
        name: launch(train_command(args, runs[name], epochs[name], args.out / name), args.out / name / "log.txt")
        for name in runs
    }
    codes = {name: proc.wait() for name, proc in procs.items()}
    summary: dict = {"budget_s": args.budget, "calibration_epoch_s": epoch_s, "runs": {}}
    for name in runs:
        rows = metric_rows(args.out / name)
        summary["runs"][name] = {
            "overrides": runs[name], "epochs": epochs[name], "exit_code": codes[name],
            "epoch_s": [r["epoch_seconds"] for r in rows], "best_val_top1": best_val(rows) if rows else None,
            "command": "mobilevit " + shlex.join(train_command(args, runs[name], epochs[name], Path(f"runs/{name}"))[3:]),
        }  # fmt: skip
    finished = {n: r for n, r in summary["runs"].items() if r["exit_code"] == 0 and r["best_val_top1"] is not None}
    if finished:
        winner = max(finished, key=lambda n: finished[n]["best_val_top1"])
        run_dir = args.out / winner
        cmd = [
            sys.executable, "-m", "mobilevit", "eval", "--weights", str(run_dir / "best.safetensors"),
            "--data", args.data, "--split", "test", "--json",
            "--confusion", str(args.out / "confusion.png"), "--samples", str(args.out / "samples.png"),
        ]  # fmt: skip
        print("$", shlex.join(cmd), flush=True)
        test = subprocess.run(cmd, capture_output=True, text=True)
        print(test.stderr, file=sys.stderr)
        summary["selected"] = winner
        for name in ("best.safetensors", "curves.png"):
            shutil.copy(run_dir / name, args.out / name)
        summary["test"] = json.loads(test.stdout) if test.returncode == 0 else test.stdout
    summary["wall_s"] = time.monotonic() - start
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if finished else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
