"""Run any exported file: ONNX (onnxruntime), OpenVINO IR, TorchScript and ExecuTorch behind one interface.

``load_exported(path)`` returns an :class:`ExportedModel`: call it on float32 RGB images in [0, 1] shaped
``[B, 3, H, W]`` (the input every exported file takes) and get what the file outputs as torch tensors: logits
(classifiers, segmentation models) or a tuple (detectors: ``boxes, scores`` and, with in-graph
post-processing, ``selected``; :meth:`ExportedModel.detections` turns them into detections). The task, input
size, class names and preprocessing come from the metadata the file carries (every format but ExecuTorch).
Everything runs on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .export import ExportError, _as_input, _reason, _require, onnx_detections

#: File suffix -> format.
EXPORTED_SUFFIXES = {".onnx": "onnx", ".xml": "openvino", ".pt": "torchscript", ".pte": "executorch"}
#: Inference precisions :func:`load_exported` accepts (OpenVINO's ``INFERENCE_PRECISION_HINT``: f32, bf16).
RUNTIME_PRECISIONS = ("fp32", "bf16")
#: CPU flags (``/proc/cpuinfo``) of which OpenVINO needs one to compute in bf16.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")
#: CPU flags of int8 dot-product instructions; without one, int8 files run no faster than fp32 (AVX2 CPUs).
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: The rt_info section of OpenVINO IR files that holds our metadata.
OPENVINO_SECTION = "mobilevit"

_JSON_KEYS = ("categories", "preprocess", "postprocess")


class ExportedFileError(ValueError):
    """An exported file that cannot be run (corrupt, incomplete, unknown); the message names it and what to do."""


def exported_format(path: str | os.PathLike) -> str | None:
    """The format of an exported file by its name (``.pt``: only a TorchScript archive), or None."""
    path = Path(path)
    fmt = EXPORTED_SUFFIXES.get(path.suffix.lower())
    if fmt == "torchscript":
        return fmt if _is_torchscript(path) else None
    return fmt


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``code/``), not a ``torch.save`` checkpoint."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


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


@functools.cache
def openvino_core() -> Any:
    """The process's OpenVINO ``Core``, made safe under a preloaded allocator (tcmalloc, jemalloc) first.

    OpenVINO's TBB loads its hwloc binding with ``RTLD_DEEPBIND``; hwloc then frees with the C library's ``free``
    memory that the preloaded ``malloc`` allocated, and the process aborts ("double free or corruption") in the first
    ``compile_model``. ``TBB_ENABLE_SANITIZERS=1`` makes TBB load it without ``RTLD_DEEPBIND`` (oneTBB issues 1636
    and 1645); it must be set before OpenVINO first compiles a model in the process, so every Core comes from here.
    """
    if malloc_name() not in ("glibc malloc", "system malloc"):
        os.environ.setdefault("TBB_ENABLE_SANITIZERS", "1")
    return _require("openvino", "running OpenVINO files").Core()


def bf16_support() -> tuple[bool, list[str]]:
    """Whether OpenVINO computes in bf16 on this CPU, and the bf16 flags :data:`BF16_CPU_FLAGS` it has."""
    capabilities = openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in capabilities, [f for f in BF16_CPU_FLAGS if f in cpu_flags()]


def int8_support() -> tuple[bool, list[str]]:
    """Whether this CPU has int8 dot-product instructions (:data:`INT8_CPU_FLAGS`), and which of them."""
    have = [f for f in INT8_CPU_FLAGS if f in cpu_flags()]
    return bool(have), have


@functools.cache
def cpu_fields(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (``model name``, ``flags``, ...), read once per process;
    empty where there is none."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends here
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU's flags (``/proc/cpuinfo``'s ``flags``, ``Features`` on Arm; empty where unknown)."""
    fields = cpu_fields()
    return frozenset(fields.get("flags", fields.get("Features", "")).split())


