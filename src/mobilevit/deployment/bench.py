"""Inference latency of our model, its deploy form, exported files and peer libraries, measured in one run.

Every implementation of one (model, batch) gets the same input and is timed in two blocks of
consecutive calls (all implementations in order, then in reverse order), so a slow drift of the
machine's speed hits all of them alike. Latency is the median of ``repeats`` calls after ``warmup``.
Every runtime gets ``threads`` threads and is told not to keep idle threads spinning between calls
(onnxruntime: ``session.intra_op.allow_spinning = 0``; OpenVINO: one stream, latency hint; its CPU plugin
parks idle threads itself), so one implementation's threads do not slow down the next.

Arithmetic floors (:func:`measure_floors`) are measured in the same run with the same threads: the
fastest of a few large matrix-multiply kernels per precision (fp32: torch and OpenVINO; bf16, only where the
CPU has native bf16 (avx512_bf16 or amx_bf16): the same two in bf16; int8 with int32 accumulation:
onnxruntime's ``MatMulInteger`` (u8 x s8) and an OpenVINO int8 1x1 convolution). ``torch._int_mm`` is not
one of them: on CPU it runs a reference kernel (about 1 GOP/s against 50-110 GOP/s for the others, on the
2-core AVX2 machine this was written on). A row's floor is ``2 * MACs / rate`` of its own precision
(``onnx-int8``, ``openvino-int8`` and ``openvino-int8-bf16`` against the int8 rate, ``openvino-bf16`` against
bf16, all others fp32).
:func:`summarize` gives, per (model, batch), the fastest fp32 peer path and our fastest fp32 / bf16 / int8
rows against it and against their floors.

Classifiers (``mobilevit_xxs`` ...) are compared with timm and Hugging Face on our weights, each through
the paths a user of that library would take with *their* model: eager (``timm``, ``hf``),
``torch.compile`` (``-compile``; the same inductor settings as ours, frozen weights), a plain
``torch.onnx.export`` of their eval model with a dynamic batch axis run in onnxruntime (``-onnx``; the default
``torch.export``-based exporter, the TorchScript-based one where that fails), and OpenVINO (``-openvino``; and
``-openvino-bf16``, the same at the bf16 inference precision that OpenVINO picks by itself on CPUs with AMX).
OpenVINO can convert their model in two ways, ``openvino.convert_model(model, example_input=x)`` or from
their ONNX file; both are built and timed for a few calls at each (model, batch), and the faster is kept
(a note says which): so every peer row is that library's best path. In the runs made while writing this
the two were within a few percent (from ONNX ahead by 1-10%). Our OpenVINO rows (``openvino`` fp32,
``openvino-bf16``, ``openvino-int8``) are the deploy form exported by ``export_model(..., "openvino")`` and run
by :func:`~mobilevit.deployment.runtime.load_exported`, with the same CPU settings as the peers'
(:func:`openvino_config`: fp32 and int8 rows force ``f32`` inference precision, which OpenVINO would otherwise
lower to bf16 on AMX CPUs). ``openvino-int8`` is quantized by the export's NNCF settings on random images (speed
only, like ``onnx-int8``); ``openvino-int8-bf16`` is the same int8 file run with the ``bf16`` hint, so the layers
NNCF leaves in float (by default the transformers' matmuls and attention) run in bf16 (``load_exported(path,
precision="bf16")``). The bf16 rows (ours and the peers') are measured only where the CPU has native bf16.

Segmentation models (``mobilevit_xxs_deeplabv3`` ...) are compared with Hugging Face's
``MobileViTForSemanticSegmentation`` (the same architecture, our weights; eager, ``-compile``, ``-onnx``,
``-openvino``) and torchvision's DeepLabv3 and LR-ASPP on MobileNetV3-Large (other architectures, random
weights: only their speed is compared). Every segmentation row returns logits at the input size (Hugging
Face's stride-16 logits are upsampled the way ours are). With several ``patch_sizes``, our implementations are
measured for each, the peers once.

Detectors (``mobilevit_xxs_ssdlite`` ...) are compared with torchvision's SSDLite320-MobileNetV3-Large
(``tv-ssdlite``, ``tv-ssdlite-onnx``, ``tv-ssdlite-openvino``; another architecture, random weights, the same
3234 anchors at 320x320). Every detection
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

import contextlib
import importlib.util
import io
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
from .runtime import BF16_CPU_FLAGS, INT8_CPU_FLAGS, cpu_fields, cpu_flags, malloc_name, openvino_core

#: Implementations in table order: peers first, then ours.
IMPLS = (
    "timm",
    "timm-compile",
    "timm-onnx",
    "timm-openvino",
    "timm-openvino-bf16",
    "hf",
    "hf-compile",
    "hf-onnx",
    "hf-openvino",
    "hf-openvino-bf16",
    "tv-deeplabv3",
    "tv-lraspp",
    "tv-ssdlite",
    "tv-ssdlite-onnx",
    "tv-ssdlite-openvino",
    "tv-ssdlite+post",
    "ours",
    "deploy",
    "compile",
    "torchscript",
    "onnx",
    "onnx-int8",
    "openvino",
    "openvino-bf16",
    "openvino-int8",
    "openvino-int8-bf16",
    "executorch",
    "deploy+post",
    "onnx+post",
)
_TIMM = ("timm", "timm-compile", "timm-onnx", "timm-openvino", "timm-openvino-bf16")
_HF = ("hf", "hf-compile", "hf-onnx", "hf-openvino", "hf-openvino-bf16")
#: Peers, built once per (model, batch) at the model's default patch sizes (torchvision's have none).
PEERS = tuple(i for i in IMPLS if i.startswith(("timm", "hf", "tv-")))
#: The peers' paths other than eager: (their eager implementation, path).
_PEER_PATHS = {
    f"{base}-{path}": (base, path)
    for base in ("timm", "hf", "tv-ssdlite")
    for path in ("compile", "onnx", "openvino", "openvino-bf16")
    if f"{base}-{path}" in IMPLS
}
_DETECTION_ONLY = (
    "tv-ssdlite",
    "tv-ssdlite-onnx",
    "tv-ssdlite-openvino",
    "tv-ssdlite+post",
    "deploy+post",
    "onnx+post",
)
#: Implementations that do not apply to a task.
_NOT_FOR = {
    "classification": ("tv-deeplabv3", "tv-lraspp", *_DETECTION_ONLY),
    "segmentation": (*_TIMM, *_DETECTION_ONLY),
    "detection": (*_TIMM, *_HF, "tv-deeplabv3", "tv-lraspp", "compile", "torchscript", "onnx-int8", "executorch"),
}
#: Arithmetic precision of the implementations that do not run in fp32 (their floor is that precision's).
PRECISIONS = {"onnx-int8": "int8", "openvino-int8": "int8", "openvino-int8-bf16": "int8"} | {
    i: "bf16" for i in ("openvino-bf16", "timm-openvino-bf16", "hf-openvino-bf16")
}
#: Implementations that run layers in bf16: measured only where the CPU has native bf16.
_NEED_BF16 = ("timm-openvino-bf16", "hf-openvino-bf16", "openvino-bf16", "openvino-int8-bf16")
#: The peer every speed-up is relative to, per task (for segmentation: the same architecture in transformers;
#: for detection: torchvision's SSDLite network forward, no post-processing).
BASELINES = {"classification": "timm", "segmentation": "hf", "detection": "tv-ssdlite"}
#: (anchor, class) scores per image above each detector's score threshold in the ``+post`` rows (see the module doc).
DETECTION_CANDIDATES = 1000
#: The classification baseline (kept for callers of earlier releases).
BASELINE = BASELINES["classification"]

Model = MobileViT | MobileViTDeepLabV3 | MobileViTSSDLite
PatchSizes = tuple[int, int, int]


def precision_of(impl: str) -> str:
    """``"fp32"``, ``"bf16"`` or ``"int8"``: the arithmetic ``impl`` runs in."""
    return PRECISIONS.get(impl, "fp32")


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
    floor_ratio: float | None = None  # this median / floor of its precision (our architecture; None for others)
    patch_sizes: str | None = None  # "2,2,2" for MobileViT implementations, None for other architectures
    precision: str = "fp32"  # "fp32", "bf16" or "int8": the floor it is compared with
    macs: int | None = None  # multiply-accumulates per batch (our architecture; None for others)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Floors:
    """Arithmetic rates measured in a run (GFLOP/s; int8: GOP/s), each the fastest of its kernels.

    ``kernels`` maps each precision to the rate of every kernel measured for it; ``bf16`` and ``int8``
    are None where no kernel could be measured (bf16: the CPU has no native bf16).
    """

    fp32: float
    bf16: float | None = None
    int8: float | None = None
    threads: int = 1
    kernels: dict[str, dict[str, float]] = field(default_factory=dict)

    def rate(self, precision: str) -> float | None:
        """The rate of ``precision`` ("fp32", "bf16" or "int8")."""
        return {"fp32": self.fp32, "bf16": self.bf16, "int8": self.int8}[precision]

    def floor_ms(self, macs: int, precision: str = "fp32") -> float | None:
        """``2 * macs`` operations at this precision's rate, in milliseconds (None without a rate)."""
        rate = self.rate(precision)
        return 2 * macs / (rate * 1e9) * 1e3 if rate else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchRun:
    """What :func:`run_bench` measured: the rows, the floors, and notes (skipped rows, conversion routes)."""

    rows: list[BenchRow]
    floors: Floors
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[dict[str, Any]]:
        """See :func:`summarize`."""
        return summarize(self.rows, self.floors)


