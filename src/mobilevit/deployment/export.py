"""Export a classifier, segmentation model or detector to ONNX, OpenVINO, TorchScript, Core ML or ExecuTorch.

Every exported file takes what the PyTorch model takes: float32 RGB images in [0, 1], shaped
``[B, 3, H, W]``, with no mean/std normalisation, and returns what its ``forward`` returns: logits
``[B, num_classes]`` for a classifier, per-pixel logits ``[B, num_classes, H, W]`` at the input size
for a segmentation model (:class:`~mobilevit.models.deeplabv3.MobileViTDeepLabV3`). Core ML takes an
RGB image instead and bakes the 1/255 scaling in. By default ``H`` and ``W`` are fixed to
``image_size``: the MobileViT unfold resizes feature maps whose sides are not multiples of the patch
size, a choice made in Python while the graph is captured. ONNX files can leave them dynamic
(``dynamic_size=True``): the inference form then always resizes (an identity on multiples), so one
graph serves every size. The batch axis can be left dynamic in every format but Core ML.

A detector (:class:`~mobilevit.models.ssdlite.MobileViTSSDLite`, or its inference form) is exported by
default at 320x320 with two outputs: ``boxes`` (decoded, normalised ``x1, y1, x2, y2``) and ``scores``
(softmax probabilities, background included) for every anchor; see :class:`DetectionGraph`. Its anchors
are computed in the graph from the feature-map sizes, so ONNX files can leave H and W dynamic too. ONNX
files can also carry the official post-processing (``postprocess=True``, the ``NonMaxSuppression``
operator): :func:`onnx_detections` turns their outputs into the detections ``model.postprocess`` gives.

After export, outputs are compared with PyTorch's (TorchScript always; ONNX when onnxruntime is
installed, at a second input size too when H and W are dynamic). Files carry metadata where the
format has room for it (ONNX, OpenVINO, TorchScript, Core ML; not ExecuTorch): the task, the input
convention, the output, the input size, the number of classes, class names and preprocessing when the
weights know them. :func:`mobilevit.load_exported` runs every format but Core ML
(:mod:`mobilevit.deployment.runtime`). ``precision="int8"`` (ONNX, OpenVINO) quantizes after training on
calibration images; ``"bf16"`` (OpenVINO) stores an inference-precision hint, see
:mod:`mobilevit.deployment.openvino`.

The model is copied, moved to the CPU in float32 and put in eval mode; the caller's model is left
untouched. Files are written atomically (built next to the target, then renamed over it).
The converters are optional dependencies: ``pip install 'mobilevit[export]'``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from ..checkpoints.io import atomic_path
from ..models.anchors import SSDAnchors, center_to_corner, decode
from ..models.backbone import MobileViT
from ..models.deeplabv3 import MobileViTDeepLabV3
from ..models.ssdlite import MobileViTSSDLite
from . import fuse
from .fuse import deploy

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino", "torchscript", "coreml", "executorch")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt", "coreml": ".mlpackage", "executorch": ".pte"}
#: Precisions each format can be exported in (``bf16``: an OpenVINO inference hint on an fp32 file).
PRECISIONS = {"onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}

#: ONNX operator set of exported files (onnxruntime >= 1.14 runs it).
ONNX_OPSET = 18
#: Largest difference from PyTorch's outputs tolerated when checking an exported file, relative to the
#: largest output magnitude when that is above 1 (absolute otherwise).
PARITY_TOL = 1e-4
INSTALL_HINT = "pip install 'mobilevit[export]'"
INPUT_CONVENTION = "float32 RGB in [0, 1], shape [batch, 3, H, W], no mean/std normalisation"

_PACKAGES = {  # import name -> distribution name, for the install hint
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnxscript": "onnxscript",
    "coremltools": "coremltools",
    "executorch": "executorch",
    "openvino": "openvino",
    "nncf": "nncf",
}


#: What each task's exported output is.
OUTPUTS = {
    "classification": "logits: float32 [batch, num_classes]",
    "segmentation": "logits: float32 [batch, num_classes, H, W], per-pixel class logits at the input size "
    "(the stride-16 logits upsampled bilinearly, align_corners=False); argmax over axis 1 gives the mask",
    "detection": "boxes: float32 [batch, anchors, 4], every anchor's decoded box as x1, y1, x2, y2 normalised to "
    "[0, 1] by the input size (unclipped); scores: float32 [batch, anchors, num_classes], softmax class "
    "probabilities, class 0 = background",
}
#: What a detector's ``selected`` output is (with ``postprocess=True``).
SELECTED_OUTPUT = (
    "selected: int64 [detections, 3], rows (batch index, class index into scores' last axis, anchor index) of "
    "the official post-processing: per class 1..num_classes-1, scores above {score_thresh}, NMS at IoU "
    "{nms_iou}, at most {topk} per class and image, in order of batch, class, decreasing score"
)
#: Default ``image_size`` per task (detectors: the paper's COCO size).
DEFAULT_SIZES = {"classification": (256, 256), "segmentation": (256, 256), "detection": (320, 320)}

#: Why a format keeps H and W fixed.
_FIXED_SIZE = {
    "torchscript": "a traced module replays the sizes it was traced at",
    "coreml": "the Core ML image input has one size",
    "executorch": "ExecuTorch plans all memory ahead of time for one size",
}


class ExportError(RuntimeError):
    """An export could not be done; the message says why and what to do."""


# ----------------------------------------------------------------------------------- entry point


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    format: str,
    *,
    image_size: tuple[int, int] | None = None,
    dynamic: bool = False,
    batch_size: int = 1,
    dynamic_size: bool = False,
    postprocess: bool = False,
    precision: str = "fp32",
    calibration: Tensor | str | os.PathLike | None = None,
    calibration_count: int = 512,
) -> Path:
    """Export ``model`` to ``path`` in ``format`` (one of :data:`FORMATS`) and return the path.

    Args:
        model: a classifier, segmentation model or detector taking ``[B, 3, H, W]`` RGB images in [0, 1]
            (e.g. from :func:`mobilevit.create_model`, or its inference form from :func:`mobilevit.deploy`).
        path: output file; its suffix must be ``SUFFIXES[format]``.
        format: ``"onnx"``, ``"openvino"`` (``.xml`` + ``.bin``), ``"torchscript"``, ``"coreml"`` or ``"executorch"``.
        image_size: ``(H, W)`` the file is made for (with ``dynamic_size``, the size it is traced and
            checked at). Default: 320x320 for detectors, else 256x256.
        dynamic: leave the batch axis dynamic (ONNX, TorchScript, ExecuTorch; not Core ML).
        batch_size: batch of the example input; the fixed batch when ``dynamic`` is False. For
            ExecuTorch with ``dynamic=True`` it is the largest batch accepted (memory is planned for it).
        dynamic_size: leave H and W dynamic (ONNX only; other formats raise :class:`ExportError`).
            A segmentation model's output then follows the input size.
        postprocess: (ONNX, OpenVINO; detectors) put the official post-processing in the graph, see :func:`export_onnx`.
        precision: ``"fp32"``; ``"int8"`` (ONNX: :func:`~mobilevit.deployment.quantize.quantize_onnx`, OpenVINO:
            NNCF) post-training quantization calibrated on ``calibration``; ``"bf16"`` (OpenVINO) an fp32 IR that
            asks the runtime to compute in bf16.
        calibration: (int8) a float ``[N, 3, H, W]`` tensor of preprocessed images, or a dataset name / directory
            whose training images are read (``calibration_count`` of them; a classifier's without the images
            ``mobilevit train val_fraction=0.1`` holds out). Never the images accuracy is measured on.
    """
    exporters: dict[str, Callable[..., Path]] = {
        "onnx": export_onnx,
        "torchscript": export_torchscript,
        "coreml": export_coreml,
        "executorch": export_executorch,
    }
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    allowed = PRECISIONS.get(format, ("fp32",))
    if precision not in allowed:
        raise ExportError(
            f"{format} files can be exported in {' or '.join(allowed)}, not precision={precision!r}"
            + ("; int8: onnx or openvino, bf16: openvino" if precision in ("int8", "bf16") else "")
        )
    if calibration is not None and precision != "int8":
        raise ExportError("calibration images are for precision='int8'")
    if postprocess and format not in ("onnx", "openvino"):
        raise ExportError(
            f"post-processing in the graph (postprocess=True) is supported in ONNX and OpenVINO files only, not "
            f"{format}: export the detector's raw outputs (boxes, scores) and run "
            "mobilevit.deployment.export.onnx_detections on them"
        )
    shape = dict(image_size=image_size, dynamic=dynamic, batch_size=batch_size, dynamic_size=dynamic_size)
    if format == "openvino":
        from .openvino import export_openvino

        return export_openvino(
            model,
            path,
            **shape,
            postprocess=postprocess,
            precision=precision,
            calibration=calibration,
            calibration_count=calibration_count,
        )
    if precision == "int8":
        return _export_onnx_int8(model, path, shape, postprocess, calibration, calibration_count)
    kw: dict[str, Any] = {"postprocess": True} if postprocess else {}
    return exporters[format](model, path, **shape, **kw)


def _export_onnx_int8(
    model: nn.Module,
    path: str | os.PathLike,
    shape: dict[str, Any],
    postprocess: bool,
    calibration: Tensor | str | os.PathLike | None,
    count: int,
) -> Path:
    """An fp32 ONNX export quantized by :func:`~mobilevit.deployment.quantize.quantize_onnx` (batch left dynamic)."""
    from .quantize import quantize_onnx, resolve_calibration

    task = _task(model)
    if task == "detection" or postprocess:
        raise ExportError(
            "int8 ONNX export is for classifiers and segmentation models; export detectors in float32, or in int8 "
            "with format='openvino'"
        )
    image_size = _default_size(model, shape["image_size"])
    path = _check_args("onnx", path, image_size, shape["batch_size"], shape["dynamic_size"])
    images = resolve_calibration(
        calibration, task=task, preprocess=_weights_preprocess(model), image_size=image_size, count=count
    )
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", **(shape | {"dynamic": True}))
        return quantize_onnx(fp32, path, images)


def _weights_preprocess(model: nn.Module) -> dict[str, Any] | None:
    return (getattr(model, "weights_meta", None) or {}).get("preprocess")


# ------------------------------------------------------------------------------------------ ONNX


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    dynamic: bool = False,
    batch_size: int = 1,
    dynamic_size: bool = False,
    postprocess: bool = False,
) -> Path:
    """Export to ONNX (opset :data:`ONNX_OPSET`): input ``"images"``, output ``"logits"``.

    Uses the ``torch.export``-based exporter (``dynamo=True``). ``dynamic=True`` makes the batch
    axis symbolic (``"batch"``). By default H and W stay fixed to ``image_size`` because the unfold
    of a MobileViT block resizes maps whose sides are not multiples of the patch size, which Python
    decides while the graph is captured. With a static batch, a model the new exporter cannot
    capture falls back to the TorchScript-based exporter (exact for the traced shape).

    ``dynamic_size=True`` makes H and W symbolic too (``"height"``, ``"width"``): the model is
    exported in its size-agnostic inference form (:func:`mobilevit.deployment.fuse.size_agnostic`;
    a raw MobileViT or DeepLabv3 model goes through :func:`mobilevit.deploy` first), whose size
    arithmetic the TorchScript-based exporter records into the graph. (The ``torch.export``-based one
    takes minutes to reason about these symbolic sizes and proves the graph only above a minimum
    size.) This needs onnxruntime: the file is checked at ``image_size`` and at a second size that
    is not a multiple of any patch grid.

    A detector (default size 320x320) always goes through the TorchScript-based exporter and has the
    outputs ``"boxes"`` ``[batch, anchors, 4]`` and ``"scores"`` ``[batch, anchors, num_classes]`` (see
    :class:`DetectionGraph`: decoded normalised corner boxes and softmax probabilities rather than raw
    regression, logits and anchors, so that a runtime needs no box coder; the anchors are computed in the
    graph, so ``dynamic_size`` works, ``"anchors"`` then being symbolic). With ``postprocess=True`` a third
    output ``"selected"`` ``[detections, 3]`` (int64 rows batch, class, anchor) holds the official
    post-processing, done by the ``NonMaxSuppression`` operator with the model's ``score_thresh``,
    ``nms_iou`` and ``topk_per_class``; :func:`onnx_detections` turns the three outputs into detections.

    The file is checked with ``onnx.checker``, and its outputs against PyTorch's when onnxruntime is
    installed (within :data:`PARITY_TOL`), before it replaces ``path``. A detector's ``selected`` is
    checked against PyTorch's post-processing of the file's own ``boxes`` and ``scores``.
    """
    image_size = _default_size(model, image_size)
    path = _check_args("onnx", path, image_size, batch_size)
    onnx = _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    if dynamic_size:
        _require("onnxruntime", "ONNX export with dynamic H and W (the file is checked at two sizes)")
    detector = _task(model) == "detection"
    if postprocess and not detector:
        raise ExportError(f"postprocess=True is for detectors; this is a {_task(model)} model")
    model = _prepare(model, size_agnostic=dynamic_size)
    if detector:
        model = DetectionGraph(model, postprocess=postprocess)
    example = _example(model, image_size, max(batch_size, 2) if dynamic else batch_size)
    with atomic_path(path) as tmp:
        if detector:
            with _converting("ONNX"):
                _onnx_legacy(model, example, tmp, _detection_axes(model, dynamic, dynamic_size), model.output_names)
        elif dynamic_size:
            with _converting("ONNX"):
                _onnx_legacy(model, example, tmp, _image_axes((0, 2, 3) if dynamic else (2, 3)))
        else:
            try:
                _onnx_dynamo(model, example, tmp, dynamic)
            except Exception as exc:
                if dynamic:
                    raise ExportError(
                        f"ONNX export with a dynamic batch failed ({_reason(exc)}); try dynamic=False"
                    ) from exc
                log.warning("torch.export-based ONNX export failed (%s); using the TorchScript-based one", _reason(exc))
                with _converting("ONNX"):
                    _onnx_legacy(model, example, tmp)
        checks = [example]
        if dynamic_size:
            checks.append(_example(model, _other_size(image_size), 1 if dynamic else batch_size, seed=1))
        with _converting("ONNX"):
            proto = onnx.load(str(tmp))
            task = _task(model)
            proto.doc_string = f"MobileViT {task} model. images: {INPUT_CONVENTION}; {_output_doc(model)}"
            if detector:
                _set_detection_dims(proto, model, example, dynamic, dynamic_size)
            elif dynamic_size:  # the tracer names the class axis of the output after an op: give it its size
                classes = _outputs(model, example).shape[1]
                proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = classes
            for key, value in _metadata(model, image_size, dynamic_size).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.checker.check_model(proto, full_check=True)
            onnx.save(proto, str(tmp))
        _check_onnx(model, tmp, checks)
    return path


def _onnx_dynamo(model: nn.Module, example: Tensor, dst: Path, dynamic: bool) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["images"],
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    program.save(dst, external_data=False)


def _image_axes(dynamic_axes: tuple[int, ...]) -> dict[str, dict[int, str]]:
    """Symbolic axes (of 0, 2, 3) of ``images`` and of ``logits``, which has the input's shape."""
    names = {0: "batch", 2: "height", 3: "width"}
    axes = {i: names[i] for i in dynamic_axes}
    return {"images": axes, "logits": axes} if axes else {}


