"""The ``mobilevit`` command: thin sub-commands over the library (models, predict, convert, average, eval, train, export, bench, data)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import __version__
from .checkpoints.average import average_checkpoints
from .checkpoints.hub import get_weights, list_weights
from .checkpoints.io import WRITABLE, Checkpoint, CheckpointError, config_task, save_checkpoint
from .checkpoints.layouts import LAYOUTS
from .data.datasets import IMAGE_SUFFIXES, open_image
from .deployment.export import ExportError
from .deployment.runtime import ExportedModel
from .factory import arch_name, create_model, list_models, load_checkpoint, model_categories, model_transform
from .models.flops import count_macs, count_params
from .training.distributed import resolve_device
from .training.recipe import list_recipes, load_recipe, parse_overrides

#: Errors of the library that the command reports as ``error: <message>`` (exit code 2), without a traceback.
#: ``OSError`` covers ``FileNotFoundError``, ``ConnectionError`` and permission problems; ``CheckpointError``
#: is a ``ValueError``; ``ExportError`` covers exports a format cannot take (and missing export packages).
USER_ERRORS = (CheckpointError, ExportError, ValueError, OSError)

EXIT_OK, EXIT_NOTHING_PREDICTED, EXIT_ERROR = 0, 1, 2
_META_KEYS = ("categories", "preprocess")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: keep argparse's message, return its code
        return EXIT_OK if e.code is None else e.code if isinstance(e.code, int) else EXIT_ERROR
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except BrokenPipeError:  # e.g. `mobilevit predict ... | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_NOTHING_PREDICTED
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Library warnings as one ``warning: ...`` line on stderr, without a source line."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobilevit",
        description="MobileViT v1: list the models, classify and segment images, train, evaluate, convert "
        "checkpoints between ecosystems, export and benchmark.",
        epilog="Exit codes: 0 success; 1 predict read no image; 2 error (bad arguments, unreadable checkpoint, "
        "failed download).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _models_parser,
        _predict_parser,
        _convert_parser,
        _average_parser,
        _eval_parser,
        _train_parser,
        _export_parser,
        _bench_parser,
        _data_parser,
    ):
        add(sub)
    return parser


def _models_parser(sub: Any) -> None:
    """`mobilevit models`."""
    p = sub.add_parser(
        "models",
        help="parameters, MACs and known pretrained weights of every model",
        description="A table of every model: parameters, MACs of one forward pass at --size (counted as fvcore "
        "does: convolutions, linear layers, attention matmuls, norms; 1 MAC = 1 flop) and the known pretrained "
        "weights with their published ImageNet-1k top-1 / top-5.",
    )
    p.add_argument(
        "--size",
        type=_positive_int,
        default=None,
        help="square input size for MACs (default: as published: 256 classification, 512 segmentation, 320 detection)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list of objects instead of the table")
    p.set_defaults(func=cmd_models)


def _predict_parser(sub: Any) -> None:
    """`mobilevit predict`."""
    p = sub.add_parser(
        "predict",
        help="classify, segment or detect objects in images (files or directories)",
        description="Classify images with a MobileViT, segment them with segmentation weights (a class mask and "
        "a colour overlay per image in --output-dir), or detect objects with detection weights (a picture with "
        "boxes, labels and scores per image in --output-dir). Directories are walked recursively for "
        f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files (any case). Images that cannot be read are reported on "
        "stderr as 'skipped PATH: REASON' and left out. Exit code 0 when at least one image was classified, "
        "1 when none was.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or directories")
    p.add_argument(
        "--model",
        choices=list_models(None),
        default=None,
        help="architecture (default: the checkpoint's with --weights, else mobilevit_s)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="known weights name (see `mobilevit models`), URL, checkpoint file or Hugging Face directory, or an "
        "exported file (.onnx, .xml OpenVINO, .pt TorchScript, .pte ExecuTorch) run on the CPU with its own "
        "preprocessing and class names; without it the model is randomly initialised and its predictions are "
        "meaningless",
    )
    _exported_options(p)
    p.add_argument("--topk", type=_positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("predictions"),
        help="segmentation models: where IMAGE_mask.png (class indices, VOC palette) and IMAGE_overlay.png go; "
        "detection models: IMAGE_detections.png (default ./predictions)",
    )
    p.add_argument(
        "--score-thresh",
        type=float,
        default=0.3,
        help="detection models: detections with a lower score are not drawn or listed (default 0.3)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--num-workers", type=_non_negative_int, default=0, help="image decoding processes (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument(
        "--json",
        action="store_true",
        help='JSON Lines on stdout: one object per image, {"path": ..., "topk": [{"index": int, "label": str, '
        '"probability": float}, ...]} with probabilities in decreasing order',
    )
    p.set_defaults(func=cmd_predict)


def _convert_parser(sub: Any) -> None:
    """`mobilevit convert`."""
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between ecosystems",
        description="Read any supported checkpoint (our format, timm, Apple ml-cvnets, Hugging Face directory, "
        "mmpretrain; layout and task detected from its keys) and write it in another layout. Our format (default) "
        "is one .safetensors file that also keeps the class names and eval preprocessing; hf writes a directory "
        "(class names kept as id2label); timm, cvnets and mmpretrain keep the tensors only. Segmentation models "
        "(DeepLabv3) convert between mobilevit, cvnets and hf.",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint file, Hugging Face directory, URL or known weights name")
    p.add_argument("dst", metavar="DST", help="output file (directory for --to hf)")
    p.add_argument("--to", choices=list(WRITABLE), default="mobilevit", help="layout to write (default mobilevit)")
    p.add_argument(
        "--layout-in", choices=list(LAYOUTS), default=None, help="layout of SRC (default: detected from its keys)"
    )
    p.add_argument(
        "--half",
        action="store_true",
        help="store floating-point tensors as float16: half the file; models load them back as float32 "
        "(logits move by about 0.2%% of their range)",
    )
    p.set_defaults(func=cmd_convert)


def _average_parser(sub: Any) -> None:
    """`mobilevit average`."""
    p = sub.add_parser(
        "average",
        help="average the weights of checkpoints of one model (a model soup)",
        description="Write the uniform average of checkpoints of one architecture with the same classes (any layout "
        "convert reads) in our format: a model soup, or SWA over saved weights. Meant for runs fine-tuned from one "
        "start (stages of one training), which lie in one basin; whether the average beats the best of them is for "
        "held-out images to say. BatchNorm statistics are averaged too, as the training EMA does.",
    )
    p.add_argument("src", metavar="SRC", nargs="+", help="two or more checkpoints (files, known names or URLs)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--half", action="store_true", help="store floating-point tensors as float16 (as convert --half)")
    p.set_defaults(func=cmd_average)


def _eval_parser(sub: Any) -> None:
    """`mobilevit eval`."""
    p = sub.add_parser(
        "eval",
        help="top-1 / top-5 accuracy (classifiers), mIoU (segmentation) or COCO mAP (detection) on a labelled dataset",
        description="Evaluate a classifier on Fashion-MNIST (IDX files; default: the Debian package "
        "dataset-fashion-mnist) or on an ImageFolder tree (one sub-directory per class, sorted names = class "
        "indices; with train/ and val/ sub-directories, --split picks one). Evaluate a segmentation model on a "
        "PASCAL VOC tree or an images/ + masks/ folder: mIoU, per-class IoU and pixel accuracy from one confusion "
        "matrix over every labelled pixel (255 ignored), each image resized to --size for the network and "
        "compared at its original size, as the official evaluation does. Evaluate a detector on a COCO (annotations/"
        "instances_SPLIT.json) or VOC tree: COCO mAP with pycocotools (AP, AP50, AP75, small / medium / large, per "
        "class), each image resized to --size and its boxes scaled back. Preprocessing comes from the weights. "
        "Unreadable images are skipped and counted.",
    )
    p.add_argument("--model", choices=list_models(None), default=None, help="architecture (default: the checkpoint's)")
    p.add_argument(
        "--weights",
        required=True,
        help="checkpoint file, directory, URL or known weights name, or an exported file (.onnx, .xml OpenVINO, "
        ".pt TorchScript, .pte ExecuTorch: e.g. an int8 export) run on the CPU with the preprocessing it records",
    )
    _exported_options(p)
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="'fashion-mnist', a directory of IDX files, or an ImageFolder tree; segmentation: a VOC tree or an "
        "images/ + masks/ folder; detection: a COCO or VOC tree",
    )
    p.add_argument(
        "--split",
        choices=["train", "val", "test", "holdout"],
        default="test",
        help="train, val, test, or holdout: the training images that `mobilevit train val_fraction=F seed=S` held "
        "out for validation, with F and S from --val-fraction and --seed (default test)",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="with --split holdout (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="with --split holdout: the run's seed (default 0)")
    p.add_argument(
        "--size",
        type=_positive_int,
        default=None,
        help="evaluate at this crop size; the resize side keeps the weights' ratio (default: the weights' eval size)",
    )
    p.add_argument(
        "--hflip", action="store_true", help="average the logits of each image and its mirror (twice the compute)"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per forward pass (default 100; segmentation and detection 16)",
    )
    p.add_argument("--num-workers", type=_non_negative_int, default=2, help="image decoding processes (default 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype (default none)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--confusion", type=Path, default=None, metavar="PNG", help="write a confusion-matrix picture")
    p.add_argument("--samples", type=Path, default=None, metavar="PNG", help="write a picture of sample predictions")
    p.add_argument(
        "--score-thresh",
        type=float,
        default=0.3,
        help="detection models: boxes drawn in --samples score at least this (default 0.3; mAP uses every detection)",
    )
    p.set_defaults(func=cmd_eval)


def _exported_options(p: argparse.ArgumentParser) -> None:
    """Options of `predict` and `eval` for exported files."""
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="(exported OpenVINO files) inference precision instead of the file's hint; bf16 needs a CPU with "
        "AVX-512 BF16 or AMX",
    )
    p.add_argument(
        "--metadata-from",
        default=None,
        metavar="WEIGHTS",
        help="(exported files without metadata: ExecuTorch .pte) the checkpoint whose preprocessing and class "
        "names apply",
    )


def _train_parser(sub: Any) -> None:
    """`mobilevit train`."""
    p = sub.add_parser(
        "train",
        help="train or fine-tune with a recipe (single process or torchrun)",
        description="Train with a recipe: a bundled name or a YAML file of training options, then KEY=VALUE "
        "overrides (values parsed as YAML, e.g. epochs=30 lr=0.001 weights=run/best.safetensors). "
        f"Bundled recipes: {', '.join(list_recipes())}. For many GPUs or nodes launch it with torchrun "
        "(see the README). The output directory receives last.pt (resumable state, written atomically), "
        "best.safetensors, metrics.csv, steps.csv, curves.png and TensorBoard logs.",
    )
    p.add_argument("--config", required=True, help="bundled recipe name or YAML file")
    p.add_argument("--resume", action="store_true", help="continue the run in the output directory exactly")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training options that replace the recipe's")
    p.set_defaults(func=cmd_train)


def _export_parser(sub: Any) -> None:
    """`mobilevit export`."""
    p = sub.add_parser(
        "export",
        help="export to ONNX, OpenVINO, TorchScript, Core ML or ExecuTorch (optionally int8 or bf16)",
        description="Export the inference form of a model (BatchNorm folded, see mobilevit.deploy) for "
        "deployment. onnx: input 'images' [B, 3, H, W] float RGB in [0, 1], output 'logits'; openvino: an IR (.xml "
        "+ .bin) with the same input and outputs, converted from the ONNX file; torchscript: a "
        "traced module; coreml: an .mlpackage whose input is an RGB image (the 1/255 scaling is built in); "
        "executorch: a .pte program lowered to XNNPACK. H and W are fixed at --size (onnx: --dynamic-size leaves "
        "them dynamic); --dynamic makes the batch dimension dynamic. Segmentation models (*_deeplabv3) output "
        "'logits' [B, classes, H, W] at the input size. Detectors (*_ssdlite) output 'boxes' [B, N, 4] "
        "(normalised x1, y1, x2, y2) and 'scores' [B, N, classes] (softmax, class 0 = background) for N anchors; "
        "--postprocess adds the official post-processing (ONNX NonMaxSuppression: per class score > 0.05, "
        "IoU 0.5, 200 per class) as a third output 'selected' [K, 3] (batch, class, anchor). --precision int8 "
        "(onnx, openvino) writes a statically quantized model calibrated on --calibration images; --precision bf16 "
        "(openvino) an fp32 IR that runs in bf16 on CPUs that have it. Run the files with `mobilevit predict` / "
        "`mobilevit eval --weights FILE` or mobilevit.load_exported.",
    )
    p.add_argument("--model", choices=list_models(None), default=None, help="architecture (default: the checkpoint's)")
    p.add_argument("--weights", default=None, help="checkpoint file, directory, URL or known weights name")
    p.add_argument("--format", required=True, choices=["onnx", "openvino", "torchscript", "coreml", "executorch"])
    p.add_argument("-o", "--output", type=Path, default=None, help="output path (default: MODEL.SUFFIX here)")
    p.add_argument(
        "--size",
        type=_positive_int,
        default=None,
        help="square input size (default: the weights' eval size; 320 for detectors, 512 for segmentation)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=1, help="batch size of the example input (default 1)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch dimension")
    p.add_argument(
        "--dynamic-size",
        action="store_true",
        help="(onnx) dynamic H and W too (--size is the size it is checked at, with a second one)",
    )
    p.add_argument(
        "--postprocess",
        action="store_true",
        help="(onnx, openvino; detectors) the official post-processing in the graph: outputs boxes, scores, selected",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8"],
        default="fp32",
        help="fp32 (default); int8 (onnx, openvino): post-training static quantization calibrated on --calibration; "
        "bf16 (openvino): an fp32 IR with a bf16 inference hint",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="(int8) calibration images: 'fashion-mnist', an IDX directory or ImageFolder tree (training images "
        "minus those `mobilevit train` holds out, see --val-fraction and --seed); segmentation and detection "
        "models: the train split of a VOC, COCO or images/ + masks/ tree",
    )
    p.add_argument("--calibration-images", type=_positive_int, default=512, help="(int8) images used (default 512)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="(int8, classifiers) the run's val_fraction: its held-out images are never used to calibrate "
        "(default 0.1)",
    )
    p.add_argument("--seed", type=int, default=0, help="(int8, classifiers) the run's seed (default 0)")
    p.set_defaults(func=cmd_export)


def _bench_parser(sub: Any) -> None:
    """`mobilevit bench`."""
    p = sub.add_parser(
        "bench",
        help="inference latency of ours, the deploy form, exports and peers (timm, Hugging Face, torchvision)",
        description="Median latency (ms per batch, after warm-up; each implementation timed in two blocks, in order "
        "then in reverse order) and "
        "throughput for each model and batch size, with the speed-up against timm (segmentation: Hugging Face) "
        "and the distance to the arithmetic floor of the row's precision (2 x MACs / the fp32, bf16 or int8 "
        "matrix-multiply rate measured in the same run). The peers run their own models through the paths their "
        "users would take: eager, torch.compile, a plain torch.onnx.export in onnxruntime and OpenVINO (timm-*, "
        "hf-*: the faster of openvino.convert_model and conversion from their ONNX). Ours adds OpenVINO in fp32, bf16 "
        "(where the CPU has avx512_bf16 or amx_bf16) and int8 (NNCF; random calibration images, speed only). "
        "onnxruntime and OpenVINO do not spin idle threads between calls. After the table, a summary gives per "
        "(model, batch) the fastest fp32 peer path and our fastest fp32 / bf16 / int8 rows against it and against "
        "their floors. Segmentation models "
        "(*_deeplabv3) are compared with Hugging Face's MobileViTForSemanticSegmentation (our weights; hf, hf-compile, "
        "hf-onnx, hf-openvino) and torchvision's "
        "DeepLabv3 / LR-ASPP MobileNetV3-Large (tv-deeplabv3, tv-lraspp; random weights); detectors (*_ssdlite) with "
        "torchvision's SSDLite320-MobileNetV3-Large (tv-ssdlite, tv-ssdlite-onnx, tv-ssdlite-openvino), timing the "
        "network up to decoded "
        "boxes and class scores, and each library's own post-processing in the '+post' rows. The header names the "
        "CPU, its AVX2/AVX-512/VNNI/BF16/AMX support and the load average. Implementations whose packages are "
        "missing are left out. 'compile' is torch.compile (inductor, frozen weights) of the deploy form: its "
        "first call compiles for about a minute per shape (the same for timm-compile and hf-compile).",
    )
    p.add_argument(
        "--models",
        default="mobilevit_xxs,mobilevit_xs,mobilevit_s",
        help="comma-separated models: classifiers, segmentation (mobilevit_xxs_deeplabv3, ...) and detection "
        "models (mobilevit_xxs_ssdlite, ...)",
    )
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--size", type=_positive_int, default=256, help="square input size (default 256)")
    p.add_argument("--impl", default=None, help="comma-separated implementations (default: all available)")
    p.add_argument(
        "--patch-sizes",
        nargs="+",
        default=None,
        metavar="P,P,P",
        help="measure ours at each of these MobileViT patch sizes, e.g. 2,2,2 8,4,2 (peers once; default: the model's)",
    )
    p.add_argument("--threads", type=_positive_int, default=2, help="intra-op threads for every implementation")
    p.add_argument("--warmup", type=_non_negative_int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--repeats", type=_positive_int, default=20, help="timed rounds (default 20)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="also draw throughput bars")
    p.set_defaults(func=cmd_bench)


def _data_parser(sub: Any) -> None:
    """`mobilevit data scenes`."""
    p = sub.add_parser("data", help="make datasets", description="Make datasets.")
    data = p.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    p = data.add_parser(
        "scenes",
        help="scenes of Fashion-MNIST items for segmentation and detection",
        description="Generate a reproducible scene dataset: Fashion-MNIST items at random scales and places over "
        "textured backgrounds (crops of scikit-image sample photos), with per-pixel masks (10 classes + "
        "background) and boxes, written in the PASCAL VOC layout (JPEGImages/, SegmentationClass/, Annotations/, "
        "ImageSets/) and the COCO layout (annotations/instances_SPLIT.json). Train and val scenes take items from "
        "Fashion-MNIST's training split (disjoint images), test scenes from its test split.",
    )
    p.add_argument("output", type=Path, metavar="OUT", help="directory to create")
    p.add_argument("--train", type=_non_negative_int, default=2000, help="training scenes (default 2000)")
    p.add_argument("--val", type=_non_negative_int, default=500, help="validation scenes (default 500)")
    p.add_argument("--test", type=_non_negative_int, default=1000, help="test scenes (default 1000)")
    p.add_argument("--size", type=_positive_int, default=128, help="square scene side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0): same arguments, same files")
    p.add_argument(
        "--fashion-mnist",
        default=None,
        metavar="DIR",
        help="directory of the IDX files (default: the Debian package's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_data_scenes)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# ---------------------------------------------------------------------------------------- models


#: The input side of each task's published results (classification 256, segmentation 512, detection 320).
TASK_SIZES = {"classification": 256, "segmentation": 512, "detection": 320}


def eval_size(model: torch.nn.Module) -> int:
    """The input side a model's weights are evaluated at: a classifier's crop, a dense model's square resize.

    An exported file with a fixed input size is evaluated at that size.
    """
    task = model_task_of(model)
    if isinstance(model, ExportedModel) and model.image_size is not None:
        return model.image_size[0]
    if task == "classification":
        return model_transform(model).crop_size
    return int(model.weights_meta.get("preprocess", {}).get("size", TASK_SIZES[task]))


def model_task_of(model: torch.nn.Module) -> str:
    """The task of a model or of an exported file (:class:`~mobilevit.deployment.runtime.ExportedModel`)."""
    return model.task if isinstance(model, ExportedModel) else config_task(model.config)


def _model_name(model: torch.nn.Module) -> str:
    """What a model is called in messages: the exported file, or the architecture."""
    if isinstance(model, ExportedModel):
        return str(model.path)
    return getattr(model.config, "name", None) or arch_name(model)


def _inference_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.device]:
    """The model of `predict` and `eval`: a checkpoint's (``--weights``, ``--model``) on ``--device``, or an exported
    file (``--weights FILE.onnx|.xml|.pt|.pte``) run on the CPU by :func:`mobilevit.load_exported`."""
    from .deployment.runtime import exported_format, load_exported

    fmt = exported_format(args.weights) if args.weights is not None else None
    if fmt is None:
        if args.precision is not None or args.metadata_from is not None:
            raise ValueError("--precision and --metadata-from are for exported files (.onnx, .xml, .pt, .pte)")
        device = resolve_device(args.device)
        arch = args.model or "mobilevit_s"
        model = load_model(args.weights, args.model) if args.weights else create_model(arch)
        return model.eval().to(device), device
    if args.model is not None:
        raise ValueError(f"--model is for checkpoints; {args.weights} is an exported {fmt} file")
    if args.device not in (None, "cpu"):
        raise ValueError(f"exported files run on the CPU; drop --device {args.device}")
    if getattr(args, "amp", "none") != "none":
        raise ValueError("--amp is for checkpoints; exported OpenVINO files take --precision bf16")
    model = load_exported(args.weights, precision=args.precision)
    if args.metadata_from is not None:
        meta = load_checkpoint(args.metadata_from).meta
        model.categories = model.categories or list(meta.get("categories") or [])
        model.preprocess = model.preprocess or dict(meta.get("preprocess") or {})
    if model.task == "classification":
        if not model.preprocess:
            raise ValueError(
                f"{args.weights} records no preprocessing ({fmt} files carry no metadata): pass --metadata-from "
                "WEIGHTS, the checkpoint it was exported from"
            )
        if model.image_size is not None and model.image_size[0] != model_transform(model).crop_size:
            model.preprocess = model_transform(model).at_size(model.image_size[0]).to_dict()
    return model, torch.device("cpu")


class _ExportedDetector(torch.nn.Module):
    """An exported detector behind the eval-mode interface of ours: ``model(images)`` -> detections per image."""

    def __init__(self, exported: torch.nn.Module):
        super().__init__()
        self.exported = exported

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        return self.exported.detections(images)


def _detector(model: torch.nn.Module) -> torch.nn.Module:
    return _ExportedDetector(model) if isinstance(model, ExportedModel) else model


def model_rows(size: int | None = None) -> list[dict[str, Any]]:
    """Parameters, MACs at ``size`` x ``size`` (default: the task's published input) and known weights of every model."""
    rows = []
    for name in list_models(None):
        model = create_model(name)
        side = size or TASK_SIZES[config_task(model.config)]
        weights = []
        for w in map(get_weights, list_weights(name)):
            top = {k.rsplit("/", 1)[-1]: v for k, v in w.metrics.items()}
            weights.append({"name": w.name, "top1": top.get("top1"), "top5": top.get("top5"), "url": w.url})
        rows.append(
            {
                "name": name,
                "task": config_task(model.config),
                "params": count_params(model),
                "macs": count_macs(model, (side, side)),
                "input_size": [side, side],
                "weights": weights,
            }
        )
    return rows


def _format_macs(macs: int) -> str:
    return f"{macs / 1e9:.2f} G" if macs >= 1e8 else f"{macs / 1e6:.1f} M"


def _format_weights(w: dict[str, Any]) -> str:
    scores = " / ".join(f"{w[k]:.1f}" for k in ("top1", "top5") if w[k] is not None)
    return f"{w['name']} ({scores})" if scores else w["name"]


def cmd_models(args: argparse.Namespace) -> int:
    rows = model_rows(args.size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    table = [["model", "params", "MACs", "input", "pretrained weights (ImageNet-1k top-1 / top-5)"]]
    for r in rows:
        names = [_format_weights(w) for w in r["weights"]] or ["-"]
        side = r["input_size"][0]
        table.append([r["name"], f"{r['params']:,}", _format_macs(r["macs"]), f"{side}x{side}", names[0]])
        table += [["", "", "", "", n] for n in names[1:]]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    align = [str.ljust, str.rjust, str.rjust, str.rjust, str.ljust]
    for row in table:
        print("  ".join(a(cell, w) for a, cell, w in zip(align, row, widths, strict=True)).rstrip())
    return EXIT_OK


# --------------------------------------------------------------------------------------- predict


def find_images(inputs: Sequence[str | os.PathLike], warn: Callable[[str], None] | None = None) -> list[Path]:
    """Files to classify: files as given (existing or not), directories walked recursively for images.

    Missing paths are kept so that reading them reports them as skipped; ``warn`` is told about
    directories without any image. Duplicates are dropped, order is kept (directories sorted).
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images and warn:
                warn(f"warning: no image files ({', '.join(IMAGE_SUFFIXES)}) in {path}")
            found += images
        else:
            found.append(path)
    return list(dict.fromkeys(found))


class ImageFiles(Dataset):
    """``(index, tensor, None)`` per readable file, ``(index, None, reason)`` per unreadable one."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], Tensor]):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        try:
            return index, self.transform(open_image(self.paths[index])), None
        except UnidentifiedImageError:
            return index, None, "not a readable image (unknown format or corrupt header)"
        except Exception as e:  # any decoder failure skips this one image, never the batch
            return index, None, str(e) or type(e).__name__


def collate_images(items: list[tuple[int, Tensor | None, str | None]]) -> tuple[list[int], Tensor | None, list]:
    """Stack the readable images; pass the unreadable ones' ``(index, reason)`` along."""
    ok = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, reason) for i, t, reason in items if t is None]
    batch = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], batch, failed