#: CPU features that decide which kernels oneDNN, onnxruntime and XNNPACK use: /proc/cpuinfo flags per name.
_CPU_FEATURES = {
    "AVX2": ("avx2",),
    "FMA": ("fma",),
    "AVX-512": ("avx512f",),
    "VNNI": INT8_CPU_FLAGS,
    "BF16": BF16_CPU_FLAGS,
    "AMX": ("amx_tile",),
}


def cpu_info() -> dict[str, Any]:
    """The CPU model, its logical CPUs, which of AVX2/FMA/AVX-512/VNNI/BF16/AMX it reports, and torch's CPU kernel level."""
    flags = cpu_flags()
    features = {feature: any(f in flags for f in names) for feature, names in _CPU_FEATURES.items()}
    return {
        "model": cpu_fields().get("model name") or platform.processor() or platform.machine(),
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


def has_native_bf16(info: dict[str, Any] | None = None) -> bool:
    """Whether the CPU computes in bf16 natively (one of :data:`~.runtime.BF16_CPU_FLAGS`); runtimes emulate it elsewhere."""
    return bool((info or cpu_info())["features"].get("BF16"))


def _best_rate(fn: Callable[[], Any], ops: float, repeats: int) -> float:
    """``ops`` divided by the fastest of ``repeats`` calls of ``fn`` (after 3 untimed ones), in G per second."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return ops / min(times) / 1e9


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _openvino_gemm(n: int, threads: int, precision: str) -> Callable[[], Any]:
    """A call of an OpenVINO model doing one ``n x n x n`` multiply-accumulate product in ``precision``.

    fp32 and bf16: a MatMul with constant weights. int8: a 1x1 convolution (``n`` channels in and out on a
    32x32 map, the same ``n**3`` MACs) between an activation quantized by a FakeQuantize (u8) and int8
    weights, which OpenVINO runs as an int8 convolution with int32 accumulation (the int8 MatMul kernel was
    slower on the CPU this was written on).
    """
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    if precision == "int8":
        shape = [1, n, 32, 32] if n % 32 == 0 else [1, n, n, 1]
        x = ops.parameter(shape, np.float32)
        lo, hi = ops.constant(np.float32(0)), ops.constant(np.float32(1))
        quantized = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        weights = ops.constant(rng.integers(-127, 128, (n, n, 1, 1), dtype=np.int8))
        scaled = ops.multiply(ops.convert(weights, np.float32), ops.constant(np.full((n, 1, 1, 1), 0.01, np.float32)))
        y = ops.convolution(quantized, scaled, [1, 1], [0, 0], [0, 0], [1, 1])
    else:
        shape = [n, n]
        x = ops.parameter(shape, np.float32)
        y = ops.matmul(x, ops.constant(rng.random((n, n), dtype=np.float32)), False, False)
    run = _openvino_request(ov.Model([y], [x]), threads, "bf16" if precision == "bf16" else "fp32")
    data = torch.rand(*shape)
    return lambda: run(data)


def _onnxruntime_int8_gemm(n: int, threads: int) -> Callable[[], Any]:
    """A call of onnxruntime's ``MatMulInteger``: u8 activations times constant s8 weights, int32 out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "int8_gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    session = _ort_session(model.SerializeToString(), threads)
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    return lambda: session.run(None, {"a": a})


def _torch_bf16_gemm(n: int, threads: int) -> Callable[[], Any]:
    torch.set_num_threads(threads)
    a, b = torch.rand(n, n, dtype=torch.bfloat16), torch.rand(n, n, dtype=torch.bfloat16)
    return lambda: a @ b


def measure_floors(threads: int, n: int = 1024, repeats: int = 10, bf16: bool | None = None) -> Floors:
    """The fastest fp32, bf16 and int8 matrix-multiply rates here with ``threads`` threads (see the module doc).

    Each precision's rate is the best of its kernels (those whose runtime is installed): fp32, torch's sgemm
    and an OpenVINO MatMul; bf16 (only with ``bf16``, default: where :func:`has_native_bf16`), the same two in
    bf16; int8, onnxruntime's ``MatMulInteger`` and an OpenVINO int8 1x1 convolution.
    """
    bf16 = has_native_bf16() if bf16 is None else bf16
    ops = 2 * n**3
    kernels: dict[str, dict[str, float]] = {"fp32": {}, "bf16": {}, "int8": {}}
    kernels["fp32"]["torch sgemm"] = sgemm_gflops(threads, n, repeats)
    openvino, onnxruntime = _installed("openvino"), _installed("onnxruntime")
    if openvino:
        kernels["fp32"]["openvino MatMul"] = _best_rate(_openvino_gemm(n, threads, "fp32"), ops, repeats)
    if bf16:
        kernels["bf16"]["torch bf16 matmul"] = _best_rate(_torch_bf16_gemm(n, threads), ops, repeats)
        if openvino:
            kernels["bf16"]["openvino bf16 MatMul"] = _best_rate(_openvino_gemm(n, threads, "bf16"), ops, repeats)
    if onnxruntime:
        kernels["int8"]["onnxruntime MatMulInteger"] = _best_rate(_onnxruntime_int8_gemm(n, threads), ops, repeats)
    if openvino:
        kernels["int8"]["openvino int8 1x1 conv"] = _best_rate(_openvino_gemm(n, threads, "int8"), ops, repeats)
    best = {p: max(k.values()) if k else None for p, k in kernels.items()}
    torch.set_num_threads(threads)
    return Floors(best["fp32"] or 0.0, best["bf16"], best["int8"], threads, {p: k for p, k in kernels.items() if k})


def build_model(name: str, patch_sizes: PatchSizes | None = None) -> Model:
    """Our model ``name`` (classifier, segmentation or detection) with random weights, in eval mode."""
    overrides = {"patch_sizes": tuple(patch_sizes)} if patch_sizes else {}
    return create_model(name, **overrides).eval()


def _patch_sizes(model: Model) -> PatchSizes:
    return model.config.patch_sizes


def _timm_model(name: str, model: MobileViT) -> nn.Module:
    """timm's ``name`` with our weights, in eval mode."""
    import timm

    from ..checkpoints.layouts import from_ours

    peer = timm.create_model(name, num_classes=model.num_classes)
    peer.load_state_dict(from_ours(model.state_dict(), "timm"))
    return peer.eval()


class HFOutputs(nn.Module):
    """A Hugging Face MobileViT model returning one tensor, as ours do: a classifier's logits, or a segmentation
    model's logits upsampled (bilinear) from stride 16 to the input size."""

    def __init__(self, peer: nn.Module, upsample: bool):
        super().__init__()
        self.peer, self.upsample = peer, upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.peer(pixel_values=x).logits
        if self.upsample:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def _hf_model(model: Model, workdir: Path) -> HFOutputs:
    """Hugging Face's ``MobileViTForImageClassification`` or ``MobileViTForSemanticSegmentation`` with our weights.

    (Its stem is written for BGR input, as Hugging Face's checkpoints are: the same work on the same tensor.)
    """
    import transformers

    from ..checkpoints.io import save_checkpoint

    segmentation = isinstance(model, MobileViTDeepLabV3)
    save_checkpoint(model.state_dict(), model.config, workdir / "hf", layout="hf")
    cls = (
        transformers.MobileViTForSemanticSegmentation if segmentation else transformers.MobileViTForImageClassification
    )
    return HFOutputs(cls.from_pretrained(workdir / "hf").eval(), upsample=segmentation).eval()


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


def _torchvision_ssd_onnx(outputs: TorchvisionSSDOutputs, size: int, path: Path) -> Path:
    """torchvision SSD's network forward (:class:`TorchvisionSSDOutputs`) in ONNX, batch dynamic, via the
    TorchScript-based exporter (its anchors become constants of the graph)."""
    if not path.exists():
        axes = {"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                outputs,
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
    impl: str, model: MobileViTSSDLite, threads: int, exported: Callable[..., Path]
) -> Callable[[torch.Tensor], Any] | None:
    """A detector's own rows (ours up to boxes and scores, the ``+post`` rows), or None for the ones shared with
    other tasks (``onnx``, ``openvino`` ...)."""
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


def _int8_calibration(size: int) -> torch.Tensor:
    """Random images the int8 rows are calibrated on (their speed is measured, not their accuracy)."""
    return torch.rand(32, 3, size, size, generator=torch.Generator().manual_seed(0))


def _compile(module: nn.Module) -> Callable[[torch.Tensor], Any]:
    """``torch.compile`` (inductor, static shapes) with frozen weights: ours and the peers' ``-compile`` rows."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant-fold weights: prepacked oneDNN convolutions with fused activations
    return torch.compile(module, dynamic=False)


def _compiled(model: Model) -> Callable[[torch.Tensor], Any]:
    return _compile(deploy(model))


def _ort_session(model: str | bytes, threads: int) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads that do not spin between calls."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _onnx_session(path: Path, threads: int) -> Callable[[torch.Tensor], Any]:
    """Run an ONNX file in onnxruntime: its output, or a tuple of its outputs."""
    session = _ort_session(str(path), threads)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> Any:
        outputs = session.run(None, {name: x.numpy()})
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run


def openvino_config(threads: int, precision: str = "fp32") -> dict[str, Any]:
    """OpenVINO CPU settings of every OpenVINO row: ``threads`` threads, one stream, latency hint, and the inference
    precision named (``f32`` for fp32 and int8 rows, whose non-quantized layers OpenVINO would otherwise run in
    bf16 on AMX CPUs; ``bf16`` for bf16)."""
    return {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
    }


def _openvino_request(model: Any, threads: int, precision: str = "fp32") -> Callable[[torch.Tensor], Any]:
    """Compile ``model`` (an ``openvino.Model`` or a file OpenVINO reads) for the CPU with :func:`openvino_config`;
    the callable returns its output, or a tuple of its outputs."""
    source = str(model) if isinstance(model, Path) else model
    compiled = openvino_core().compile_model(source, "CPU", openvino_config(threads, precision))
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> Any:
        outputs = request.infer({0: x.numpy()}, share_inputs=True).to_tuple()
        return outputs[0] if len(outputs) == 1 else outputs

    return run


def _reason(exc: BaseException) -> str:
    """The first line of an error's message (its type when it has none), at most 200 characters."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _peer_onnx(module: nn.Module, path: Path, size: int, notes: list[str], label: str) -> Path:
    """A peer's eval model in ONNX with a dynamic batch axis, as its user would export it: a plain
    ``torch.onnx.export`` (the ``torch.export``-based exporter, torch's default), or the TorchScript-based one
    where that fails (a note says so)."""
    if path.exists():
        return path
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    kw: dict[str, Any] = {"input_names": ["images"], "output_names": ["output"], "opset_version": 18}
    kw["dynamic_axes"] = {"images": {0: "batch"}, "output": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (x,), str(path), dynamo=True, verbose=False, **kw)
        except Exception as exc:
            notes.append(f"{label}: torch.export-based ONNX export failed ({_reason(exc)}); used the TorchScript one")
            torch.onnx.export(module, (x,), str(path), dynamo=False, **kw)
    return path


#: How a peer's model reaches OpenVINO: converted from PyTorch, or from its ONNX file.
OPENVINO_ROUTES = ("convert_model(model)", "from ONNX")


def _peer_openvino(
    module: nn.Module,
    onnx: Path,
    batch: int,
    size: int,
    threads: int,
    notes: list[str],
    label: str,
    precision: str = "fp32",
) -> Callable[[torch.Tensor], Any]:
    """A peer in OpenVINO by the faster of :data:`OPENVINO_ROUTES` at this batch (a note gives both times), at the
    inference ``precision`` ("fp32" or "bf16": OpenVINO's own default on CPUs with AMX).

    ``openvino.convert_model(module, example_input=x)`` is converted once and saved next to ``onnx``.
    """
    import openvino as ov

    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    xml = onnx.with_suffix(".pytorch.xml")
    routes: dict[str, Callable[[torch.Tensor], Any]] = {}
    try:
        if not xml.exists():
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                ov.save_model(ov.convert_model(module, example_input=x), str(xml), compress_to_fp16=False)
        routes[OPENVINO_ROUTES[0]] = _openvino_request(xml, threads, precision)
    except Exception as exc:
        notes.append(f"{label}: openvino.convert_model of the PyTorch model failed ({_reason(exc)})")
    routes[OPENVINO_ROUTES[1]] = _openvino_request(onnx, threads, precision)
    if len(routes) == 1:
        return routes[OPENVINO_ROUTES[1]]
    ms = _quick_ms(routes, x)
    best = min(ms, key=ms.__getitem__)
    times = ", ".join(f"{route} {t:.1f} ms" for route, t in ms.items())
    notes.append(f"{label}: OpenVINO {times}: kept {best}")
    return routes[best]


@torch.inference_mode()
def _quick_ms(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, rounds: int = 3) -> dict[str, float]:
    """Median ms of a few calls of each function, taking turns (after one untimed call each)."""
    times: dict[str, list[float]] = {key: [] for key in fns}
    for fn in fns.values():
        fn(x)
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(2):
                t = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - t)
    return {key: statistics.median(ts) * 1e3 for key, ts in times.items()}


