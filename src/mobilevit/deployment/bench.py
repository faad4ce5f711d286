"""Inference latency of our model, its deploy form, exported files and peer libraries, measured in one run.

Every implementation of one (model, batch) gets the same input and is timed in two blocks of
consecutive calls (all implementations in order, then in reverse order), so a slow drift of the
machine's speed hits all of them alike. Latency is the median of ``repeats`` calls after ``warmup``.
The FLOP floor is ``2 * MACs / sgemm``, with the sgemm rate measured in the same run with the same
number of threads.

Classifiers (``mobilevit_xxs`` ...) are compared with timm and Hugging Face on our weights.
Segmentation models (``mobilevit_xxs_deeplabv3`` ...) are compared with Hugging Face's
``MobileViTForSemanticSegmentation`` (the same architecture) and torchvision's DeepLabv3 and LR-ASPP
on MobileNetV3-Large (other architectures, random weights: only their speed is compared). Every
segmentation row returns logits at the input size (Hugging Face's stride-16 logits are upsampled the
way ours are). With several ``patch_sizes``, our implementations are measured for each, the peers once.

Detectors (``mobilevit_xxs_ssdlite`` ...) are compared with torchvision's SSDLite320-MobileNetV3-Large
(``tv-ssdlite``; another architecture, random weights, the same 3234 anchors at 320x320). Every detection
row but the ``+post`` ones times the network forward only, up to what an exported file outputs: every
anchor's decoded box and softmax class probabilities (ours: ``forward_raw``, ``decode_boxes``, softmax;
torchvision: its normalisation, backbone, head, anchors, box decoding and softmax, without its resize
and post-processing). ``deploy+post``, ``onnx+post`` and ``tv-ssdlite+post`` run the whole eval forward
with each library's own post-processing (ours: score > 0.05, NMS 0.5, 200 per class; torchvision's: score >
0.001, 300 candidates per class, NMS 0.55, 300 per image, plus its resize). Post-processing time depends on
how many scores pass the threshold, which random weights do not decide realistically, and freshly initialised
BatchNorm statistics let torchvision's activations vanish into subnormal numbers (slow on CPUs): so before
timing, every detector is calibrated on the first images of the benchmark batch (:func:`calibrate_detector`:
BatchNorm statistics, then the class logits' spread and background level) until about
:data:`DETECTION_CANDIDATES` (anchor, class) scores per image pass its own threshold.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..factory import create_model, model_task
from ..models.backbone import MobileViT
from ..models.deeplabv3 import MobileViTDeepLabV3
from ..models.flops import count_macs
from ..models.peers import TorchvisionModel
from ..models.ssdlite import MobileViTSSDLite
from .fuse import deploy

#: Implementations in table order: peers first, then ours.
IMPLS = (
    "timm",
    "hf",
    "tv-deeplabv3",
    "tv-lraspp",
    "tv-ssdlite",
    "tv-ssdlite-onnx",
    "tv-ssdlite+post",
    "ours",
    "deploy",
    "compile",
    "torchscript",
    "onnx",
    "onnx-int8",
    "executorch",
    "deploy+post",
    "onnx+post",
)
#: Peers, built once per (model, batch) at the model's default patch sizes (torchvision's have none).
PEERS = ("timm", "hf", "tv-deeplabv3", "tv-lraspp", "tv-ssdlite", "tv-ssdlite-onnx", "tv-ssdlite+post")
_DETECTION_ONLY = ("tv-ssdlite", "tv-ssdlite-onnx", "tv-ssdlite+post", "deploy+post", "onnx+post")
#: Implementations that do not apply to a task.
_NOT_FOR = {
    "classification": ("tv-deeplabv3", "tv-lraspp", *_DETECTION_ONLY),
    "segmentation": ("timm", *_DETECTION_ONLY),
    "detection": ("timm", "hf", "tv-deeplabv3", "tv-lraspp", "compile", "torchscript", "onnx-int8", "executorch"),
}
#: The peer every speed-up is relative to, per task (for segmentation: the same architecture in transformers;
#: for detection: torchvision's SSDLite network forward, no post-processing).
BASELINES = {"classification": "timm", "segmentation": "hf", "detection": "tv-ssdlite"}
#: (anchor, class) scores per image above each detector's score threshold in the ``+post`` rows (see the module doc).
DETECTION_CANDIDATES = 1000
#: The classification baseline (kept for callers of earlier releases).
BASELINE = BASELINES["classification"]

Model = MobileViT | MobileViTDeepLabV3 | MobileViTSSDLite
PatchSizes = tuple[int, int, int]


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
    floor_ratio: float | None = None  # this median / FLOP floor (of our model; None for other architectures)
    patch_sizes: str | None = None  # "2,2,2" for MobileViT implementations, None for other architectures

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


#: CPU features that decide which kernels oneDNN, onnxruntime and XNNPACK use: /proc/cpuinfo flags per name.
_CPU_FEATURES = {
    "AVX2": ("avx2",),
    "FMA": ("fma",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "BF16": ("avx512_bf16", "amx_bf16"),
    "AMX": ("amx_tile",),
}


def cpu_info() -> dict[str, Any]:
    """The CPU model, its logical CPUs, which of AVX2/FMA/AVX-512/VNNI/BF16/AMX it reports, and torch's CPU kernel level."""
    name: str | None = None
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and name is None:
                name = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    name = name or platform.processor() or platform.machine()
    features = {feature: any(f in flags for f in names) for feature, names in _CPU_FEATURES.items()}
    return {
        "model": name,
        "logical_cpus": os.cpu_count(),
        "features": features if flags else {},
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
    }


