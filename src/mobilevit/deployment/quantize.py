"""int8 post-training static quantization of an exported ONNX model with ONNX Runtime.

Naive int8 MobileViT (every op quantized per tensor) loses 6-17 top-1 points on ImageNet: LayerNorm,
softmax and the attention score matmuls have wide, outlier-heavy ranges, and per-tensor weight scales
of the depthwise and 1x1 convolutions (BatchNorm folded in) vary by orders of magnitude across channels.
What this does about it:

- weights are quantized per output channel (symmetric int8), activations per tensor (uint8);
- only convolutions and the Linear layers' matrix products (Conv, Gemm and the weight MatMuls) are
  quantized; LayerNorm, softmax, SiLU and the two activation x activation matmuls of attention
  (q @ k^T and attn @ v) stay in fp32;
- activation ranges are calibrated on real images with percentile clipping (99.999th), so one outlier
  does not waste the 256 levels;
- the classifier (last Gemm) stays in fp32, as it is tiny and sets the logits directly.

int8 OpenVINO files are quantized by NNCF instead: :mod:`mobilevit.deployment.openvino`. Both calibrate on
:func:`calibration_images` (training images, never the held-out or test images accuracy is measured on).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _activation_matmuls(model) -> list[str]:
    """Names of MatMul nodes whose two inputs are both activations (no initializer): attention products."""
    weights = {init.name for init in model.graph.initializer}
    produced_by_const = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    consts = weights | produced_by_const
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def _last_gemm_or_matmul(model) -> list[str]:
    nodes = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    return [nodes[-1].name] if nodes else []


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    calibration: torch.Tensor | np.ndarray,
    batch_size: int = 8,
    percentile: float = 99.999,
) -> Path:
    """Write an int8 (QDQ) copy of the fp32 ONNX model ``src`` to ``dst``, calibrated on ``calibration``.

    ``calibration`` is a float ``[N, 3, H, W]`` batch of preprocessed images (a few hundred real ones is
    plenty), at the input size of ``src``. The metadata of ``src`` is kept, with ``precision = int8`` added.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    images = calibration.numpy() if isinstance(calibration, torch.Tensor) else np.asarray(calibration)
    images = images.astype(np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"calibration images must be a non-empty [N, 3, H, W] batch, got shape {images.shape}")
    model = onnx.load(str(src))
    input_name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(np.array_split(images, max(1, len(images) // batch_size)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    dst.parent.mkdir(parents=True, exist_ok=True)
    prepared = dst.with_name(dst.stem + ".prep.onnx")
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        prepared_model = onnx.load(str(prepared))
        exclude = _activation_matmuls(prepared_model) + _last_gemm_or_matmul(prepared_model)
        options = dict(
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
            nodes_to_exclude=exclude,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            extra_options={"CalibPercentile": percentile, "ActivationSymmetric": False, "WeightSymmetric": True},
        )
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints calibration progress
            try:
                quantize_static(
                    str(prepared), str(tmp), Reader(), calibrate_method=CalibrationMethod.Percentile, **options
                )
            except ValueError as e:  # a constant tensor has no histogram ("Too many bins for data range")
                logger.warning("percentile calibration failed (%s); using min/max ranges", e)
                quantize_static(str(prepared), str(tmp), Reader(), calibrate_method=CalibrationMethod.MinMax, **options)
        quantized = onnx.load(str(tmp))
        entries = [p for p in quantized.metadata_props if p.key != "precision"]
        del quantized.metadata_props[:]
        quantized.metadata_props.extend(entries)
        entry = quantized.metadata_props.add()
        entry.key, entry.value = "precision", "int8"
        onnx.save(quantized, str(tmp))
        tmp.replace(dst)
    finally:
        prepared.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return dst


def calibration_images(
    data: str | Path,
    transform: Callable[..., torch.Tensor] | None,
    size: int,
    count: int = 512,
    seed: int = 0,
    *,
    task: str = "classification",
    val_fraction: float = 0.1,
    holdout_seed: int = 0,
) -> torch.Tensor:
    """``count`` random training images of ``data`` (a dataset name or directory), preprocessed at ``size``.

    Calibration never sees the images a quantized model is evaluated on: classifiers draw from the train split
    minus the images ``mobilevit train val_fraction=F seed=S`` holds out for validation (``val_fraction``,
    ``holdout_seed``; the recipes' 0.1 and 0 by default), which ``mobilevit eval --split holdout`` measures;
    segmentation and detection models from the train split of their dataset (VOC, COCO, images/ + masks/),
    resized to ``size`` x ``size`` as their evaluation does (``transform`` is then unused).
    """
    if task == "classification":
        from ..data.datasets import build_dataset, split_holdout

        if transform is None:
            raise ValueError("calibrating a classifier needs its eval transform")
        full = build_dataset(data, "train", lambda image, *_: transform(image, size))
        dataset: Any = full.subset(split_holdout(len(full), val_fraction, holdout_seed)[0])
    elif task == "segmentation":
        from ..data.segmentation import SegEvalTransform, build_segmentation_dataset

        dataset = build_segmentation_dataset(data, "train", SegEvalTransform(size))
    elif task == "detection":
        from ..data.detection import DetEvalTransform, build_detection_dataset

        dataset = build_detection_dataset(data, "train", DetEvalTransform(size))
    else:
        raise ValueError(f"unknown task {task!r}")
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    items = [item for item in (dataset[i] for i in picks) if item is not None]
    if not items:
        raise ValueError(f"no readable calibration image in {data}")
    return torch.stack([item[0] for item in items])


def resolve_calibration(
    calibration: torch.Tensor | np.ndarray | str | Path | None,
    *,
    task: str,
    preprocess: dict[str, Any] | None,
    image_size: tuple[int, int],
    count: int = 512,
) -> torch.Tensor:
    """Calibration images as a float ``[N, 3, H, W]`` tensor at ``image_size``.

    ``calibration`` is such a tensor (or array) of preprocessed images, or a dataset name or directory read
    with :func:`calibration_images` (``count`` images; a classifier's with its eval ``preprocess``).
    """
    if calibration is None:
        raise ValueError(
            "int8 needs calibration images: pass calibration=a float [N, 3, H, W] tensor of preprocessed images "
            "or a dataset name / directory (--calibration DATA), never the images accuracy is measured on"
        )
    if isinstance(calibration, (str, Path)):
        h, w = image_size
        if h != w:
            raise ValueError(f"calibrating from a dataset needs a square image_size, got {image_size}; pass a tensor")
        from ..data.transforms import EvalTransform

        transform = EvalTransform(**(preprocess or {})).at_size(h) if task == "classification" else None
        return calibration_images(calibration, transform, h, count, task=task)
    images = torch.as_tensor(np.asarray(calibration) if isinstance(calibration, np.ndarray) else calibration)
    if images.ndim != 4 or len(images) == 0 or not images.is_floating_point():
        raise ValueError(
            f"calibration images must be a non-empty float [N, 3, H, W] batch, got {images.dtype} {list(images.shape)}"
        )
    return images.detach().to(device="cpu", dtype=torch.float32).contiguous()