def _peer_model(impl: str, name: str, model: Model, size: int, workdir: Path) -> Any:
    """A peer's eager implementation (a module, or torchvision's whole detector for ``tv-ssdlite+post``)."""
    if impl == "timm":
        return _timm_model(name, model)
    if impl == "hf":
        return _hf_model(model, workdir)
    if impl in TORCHVISION_PEERS:
        return _torchvision_model(TORCHVISION_PEERS[impl], model.num_classes)
    peer = _torchvision_model("ssdlite320_mobilenet_v3_large", model.num_classes)
    calibrate_detector(peer, _calibration_images(size))
    return peer if impl == "tv-ssdlite+post" else TorchvisionSSDOutputs(peer).eval()


def _torchvision_model(builder: str, num_classes: int) -> TorchvisionModel:
    """torchvision's ``builder`` with random weights drawn from seed 0: every row of a peer runs the same model."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return create_model(f"torchvision:{builder}", num_classes=num_classes).eval()


def _peer_path(
    impl: str, name: str, model: Model, batch: int, size: int, threads: int, workdir: Path, notes: list[str]
) -> Callable[[torch.Tensor], Any]:
    """A peer's model (built as its eager row) through ``torch.compile``, onnxruntime or OpenVINO."""
    base, path = _PEER_PATHS[impl]
    module = _peer_model(base, name, model, size, workdir)
    if path == "compile":
        return _compile(module)
    label = f"{name} batch {batch} {impl}"
    if base == "tv-ssdlite":
        onnx = _torchvision_ssd_onnx(module, size, workdir / f"tv_ssdlite_{size}.onnx")
    else:
        onnx = _peer_onnx(module, workdir / f"{name}_{base}_{size}.onnx", size, notes, label)
    if path == "onnx":
        return _onnx_session(onnx, threads)
    return _peer_openvino(module, onnx, batch, size, threads, notes, label, precision_of(impl))