def describe_cpu(info: dict[str, Any] | None = None) -> str:
    """One line: ``AMD EPYC, 2 logical CPUs; AVX2 FMA (no AVX-512 VNNI BF16 AMX); torch kernels: AVX2``."""
    info = info or cpu_info()
    has = [f for f, on in info["features"].items() if on]
    lacks = [f for f, on in info["features"].items() if not on]
    flags = (" ".join(has) or "none of AVX2/FMA") + (f" (no {' '.join(lacks)})" if lacks else "")
    flags = flags if info["features"] else "features unknown"
    return f"{info['model']}, {info['logical_cpus']} logical CPUs; {flags}; torch kernels: {info['torch_capability']}"


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), when the system reports it."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


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


def build_model(name: str, patch_sizes: PatchSizes | None = None) -> Model:
    """Our model ``name`` (classifier, segmentation or detection) with random weights, in eval mode."""
    overrides = {"patch_sizes": tuple(patch_sizes)} if patch_sizes else {}
    return create_model(name, **overrides).eval()


def _patch_sizes(model: Model) -> PatchSizes:
    return model.config.patch_sizes


def _timm_model(name: str, model: MobileViT) -> Callable[[torch.Tensor], Any]:
    import timm

    from ..checkpoints.layouts import from_ours

    peer = timm.create_model(name, num_classes=model.num_classes)
    peer.load_state_dict(from_ours(model.state_dict(), "timm"))
    return peer.eval()


def _hf_model(model: Model, workdir: Path) -> Callable[[torch.Tensor], Any]:
    import transformers

    if isinstance(model, MobileViTDeepLabV3):
        return _hf_segmentation_model(model)
    from ..checkpoints.io import save_checkpoint

    save_checkpoint(model.state_dict(), model.config, workdir / "hf", layout="hf")
    peer = transformers.MobileViTForImageClassification.from_pretrained(workdir / "hf").eval()
    return lambda x: peer(pixel_values=x).logits


def _hf_segmentation_model(model: MobileViTDeepLabV3) -> Callable[[torch.Tensor], Any]:
    """Hugging Face's ``MobileViTForSemanticSegmentation`` of the same architecture, random weights.

    Its logits (at stride 16) are upsampled to the input size as ours are, so that both return the same thing.
    """
    import transformers

    c, b = model.config, model.config.backbone
    if b.transformer_depths != (2, 4, 3) or len(set(b.patch_sizes)) != 1:
        raise ValueError(f"Hugging Face MobileViT has depths (2, 4, 3) and one patch size; got {b.patch_sizes}")
    config = transformers.MobileViTConfig(
        num_channels=b.in_chans,
        patch_size=b.patch_sizes[0],
        hidden_sizes=list(b.transformer_dims),
        neck_hidden_sizes=[b.stem_channels, *b.channels, b.last_channels or 4 * b.channels[-1]],
        num_attention_heads=b.num_heads,
        mlp_ratio=b.ffn_ratio,
        expand_ratio=float(b.expansion),
        output_stride=b.output_stride,
        aspp_out_channels=c.aspp_channels,
        atrous_rates=list(c.aspp_rates),
        num_labels=c.num_classes,
    )
    peer = transformers.MobileViTForSemanticSegmentation(config).eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        logits = peer(pixel_values=x).logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return run