def _onnx_legacy(
    model: nn.Module,
    example: Tensor,
    dst: Path,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    output_names: tuple[str, ...] = ("logits",),
) -> None:
    """The TorchScript-based exporter; ``dynamic_axes`` maps input/output names to their symbolic axes."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation of this exporter, tracer warnings about fixed H, W
        torch.onnx.export(
            model,
            (example,),
            str(dst),
            input_names=["images"],
            output_names=list(output_names),
            opset_version=ONNX_OPSET,
            dynamo=False,
            dynamic_axes=dynamic_axes or None,
        )


def _check_onnx(model: nn.Module, path: Path, inputs: list[Tensor]) -> None:
    """Compare the file's outputs with the model's on ``inputs`` (skipped without onnxruntime)."""
    try:
        ort = _import_module("onnxruntime")
    except ImportError:
        log.info("onnxruntime is not installed: %s is not compared with PyTorch", path.name)
        return
    with _converting("ONNX"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for x in inputs:
            got = [torch.from_numpy(o) for o in session.run(None, {"images": x.numpy()})]
            expected = _outputs(model, x)
            if isinstance(model, DetectionGraph):
                problem = model.mismatch(got, expected)
            else:
                problem = _difference(got[0], expected) if not _close(got[0], expected, PARITY_TOL) else None
            if problem:
                raise ExportError(
                    f"ONNX export failed: onnxruntime's outputs for input {list(x.shape)} differ from PyTorch's "
                    f"({problem})"
                )


def run_onnx(path: str | os.PathLike, images: Tensor) -> Tensor | tuple[Tensor, ...]:
    """Outputs of an exported ONNX file for ``images`` ([B, 3, H, W] RGB in [0, 1]) with onnxruntime (CPU).

    The logits of a classifier or segmentation model; a detector's outputs as a tuple in the file's
    order (``boxes, scores`` and, with post-processing, ``selected``: see :func:`onnx_detections`).
    Shorthand for ``mobilevit.load_exported(path)(images)`` that keeps the loaded file for the next call.
    """
    from .runtime import run_exported

    return run_exported(_suffixed(path, ".onnx"), images)


def _suffixed(path: str | os.PathLike, suffix: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ValueError(f"{path}: expected a {suffix} file")
    return path


# ------------------------------------------------------------------------------------- detectors


def non_max_suppression(
    boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float, score_threshold: float
) -> Tensor:
    """ONNX ``NonMaxSuppression`` (``center_point_box=0``) in PyTorch: the official per-class post-processing.

    ``boxes`` ``[B, N, 4]`` corners, ``scores`` ``[B, C, N]``. For each image and class: the boxes scoring
    above ``score_threshold``, greedy NMS (a box is dropped when its IoU with a kept one is above
    ``iou_threshold``), the best ``max_per_class``. Returns int64 rows ``(batch, class, box)`` ``[K, 3]``
    in order of batch, class, decreasing score.
    """
    rows = []
    for b in range(boxes.shape[0]):
        cls, idx = torch.nonzero(scores[b] > score_threshold, as_tuple=True)
        keep = batched_nms(boxes[b, idx].float(), scores[b, cls, idx].float(), cls, iou_threshold)  # by score
        keep = keep[torch.sort(cls[keep], stable=True).indices]  # class order, by score within a class
        kept = cls[keep]
        keep = keep[torch.arange(len(keep)) - torch.searchsorted(kept, kept) < max_per_class]
        rows.append(torch.stack([torch.full_like(keep, b), cls[keep], idx[keep]], 1))
    return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.int64)


class _NonMaxSuppression(torch.autograd.Function):
    """:func:`non_max_suppression` in eager mode and while tracing; the ONNX operator in exported graphs."""

    @staticmethod
    def forward(
        ctx: Any, boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float, score_threshold: float
    ) -> Tensor:
        return non_max_suppression(boxes, scores, max_per_class, iou_threshold, score_threshold)

    @staticmethod
    def symbolic(
        g: Any, boxes: Any, scores: Any, max_per_class: int, iou_threshold: float, score_threshold: float
    ) -> Any:
        max_out = g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32))
        score = g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, max_out, iou, score, center_point_box_i=0)


def _anchors_in_graph(generator: SSDAnchors, feats: list[Tensor]) -> Tensor:
    """``generator``'s anchors ``[N, 4]`` for the sizes of ``feats``, from tensor ops on those sizes.

    The same values as ``generator(grid_sizes)`` (within float32 rounding), but traced exporters record
    the size arithmetic, so an ONNX graph with symbolic H and W computes the anchors of each input.
    """
    levels = []
    for f, wh in zip(feats, generator._wh, strict=True):
        h, w = f.shape[-2], f.shape[-1]
        cy = (torch.arange(h, dtype=torch.float32) + 0.5) / h
        cx = (torch.arange(w, dtype=torch.float32) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack([grid_x, grid_y], -1).reshape(-1, 1, 2).expand(-1, wh.shape[0], 2)
        levels.append(torch.cat([centres, wh.float().expand_as(centres)], -1).reshape(-1, 4))
    return torch.cat(levels).clamp(0.0, 1.0)


class DetectionGraph(nn.Module):
    """What an exported detector computes: ``images -> (boxes, scores)``, or ``(boxes, scores, selected)``.

    ``boxes`` ``[B, N, 4]``: each anchor's decoded box, normalised ``x1, y1, x2, y2`` (``model.decode_boxes``);
    ``scores`` ``[B, N, C]``: softmax of the class logits (class 0 = background). These rather than the raw
    regression, logits and anchors: a runtime then needs neither the box coder nor the anchors (which
    depend on the input size) and can threshold the scores directly. With ``postprocess``, ``selected``
    ``[K, 3]`` (int64 rows batch, class, anchor; see :data:`SELECTED_OUTPUT`) is the official
    post-processing of classes 1..C-1 (``model.postprocess``'s thresholds), as ONNX ``NonMaxSuppression``.
    """

    def __init__(self, model: nn.Module, postprocess: bool = False):
        super().__init__()
        if not all(hasattr(model, a) for a in ("forward_features", "heads", "anchor_generator", "forward_raw")):
            raise ExportError(
                f"detector export takes mobilevit's SSDLite detectors (or their deploy() form), not {type(model).__name__}"
            )
        self.model = model
        self.config = model.config
        self.weights_meta = dict(getattr(model, "weights_meta", None) or {})
        self.postprocess = postprocess
        self.output_names: tuple[str, ...] = ("boxes", "scores", "selected") if postprocess else ("boxes", "scores")
        self.train(False)  # exporters restore the wrapper's mode to every submodule afterwards: keep it eval

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        m, c = self.model, self.config
        feats = m.forward_features(images)
        outs = [head(f) for head, f in zip(m.heads, feats, strict=True)]
        regression, logits = torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)
        anchors = _anchors_in_graph(m.anchor_generator, feats)
        boxes = center_to_corner(decode(regression, anchors, c.center_variance, c.size_variance))
        scores = logits.softmax(-1)
        if not self.postprocess:
            return boxes, scores
        return boxes, scores, self._select(boxes, scores, _NonMaxSuppression.apply)

    def _select(self, boxes: Tensor, scores: Tensor, nms: Callable[..., Tensor]) -> Tensor:
        c = self.config
        selected = nms(boxes, scores[..., 1:].transpose(1, 2), c.topk_per_class, c.nms_iou, c.score_thresh)
        return selected + torch.tensor([0, 1, 0], dtype=torch.int64)  # classes 1..C-1: skip the background

    @torch.no_grad()
    def reference(self, images: Tensor) -> tuple[Tensor, ...]:
        """The outputs from the model's own ``forward_raw`` and ``decode_boxes`` (what files are checked against)."""
        raw = self.model.forward_raw(images)
        boxes, scores = self.model.decode_boxes(raw), raw.class_logits.float().softmax(-1)
        return (
            (boxes, scores, self._select(boxes, scores, non_max_suppression)) if self.postprocess else (boxes, scores)
        )

    def mismatch(self, got: list[Tensor], expected: tuple[Tensor, ...]) -> str | None:
        """Why a runtime's outputs ``got`` differ from :meth:`reference`'s, or None.

        ``boxes`` and ``scores`` within :data:`PARITY_TOL`; ``selected`` must be exactly what PyTorch's
        post-processing selects from the runtime's own ``boxes`` and ``scores`` (so that scores within
        rounding of the threshold cannot make it differ).
        """
        if len(got) != len(expected):
            return f"{len(got)} outputs instead of {len(expected)}"
        for name, a, b in zip(self.output_names[:2], got, expected, strict=False):
            if not _close(a, b, PARITY_TOL):
                return f"{name}: {_difference(a, b)}"
        if self.postprocess:
            wanted = self._select(got[0], got[1], non_max_suppression)
            rows, wanted_rows = (set(map(tuple, t.tolist())) for t in (got[2], wanted))
            if got[2].shape[-1:] != (3,) or len(rows) != len(got[2]) or rows != wanted_rows:
                return (
                    f"selected: {len(rows ^ wanted_rows)} of {len(wanted_rows)} detections differ from PyTorch's "
                    "post-processing of the same boxes and scores"
                )
        return None


def onnx_detections(
    boxes: Tensor | Any,
    scores: Tensor | Any,
    selected: Tensor | Any | None = None,
    image_sizes: list[tuple[int, int]] | None = None,
    *,
    score_thresh: float = 0.05,
    nms_iou: float = 0.5,
    topk_per_class: int = 200,
) -> list[dict[str, Tensor]]:
    """Detections per image from an exported detector's outputs, as ``model.postprocess`` gives them.

    ``boxes`` ``[B, N, 4]`` and ``scores`` ``[B, N, C]`` (tensors or NumPy arrays), and ``selected``
    ``[K, 3]`` from a file exported with ``postprocess=True``; without it, the official post-processing
    is run here with ``score_thresh``, ``nms_iou`` and ``topk_per_class``. Each image gets ``{"boxes",
    "scores", "labels"}`` in class order, by decreasing score within a class; boxes are normalised
    (unclipped) without ``image_sizes``, else in pixels of each ``(h, w)`` and clipped to the image.
    """
    boxes, scores = torch.as_tensor(boxes).float(), torch.as_tensor(scores).float()
    if selected is None:
        nms_scores = scores[..., 1:].transpose(1, 2)
        selected = non_max_suppression(boxes, nms_scores, topk_per_class, nms_iou, score_thresh)
        selected = selected + torch.tensor([0, 1, 0])
    selected = torch.as_tensor(selected).long().reshape(-1, 3)
    if image_sizes is not None and len(image_sizes) != len(boxes):
        raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {len(boxes)}")
    results = []
    for b in range(len(boxes)):
        _, cls, idx = selected[selected[:, 0] == b].unbind(1)
        found = scores[b, idx, cls]
        order = torch.sort(found, descending=True, stable=True).indices
        order = order[torch.sort(cls[order], stable=True).indices]
        out_boxes, cls, idx = boxes[b, idx[order]], cls[order], idx[order]
        if image_sizes is not None:
            h, w = image_sizes[b]
            scale = out_boxes.new_tensor([w, h, w, h])
            out_boxes = torch.min((out_boxes * scale).clamp(min=0), scale)
        results.append({"boxes": out_boxes, "scores": found[order], "labels": cls})
    return results


def _detection_axes(model: DetectionGraph, dynamic: bool, dynamic_size: bool) -> dict[str, dict[int, str]]:
    """Symbolic axes of a detector's input and outputs for the TorchScript-based exporter."""
    image = ({0: "batch"} if dynamic else {}) | ({2: "height", 3: "width"} if dynamic_size else {})
    per_anchor = ({0: "batch"} if dynamic else {}) | ({1: "anchors"} if dynamic_size else {})
    axes = {"images": image, "boxes": per_anchor, "scores": per_anchor, "selected": {0: "detections"}}
    return {k: v for k, v in axes.items() if v and (k == "images" or k in model.output_names)}


def _set_detection_dims(proto: Any, model: DetectionGraph, example: Tensor, dynamic: bool, dynamic_size: bool) -> None:
    """Give the outputs' axes their sizes or names (the tracer names some after the ops that made them)."""
    boxes, scores = model(example)[:2]
    batch: int | str = "batch" if dynamic else boxes.shape[0]
    anchors: int | str = "anchors" if dynamic_size else boxes.shape[1]
    dims: dict[str, list[int | str]] = {
        "boxes": [batch, anchors, 4],
        "scores": [batch, anchors, scores.shape[2]],
        "selected": ["detections", 3],
    }
    for output in proto.graph.output:
        shape = output.type.tensor_type.shape
        del shape.dim[:]
        for d in dims[output.name]:
            if isinstance(d, str):
                shape.dim.add().dim_param = d
            else:
                shape.dim.add().dim_value = d


# ----------------------------------------------------------------------------------- TorchScript


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    dynamic: bool = False,
    batch_size: int = 1,
    dynamic_size: bool = False,
) -> Path:
    """Export a traced TorchScript module (``torch.jit.load`` it; no mobilevit needed).

    The trace fixes H and W to ``image_size`` (``dynamic_size=True`` is refused); the batch stays
    dynamic whatever ``dynamic`` says (with ``dynamic=True`` this is checked at another batch size).
    The module is frozen with ``torch.jit.freeze`` (BatchNorm folded, constants inlined) when its
    outputs stay within :data:`PARITY_TOL` of the model's, else saved unfrozen. The task, input and
    output conventions, class names and preprocessing are stored as the extra file ``mobilevit.json``.
    A detector's module returns ``(boxes, scores)`` as its ONNX file does (see :class:`DetectionGraph`).
    """
    image_size = _default_size(model, image_size)
    path = _check_args("torchscript", path, image_size, batch_size, dynamic_size)
    model = _prepare(model)
    if _task(model) == "detection":
        model = DetectionGraph(model)
    example = _example(model, image_size, batch_size)
    check = _example(model, image_size, batch_size + 1 if dynamic else batch_size, seed=1)
    with _converting("TorchScript"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: H and W are fixed on purpose
        traced = torch.jit.trace(model, example, check_trace=False)
        expected = _outputs(model, check)
        problem = _mismatch(traced(check), expected)
        if problem:
            raise ExportError(
                f"TorchScript export failed: the traced module does not reproduce the model ({problem})"
                + (" at another batch size (the trace fixed the batch); use dynamic=False" if dynamic else "")
            )
        try:
            frozen = torch.jit.freeze(traced)
            if _mismatch(frozen(check), expected) is None:
                traced = frozen
            else:
                log.info("torch.jit.freeze changed the outputs by more than %g; saving the unfrozen module", PARITY_TOL)
        except Exception as exc:  # freezing is an optimisation only
            log.info("torch.jit.freeze failed (%s); saving the unfrozen module", _reason(exc))
        extra = {"mobilevit.json": json.dumps(_metadata(model, image_size, False))}
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files=extra)
    return path