def _our_openvino(impl: str, stem: str, size: int, threads: int, workdir: Path, exported: Callable[..., Path]) -> Any:
    """Our exported deploy form in OpenVINO in the precision of ``impl``, run by :func:`~.runtime.load_exported`
    (the same CPU settings as :func:`openvino_config`).

    int8: the fp32 file quantized by :func:`~.openvino.quantize_ir` with the export's own NNCF settings, on
    :func:`_int8_calibration` images; ``export_model(..., precision="int8")`` would refuse the result, since the
    accuracy check it makes cannot pass with random weights and images (only the speed is measured here).
    ``openvino-int8-bf16`` runs that int8 file with the bf16 hint (its float layers in bf16).
    """
    from .runtime import load_exported

    precision = precision_of(impl)
    if precision != "int8":
        path = exported("openvino", f".{precision}.xml", dynamic=True, precision=precision)
    else:
        path = workdir / f"{stem}.int8.xml"
        if not path.exists():
            import openvino as ov

            from .openvino import DEFAULT_QUANTIZATION, quantize_ir

            fp32 = openvino_core().read_model(str(exported("openvino", ".fp32.xml", dynamic=True)))
            int8 = quantize_ir(fp32, _int8_calibration(size), DEFAULT_QUANTIZATION)
            int8.set_rt_info("int8", ["mobilevit", "precision"])
            ov.save_model(int8, str(path), compress_to_fp16=False)
    return load_exported(path, threads=threads, precision="bf16" if impl in _NEED_BF16 else "fp32")