class ExportedModel(nn.Module):
    """An exported file ready to run (see :func:`load_exported`); an ``nn.Module`` without parameters.

    ``model(images)`` takes float32 ``[B, 3, H, W]`` RGB images in [0, 1] and returns the file's outputs as
    CPU tensors: logits, or a tuple for detectors. Attributes: ``path``, ``format`` (``"onnx"``,
    ``"openvino"``, ``"torchscript"``, ``"executorch"``), ``task``, ``metadata`` (what the file records, JSON
    values decoded), ``image_size`` (``(H, W)``, None when H and W are dynamic), ``categories`` and
    ``preprocess`` (empty when the file does not record them), ``num_classes``, ``output_names``,
    ``precision`` (OpenVINO: the inference precision in use) and ``weights_meta`` (class names and
    preprocessing in the form :func:`mobilevit.model_transform` and :func:`mobilevit.model_categories` read).
    """

    def __init__(self, path: Path, format: str, runner: _Runner, precision: str | None = None):
        super().__init__()
        self.path, self.format, self._runner, self.precision = path, format, runner, precision
        self.metadata: dict[str, Any] = _decode(runner.metadata)
        self.output_names: list[str] = list(runner.output_names)
        self.input_shape: list[int | str] = list(runner.input_shape)
        self.image_size = self._image_size()
        self.task: str = self.metadata.get("task") or self._guess_task()
        self.categories: list[str] = list(self.metadata.get("categories") or [])
        self.preprocess: dict[str, Any] = dict(self.metadata.get("preprocess") or {})
        self._num_classes: int | None = _int(self.metadata.get("num_classes")) or runner.num_classes

    def _image_size(self) -> tuple[int, int] | None:
        size = str(self.metadata.get("image_size", ""))
        if "x" in size:
            h, w = size.split("x")
            return int(h), int(w)
        hw = self.input_shape[2:4]
        if size != "dynamic" and len(hw) == 2 and all(isinstance(d, int) and d > 0 for d in hw):
            return int(hw[0]), int(hw[1])
        return None

    def _guess_task(self) -> str:
        """A file without metadata: detectors have two or three outputs, segmentation models 4-d logits."""
        if len(self.output_names) >= 2:
            return "detection"
        return "segmentation" if self._runner.output_rank == 4 else "classification"

    @property
    def num_classes(self) -> int:
        """Classes of the logits (a detector's scores, background included); from one run when not recorded."""
        if self._num_classes is None:
            h, w = self.image_size or (64, 64)
            out = self(torch.zeros(self._fixed_batch() or 1, 3, h, w))
            self._num_classes = int(
                (out[1] if isinstance(out, tuple) else out).shape[-1 if self.task == "detection" else 1]
            )
        return self._num_classes

    @property
    def weights_meta(self) -> dict[str, Any]:
        return {"source": str(self.path), "categories": self.categories, "preprocess": self.preprocess}

    def _fixed_batch(self) -> int | None:
        batch = self.input_shape[0] if self.input_shape else None
        return batch if isinstance(batch, int) and batch > 0 else None

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, ...]:
        x = _as_input(images)
        if self._fixed_batch() == 1 and len(x) > 1:  # a file made for one image at a time: one call per image
            return _concat([self(image[None]) for image in x])
        self._check_shape(x)
        try:
            outputs = self._runner(x)
        except Exception as exc:
            raise ValueError(
                f"{self.path}: takes images shaped {self.input_shape}, got {list(x.shape)} ({_reason(exc)})"
            ) from exc
        return outputs[0] if len(outputs) == 1 else outputs

    def _check_shape(self, x: Tensor) -> None:
        expected = self.input_shape
        if not expected:
            return
        wrong = [
            (isinstance(e, int) and e > 0 and e != s) or (isinstance(e, str) and e.startswith("<=") and s > int(e[2:]))
            for e, s in zip(expected, x.shape, strict=False)
        ]
        if len(expected) != x.ndim or any(wrong):
            raise ValueError(
                f"{self.path}: takes images shaped {expected}, got {list(x.shape)} (sizes are fixed at export unless "
                "exported with --dynamic / --dynamic-size)"
            )

    def detections(self, images: Tensor) -> list[dict[str, Tensor]]:
        """A detector's detections per image, as ``model(images)`` of the PyTorch detector in eval mode gives them:
        ``{"boxes", "scores", "labels"}``, boxes in pixels of the input, clipped; the file's post-processing
        thresholds (its in-graph ``selected`` output when it has one)."""
        if self.task != "detection":
            raise ValueError(f"{self.path} is a {self.task} model, not a detector")
        outputs = self(images)
        post = self.metadata.get("postprocess") or {}
        h, w = images.shape[-2:]
        return onnx_detections(*outputs[:3], image_sizes=[(h, w)] * len(images), **post)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, format={self.format!r}, task={self.task!r}, image_size={self.image_size}"


