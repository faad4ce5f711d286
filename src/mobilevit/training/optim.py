"""Optimiser pieces of the recipe: AdamW, cosine LR with linear warm-up, and the EMA model."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], head_lr_scale: float = 1.0
) -> torch.optim.AdamW:
    """AdamW over all trainable parameters (the official recipe decays every parameter).

    Each group's ``lr_scale`` multiplies the scheduled LR: ``head_lr_scale`` for a dense model's
    ``head_parameters()`` (the official segmentation recipe trains the head at 10x), 1 for the rest.
    """
    head = {id(p) for p in getattr(model, "head_parameters", list)()} if head_lr_scale != 1 else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in head], "lr_scale": 1.0}]
    if head:
        groups.append({"params": [p for p in params if id(p) in head], "lr_scale": head_lr_scale})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def cosine_lr(step: int, total_steps: int, lr: float, min_lr: float, warmup_iters: int, warmup_init_lr: float) -> float:
    """LR at optimizer step ``step``: linear warm-up from ``warmup_init_lr``, then cosine from ``lr`` to ``min_lr``."""
    if step < warmup_iters:
        return warmup_init_lr + (lr - warmup_init_lr) * step / warmup_iters
    span = max(1, total_steps - warmup_iters)
    progress = min(1.0, (step - warmup_iters) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


class ModelEMA(nn.Module):
    """Exponential moving average of a model's weights: ``ema = (1 - momentum) * ema + momentum * model``.

    BatchNorm statistics are averaged like the weights; integer counters are copied. With ``warmup``
    the momentum starts high and decays to ``momentum`` as ``max(momentum, 9 / (10 + step))``, so a
    short run's average does not keep a large share of the random initial weights.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.0005, warmup: bool = False):
        super().__init__()
        if not 0 < momentum <= 1:
            raise ValueError(f"EMA momentum must be in (0, 1], got {momentum}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.momentum = momentum
        self.warmup = warmup

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0) -> None:
        """Blend in ``model``'s weights after optimizer step ``step`` (counted from 0)."""
        momentum = max(self.momentum, 9 / (10 + step)) if self.warmup else self.momentum
        ema_state = self.module.state_dict()
        floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.dtype.is_floating_point:
                floats[0].append(target)
                floats[1].append(value.to(target.dtype))
            else:
                target.copy_(value)
        torch._foreach_lerp_(*floats, momentum)  # one multi-tensor kernel on GPU instead of one per tensor