def _executorch_method(path: Path) -> Callable[[torch.Tensor], Any]:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return lambda x: method.execute([x])[0]


def build_impl(
    impl: str,
    name: str,
    model: Model,
    batch: int,
    size: int,
    threads: int,
    workdir: Path,
    notes: list[str] | None = None,
) -> Callable[[torch.Tensor], Any]:
    """A callable running ``impl`` of ``model`` on a ``[batch, 3, size, size]`` tensor (exports go to ``workdir``).

    The int8 models are calibrated on random images: their speed, not their accuracy, is what is measured here.
    A detector's rows are described in the module doc (``model`` is calibrated by :func:`run_bench`). How peers
    were exported or converted is appended to ``notes`` when there was a choice.
    """
    notes = [] if notes is None else notes
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if impl in _PEER_PATHS:
        return _peer_path(impl, name, model, batch, size, threads, workdir, notes)
    if impl in PEERS:
        return _peer_model(impl, name, model, size, workdir)
    from .export import export_model

    stem = f"{name}_p{'-'.join(map(str, _patch_sizes(model)))}"

    def exported(fmt: str, suffix: str, **kw: Any) -> Path:  # one file per model, reused across batch sizes
        path = workdir / f"{stem}{suffix}"
        if not path.exists():
            export_model(deploy(model, channels_last=False), path, fmt, image_size=(size, size), **kw)
        return path

    if isinstance(model, MobileViTSSDLite):
        fn = _detection_impl(impl, model, threads, exported)
        if fn is not None:
            return fn
    if impl == "ours":
        return model
    if impl == "deploy":
        return deploy(model)
    if impl == "compile":
        return _compiled(model)
    if impl.startswith("openvino"):
        return _our_openvino(impl, stem, size, threads, workdir, exported)
    if impl == "torchscript":
        return torch.jit.load(exported("torchscript", ".pt", dynamic=True)).eval()
    if impl == "onnx":
        return _onnx_session(exported("onnx", ".onnx", dynamic=True), threads)
    if impl == "onnx-int8":
        from .quantize import quantize_onnx

        int8 = workdir / f"{stem}.int8.onnx"
        if not int8.exists():
            quantize_onnx(exported("onnx", ".onnx", dynamic=True), int8, _int8_calibration(size))
        return _onnx_session(int8, threads)
    return _executorch_method(exported("executorch", f"_b{batch}.pte", batch_size=batch))