def load_exported(path: str | os.PathLike, threads: int | None = None, precision: str | None = None) -> ExportedModel:
    """Load an exported file to run on the CPU: ``.onnx``, ``.xml`` (OpenVINO IR), ``.pt`` (TorchScript), ``.pte``.

    Args:
        path: the file (an OpenVINO ``.xml`` needs its ``.bin`` next to it).
        threads: intra-op threads (default: the runtime's). onnxruntime runs with
            ``session.intra_op.allow_spinning=0`` (idle threads sleep); OpenVINO with ``INFERENCE_NUM_THREADS``,
            one stream and the LATENCY hint; TorchScript sets torch's threads during each call. ExecuTorch ignores it:
            its XNNPACK thread pool is process-wide (resetting it while programs are loaded aborts the process).
        precision: (OpenVINO) ``"fp32"`` or ``"bf16"`` inference precision instead of the file's hint. bf16 needs
            a CPU with bf16 arithmetic (AVX-512 BF16 or AMX); elsewhere it raises :class:`ExportedFileError`.
            Other formats take only None or ``"fp32"``.
    """
    path = Path(path).expanduser()
    fmt = EXPORTED_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ExportedFileError(
            f"{path}: unknown exported file type {path.suffix!r}; expected one of "
            f"{', '.join(EXPORTED_SUFFIXES)} (write one with `mobilevit export --format FORMAT`)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (write it with `mobilevit export --format {fmt}`)")
    if precision is not None and precision not in RUNTIME_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(RUNTIME_PRECISIONS)} or None, got {precision!r}")
    if precision == "bf16" and fmt != "openvino":
        raise ValueError(f"precision='bf16' is an OpenVINO runtime setting; {path.name} is a {fmt} file")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    runners: dict[str, Callable[..., _Runner]] = {
        "onnx": _OnnxRunner,
        "openvino": _OpenVINORunner,
        "torchscript": _TorchScriptRunner,
        "executorch": _ExecuTorchRunner,
    }
    runner = runners[fmt](path, threads, precision)
    if runner.metadata.get("precision") == "int8" and cpu_flags() and not int8_support()[0]:
        warnings.warn(
            f"{path.name} is int8, but this CPU has no int8 dot-product instructions ({' / '.join(INT8_CPU_FLAGS)}): "
            "int8 runs at fp32 speed or slower here (docs/results/openvino_int8_search.md); the fp32 file is the "
            "faster choice on this machine",
            stacklevel=2,
        )
    return ExportedModel(path, fmt, runner, getattr(runner, "precision", None))


# --------------------------------------------------------------------------------------- runners


class _Runner:
    """One format's session: ``runner(x)`` -> output tensors; input shape, output names, raw metadata."""

    metadata: dict[str, str]
    input_shape: list[int | str]
    output_names: list[str]
    output_rank: int | None = None
    num_classes: int | None = None

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError


def _corrupt(path: Path, fmt: str, exc: BaseException) -> ExportedFileError:
    return ExportedFileError(
        f"{path}: not a readable {fmt} file ({_reason(exc)}); export it again with `mobilevit export --format {fmt}`"
    )


def _dims(shape: Any) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in shape]