# -------------------------------------------------------------------------------------- Core ML


def export_coreml(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    dynamic: bool = False,
    batch_size: int = 1,
    dynamic_size: bool = False,
) -> Path:
    """Export a Core ML ML Program (``.mlpackage``, iOS 15 / macOS 12 or later).

    The input ``"image"`` is an RGB image of ``image_size``; the 1/255 scaling to [0, 1] is baked
    into the program, so apps pass camera or photo pixels directly. The output ``"logits"`` is a
    ``[1, num_classes]`` float32 array (a segmentation model's: ``[1, num_classes, H, W]``); H and W
    are fixed (``dynamic_size=True`` is refused). Weights and compute stay float32 so the logits match
    PyTorch's (the Neural Engine needs float16: convert with ``compute_precision=FLOAT16`` yourself
    to use it). Core ML image inputs carry one image (the image type has no batch axis; apps batch
    with ``MLModel.predictions(fromBatch:)``), so ``dynamic`` and ``batch_size > 1`` are refused.
    Core ML runs predictions only on Apple platforms; the conversion itself works anywhere. A detector
    has the outputs ``"boxes"`` ``[1, anchors, 4]`` and ``"scores"`` ``[1, anchors, num_classes]`` of
    :class:`DetectionGraph` (no post-processing in the program).
    """
    image_size = _default_size(model, image_size)
    path = _check_args("coreml", path, image_size, batch_size, dynamic_size)
    if dynamic or batch_size != 1:
        raise ExportError(
            "Core ML image inputs take one image at a time (the image type has no batch axis): export with "
            "dynamic=False and batch_size=1, and batch on device with MLModel.predictions(fromBatch:)"
        )
    ct = _require("coremltools", "Core ML export")
    model = _prepare(model)
    if _task(model) == "detection":
        model = DetectionGraph(model)
    names = model.output_names if isinstance(model, DetectionGraph) else ("logits",)
    example = _example(model, image_size, 1)
    if example.shape[1] != 3:
        raise ExportError(f"Core ML export takes RGB models (3 input channels), this one has {example.shape[1]}")
    h, w = image_size
    with _converting("Core ML"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,)).run_decompositions({})
        mlmodel = ct.convert(
            program,
            inputs=[
                ct.ImageType(
                    name="image",
                    shape=(1, 3, h, w),
                    scale=1 / 255.0,
                    bias=[0.0, 0.0, 0.0],
                    color_layout=ct.colorlayout.RGB,
                )
            ],
            outputs=[ct.TensorType(name=name) for name in names],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS15,
            compute_precision=ct.precision.FLOAT32,
            skip_model_load=True,  # compiling needs macOS; the saved package loads there later
        )
        task = _task(model)
        mlmodel.short_description = {
            "classification": "MobileViT image classifier",
            "segmentation": "DeepLabv3-MobileViT semantic segmentation",
            "detection": "SSDLite-MobileViT object detection (raw outputs, no post-processing)",
        }.get(task, f"MobileViT {task} model")
        mlmodel.input_description["image"] = f"RGB image, {w}x{h} pixels (scaled to [0, 1] inside the model)"
        if task == "detection":
            mlmodel.output_description["boxes"] = "every anchor's box [1, anchors, 4]: x1, y1, x2, y2 in [0, 1] units"
            mlmodel.output_description["scores"] = (
                "softmax class probabilities [1, anchors, num_classes], 0 = background"
            )
        else:
            mlmodel.output_description["logits"] = {
                "classification": "class logits [1, num_classes] (apply softmax for probabilities)",
                "segmentation": f"per-pixel class logits [1, num_classes, {h}, {w}] (argmax over axis 1: the mask)",
            }.get(task, OUTPUTS.get(task, "outputs"))
        mlmodel.user_defined_metadata.update(_metadata(model, image_size, False))
        with _atomic_dir(path) as tmp:
            mlmodel.save(str(tmp))
    return path