#: Packages each implementation needs besides torch.
_NEEDS = {
    "timm": ("timm",),
    "timm-compile": ("timm",),
    "timm-onnx": ("timm", "onnxscript", "onnxruntime"),
    "timm-openvino": ("timm", "onnxscript", "openvino"),
    "timm-openvino-bf16": ("timm", "onnxscript", "openvino"),
    "hf": ("transformers",),
    "hf-compile": ("transformers",),
    "hf-onnx": ("transformers", "onnxscript", "onnxruntime"),
    "hf-openvino": ("transformers", "onnxscript", "openvino"),
    "hf-openvino-bf16": ("transformers", "onnxscript", "openvino"),
    "tv-deeplabv3": ("torchvision",),
    "tv-lraspp": ("torchvision",),
    "tv-ssdlite-onnx": ("onnxruntime",),
    "tv-ssdlite-openvino": ("openvino",),
    "onnx": ("onnxruntime",),
    "onnx-int8": ("onnxruntime",),
    "onnx+post": ("onnxruntime",),
    "openvino": ("openvino", "onnxscript"),
    "openvino-bf16": ("openvino", "onnxscript"),
    "openvino-int8": ("openvino", "onnxscript", "nncf"),
    "openvino-int8-bf16": ("openvino", "onnxscript", "nncf"),
    "executorch": ("executorch",),
}