class _OnnxRunner(_Runner):
    def __init__(self, path: Path, threads: int | None, precision: str | None):
        ort = _require("onnxruntime", "running ONNX files")
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise _corrupt(path, "onnx", exc) from exc
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = _dims(self.session.get_inputs()[0].shape)
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        self.output_rank = len(outputs[0].shape)
        last = outputs[min(1, len(outputs) - 1)].shape
        axis = -1 if len(outputs) > 1 else 1
        self.num_classes = last[axis] if len(last) > 1 and isinstance(last[axis], int) else None

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.from_numpy(o) for o in self.session.run(None, {self.input_name: x.numpy()}))


class _OpenVINORunner(_Runner):
    def __init__(self, path: Path, threads: int | None, precision: str | None):
        weights = path.with_suffix(".bin")
        _check_ir_xml(path)
        if not weights.is_file():
            raise ExportedFileError(
                f"{path}: its weights file {weights.name} is missing; keep the .xml and .bin of an OpenVINO IR "
                "together (or export it again with `mobilevit export --format openvino`)"
            )
        core = openvino_core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:
            raise _corrupt(path, "openvino", exc) from exc
        info = model.get_rt_info()
        section = info[OPENVINO_SECTION] if OPENVINO_SECTION in list(info.keys()) else {}
        self.metadata = {k: v.astype(str) if hasattr(v, "astype") else str(v) for k, v in dict(section).items()}
        hint = precision or self.metadata.get("inference_precision", "fp32")
        self.precision = "bf16" if hint == "bf16" else "fp32"
        if self.precision == "bf16":
            supported, have = bf16_support()
            if not supported:
                missing = [f for f in BF16_CPU_FLAGS if f not in have]
                raise ExportedFileError(
                    f"{path}: asks for bf16 inference, but this CPU cannot compute in bf16 (it lacks the CPU flags "
                    f"{' / '.join(missing)}; OpenVINO reports {', '.join(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}): "
                    "load it with precision='fp32' (mobilevit ... --precision fp32)"
                )
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise _corrupt(path, "openvino", exc) from exc
        self.request = self.compiled.create_infer_request()
        shape = model.inputs[0].get_partial_shape()
        self.input_shape = [d.get_length() if d.is_static else "?" for d in shape]
        self.output_names = [o.get_any_name() for o in model.outputs]
        outputs = [o.get_partial_shape() for o in model.outputs]
        self.output_rank = outputs[0].rank.get_length() if outputs[0].rank.is_static else None
        last = outputs[min(1, len(outputs) - 1)]
        axis = -1 if len(outputs) > 1 else 1
        dim = last[axis] if last.rank.is_static and last.rank.get_length() > 1 else None
        self.num_classes = dim.get_length() if dim is not None and dim.is_static else None

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        # share_inputs: OpenVINO reads the (contiguous) tensor's memory instead of copying it first (1-2 ms per
        # call at 256x256)
        self.request.infer({0: x.numpy()}, share_inputs=True)
        return tuple(
            torch.from_numpy(np.array(self.request.get_output_tensor(i).data)) for i in range(len(self.output_names))
        )


def _check_ir_xml(path: Path) -> None:
    """Refuse, with a clear message, an ``.xml`` that is not an OpenVINO IR (its root element is ``<net>``)."""
    try:
        for _, element in ET.iterparse(path, events=("start",)):
            if element.tag != "net":
                raise ExportedFileError(
                    f"{path}: not an OpenVINO IR (root element <{element.tag}>, expected <net>); write one with "
                    "`mobilevit export --format openvino`"
                )
            return
    except ET.ParseError as exc:
        raise ExportedFileError(
            f"{path}: not an OpenVINO IR ({exc}); export it again with `mobilevit export --format openvino`"
        ) from exc