def cmd_predict(args: argparse.Namespace) -> int:
    def warn(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    arch = args.model or "mobilevit_s"
    model, device = _inference_model(args)
    if model.num_classes == 0:
        raise ValueError(f"{args.weights} has no classifier (num_classes=0): nothing to predict")
    if args.weights is None:
        warn(
            f"warning: no --weights given, {arch} is randomly initialised: its predictions are meaningless. "
            f"Pass --weights {(list_weights(arch) or ['PATH'])[0]} or a checkpoint file."
        )
    categories = model_categories(model)
    topk = min(args.topk, model.num_classes)

    paths = find_images(args.inputs, warn)
    if not paths:
        print("error: no image files found in " + ", ".join(map(str, args.inputs)), file=sys.stderr)
        return EXIT_NOTHING_PREDICTED
    if model_task_of(model) == "segmentation":
        return _predict_segmentation(args, model, device, paths, categories, warn)
    if model_task_of(model) == "detection":
        return _predict_detection(args, model, device, paths, categories, warn)
    loader = DataLoader(
        ImageFiles(paths, model_transform(model)),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    predicted = skipped = 0
    with tqdm(total=len(paths), unit="img", desc="predict", file=sys.stderr, disable=None) as bar:
        for indices, batch, failed in loader:
            for i, reason in failed:
                warn(f"skipped {paths[i]}: {reason}")
            skipped += len(failed)
            if batch is not None:
                with torch.inference_mode():
                    probs = model(batch.to(device, non_blocking=True)).float().softmax(dim=-1)
                top_p, top_i = (t.cpu().tolist() for t in probs.topk(topk, dim=-1))
                for i, ps, cs in zip(indices, top_p, top_i, strict=True):
                    preds = [
                        {"index": c, "label": categories[c], "probability": p} for p, c in zip(ps, cs, strict=True)
                    ]
                    tqdm.write(_format_prediction(paths[i], preds, args.json), file=sys.stdout)
                predicted += len(indices)
            bar.update(len(indices) + len(failed))
    if not predicted:
        print(f"error: none of the {len(paths)} image file(s) could be read", file=sys.stderr)
        return EXIT_NOTHING_PREDICTED
    if skipped:
        warn(f"{predicted} image(s) classified, {skipped} skipped")
    return EXIT_OK


def _predict_segmentation(
    args: argparse.Namespace,
    model: torch.nn.Module,
    device: torch.device,
    paths: list[Path],
    categories: list[str],
    warn: Callable[[str], None],
) -> int:
    """Per image: a palette PNG of class indices and a colour overlay in --output-dir, and the classes found."""
    import numpy as np
    import torch.nn.functional as F

    from .data.segmentation import SegEvalTransform, voc_colormap
    from .training.report import overlay

    transform = SegEvalTransform(eval_size(model))
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    palette = voc_colormap(256).reshape(-1).tolist()
    predicted = 0
    for path in tqdm(paths, unit="img", desc="predict", file=sys.stderr, disable=None):
        try:
            image = open_image(path)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            warn(f"skipped {path}: {e}")
            continue
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div(255)
        resized, _ = transform(image, np.zeros(pixels.shape[-2:], dtype=np.uint8))
        with torch.inference_mode():
            logits = model(resized[None].to(device)).float()
        mask = F.interpolate(logits, size=pixels.shape[-2:], mode="nearest").argmax(1)[0].cpu()
        stem = out / path.stem
        indexed = Image.fromarray(mask.numpy().astype(np.uint8), mode="P")
        indexed.putpalette(palette)
        indexed.save(f"{stem}_mask.png")
        blended = (overlay(pixels, mask) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(blended).save(f"{stem}_overlay.png")
        counts = torch.bincount(mask.reshape(-1), minlength=len(categories))
        found = [
            {"index": c, "label": categories[c], "fraction": int(counts[c]) / mask.numel()}
            for c in counts.argsort(descending=True).tolist()
            if counts[c]
        ]
        if args.json:
            record = {"path": str(path), "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png", "classes": found}
            tqdm.write(json.dumps(record, ensure_ascii=False), file=sys.stdout)
        else:
            parts = [f"{100 * f['fraction']:5.1f}% {f['label']}" for f in found]
            tqdm.write(f"{path} -> {stem}_mask.png, {stem}_overlay.png\n  " + ", ".join(parts), file=sys.stdout)
        predicted += 1
    if not predicted:
        print(f"error: none of the {len(paths)} image file(s) could be read", file=sys.stderr)
        return EXIT_NOTHING_PREDICTED
    return EXIT_OK


def _predict_detection(
    args: argparse.Namespace,
    model: torch.nn.Module,
    device: torch.device,
    paths: list[Path],
    categories: list[str],
    warn: Callable[[str], None],
) -> int:
    """Per image: the boxes above --score-thresh (printed or JSON) and a picture of them in --output-dir."""
    import numpy as np
    from torchvision.transforms.v2 import functional as TF

    from .training.report import draw_detections

    size = eval_size(model)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    predicted = 0
    for path in tqdm(paths, unit="img", desc="predict", file=sys.stderr, disable=None):
        try:
            image = open_image(path)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            warn(f"skipped {path}: {e}")
            continue
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
        h, w = pixels.shape[-2:]
        resized = TF.resize(pixels.float().div(255), [size, size], antialias=True)
        with torch.inference_mode():
            det = _detector(model)(resized[None].to(device))[0]
        keep = det["scores"] >= args.score_thresh
        boxes = (det["boxes"][keep].float().cpu() * torch.tensor([w / size, h / size] * 2)).tolist()
        found = [
            {"index": int(c), "label": categories[int(c)], "score": float(p), "box": [round(v, 1) for v in b]}
            for c, p, b in zip(det["labels"][keep].tolist(), det["scores"][keep].tolist(), boxes, strict=True)
        ]
        found.sort(key=lambda d: -d["score"])
        picture = out / f"{path.stem}_detections.png"
        drawn = draw_detections(
            pixels,
            torch.tensor([d["box"] for d in found]).reshape(-1, 4),
            torch.tensor([d["index"] for d in found], dtype=torch.long),
            torch.tensor([d["score"] for d in found]),
            categories,
            score_thresh=args.score_thresh,
        )
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(picture)
        if args.json:
            tqdm.write(json.dumps({"path": str(path), "picture": str(picture), "detections": found}), file=sys.stdout)
        else:
            rows = [f"  {d['score']:.2f}  {d['label']}  {d['box']}" for d in found] or [
                "  (nothing above the threshold)"
            ]
            tqdm.write("\n".join([f"{path} -> {picture}", *rows]), file=sys.stdout)
        predicted += 1
    if not predicted:
        print(f"error: none of the {len(paths)} image file(s) could be read", file=sys.stderr)
        return EXIT_NOTHING_PREDICTED
    return EXIT_OK


def _format_prediction(path: Path, preds: list[dict[str, Any]], as_json: bool) -> str:
    if as_json:
        return json.dumps({"path": str(path), "topk": preds}, ensure_ascii=False)
    return "\n".join([str(path), *(f"  {100 * p['probability']:6.2f}%  {p['label']}" for p in preds)])


# --------------------------------------------------------------------------------------- convert


def cmd_average(args: argparse.Namespace) -> int:
    ckpt = average_checkpoints([load_checkpoint(src) for src in args.src])
    dst = save_checkpoint(
        _stored_state(ckpt, args.half), ckpt.config, args.output, arch=ckpt.arch, meta=_portable_meta(ckpt)
    )
    print(
        f"wrote {dst}: the average of {len(args.src)} {ckpt.arch or 'non-standard MobileViT'} checkpoints"
        f"{' as float16' if args.half else ''}"
    )
    return EXIT_OK


def _portable_meta(ckpt: Checkpoint) -> dict[str, Any]:
    """The metadata of ``ckpt`` that our format keeps (categories only when they match the classes)."""
    meta = {k: ckpt.meta[k] for k in _META_KEYS if ckpt.meta.get(k)}
    if len(meta.get("categories", [])) != ckpt.config.num_classes:
        meta.pop("categories", None)
    return meta


def _stored_state(ckpt: Checkpoint, half: bool) -> dict[str, Tensor]:
    """The tensors to write: floating-point ones as float16 if ``half``."""
    if not half:
        return ckpt.state_dict
    return {k: v.half() if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}


def cmd_convert(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.src, layout=args.layout_in)
    c = ckpt.config
    print(
        f"read {args.src}: {ckpt.layout} layout, {ckpt.arch or 'non-standard MobileViT'}"
        f"{'' if ckpt.task == 'classification' else f' ({ckpt.task})'}, {c.num_classes} classes, "
        f"{len(ckpt.state_dict)} tensors"
    )
    meta = _portable_meta(ckpt)
    dst = save_checkpoint(_stored_state(ckpt, args.half), c, args.dst, layout=args.to, arch=ckpt.arch, meta=meta)
    kept = {"mobilevit": set(_META_KEYS), "hf": {"categories"}}.get(args.to, set())
    lost = [k for k in meta if k not in kept]
    half = " as float16" if args.half else ""
    print(f"wrote {dst} ({args.to} layout{half})" + (f"; not stored in this layout: {', '.join(lost)}" if lost else ""))
    return EXIT_OK


__all__ = ["IMAGE_SUFFIXES", "build_parser", "find_images", "main", "model_rows", "open_image"]


# ---------------------------------------------------------------------------------------- eval / train


def cmd_eval(args: argparse.Namespace) -> int:
    from .data.datasets import build_dataset, collate, split_holdout
    from .training.evaluate import evaluate
    from .training.trainer import eval_batches

    model, device = _inference_model(args)
    if model_task_of(model) == "segmentation":
        return _eval_segmentation(args, model, device)
    if model_task_of(model) == "detection":
        return _eval_detection(args, model, device)
    transform = model_transform(model)
    if args.size is not None:
        transform = transform.at_size(args.size)
    if args.split == "holdout":
        full = build_dataset(args.data, "train", transform)
        dataset = full.subset(split_holdout(len(full), args.val_fraction, args.seed)[1])
    else:
        dataset = build_dataset(args.data, args.split, transform)
    if len(dataset.classes) != model.num_classes:
        raise ValueError(
            f"{args.data} ({args.split}) has {len(dataset.classes)} classes but the model predicts "
            f"{model.num_classes}; fine-tune it first (mobilevit train ... weights={args.weights})"
        )
    loader = DataLoader(
        dataset,
        batch_sampler=eval_batches(len(dataset), args.batch_size or 100),
        num_workers=args.num_workers,
        collate_fn=collate,
    )
    keep = args.confusion is not None or args.samples is not None
    result = evaluate(
        model, loader, device, args.amp, keep_predictions=keep, progress=sys.stderr.isatty(), hflip=args.hflip
    )
    name = _model_name(model)
    metrics = {"model": name, "weights": str(args.weights), "data": args.data, "split": args.split}
    metrics |= {"size": transform.crop_size, "hflip": args.hflip}
    metrics |= result.to_dict()
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"{metrics['model']} on {args.data} ({args.split}, {result.count} images at {transform.crop_size} px"
            f"{', + mirror' * args.hflip}): "
            f"top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}"
        )
    if result.skipped:
        print(f"warning: {result.skipped} unreadable image(s) skipped", file=sys.stderr)
    if keep:
        _eval_pictures(args, model, dataset, result, device)
    return EXIT_OK


def load_model(weights: str, name: str | None = None) -> torch.nn.Module:
    """The model that ``weights`` hold (a torchvision peer file, or any checkpoint ``create_model`` reads)."""
    from .checkpoints.io import read_peer_header
    from .models.peers import PREFIX

    header = read_peer_header(weights)
    if header is not None:
        return create_model(PREFIX + header["config"]["peer"], weights=weights)
    ckpt = load_checkpoint(weights)
    return create_model(name or ckpt.arch or "mobilevit_s", weights=ckpt)


#: What --data must be for each dense-prediction task.
_DENSE_DATA = {"segmentation": "a VOC tree or an images/ + masks/ folder", "detection": "a COCO or VOC tree"}


def _dense_eval_data(
    args: argparse.Namespace, model: torch.nn.Module, build: Callable, transform: Callable, collate: Callable
) -> tuple[Any, list[str], DataLoader, int]:
    """Dataset, class names, loader and input size of a segmentation or detection evaluation."""
    from .training.trainer import eval_batches

    task = model_task_of(model)
    if args.split == "holdout" or args.hflip:
        raise ValueError(f"--split holdout and --hflip are for classifiers; {task} uses train/val/test")
    if str(args.data).lower().replace("_", "-") == "fashion-mnist":
        raise ValueError(
            f"{args.weights} is a {task} model: give --data {_DENSE_DATA[task]} (e.g. the scenes of "
            "`mobilevit data scenes`)"
        )
    size = args.size or eval_size(model)
    dataset = build(args.data, args.split, transform(size))
    classes = list(dataset.classes)
    if len(classes) != model.num_classes:
        raise ValueError(
            f"{args.data} ({args.split}) has {len(classes)} classes (background included) but the model predicts "
            f"{model.num_classes}; fine-tune it first (mobilevit train ... weights={args.weights})"
        )
    batches = eval_batches(len(dataset), args.batch_size or 16)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers, collate_fn=collate)
    return dataset, classes, loader, size


def _eval_segmentation(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> int:
    from .data.segmentation import SegEvalTransform, build_segmentation_dataset, collate_segmentation
    from .training.evaluate import evaluate_segmentation
    from .training.report import plot_confusion

    dataset, classes, loader, size = _dense_eval_data(
        args, model, build_segmentation_dataset, SegEvalTransform, collate_segmentation
    )
    result = evaluate_segmentation(model, loader, device, args.amp, progress=sys.stderr.isatty())
    name = _model_name(model)
    metrics = {"model": name, "weights": str(args.weights), "data": args.data, "split": args.split, "size": size}
    metrics |= result.to_dict() | {"iou": dict(zip(classes, result.iou, strict=True))}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"{name} on {args.data} ({args.split}, {result.count} images at {size} px, compared at their own size): "
            f"mIoU {result.miou:.2f}%  pixel accuracy {result.pixel_acc:.2f}%  loss {result.loss:.4f}"
        )
        for cls, iou in zip(classes, result.iou, strict=True):
            print(f"  {iou:6.2f}%  {cls}" if iou == iou else f"     -    {cls} (absent)")
    if result.skipped:
        print(f"warning: {result.skipped} unusable image(s) skipped", file=sys.stderr)
    if args.confusion is not None:
        title = f"{args.weights} on {args.data} ({args.split}), pixels"
        plot_confusion(result.confusion, classes, args.confusion, title=title)
        print(f"confusion matrix: {args.confusion}", file=sys.stderr)
    if args.samples is not None:
        _segmentation_samples(model, dataset, classes, args.samples, device, f"{name} on {args.data} ({args.split})")
        print(f"sample predictions: {args.samples}", file=sys.stderr)
    return EXIT_OK


def _eval_detection(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> int:
    from .data.detection import DetEvalTransform, build_detection_dataset, collate_detection
    from .training.evaluate import evaluate_detection
    from .training.report import plot_detections

    if args.confusion is not None:
        raise ValueError("--confusion is for classifiers and segmentation models")
    dataset, classes, loader, size = _dense_eval_data(
        args, model, build_detection_dataset, DetEvalTransform, collate_detection
    )
    result = evaluate_detection(_detector(model), loader, device, args.amp)
    name = _model_name(model)
    metrics = {"model": name, "weights": str(args.weights), "data": args.data, "split": args.split, "size": size}
    metrics |= {k: getattr(result, k) for k in ("map", "map50", "map75", "map_small", "map_medium", "map_large")}
    metrics |= {"loss": result.loss, "images": result.num_images, "detections": result.num_detections}
    metrics["ap"] = dict(zip(classes[1:], result.per_class_ap, strict=True))
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"{name} on {args.data} ({args.split}, {result.num_images} images at {size}x{size} px): "
            f"mAP {result.map:.2f}  AP50 {result.map50:.2f}  AP75 {result.map75:.2f}  "
            f"(small {result.map_small:.2f}, medium {result.map_medium:.2f}, large {result.map_large:.2f})"
        )
        for cls, ap in metrics["ap"].items():
            print(f"  {ap:6.2f}  {cls}" if ap == ap else f"     -    {cls} (absent)")
    if args.samples is not None:
        picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:8].tolist()
        images, targets, _ = collate_detection([dataset[i] for i in picks])
        with torch.inference_mode():
            preds = [{k: v.cpu() for k, v in p.items()} for p in _detector(model).eval()(images.to(device))]
        title = f"{name} on {args.data} ({args.split}), scores >= {args.score_thresh:g}"
        plot_detections(images, preds, targets, classes, args.samples, title=title, score_thresh=args.score_thresh)
        print(f"sample detections: {args.samples}", file=sys.stderr)
    return EXIT_OK