def available_impls(task: str = "classification") -> list[str]:
    """The implementations for ``task`` whose packages are installed here (the bf16 rows whatever the CPU:
    :func:`run_bench` leaves them out where the CPU has no native bf16)."""
    impls = [i for i in IMPLS if i not in _NOT_FOR.get(task, ())]
    return [i for i in impls if all(_installed(p) for p in _NEEDS.get(i, ()))]


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
    keep_going: bool = True,
) -> BenchRun:
    """Measure every implementation and the arithmetic floors (:func:`measure_floors`) in one run.

    ``models`` may mix classifiers, segmentation models and detectors; each gets the implementations of
    ``impls`` (default: all available) that apply to its task. ``patch_sizes`` (default: each model's own) lists
    the MobileViT patch sizes our implementations are measured at, e.g. ``[(2, 2, 2), (8, 4, 2)]``; the
    peers are measured once, at the model's default patch sizes, in the same timing blocks. The bf16 rows (ours
    and the peers', :data:`_NEED_BF16`) are left out, with a note, where the CPU has no native bf16. With
    ``keep_going``, an implementation that fails to build or to run its first call is left out with a note (a long
    run goes on); otherwise the error is raised.
    """
    requested = list(impls) if impls else None
    unknown = sorted(set(requested or []) - set(IMPLS))
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    torch.set_num_threads(threads)
    bf16 = has_native_bf16()
    say = progress or (lambda _msg: None)
    say("measuring the arithmetic floors")
    floors = measure_floors(threads, bf16=bf16)
    notes: list[str] = []
    rows: list[BenchRow] = []
    configs = [tuple(p) for p in patch_sizes] if patch_sizes else [None]
    with tempfile.TemporaryDirectory(prefix="mobilevit-bench-") as tmp:
        for name in models:
            task = model_task(name)
            mine = [i for i in (requested or available_impls(task)) if i not in _NOT_FOR[task]]
            skipped = [i for i in _NEED_BF16 if i in mine] if not bf16 else []
            if skipped:
                mine = [i for i in mine if i not in skipped]
                note = (
                    f"{' and '.join(skipped)} skipped: this CPU has neither avx512_bf16 nor amx_bf16 (no native bf16)"
                )
                notes += [note] if note not in notes else []
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
                    try:
                        fn = build_impl(impl, name, model, batch, size, threads, Path(tmp), notes)
                        with torch.inference_mode():
                            fn(x)  # the first call compiles or plans memory: a failure leaves the row out
                    except Exception as exc:
                        if not keep_going:
                            raise
                        notes.append(f"{name} batch {batch} {_label(impl, patches)}: not measured ({_reason(exc)})")
                        continue
                    fns[impl, patches] = fn
                    models_of[impl, patches] = None if other_arch else model
                times = _timed_blocks(fns, x, warmup, repeats, say, f"{name} batch {batch}")
                base_key = next((k for k in times if k[0] == BASELINES[task]), None)
                base = statistics.median(times[base_key]) if base_key else None
                macs = {id(m): count_macs(m, (size, size), batch) for m in [default, *ours.values()]}
                for (impl, patches), ts in times.items():
                    ms = statistics.median(ts) * 1e3
                    model = models_of[impl, patches]
                    precision = precision_of(impl)
                    floor = floors.floor_ms(macs[id(model)], precision) if model is not None else None
                    rows.append(
                        BenchRow(
                            name,
                            impl,
                            batch,
                            size,
                            ms,
                            batch / ms * 1e3,
                            speedup=base * 1e3 / ms if base else None,
                            floor_ratio=ms / floor if floor else None,
                            patch_sizes=",".join(map(str, patches)) if patches else None,
                            precision=precision,
                            macs=macs[id(model)] if model is not None else None,
                        )
                    )
    return BenchRun(rows, floors, notes)


def _label(impl: str, patches: PatchSizes | None) -> str:
    return f"{impl} ({','.join(map(str, patches))})" if patches else impl