class _TorchScriptRunner(_Runner):
    def __init__(self, path: Path, threads: int | None, precision: str | None):
        extra = {"mobilevit.json": ""}
        try:
            self.module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            hint = " (a checkpoint? pass it as --weights to use it as one)" if not _is_torchscript(path) else ""
            raise ExportedFileError(
                f"{path}: not a readable TorchScript file{hint} ({_reason(exc)}); export one with "
                "`mobilevit export --format torchscript`"
            ) from exc
        self.module.eval()
        self.threads = threads
        self.metadata = json.loads(extra["mobilevit.json"]) if extra["mobilevit.json"] else {}
        size = str(self.metadata.get("image_size", ""))
        self.input_shape = ["batch", 3, *map(int, size.split("x"))] if "x" in size else []
        outputs = [s.strip() for s in str(self.metadata.get("outputs", "")).split(",") if s.strip()]
        self.output_names = outputs or ["logits"]

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        before = torch.get_num_threads()
        if self.threads and self.threads != before:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = self.module(x)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class _ExecuTorchRunner(_Runner):
    def __init__(self, path: Path, threads: int | None, precision: str | None):
        key = _file_key(path)
        try:
            self.method = _executorch_method(*key)
        except ExportError:
            raise
        except Exception as exc:
            raise _corrupt(path, "executorch", exc) from exc
        meta = self.method.metadata
        self.metadata = {}
        sizes = list(meta.input_tensor_meta(0).sizes())  # the batch: fixed, or the largest of a dynamic one
        self.input_shape = [sizes[0] if sizes[0] == 1 else f"<={sizes[0]}", *sizes[1:]]
        n = meta.num_outputs()
        self.output_names = ["logits"] if n == 1 else ["boxes", "scores", "selected"][:n]
        sizes = [list(meta.output_tensor_meta(i).sizes()) for i in range(n)]
        self.output_rank = len(sizes[0])
        self.num_classes = sizes[min(1, n - 1)][-1 if n > 1 else 1]

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        outputs = self.method.execute([x])
        return tuple(o.clone() for o in outputs)  # outputs live in planned memory that the next call reuses


def _file_key(path: Path) -> tuple[str, int, int]:
    resolved = path.resolve()
    st = resolved.stat()
    return str(resolved), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _executorch_method(path: str, mtime_ns: int, size: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "This API is experimental"
        runtime = _require("executorch.runtime", "running ExecuTorch files")
        return runtime.Runtime.get().load_program(path).load_method("forward")


# -------------------------------------------------------------------------------------- metadata


def _decode(raw: dict[str, Any]) -> dict[str, Any]:
    """The file's metadata with JSON values (class names, preprocessing, post-processing) decoded."""
    meta: dict[str, Any] = dict(raw)
    for key in _JSON_KEYS:
        if isinstance(meta.get(key), str):
            with contextlib.suppress(json.JSONDecodeError):
                meta[key] = json.loads(meta[key])
    return meta


def _concat(parts: list[Tensor | tuple[Tensor, ...]]) -> Tensor | tuple[Tensor, ...]:
    """Outputs of single images joined into a batch (a detector's ``selected`` rows get their batch index)."""
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)  # type: ignore[arg-type]
    joined = [torch.cat([p[k] for p in parts]) for k in range(2)]
    if len(parts[0]) > 2:
        joined.append(torch.cat([p[2] + torch.tensor([i, 0, 0]) for i, p in enumerate(parts)]))  # type: ignore[index]
    return tuple(joined)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int, size: int) -> ExportedModel:
    return load_exported(path)


def run_exported(path: str | os.PathLike, images: Tensor) -> Tensor | tuple[Tensor, ...]:
    """``load_exported(path)(images)``, the loaded file kept for the next call (reloaded when the file changes)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return load_exported(path)(images)  # the error for a missing file
    return _cached(*_file_key(path))(images)


__all__ = [
    "BF16_CPU_FLAGS",
    "EXPORTED_SUFFIXES",
    "INT8_CPU_FLAGS",
    "ExportedFileError",
    "ExportedModel",
    "bf16_support",
    "exported_format",
    "int8_support",
    "load_exported",
    "run_exported",
]
