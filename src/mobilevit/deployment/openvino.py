"""Export to OpenVINO IR (``.xml`` + ``.bin``) in fp32, bf16 (a runtime hint) or int8 (NNCF post-training quantization).

**Route.** The inference form (:func:`mobilevit.deploy`, applied here to a model in training form) is exported
to ONNX (:func:`~mobilevit.deployment.export.export_onnx`, batch dynamic, H and W fixed unless
``dynamic_size``) and converted with ``openvino.convert_model``. The ONNX route shares the graph of the ONNX
export, including dynamic H and W and a detector's in-graph ``NonMaxSuppression`` (``postprocess``), which
OpenVINO's ONNX front end converts (same selections as onnxruntime). A fixed-size graph has no resize in its
MobileViT blocks; the size-agnostic one resizes by an identity in each (two ``Interpolate`` per block, 1-2%
of the time at 256x256: ``benchmarks/openvino_graph.py``). Converting ``deploy(model)`` directly
(``convert_model(model, example_input=...)``) compiled to an equally fast model (within 1% on XS at
256x256, batch 1 and 8).

**Batch.** The batch axis of the IR is always dynamic, whatever ``dynamic`` says (``batch_size`` is then the
batch the file is checked at). With a fully static input shape OpenVINO 2026.4.1 computes wrong attention
when a MobileViT block has 4 patches (as many as its heads): the Fashion-MNIST XXS at 64 px was off by 1% of
its largest logit (3e-2) with a static batch and exact (1e-6) with a dynamic one, and a minimal attention
block [B, 4 tokens, 4 heads] by up to 0.76, while a dynamic batch costs no measurable time.

**Precision.** Weights are stored in fp32 (``compress_to_fp16=False``). ``"bf16"`` is not a file format in
OpenVINO but an inference hint: the fp32 IR is stored with ``inference_precision = bf16`` in its rt_info,
which :func:`mobilevit.load_exported` applies (``INFERENCE_PRECISION_HINT``) and refuses on CPUs without
bf16 arithmetic. Every other file is run with the hint ``f32``, so CPUs with AMX do not silently use bf16.
``"int8"`` quantizes with NNCF (:data:`DEFAULT_QUANTIZATION`, measured in
``docs/results/openvino_int8_search.md``).

**Metadata.** The rt_info section ``mobilevit`` holds what ONNX files carry in their metadata (task, input
convention, outputs, input size, number of classes, class names, preprocessing) plus ``precision`` and
``inference_precision``.

**Checks.** The saved IR is compiled and compared with PyTorch before it replaces ``path``: fp32 and bf16
files at f32 within :data:`~mobilevit.deployment.export.PARITY_TOL` (at a second size too with
``dynamic_size``); int8 files on calibration images, whose outputs must stay within
:data:`INT8_MAX_ERROR` of PyTorch's (relative L2 error) and agree in arg-max (top-1 class, per-pixel class)
on at least :data:`INT8_MIN_AGREEMENT` of them. The ``.xml`` and ``.bin`` are written under temporary names
and renamed into place together: after a failure neither is left half-written, and an ``.xml`` is never
left without its ``.bin``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .export import (
    PARITY_TOL,
    DetectionGraph,
    ExportError,
    _check_args,
    _close,
    _converting,
    _default_size,
    _difference,
    _example,
    _inference_form,
    _other_size,
    _outputs,
    _prepare,
    _require,
    _task,
    _weights_preprocess,
    export_onnx,
)

log = logging.getLogger(__name__)

#: Largest relative L2 error ``|q - p| / |p|`` of an int8 file's outputs ``q`` against PyTorch's ``p`` (pooled
#: over the check images). Measured on the Fashion-MNIST XXS: 0.20 for the default settings and for naive int8;
#: 0.59 when calibrated on noise, 0.88 when calibrated on images scaled by 0.05 (ranges far too small).
INT8_MAX_ERROR = 0.4
#: Smallest share of check images (pixels for segmentation, anchors for detection) whose arg-max class the int8
#: file keeps (measured: 95-97% for good settings, 80% calibrated on noise, 36% with too small ranges).
INT8_MIN_AGREEMENT = 0.85
#: Calibration images an int8 file is checked on.
INT8_CHECK_IMAGES = 64


@dataclass(frozen=True)
class QuantizationSettings:
    """NNCF post-training quantization settings (``nncf.quantize`` arguments) for int8 OpenVINO files.

    ``ignored_types`` are OpenVINO operation types left in fp32 (``MatMul``: the transformers' Linear layers
    and the classifier; ``ScaledDotProductAttention``: the attention products). ``smooth_quant_alpha`` None
    keeps NNCF's default for the model type (SmoothQuant only acts on quantized matmuls); a negative value
    turns SmoothQuant off.
    """

    model_type: str | None = "transformer"
    preset: str = "mixed"
    subset_size: int = 300
    fast_bias_correction: bool = False
    smooth_quant_alpha: float | None = None
    ignored_types: tuple[str, ...] = ("MatMul", "ScaledDotProductAttention")
    ignored_names: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "preset": self.preset,
            "subset_size": self.subset_size,
            "fast_bias_correction": self.fast_bias_correction,
            "smooth_quant_alpha": self.smooth_quant_alpha,
            "ignored_types": list(self.ignored_types),
            "ignored_names": list(self.ignored_names),
        }


#: The best settings measured on the Fashion-MNIST models (docs/results/openvino_int8_search.md, chosen on the
#: held-out training images): convolutions in int8 (the transformer's matmuls, attention, LayerNorm and softmax
#: in fp32), MIXED preset (asymmetric activations), full bias correction. On the AVX2 CPU measured, int8 matmuls
#: run slower than fp32 ones, and every variant quantizing them was slower and no more accurate.
DEFAULT_QUANTIZATION = QuantizationSettings()


def export_openvino(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    dynamic: bool = False,
    batch_size: int = 1,
    dynamic_size: bool = False,
    postprocess: bool = False,
    precision: str = "fp32",
    calibration: Tensor | str | os.PathLike | None = None,
    calibration_count: int = 512,
    quantization: QuantizationSettings | None = None,
) -> Path:
    """Export an OpenVINO IR: ``path`` (``.xml``) and its weights next to it (same name, ``.bin``).

    Arguments as for :func:`~mobilevit.deployment.export.export_onnx` (but the batch axis is always dynamic, see
    the module's notes; ``batch_size`` is the batch the file is checked at), plus ``precision`` (``"fp32"``,
    ``"bf16"``, ``"int8"``), ``calibration`` (int8: a float ``[N, 3, H, W]`` tensor of preprocessed images at
    ``image_size``, or a dataset name / directory, ``calibration_count`` of whose training images are read; see
    :func:`~mobilevit.deployment.quantize.calibration_images`) and ``quantization`` (NNCF settings, default
    :data:`DEFAULT_QUANTIZATION`). Input ``images``; outputs as in the ONNX file (``logits``, or ``boxes``,
    ``scores`` and with ``postprocess`` ``selected``).
    """
    image_size = _default_size(model, image_size)
    path = _check_args("openvino", path, image_size, batch_size)
    if precision not in ("fp32", "bf16", "int8"):
        raise ExportError(f"OpenVINO files are exported in fp32, bf16 or int8, not {precision!r}")
    ov = _require("openvino", "OpenVINO export")
    _require("onnx", "OpenVINO export (the model goes through ONNX)")
    task = _task(model)
    images = None
    if precision == "int8":
        _require("nncf", "int8 OpenVINO export")
        from .quantize import resolve_calibration

        images = resolve_calibration(
            calibration,
            task=task,
            preprocess=_weights_preprocess(model),
            image_size=image_size,
            count=calibration_count,
        )
    elif calibration is not None:
        raise ExportError("calibration images are for precision='int8'")
    model = _inference_form(model)
    reference = _prepare(model, size_agnostic=dynamic_size)
    if task == "detection":
        reference = DetectionGraph(reference, postprocess=postprocess)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        onnx_file = export_onnx(
            model,
            work / "model.onnx",
            image_size=image_size,
            dynamic=True,  # always: see "Batch" above
            batch_size=batch_size,
            dynamic_size=dynamic_size,
            postprocess=postprocess,
        )
        with _converting("OpenVINO"):
            ov_model = ov.convert_model(str(onnx_file))
        metadata = _onnx_metadata(onnx_file)
        if images is not None:
            ov_model = quantize_ir(ov_model, images, quantization or DEFAULT_QUANTIZATION)
        metadata |= {"precision": precision, "inference_precision": "bf16" if precision == "bf16" else "f32"}
        if images is not None:
            metadata["quantization"] = _json((quantization or DEFAULT_QUANTIZATION).to_dict())
        for key, value in metadata.items():
            ov_model.set_rt_info(value, ["mobilevit", key])
        staged = work / "ir" / path.name
        staged.parent.mkdir()
        with _converting("OpenVINO"):
            ov.save_model(ov_model, str(staged), compress_to_fp16=False)
        batch = max(batch_size, 2) if dynamic else batch_size
        if images is None:
            checks = [_example(reference, image_size, batch)]
            if dynamic_size:
                checks.append(_example(reference, _other_size(image_size), 1 if dynamic else batch_size, seed=1))
            _check_float(staged, reference, checks)
        else:
            _check_int8(staged, reference, images[:INT8_CHECK_IMAGES], None)
        _replace_pair(staged, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def quantize_ir(model: Any, images: Tensor, settings: QuantizationSettings, batch: int | None = None) -> Any:
    """``model`` (an ``openvino.Model``) quantized to int8 by NNCF, calibrated on ``images`` ``[N, 3, H, W]``.

    The calibration items are single images, or batches of ``batch`` when the model's batch is fixed.
    """
    nncf = _require("nncf", "int8 OpenVINO export")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    step = batch or 1
    if len(images) < step:
        raise ExportError(f"int8 export needs at least {step} calibration images (the fixed batch), got {len(images)}")
    items = [images[i : i + step].numpy() for i in range(0, len(images) - step + 1, step)]
    kwargs: dict[str, Any] = {
        "preset": nncf.QuantizationPreset(settings.preset),
        "subset_size": min(settings.subset_size, len(items)),
        "fast_bias_correction": settings.fast_bias_correction,
    }
    if settings.model_type:
        kwargs["model_type"] = nncf.ModelType(settings.model_type)
    if settings.ignored_types or settings.ignored_names:
        kwargs["ignored_scope"] = nncf.IgnoredScope(
            types=list(settings.ignored_types), names=list(settings.ignored_names), validate=False
        )
    if settings.smooth_quant_alpha is not None:
        alphas = AdvancedSmoothQuantParameters(matmul=settings.smooth_quant_alpha)
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(smooth_quant_alphas=alphas)
    with _converting("int8 quantization (NNCF)"), _quiet_nncf():
        return nncf.quantize(model, nncf.Dataset(items), **kwargs)


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF's INFO lines (every operation it leaves alone) off, its progress bars on stderr rather than stdout."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)


def _onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata an ONNX export wrote (``_metadata`` of export.py): the same keys go into the IR."""
    onnx = _require("onnx", "OpenVINO export")
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def _run_ir(path: Path, batches: list[Tensor]) -> list[tuple[Tensor, ...]]:
    """The staged IR's outputs for each batch, at f32 (whatever its hint)."""
    from .runtime import load_exported

    runner = load_exported(path, precision="fp32")
    with _converting("OpenVINO"):
        return [o if isinstance(o, tuple) else (o,) for o in map(runner, batches)]


