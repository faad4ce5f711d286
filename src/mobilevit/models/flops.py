"""Counting multiply-accumulates (MACs) and parameters, in the fvcore convention the paper uses."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import Attention


def _module_macs(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        k = math.prod(module.kernel_size)
        return output.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, Attention):  # q @ k^T and attn @ v
        b, n, d = inputs[0].shape
        return 2 * b * n * n * d
    if isinstance(module, nn.BatchNorm2d):  # eval-mode affine norm: 2 per element
        return 2 * output.numel()
    if isinstance(module, nn.LayerNorm):  # mean, var, normalise, affine: 5 per element
        return 5 * output.numel()
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return inputs[0].numel()
    return 0


def count_macs(model: nn.Module, input_size: tuple[int, int] = (256, 256), batch_size: int = 1) -> int:
    """MACs of one eval forward pass at ``input_size`` (1 MAC counted as 1 flop, as fvcore does).

    Counts convolutions, linear layers, attention matmuls, norms and pooling; activations and
    element-wise additions are free.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        total += _module_macs(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    p = next(model.parameters())
    x = torch.zeros(batch_size, model.config.in_chans, *input_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