# ----------------------------------------------------------------------------------- ExecuTorch


def export_executorch(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    dynamic: bool = False,
    batch_size: int = 1,
    dynamic_size: bool = False,
) -> Path:
    """Export an ExecuTorch program (``.pte``) lowered to the XNNPACK CPU backend, float32.

    ExecuTorch plans all memory ahead of time, so with ``dynamic=True`` the program accepts
    batches of 1 to ``batch_size`` (at least 2) and reserves memory for ``batch_size`` images.
    Attention is rewritten into batched matmuls and ``unbind`` into slices before lowering, so that
    XNNPACK takes the whole transformer except its LayerNorms (which XNNPACK lacks). H and W are fixed
    (``dynamic_size=True`` is refused). The program carries no metadata. Run the file with
    :func:`run_executorch`, or with the ExecuTorch runtime on device. A detector's program returns
    ``(boxes, scores)`` as its ONNX file does (see :class:`DetectionGraph`).
    """
    image_size = _default_size(model, image_size)
    path = _check_args("executorch", path, image_size, batch_size, dynamic_size)
    if dynamic and batch_size < 2:
        raise ExportError(
            "ExecuTorch plans memory for the largest batch: with dynamic=True pass batch_size=N (2 or more), "
            "the largest batch the program will accept"
        )
    exir = _require("executorch.exir", "ExecuTorch export")
    xnnpack = _require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "ExecuTorch export")
    model = _prepare(model)
    if _task(model) == "detection":
        model = DetectionGraph(model)
    example = _example(model, image_size, 2 if dynamic else batch_size)  # 1 would specialise the batch
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=batch_size)},) if dynamic else None
    with _converting("ExecuTorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
        program = program.run_decompositions(_xnnpack_decompositions())
        edge = exir.to_edge_transform_and_lower(program, partitioner=[xnnpack.XnnpackPartitioner()])
        executorch_program = edge.to_executorch()
        if dynamic:
            largest = _largest_batch(executorch_program.exported_program())
            if largest < batch_size:
                raise ExportError(
                    f"ExecuTorch export failed: lowering limited the dynamic batch to at most {largest} "
                    f"(torch specialises larger batches while tracing convolutions); use batch_size <= {largest}"
                )
        with atomic_path(path) as tmp:
            tmp.write_bytes(executorch_program.buffer)
    return path


def run_executorch(path: str | os.PathLike, images: Tensor) -> Tensor | tuple[Tensor, ...]:
    """Outputs of an exported ``.pte`` file for ``images`` ([B, 3, H, W] RGB in [0, 1]) with the ExecuTorch runtime.

    The logits; a detector's ``(boxes, scores)``. Shorthand for ``mobilevit.load_exported(path)(images)``.
    """
    from .runtime import run_exported

    return run_exported(_suffixed(path, ".pte"), images)


def _xnnpack_decompositions() -> dict[Any, Callable[..., Any]]:
    """Rewrites of ops that XNNPACK cannot take as they come, into ops it can (bmm, softmax, slice, view).

    Left alone, ``scaled_dot_product_attention`` decomposes into masking ops (``where``, ``any``)
    and ``unbind`` into ``squeeze``; XNNPACK takes none of them, so every attention layer would be
    cut into several delegate calls with slow portable kernels in between. Copies into another
    memory format (``x.contiguous(memory_format=torch.channels_last)``) become plain copies:
    XNNPACK picks its own layouts, and ExecuTorch 1.5 computes wrong logits (off by ~5e-3) for a
    channels-last copy of a dynamic-batch input.
    """
    aten = torch.ops.aten
    return {
        aten.scaled_dot_product_attention.default: _sdpa_as_bmm,
        aten.unbind.int: _unbind_as_slices,
        aten.clone.default: _clone_contiguous,
    }


def _sdpa_as_bmm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        return NotImplemented  # the default decomposition handles these
    *lead, n, d = q.shape
    s, dv = k.shape[-2], v.shape[-1]
    scale = d**-0.5 if scale is None else scale
    attn = torch.bmm((q * scale).reshape(-1, n, d), k.reshape(-1, s, d).transpose(1, 2))
    return torch.bmm(attn.softmax(-1), v.reshape(-1, s, dv)).reshape(*lead, n, dv)


def _unbind_as_slices(x: Tensor, dim: int = 0) -> list[Tensor]:
    dim %= x.dim()
    shape = [*x.shape[:dim], *x.shape[dim + 1 :]]
    return [torch.ops.aten.slice.Tensor(x, dim, i, i + 1).reshape(shape) for i in range(x.shape[dim])]


def _clone_contiguous(x: Tensor, *, memory_format: torch.memory_format | None = None) -> Any:
    if memory_format in (None, torch.contiguous_format, torch.preserve_format):
        return NotImplemented  # kept as it is
    return torch.ops.aten.clone.default(x, memory_format=torch.contiguous_format)


def _largest_batch(program: Any) -> int:
    """Upper bound of the batch axis of the first user input of an exported program."""
    from executorch.exir.sym_util import eval_upper_bound

    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    return int(eval_upper_bound(node.meta["val"].shape[0]))


# --------------------------------------------------------------------------------------- helpers


def _import_module(name: str) -> ModuleType:
    """``importlib.import_module``; a seam for tests that simulate a missing package."""
    return importlib.import_module(name)


def _require(name: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise an :class:`ExportError` saying how to install it."""
    try:
        return _import_module(name)
    except ImportError as exc:
        package = _PACKAGES.get(name.split(".")[0], name.split(".")[0])
        raise ExportError(
            f"{purpose} needs the optional package {package!r} ({exc}); install it with: {INSTALL_HINT}"
        ) from None


def _check_args(
    format: str, path: str | os.PathLike, image_size: tuple[int, int], batch_size: int, dynamic_size: bool = False
) -> Path:
    if dynamic_size and format in _FIXED_SIZE:
        raise ExportError(
            f"{format} files have a fixed H and W ({_FIXED_SIZE[format]}): export them without dynamic_size "
            "(--dynamic-size) at the image_size you will run, or use ONNX for dynamic H and W"
        )
    path = Path(path).expanduser()
    suffix = SUFFIXES[format]
    if path.suffix.lower() != suffix:
        raise ExportError(
            f"{format} files end in {suffix!r}, got {str(path)!r}; use e.g. {str(path.with_suffix(suffix))!r}"
        )
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ExportError(f"image_size must be (height, width) in pixels, got {image_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ExportError(f"batch_size must be a positive integer, got {batch_size!r}")
    return path


def _inference_form(model: nn.Module) -> nn.Module:
    """``deploy(model, channels_last=False)`` for a MobileViT classifier, segmentation model or detector in
    training form; any other module (an inference form already, a peer) as it is."""
    if isinstance(model, (MobileViT, MobileViTDeepLabV3, MobileViTSSDLite)):
        return deploy(model, channels_last=False)
    return model


def _prepare(model: nn.Module, size_agnostic: bool = False) -> nn.Module:
    """A CPU float32 eval-mode copy of ``model`` without gradients (the caller's model is untouched).

    Weights are made contiguous: XNNPACK refuses channels-last weights, and the other formats
    choose their own layouts anyway. With ``size_agnostic``, the copy is the inference form whose
    operations do not depend on H and W (see :func:`~mobilevit.deployment.fuse.size_agnostic`).
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    if size_agnostic:
        model = _inference_form(model)
        fuse.size_agnostic(model)
    model.to(memory_format=torch.contiguous_format)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _in_chans(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "backbone", config)  # a segmentation model's input is its backbone's
    return getattr(config, "in_chans", 3)


def _task(model: nn.Module) -> str:
    """``"classification"``, ``"segmentation"`` or ``"detection"`` (from the model's config)."""
    return getattr(getattr(model, "config", None), "task", "classification")


def _default_size(model: nn.Module, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """``image_size``, or the task's default (:data:`DEFAULT_SIZES`) when it is None."""
    return DEFAULT_SIZES.get(_task(model), (256, 256)) if image_size is None else image_size


def _output_doc(model: nn.Module) -> str:
    """What the exported file outputs (:data:`OUTPUTS`; a detector's ``selected`` too when it has one)."""
    doc = OUTPUTS.get(_task(model), "outputs of the model's forward")
    if isinstance(model, DetectionGraph) and model.postprocess:
        c = model.config
        doc += "; " + SELECTED_OUTPUT.format(score_thresh=c.score_thresh, nms_iou=c.nms_iou, topk=c.topk_per_class)
    return doc


def _example(model: nn.Module, image_size: tuple[int, int], batch: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, _in_chans(model), *image_size, generator=g)


def _other_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """A second input size to check a file with dynamic H and W at: odd, so no patch grid divides it."""
    h, w = image_size
    return (h * 3 // 4) | 1, (w * 5 // 4 + 2) | 1


@torch.no_grad()
def _outputs(model: nn.Module, x: Tensor) -> Any:
    """What an exported file must reproduce: the model's output (a detector's :meth:`DetectionGraph.reference`)."""
    return model.reference(x) if isinstance(model, DetectionGraph) else model(x)


def _metadata(model: nn.Module, image_size: tuple[int, int], dynamic_size: bool) -> dict[str, str]:
    """String metadata stored in the exported files.

    ``task``, ``input`` (convention), ``output``, ``image_size`` (``"HxW"`` or ``"dynamic"``), ``num_classes``,
    and when the weights know them ``categories`` (JSON list of class names) and ``preprocess`` (JSON).
    """
    task = _task(model)
    meta = {
        "task": task,
        "input": INPUT_CONVENTION,
        "output": _output_doc(model),
        "image_size": "dynamic" if dynamic_size else f"{image_size[0]}x{image_size[1]}",
    }
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if isinstance(num_classes, int) and num_classes > 0:
        meta["num_classes"] = str(num_classes)
    if isinstance(model, DetectionGraph):
        c = model.config
        meta["outputs"] = ",".join(model.output_names)
        meta["postprocess"] = json.dumps(
            {"score_thresh": c.score_thresh, "nms_iou": c.nms_iou, "topk_per_class": c.topk_per_class}
        )
    weights_meta = getattr(model, "weights_meta", None) or {}
    categories = list(weights_meta.get("categories") or [])
    if categories:
        meta["categories"] = json.dumps(categories)
    if weights_meta.get("preprocess"):
        meta["preprocess"] = json.dumps(weights_meta["preprocess"])
    return meta


def _as_input(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"expected images as a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    return images.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _close(a: Tensor, b: Tensor, tol: float) -> bool:
    """Same shape, and ``|a - b| <= tol * max(1, max |b|)`` everywhere."""
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


def _mismatch(got: Tensor | tuple[Tensor, ...], expected: Tensor | tuple[Tensor, ...]) -> str | None:
    """Why ``got`` (a tensor or a tuple of them) differs from ``expected`` beyond :data:`PARITY_TOL`, or None."""
    pairs = list(zip(got, expected, strict=False)) if isinstance(expected, tuple) else [(got, expected)]
    if isinstance(expected, tuple) and (not isinstance(got, tuple) or len(got) != len(expected)):
        return f"{len(got) if isinstance(got, tuple) else 1} outputs instead of {len(expected)}"
    for i, (a, b) in enumerate(pairs):
        if not _close(a, b, PARITY_TOL):
            return (f"output {i}: " if len(pairs) > 1 else "") + _difference(a, b)
    return None


def _difference(a: Tensor, b: Tensor) -> str:
    if a.shape != b.shape:
        return f"shape {list(a.shape)} instead of {list(b.shape)}"
    return f"largest difference {(a - b).abs().max().item():.3g}, largest output {b.abs().max().item():.3g}"


def _reason(exc: BaseException) -> str:
    """One line about what went wrong: the first line of the innermost cause, without colour codes."""
    root, seen = exc, set()
    while root.__cause__ is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(root)).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    reason = f"{type(root).__name__}: {first}" if first else type(root).__name__
    return reason if len(reason) <= 300 else reason[:297] + "..."


@contextlib.contextmanager
def _converting(what: str) -> Iterator[None]:
    """Turn a converter's exception into an :class:`ExportError` naming the format and the reason."""
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{what} export failed: {_reason(exc)}") from exc


@contextlib.contextmanager
def _atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dst`` to build a directory in; it replaces ``dst`` if the block succeeds."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    try:
        tmp = work / dst.name
        yield tmp
        old = work / f"{dst.name}.old"
        had_old = dst.exists() or dst.is_symlink()
        if had_old:
            os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            if had_old:
                os.replace(old, dst)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = [
    "FORMATS",
    "OUTPUTS",
    "PARITY_TOL",
    "PRECISIONS",
    "SUFFIXES",
    "DetectionGraph",
    "ExportError",
    "export_coreml",
    "export_executorch",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "non_max_suppression",
    "onnx_detections",
    "run_executorch",
    "run_onnx",
]