def _check_float(path: Path, reference: nn.Module, inputs: list[Tensor]) -> None:
    """fp32 (and bf16-hinted) files: outputs within ``PARITY_TOL`` of PyTorch's."""
    for x, got in zip(inputs, _run_ir(path, inputs), strict=True):
        expected = _outputs(reference, x)
        if isinstance(reference, DetectionGraph):
            problem = reference.mismatch(list(got), expected)
        else:
            problem = None if _close(got[0], expected, PARITY_TOL) else _difference(got[0], expected)
        if problem:
            raise ExportError(
                f"OpenVINO export failed: OpenVINO's outputs for input {list(x.shape)} differ from PyTorch's ({problem})"
            )


def _check_int8(path: Path, reference: nn.Module, images: Tensor, batch: int | None) -> None:
    """int8 files: relative L2 error and arg-max agreement against PyTorch, pooled over calibration images."""
    step = batch or min(len(images), 16)
    batches = [images[i : i + step] for i in range(0, len(images) - step + 1, step)]
    names = reference.output_names[:2] if isinstance(reference, DetectionGraph) else ("logits",)
    got: dict[str, list[Tensor]] = {name: [] for name in names}
    expected: dict[str, list[Tensor]] = {name: [] for name in names}
    for x, outputs in zip(batches, _run_ir(path, batches), strict=True):
        ref = _outputs(reference, x)
        for name, q, p in zip(names, outputs, ref if isinstance(ref, tuple) else (ref,), strict=False):
            got[name].append(q)
            expected[name].append(p)
    for name in names:
        q, p = torch.cat(got[name]), torch.cat(expected[name])
        error = ((q - p).norm() / p.norm().clamp_min(1e-12)).item()
        axis = -1 if name == "scores" else 1
        agreement = 1.0 if name == "boxes" else (q.argmax(axis) == p.argmax(axis)).float().mean().item()
        log.info("int8 %s: relative error %.3f, arg-max agreement %.1f%%", name, error, 100 * agreement)
        if error > INT8_MAX_ERROR or agreement < INT8_MIN_AGREEMENT:
            raise ExportError(
                f"int8 OpenVINO export failed: the quantized {name} are too far from PyTorch's on the calibration "
                f"images (relative error {error:.3f}, limit {INT8_MAX_ERROR}; arg-max agreement {100 * agreement:.1f}%, "
                f"at least {100 * INT8_MIN_AGREEMENT:.0f}% needed); calibrate on more, real images of the training "
                "data, or export in fp32"
            )


def _replace_pair(staged_xml: Path, xml: Path) -> None:
    """Move the staged ``.xml`` + ``.bin`` over ``xml`` and its ``.bin``; any old pair is restored on failure.

    Order: old ``.xml`` out, old ``.bin`` out, new ``.bin`` in, new ``.xml`` in, so that an ``.xml`` on disk
    always has its ``.bin``.
    """
    staged_bin, binary = staged_xml.with_suffix(".bin"), xml.with_suffix(".bin")
    backup = staged_xml.parent.parent / "old"
    backup.mkdir()
    moved: list[tuple[Path, Path]] = []
    try:
        for current in (xml, binary):
            if current.exists() or current.is_symlink():
                os.replace(current, backup / current.name)
                moved.append((backup / current.name, current))
        os.replace(staged_bin, binary)
        os.replace(staged_xml, xml)
    except BaseException:
        for stale in (xml, binary):
            if stale.exists() and not any(dst == stale for _, dst in moved):
                stale.unlink()
        for src, dst in moved:
            os.replace(src, dst)
        raise


__all__ = ["DEFAULT_QUANTIZATION", "QuantizationSettings", "export_openvino", "quantize_ir"]