@torch.inference_mode()
def _timed_blocks(
    fns: dict[Any, Callable], x: torch.Tensor, warmup: int, repeats: int, say: Callable[[str], None], label: str
) -> dict[Any, list[float]]:
    """Time each implementation in blocks of consecutive calls: a pass in order, then one in reverse order.

    Some runtimes keep their worker threads spinning for a while after a call (PyTorch's OpenMP, XNNPACK;
    onnxruntime and OpenVINO are told not to), which would slow down whichever implementation runs next: so
    calls are not interleaved one by one. One untimed call starts every block, 50 ms after the previous block
    ended, when its threads have settled.
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


def summarize(rows: Sequence[BenchRow], floors: Floors) -> list[dict[str, Any]]:
    """Per (model, batch) and our patch sizes: the fastest fp32 peer path and our fastest fp32, bf16 and int8 rows.

    The peers are those of our architecture (timm's and Hugging Face's paths) where the rows have any, else all
    (torchvision's); ``+post`` rows (post-processing too) are left out. Each of our entries has its ``impl``,
    ``median_ms``, ``speedup`` (best peer ms / ours ms) and ``x_floor`` (ours ms / floor ms of its precision,
    what is left to the floor); an entry is None where no row of that precision was measured. ``floors_ms``
    are the model's floors per precision (None where that rate was not measured).
    """
    summary = []
    for model, batch in dict.fromkeys((r.model, r.batch) for r in rows):
        group = [r for r in rows if (r.model, r.batch) == (model, batch) and "+post" not in r.impl]
        peers = [r for r in group if r.impl in PEERS and r.precision == "fp32"]
        peer = min([r for r in peers if r.patch_sizes] or peers, key=lambda r: r.median_ms, default=None)
        for patches in dict.fromkeys(r.patch_sizes for r in group if r.impl not in PEERS):
            mine = [r for r in group if r.impl not in PEERS and r.patch_sizes == patches]
            macs = next((r.macs for r in mine if r.macs), None)
            floors_ms = {p: floors.floor_ms(macs, p) if macs else None for p in ("fp32", "bf16", "int8")}
            entry: dict[str, Any] = {"model": model, "batch": batch, "patch_sizes": patches}
            entry["peer"] = {"impl": peer.impl, "median_ms": peer.median_ms} if peer else None
            entry["floors_ms"] = floors_ms
            for precision, floor in floors_ms.items():
                best = min((r for r in mine if r.precision == precision), key=lambda r: r.median_ms, default=None)
                entry[precision] = (
                    {
                        "impl": best.impl,
                        "median_ms": best.median_ms,
                        "speedup": peer.median_ms / best.median_ms if peer else None,
                        "x_floor": best.median_ms / floor if floor else None,
                    }
                    if best
                    else None
                )
            summary.append(entry)
    return summary


def _header(floors: Floors, cpu: dict[str, Any] | None) -> list[str]:
    """The CPU line and the floors line of every table."""
    load = load_average()

    def rate(precision: str, unit: str) -> str:
        kernels = floors.kernels.get(precision, {})
        if not kernels or not floors.rate(precision):
            return f"{precision} n/a" + (" (no native bf16)" if precision == "bf16" else "")
        best = max(kernels, key=kernels.__getitem__)
        others = "; ".join(f"{k} {v:.0f}" for k, v in kernels.items() if k != best)
        return f"{precision} {kernels[best]:.0f} {unit} ({best}{'; ' + others if others else ''})"

    return [
        f"CPU: {describe_cpu(cpu)}",
        f"floors ({floors.threads} threads): {rate('fp32', 'GFLOP/s')}, {rate('bf16', 'GFLOP/s')}, "
        f"{rate('int8', 'GOP/s')}; floor = 2 x MACs / rate of the row's precision; allocator: {malloc_name()}"
        + (f"; load average {load:.2f} (all processes)" if load is not None else ""),
    ]


def format_table(rows: Sequence[BenchRow], floors: Floors | float, cpu: dict[str, Any] | None = None) -> str:
    """Markdown table of the rows, with speed-up against the baseline and distance to the floor of each row's precision.

    The header names the CPU and its vector/matrix extensions, the floors' rates (``floors`` may be a bare sgemm
    rate), the allocator and the load average (other processes on the machine slow every row alike, but they do
    slow them).
    """
    floors = floors if isinstance(floors, Floors) else Floors(floors, threads=torch.get_num_threads())
    tasks = {model_task(r.model) for r in rows} or {"classification"}
    baselines = ", ".join(BASELINES[t] for t in sorted(tasks))
    lines = [
        *_header(floors, cpu),
        "",
        f"| model | batch | implementation | patch sizes | median ms | images/s | speed-up vs {baselines} | x floor |",
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


def format_summary(summary: Sequence[dict[str, Any]], floors: Floors, cpu: dict[str, Any] | None = None) -> str:
    """Markdown table of :func:`summarize`: the best peer path and our best fp32 / bf16 / int8 rows against it
    (speed-up) and against their floors (x floor: what is left to the floor), under the same header as the table's."""
    lines = [
        *_header(floors, cpu),
        "",
        "| model | batch | patch sizes | best peer path (fp32) ms | floor ms fp32 / bf16 / int8 "
        "| ours fp32 ms | speed-up | x floor | ours bf16 ms | speed-up | x floor | ours int8 ms | speed-up | x floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    for e in summary:
        peer = f"{e['peer']['impl']} {e['peer']['median_ms']:.1f}" if e["peer"] else "-"
        floors_ms = " / ".join(num(e["floors_ms"][p], ".1f") for p in ("fp32", "bf16", "int8"))
        cells = [e["model"], str(e["batch"]), e["patch_sizes"] or "-", peer, floors_ms]
        for precision in ("fp32", "bf16", "int8"):
            best = e[precision]
            if best is None:
                cells += ["-", "-", "-"]
            else:
                speedup = num(best["speedup"], ".2f") + ("x" if best["speedup"] is not None else "")
                cells += [f"{best['impl']} {best['median_ms']:.1f}", speedup, num(best["x_floor"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(run: BenchRun, cpu: dict[str, Any] | None = None) -> str:
    """The rows' table, the summary table and the notes, as ``mobilevit bench`` prints them."""
    parts = [format_table(run.rows, run.floors, cpu), "", "Best peer path and ours:", ""]
    parts.append(format_summary(run.summary(), run.floors, cpu))
    if run.notes:
        parts += ["", "Notes:", *(f"- {note}" for note in run.notes)]
    return "\n".join(parts)


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
