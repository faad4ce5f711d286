"""Which NNCF settings keep int8 OpenVINO MobileViT accurate and fast: a search on the Fashion-MNIST models.

For each model (``--weights``, trained with ``mobilevit train ... val_fraction=0.1 seed=0``) the fp32 IR is
quantized with every setting of ``SETTINGS``, calibrated on ``--calibration-images`` training images that are
not held out (:func:`mobilevit.deployment.quantize.calibration_images`). Each int8 model's top-1 is measured on
the 6,000 held-out images (what the search may look at) and, for the record, on the 10,000 test images; its
speed against the fp32 IR in interleaved rounds (2 threads, batch 1 and 64). The default settings are then
exported and evaluated once more through the command line (``mobilevit export --format openvino --precision
int8`` and ``mobilevit eval --weights FILE.xml``). Writes ``OUT/search.json`` and prints a markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/openvino_int8_fashion_mnist.py \\
        --weights runs/fm_{xxs,xs,s}/best.safetensors --out runs/openvino_int8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mobilevit as mv
from mobilevit.cli import load_model
from mobilevit.data.datasets import build_dataset, split_holdout
from mobilevit.deployment.bench import cpu_info, has_native_bf16
from mobilevit.deployment.export import export_model
from mobilevit.deployment.openvino import DEFAULT_QUANTIZATION, QuantizationSettings, quantize_ir
from mobilevit.deployment.quantize import calibration_images

Q = QuantizationSettings
CONV_ONLY = Q(fast_bias_correction=True, ignored_types=("MatMul", "ScaledDotProductAttention"))
#: name -> settings tried; "conv-only, full bias correction" is DEFAULT_QUANTIZATION (the best on the held-out images).
SETTINGS = {
    "naive (CNN defaults, everything int8)": Q(model_type=None, preset="performance", ignored_types=()),
    "transformer, mixed": dataclasses.replace(CONV_ONLY, ignored_types=()),
    "transformer, performance": dataclasses.replace(CONV_ONLY, preset="performance", ignored_types=()),
    "transformer, mixed, SmoothQuant 0.5": dataclasses.replace(CONV_ONLY, ignored_types=(), smooth_quant_alpha=0.5),
    "transformer, mixed, attention fp32": dataclasses.replace(CONV_ONLY, ignored_types=("ScaledDotProductAttention",)),
    "transformer, mixed, full bias correction": Q(ignored_types=()),
    "conv-only": CONV_ONLY,
    "conv-only, performance": dataclasses.replace(CONV_ONLY, preset="performance"),
    "conv-only, full bias correction": dataclasses.replace(CONV_ONLY, fast_bias_correction=False),
    "conv-only, SmoothQuant off": dataclasses.replace(CONV_ONLY, smooth_quant_alpha=-1.0),
    "conv-only, subset 1000": dataclasses.replace(CONV_ONLY, subset_size=1000),
    "conv-only, depthwise fp32": dataclasses.replace(
        CONV_ONLY, ignored_types=(*CONV_ONLY.ignored_types, "GroupConvolution")
    ),
}
assert SETTINGS["conv-only, full bias correction"] == DEFAULT_QUANTIZATION
#: suffix of the rows run with OpenVINO's bf16 inference precision (``--bf16``)
BF16 = ", rest in bf16"


def top1(compiled, images: torch.Tensor, labels: torch.Tensor, batch: int = 100) -> tuple[float, torch.Tensor]:
    logits = torch.cat(
        [torch.from_numpy(compiled(images[i : i + batch].numpy())[0]) for i in range(0, len(images), batch)]
    )
    return 100 * (logits.argmax(1) == labels).float().mean().item(), logits


def accuracy(compiled, data: dict, ref: dict) -> dict[str, float]:
    """Top-1, top-1 agreement with fp32 and relative L2 error of the logits on each split of ``data``."""
    row = {}
    for s, (images, labels) in data.items():
        acc, logits = top1(compiled, images, labels)
        row[s] = acc
        row[f"{s}_agreement"] = 100 * (logits.argmax(1) == ref[s][1].argmax(1)).float().mean().item()
        row[f"{s}_rel_error"] = ((logits - ref[s][1]).norm() / ref[s][1].norm()).item()
    return row


def speed(models: dict[str, object], images: torch.Tensor, batch: int, rounds: int = 6) -> dict[str, float]:
    """Median over interleaved rounds (order reversed every other round) of the best of a few calls, in ms."""
    x = images[:batch].numpy()
    requests = {k: m.create_infer_request() for k, m in models.items()}
    for r in requests.values():
        r.infer([x])
    times: dict[str, list[float]] = {k: [] for k in requests}
    for i in range(rounds):
        for k in list(requests)[:: 1 if i % 2 == 0 else -1]:
            best = float("inf")
            for _ in range(10 if batch == 1 else 3):
                t = time.perf_counter()
                requests[k].infer([x])
                best = min(best, time.perf_counter() - t)
            times[k].append(best)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def eval_cli(weights: str, split: str) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "mobilevit", "eval", "--weights", weights, "--data", "fashion-mnist", "--split", split,
         "--num-workers", "0", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)["top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", required=True)
    p.add_argument("--out", type=Path, default=Path("runs/openvino_int8"))
    p.add_argument("--calibration-images", type=int, default=1000)
    p.add_argument(
        "--settings",
        action="append",
        choices=list(SETTINGS),
        help="a name of SETTINGS to try; repeat for more (default all)",
    )
    p.add_argument("--no-cli", action="store_true", help="skip the command-line export and eval of the defaults")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="also run the fp32 IR and every int8 setting with OpenVINO's bf16 inference precision (the layers left "
        "in float run in bf16; needs a CPU with native bf16: AVX-512 BF16 or AMX)",
    )
    args = p.parse_args()
    import openvino as ov

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": 2,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    names = args.settings or list(SETTINGS)
    if args.bf16 and not has_native_bf16():
        p.error("--bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX)")
    hints = {"": config} | ({BF16: config | {"INFERENCE_PRECISION_HINT": "bf16"}} if args.bf16 else {})
    report = {
        "cpu": cpu_info(),
        "openvino": ov.__version__,
        "calibration_images": args.calibration_images,
        "models": [],
    }
    for weights in args.weights:
        model = load_model(weights).eval()
        transform = mv.model_transform(model)
        size = transform.crop_size
        full = build_dataset("fashion-mnist", "train", transform)
        held = full.subset(split_holdout(len(full), 0.1, 0)[1])
        test = build_dataset("fashion-mnist", "test", transform)
        data = {}
        for split, ds in (("holdout", held), ("test", test)):
            data[split] = (torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets))
        calib = calibration_images("fashion-mnist", transform, size, args.calibration_images)
        with tempfile.TemporaryDirectory() as tmp:
            xml = export_model(
                mv.deploy(model, channels_last=False),
                Path(tmp) / "fp32.xml",
                "openvino",
                image_size=(size, size),
                dynamic=True,
            )
            fp32 = core.read_model(str(xml))
        compiled = {"fp32": core.compile_model(fp32, "CPU", config)}
        rows = []
        ref = {s: top1(compiled["fp32"], *data[s]) for s in data}
        rows.append({"settings": "fp32", **{s: ref[s][0] for s in data}})

        variants = [("bf16", fp32, hints[BF16], {"inference_precision": "bf16"})] if BF16 in hints else []
        for name in names:
            t = time.time()
            q = quantize_ir(fp32.clone(), calib, SETTINGS[name])
            extra = {"quantize_s": round(time.time() - t, 1), **SETTINGS[name].to_dict()}
            variants += [(name + suffix, q, cfg, extra) for suffix, cfg in hints.items()]
        for label, ir, cfg, extra in variants:
            compiled[label] = core.compile_model(ir, "CPU", cfg)
            rows.append({"settings": label, **extra, **accuracy(compiled[label], data, ref)})
            print(json.dumps(rows[-1]), flush=True)
        for batch in (1, 64):
            ms = speed(compiled, data["holdout"][0], batch)
            for row in rows:
                row[f"ms_b{batch}"] = ms[row["settings"]]
                row[f"speedup_b{batch}"] = ms["fp32"] / ms[row["settings"]]
        entry = {"weights": weights, "model": mv.factory.arch_name(model), "size": size, "rows": rows}
        # the default settings through the command line: export, then `mobilevit eval --weights FILE.xml`
        stem = args.out / Path(weights).parent.name
        for precision in () if args.no_cli else ("fp32", "int8"):
            cmd = [sys.executable, "-m", "mobilevit", "export", "--weights", weights, "--format", "openvino",
                   "--precision", precision, "--dynamic", "-o", f"{stem}.{precision}.xml"]  # fmt: skip
            if precision == "int8":
                cmd += ["--calibration", "fashion-mnist", "--calibration-images", str(args.calibration_images)]
            subprocess.run(cmd, check=True, capture_output=True)
            entry[f"cli_{precision}"] = {s: eval_cli(f"{stem}.{precision}.xml", s) for s in ("holdout", "test")}
        if not args.no_cli:
            entry["cli_pytorch"] = {s: eval_cli(weights, s) for s in ("holdout", "test")}
        report["models"].append(entry)
        (args.out / "search.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in entry.items() if k.startswith("cli")}), flush=True)
    print(table(report))


def table(report: dict) -> str:
    lines = []
    for entry in report["models"]:
        lines += [f"\n{entry['model']} at {entry['size']} px ({entry['weights']})\n",
                  "| settings | holdout top-1 | test top-1 | agreement (holdout) | ms batch 1 | ms batch 64 | speed-up b1 / b64 |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in entry["rows"]:
            agree = f"{r['holdout_agreement']:.2f}%" if "holdout_agreement" in r else "-"
            lines.append(
                f"| {r['settings']} | {r['holdout']:.2f}% | {r['test']:.2f}% | {agree} | {r['ms_b1']:.2f} | "
                f"{r['ms_b64']:.1f} | {r['speedup_b1']:.2f}x / {r['speedup_b64']:.2f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