#: torchvision builder of each torchvision peer (random weights; logits at the input size).
TORCHVISION_PEERS = {"tv-deeplabv3": "deeplabv3_mobilenet_v3_large", "tv-lraspp": "lraspp_mobilenet_v3_large"}


# ------------------------------------------------------------------------------------------ detection


def _detector_outputs(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    """Our detector's network forward up to an exported file's outputs: decoded boxes and class probabilities."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = model.forward_raw(x)
        return model.decode_boxes(raw), raw.class_logits.softmax(-1)

    return run


class TorchvisionSSDOutputs(nn.Module):
    """torchvision SSD's network forward: normalisation, backbone, head, anchors, box decoding and softmax.

    The same outputs as our detectors' (pixel boxes rather than normalised ones), without torchvision's
    resize (the input has the model's size already) and post-processing.
    """

    def __init__(self, peer: TorchvisionModel):
        super().__init__()
        self.net = peer.net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.models.detection.image_list import ImageList

        net = self.net
        mean = torch.tensor(net.transform.image_mean).reshape(-1, 1, 1)
        std = torch.tensor(net.transform.image_std).reshape(-1, 1, 1)
        x = (x - mean) / std
        features = list(net.backbone(x).values())
        head = net.head(features)
        anchors = net.anchor_generator(ImageList(x[:1], [tuple(x.shape[-2:])]), features)[0]  # the same per image
        regression = head["bbox_regression"]
        per_image = anchors.expand(regression.shape[0], -1, -1).reshape(-1, 4)
        boxes = net.box_coder.decode_single(regression.reshape(-1, 4), per_image).reshape(regression.shape)
        return boxes, head["cls_logits"].softmax(-1)


def _calibration(logits: torch.Tensor, threshold: float, candidates: int, spread: float) -> tuple[float, float]:
    """``(scale, shift)``: multiplying the class logits by ``scale`` (their standard deviation becomes ``spread``) and
    adding ``shift`` to the background's leaves about ``candidates`` object scores per image above ``threshold``."""
    scale = spread / logits[..., 1:].std().clamp(min=1e-6).item()
    low, high = -100.0, 100.0
    for _ in range(50):
        mid = (low + high) / 2
        shifted = logits * scale
        shifted[..., 0] += mid
        above = (shifted.softmax(-1)[..., 1:] > threshold).sum().item() / len(logits)
        low, high = (mid, high) if above > candidates else (low, mid)
    return scale, high


@torch.no_grad()
def _rescale(conv: nn.Conv2d, classes: torch.Tensor, background: torch.Tensor, scale: float, shift: float) -> None:
    conv.weight[classes] *= scale
    conv.bias[classes] *= scale
    conv.bias[background] += shift


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module, run: Callable[[], Any]) -> None:
    """Set every BatchNorm's statistics to those of the batch ``run()`` feeds ``model`` (left in eval mode).

    Only the BatchNorm layers are put in training mode (dropout stays off: the statistics are deterministic).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in norms]
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch gives its own statistics
        bn.train()
    run()
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
        bn.eval()


@torch.no_grad()
def calibrate_detector(
    model: nn.Module, x: torch.Tensor, candidates: int = DETECTION_CANDIDATES, spread: float = 2.0
) -> tuple[float, float]:
    """Make a random-weight detector's activations and scores like a trained one's (in place), on images ``x``.

    BatchNorm statistics are measured on ``x`` (freshly initialised ones let torchvision's SSD features
    vanish to ~1e-13 and below, where subnormal numbers slow CPUs down), then the class logits get a
    spread (standard deviation ``spread``) and a background level such that about ``candidates`` (anchor,
    class) scores per image pass the model's own score threshold: a post-processing workload like a
    trained detector's, where random weights give almost none or all. Only the last convolution of each
    classification head is changed besides BatchNorm (scaled, and the background's bias shifted).
    ``model`` is one of our detectors or torchvision's SSD peer (:class:`TorchvisionModel`). Returns the
    logits' ``(scale, shift)``.
    """
    if isinstance(model, TorchvisionModel):
        _calibrate_batchnorm(model, lambda: TorchvisionSSDOutputs(model)(x))
        logits = TorchvisionSSDOutputs(model)(x)[1].log()
        scale, shift = _calibration(logits, model.net.score_thresh, candidates, spread)
        for layer in model.net.head.classification_head.module_list:
            conv = layer[-1]  # channels: num_classes per anchor
            channel = torch.arange(conv.out_channels)
            _rescale(conv, channel >= 0, channel % model.num_classes == 0, scale, shift)
        return scale, shift
    _calibrate_batchnorm(model, lambda: model.forward_raw(x))
    logits = model.forward_raw(x).class_logits
    scale, shift = _calibration(logits, model.config.score_thresh, candidates, spread)
    width = 4 + model.num_classes
    for head in model.heads:
        conv = head.pred.pw if hasattr(head.pred, "pw") else head.pred  # 4 box values, then the classes per anchor
        channel = torch.arange(conv.out_channels) % width
        _rescale(conv, channel >= 4, channel == 4, scale, shift)
    return scale, shift


def _torchvision_ssd_onnx(peer: TorchvisionModel, size: int, path: Path) -> Path:
    """torchvision SSD's network forward (:class:`TorchvisionSSDOutputs`) in ONNX, batch dynamic, via the
    TorchScript-based exporter (its anchors become constants of the graph)."""
    import warnings

    if not path.exists():
        axes = {"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                TorchvisionSSDOutputs(peer).eval(),
                (torch.rand(2, 3, size, size),),
                str(path),
                input_names=["images"],
                output_names=["boxes", "scores"],
                opset_version=18,
                dynamo=False,
                dynamic_axes=axes,
            )
    return path


def _detection_impl(
    impl: str, model: MobileViTSSDLite, size: int, threads: int, exported: Callable[..., Path], workdir: Path
) -> Callable[[torch.Tensor], Any] | None:
    """A detector's implementation (torchvision's SSD, ours up to boxes and scores, the ``+post`` rows), or None
    for the ones shared with other tasks (``onnx``)."""
    if impl.startswith("tv-ssdlite"):
        peer = create_model("torchvision:ssdlite320_mobilenet_v3_large", num_classes=model.num_classes).eval()
        calibrate_detector(peer, _calibration_images(size))
        if impl == "tv-ssdlite+post":
            return peer
        if impl == "tv-ssdlite":
            return TorchvisionSSDOutputs(peer).eval()
        return _onnx_session(_torchvision_ssd_onnx(peer, size, workdir / f"tv_ssdlite_{size}.onnx"), threads)
    if impl == "deploy+post":
        return deploy(model)
    if impl == "onnx+post":
        return _onnx_session(exported("onnx", "_post.onnx", dynamic=True, postprocess=True), threads)
    if impl in ("ours", "deploy"):
        return _detector_outputs(model if impl == "ours" else deploy(model))
    return None


def _calibration_images(size: int) -> torch.Tensor:
    """The images detectors are calibrated on (:func:`calibrate_detector`): the first four of every timed batch."""
    return torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))


def _compiled(model: Model) -> Callable[[torch.Tensor], Any]:
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
    impl: str, name: str, model: Model, batch: int, size: int, threads: int, workdir: Path
) -> Callable[[torch.Tensor], Any]:
    """A callable running ``impl`` of ``model`` on a ``[batch, 3, size, size]`` tensor (exports go to ``workdir``).

    The int8 model is calibrated on random images: its speed, not its accuracy, is what is measured here.
    A detector's rows are described in the module doc (``model`` is calibrated by :func:`run_bench`).
    """
    if impl == "timm":
        return _timm_model(name, model)
    if impl == "hf":
        return _hf_model(model, workdir)
    if impl in TORCHVISION_PEERS:
        return create_model(f"torchvision:{TORCHVISION_PEERS[impl]}", num_classes=model.num_classes).eval()
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    from .export import export_model

    stem = f"{name}_p{'-'.join(map(str, _patch_sizes(model)))}"

    def exported(fmt: str, suffix: str, **kw: Any) -> Path:  # one file per model, reused across batch sizes
        path = workdir / f"{stem}{suffix}"
        if not path.exists():
            export_model(deploy(model, channels_last=False), path, fmt, image_size=(size, size), **kw)
        return path

    if isinstance(model, MobileViTSSDLite):
        fn = _detection_impl(impl, model, size, threads, exported, workdir)
        if fn is not None:
            return fn
    if impl == "ours":
        return model
    if impl == "deploy":
        return deploy(model)
    if impl == "compile":
        return _compiled(model)

    if impl == "torchscript":
        return torch.jit.load(exported("torchscript", ".pt", dynamic=True)).eval()
    if impl == "onnx":
        return _onnx_session(exported("onnx", ".onnx", dynamic=True), threads)
    if impl == "onnx-int8":
        from .quantize import quantize_onnx

        int8 = workdir / f"{stem}.int8.onnx"
        if not int8.exists():
            images = torch.rand(32, 3, size, size, generator=torch.Generator().manual_seed(0))
            quantize_onnx(exported("onnx", ".onnx", dynamic=True), int8, images)
        return _onnx_session(int8, threads)
    return _executorch_method(exported("executorch", f"_b{batch}.pte", batch_size=batch))


def available_impls(task: str = "classification") -> list[str]:
    """The implementations for ``task`` whose packages are installed here."""
    import importlib.util

    needs = {
        "timm": "timm",
        "hf": "transformers",
        "tv-deeplabv3": "torchvision",
        "tv-lraspp": "torchvision",
        "tv-ssdlite-onnx": "onnxruntime",
        "onnx": "onnxruntime",
        "onnx-int8": "onnxruntime",
        "onnx+post": "onnxruntime",
        "executorch": "executorch",
    }
    impls = [i for i in IMPLS if i not in _NOT_FOR.get(task, ())]
    return [i for i in impls if importlib.util.find_spec(needs.get(i, "torch")) is not None]


def run_bench(
    models: Sequence[str] = ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s"),
    batch_sizes: Sequence[int] = (1, 8),
    size: int = 256,
    impls: Sequence[str] | None = None,
    threads: int = 2,
    warmup: int = 5,
    repeats: int = 20,
    progress: Callable[[str], None] | None = None,
    patch_sizes: Sequence[PatchSizes] | None = None,
) -> tuple[list[BenchRow], float]:
    """Measure every implementation; returns the rows and the sgemm rate (GFLOP/s) used for the floor.

    ``models`` may mix classifiers, segmentation models and detectors; each gets the implementations of
    ``impls`` (default: all available) that apply to its task. ``patch_sizes`` (default: each model's own) lists
    the MobileViT patch sizes our implementations are measured at, e.g. ``[(2, 2, 2), (8, 4, 2)]``; the
    peers are measured once, at the model's default patch sizes, in the same timing blocks.
    """
    requested = list(impls) if impls else None
    unknown = sorted(set(requested or []) - set(IMPLS))
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    torch.set_num_threads(threads)
    gflops = sgemm_gflops(threads)
    say = progress or (lambda _msg: None)
    rows: list[BenchRow] = []
    configs = [tuple(p) for p in patch_sizes] if patch_sizes else [None]
    with tempfile.TemporaryDirectory(prefix="mobilevit-bench-") as tmp:
        for name in models:
            task = model_task(name)
            mine = [i for i in (requested or available_impls(task)) if i not in _NOT_FOR[task]]
            default = build_model(name)
            ours = {p: build_model(name, p) if p else default for p in configs}
            if task == "detection":  # a realistic post-processing workload for the +post rows
                for m in ({id(m): m for m in ours.values()} | {id(default): default}).values():
                    calibrate_detector(m, _calibration_images(size))
            for batch in batch_sizes:
                x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
                fns: dict[tuple[str, PatchSizes | None], Callable] = {}
                models_of: dict[tuple[str, PatchSizes | None], Model | None] = {}
                # peers first, then ours for each patch-size configuration
                plan = [(i, default) for i in mine if i in PEERS]
                plan += [(i, m) for m in ours.values() for i in mine if i not in PEERS]
                for impl, model in plan:
                    other_arch = impl.startswith("tv-")
                    patches = None if other_arch else _patch_sizes(model)
                    say(f"{name} batch {batch}: preparing {_label(impl, patches)}")
                    fns[impl, patches] = build_impl(impl, name, model, batch, size, threads, Path(tmp))
                    models_of[impl, patches] = None if other_arch else model
                times = _timed_blocks(fns, x, warmup, repeats, say, f"{name} batch {batch}")
                base_key = next((k for k in times if k[0] == BASELINES[task]), None)
                base = statistics.median(times[base_key]) if base_key else None
                floors = {
                    id(m): 2 * count_macs(m, (size, size), batch) / (gflops * 1e9) * 1e3
                    for m in [default, *ours.values()]
                }
                for (impl, patches), ts in times.items():
                    ms = statistics.median(ts) * 1e3
                    model = models_of[impl, patches]
                    rows.append(
                        BenchRow(
                            name,
                            impl,
                            batch,
                            size,
                            ms,
                            batch / ms * 1e3,
                            speedup=base * 1e3 / ms if base else None,
                            floor_ratio=ms / floors[id(model)] if model is not None else None,
                            patch_sizes=",".join(map(str, patches)) if patches else None,
                        )
                    )
    return rows, gflops


def _label(impl: str, patches: PatchSizes | None) -> str:
    return f"{impl} ({','.join(map(str, patches))})" if patches else impl


@torch.inference_mode()
def _timed_blocks(
    fns: dict[Any, Callable], x: torch.Tensor, warmup: int, repeats: int, say: Callable[[str], None], label: str
) -> dict[Any, list[float]]:
    """Time each implementation in blocks of consecutive calls: a pass in order, then one in reverse order.

    Runtimes keep their worker threads spinning for a while after a call (OpenMP, onnxruntime,
    XNNPACK), which would slow down whichever implementation runs next: so calls are not interleaved
    one by one. One untimed call starts every block, after the threads of the previous block have settled.
    Keys of ``fns`` are implementation names or ``(impl, patch_sizes)`` pairs.
    """
    name = {key: _label(*key) if isinstance(key, tuple) else str(key) for key in fns}
    for key, fn in fns.items():
        say(f"{label}: warming up {name[key]}")
        for _ in range(warmup):
            fn(x)
    times: dict[Any, list[float]] = {key: [] for key in fns}
    halves = (repeats + 1) // 2, repeats // 2
    for order, n in zip((list(fns), list(fns)[::-1]), halves, strict=True):
        for key in order:
            say(f"{label}: timing {name[key]}")
            time.sleep(0.05)
            fns[key](x)
            for _ in range(n):
                t = time.perf_counter()
                fns[key](x)
                times[key].append(time.perf_counter() - t)
    return times


def format_table(rows: Sequence[BenchRow], gflops: float, cpu: dict[str, Any] | None = None) -> str:
    """Markdown table of the rows, with speed-up against the baseline and distance to the FLOP floor.

    The header names the CPU and its vector/matrix extensions, the sgemm rate, the allocator and the
    load average (other processes on the machine slow every row alike, but they do slow them).
    """
    tasks = {model_task(r.model) for r in rows} or {"classification"}
    baselines = ", ".join(BASELINES[t] for t in sorted(tasks))
    load = load_average()
    lines = [
        f"CPU: {describe_cpu(cpu)}",
        f"sgemm: {gflops:.0f} GFLOP/s ({torch.get_num_threads()} threads); floor = 2 x MACs / sgemm; "
        f"allocator: {malloc_name()}" + (f"; load average {load:.2f} (all processes)" if load is not None else ""),
        "",
        f"| model | batch | implementation | patch sizes | median ms | images/s | speed-up vs {baselines} "
        "| x FLOP floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
        floor = f"{r.floor_ratio:.2f}" if r.floor_ratio is not None else "-"
        lines.append(
            f"| {r.model} | {r.batch} | {r.impl} | {r.patch_sizes or '-'} | {r.median_ms:.1f} | {r.throughput:.1f} "
            f"| {speedup} | {floor} |"
        )
    return "\n".join(lines)


def plot_bench(rows: Sequence[BenchRow], path: str | Path) -> Path:
    """Bar chart of throughput per implementation, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in rows})
    models = list(dict.fromkeys(r.model for r in rows))
    several = len({r.patch_sizes for r in rows if r.patch_sizes}) > 1  # then bars name their patch sizes
    impls = list(dict.fromkeys(_row_label(r, several) for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    width = 0.8 / len(impls)
    for ax, batch in zip(axes[0], batches, strict=True):
        for k, impl in enumerate(impls):
            values = [
                next(
                    (r.throughput for r in rows if (r.model, _row_label(r, several), r.batch) == (m, impl, batch)),
                    np.nan,
                )
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


def _row_label(row: BenchRow, with_patches: bool) -> str:
    return f"{row.impl} ({row.patch_sizes})" if with_patches and row.patch_sizes else row.impl