def _segmentation_samples(
    model: torch.nn.Module, dataset: Any, classes: list[str], path: Path, device: torch.device, title: str, n: int = 6
) -> None:
    """A picture of ``n`` seeded random images of ``dataset``: image, ground truth, prediction."""
    from .training.report import plot_segmentation

    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].tolist()
    items = [item for item in (dataset[i] for i in picks) if item is not None]
    images, targets, preds = [], [], []
    for image, mask in items:
        with torch.inference_mode():
            logits = model(image[None].to(device)).float()
        logits = torch.nn.functional.interpolate(logits, size=mask.shape, mode="nearest")
        preds.append(logits.argmax(1)[0].cpu())
        images.append(torch.nn.functional.interpolate(image[None], size=mask.shape, mode="bilinear")[0])
        targets.append(mask)
    plot_segmentation(torch.stack(images), torch.stack(targets), torch.stack(preds), classes, path, title=title)


def _eval_pictures(
    args: argparse.Namespace, model: torch.nn.Module, dataset: Any, result: Any, device: torch.device
) -> None:
    from .training.report import confusion_matrix, plot_confusion, plot_samples

    classes = list(dataset.classes)
    if args.confusion is not None:
        matrix = confusion_matrix(result.targets, result.preds, len(classes))
        plot_confusion(matrix, classes, args.confusion, title=f"{args.weights} on {args.data} ({args.split})")
        print(f"confusion matrix: {args.confusion}", file=sys.stderr)
    if args.samples is not None:
        generator = torch.Generator().manual_seed(0)
        picks = torch.randperm(len(dataset), generator=generator)[:32].tolist()
        items = [item for item in (dataset[i] for i in picks) if item is not None]
        images = torch.stack([image for image, _ in items])
        targets = torch.tensor([label for _, label in items])
        with torch.inference_mode():
            probs = model(images.to(device)).float().softmax(-1).cpu()
        conf, preds = probs.max(-1)
        plot_samples(images, targets, preds, classes, args.samples, probs=conf)
        print(f"sample predictions: {args.samples}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    from .training.trainer import TrainingDiverged, train

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    cfg = load_recipe(args.config, parse_overrides(args.overrides))
    try:
        result = train(cfg, resume=args.resume)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
    return EXIT_OK


def cmd_data_scenes(args: argparse.Namespace) -> int:
    from .data.scenes import generate_scenes

    summary = generate_scenes(
        args.output,
        num_train=args.train,
        num_val=args.val,
        num_test=args.test,
        size=args.size,
        seed=args.seed,
        fashion_mnist_dir=args.fashion_mnist,
        progress=None,
        overwrite=args.overwrite,
    )
    for split, info in summary["splits"].items():
        print(f"{split}: {info['scenes']} scenes, {info['objects']} objects")
    print(f"wrote {summary['out_dir']} (VOC and COCO layouts) in {summary['seconds']:.1f} s")
    return EXIT_OK


# ---------------------------------------------------------------------------------------- export / bench


def cmd_export(args: argparse.Namespace) -> int:
    from .deployment.export import PRECISIONS, SUFFIXES, export_model
    from .deployment.fuse import deploy

    allowed = PRECISIONS.get(args.format, ("fp32",))
    if args.precision not in allowed:
        raise ValueError(
            f"--precision {args.precision} is not available for --format {args.format} (int8: onnx or openvino; "
            "bf16: openvino)"
        )
    int8 = args.precision == "int8"
    if int8 and args.calibration is None:
        raise ValueError(
            "--precision int8 needs --calibration DATA (e.g. fashion-mnist or an image folder) to set the ranges"
        )
    if args.calibration is not None and not int8:
        raise ValueError("--calibration is for --precision int8")
    ckpt = load_checkpoint(args.weights) if args.weights else None
    model = create_model(args.model or (ckpt.arch if ckpt else None) or "mobilevit_s", weights=ckpt).eval()
    task = config_task(model.config)
    if args.postprocess and (args.format not in ("onnx", "openvino") or task != "detection"):
        raise ValueError("--postprocess is for detectors exported with --format onnx or openvino")
    size = args.size or eval_size(model)
    name = arch_name(model)
    out = args.output or Path(
        f"{name}{'' if args.precision == 'fp32' else '.' + args.precision}{SUFFIXES[args.format]}"
    )
    kw: dict[str, Any] = dict(
        image_size=(size, size),
        dynamic=args.dynamic or (int8 and args.format == "onnx"),
        batch_size=args.batch_size,
        dynamic_size=args.dynamic_size,
        precision=args.precision,
    )
    if args.postprocess:
        kw["postprocess"] = True
    if int8:
        from .deployment.quantize import calibration_images

        kw["calibration"] = calibration_images(
            args.calibration,
            model_transform(model).at_size(size) if task == "classification" else None,
            size,
            args.calibration_images,
            task=task,
            val_fraction=args.val_fraction,
            holdout_seed=args.seed,
        )
    path = export_model(deploy(model, channels_last=False), out, args.format, **kw)
    shape = f"input {size}x{size}" + (" (H and W dynamic)" if args.dynamic_size else "")
    files = f"{path} + {path.with_suffix('.bin').name}" if args.format == "openvino" else str(path)
    precision = "" if args.precision == "fp32" else f", {args.precision}"
    print(f"wrote {files} ({args.format}{precision}, {name}, {shape})")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from .deployment.bench import cpu_info, format_report, load_average, malloc_name, plot_bench, run_bench

    def ints(text: str, what: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise ValueError(f"{what} must be positive integers, got {text!r}")
        return values

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in list_models(None)]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(list_models(None))}")
    impls = [i.strip() for i in args.impl.split(",")] if args.impl else None
    patch_sizes = [tuple(ints(p, "--patch-sizes")) for p in args.patch_sizes or []]
    if any(len(p) != 3 for p in patch_sizes):
        raise ValueError(f"--patch-sizes takes three sizes per entry (e.g. 2,2,2 8,4,2), got {args.patch_sizes}")
    cpu, load_before = cpu_info(), load_average()
    bar = tqdm(desc="bench", disable=not sys.stderr.isatty(), bar_format="{desc}")
    result = run_bench(
        models,
        ints(args.batch_sizes, "--batch-sizes"),
        args.size,
        impls,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        progress=bar.set_description_str,
        patch_sizes=patch_sizes or None,
    )
    bar.close()
    print(format_report(result, cpu))
    if args.json:
        run = {"threads": args.threads, "size": args.size, "load_average": [load_before, load_average()]}
        floors = result.floors.as_dict()
        args.json.write_text(
            json.dumps(
                {"sgemm_gflops": result.floors.fp32, "floors": floors, "allocator": malloc_name(), "cpu": cpu}
                | {"run": run, "rows": [r.as_dict() for r in result.rows], "summary": result.summary()}
                | {"notes": result.notes},
                indent=2,
            )
        )
    if args.plot:
        print(f"plot: {plot_bench(result.rows, args.plot)}", file=sys.stderr)
    return EXIT_OK
