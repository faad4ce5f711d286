"""Uniform weight averaging of checkpoints of one model (a "model soup"; SWA over saved weights)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .io import Checkpoint, CheckpointError


def average_checkpoints(checkpoints: Sequence[Checkpoint]) -> Checkpoint:
    """The uniform average of ``checkpoints``, which must be one architecture with the same classes.

    Meant for runs fine-tuned from one start (stages of one training, or fine-tunes of one model): such weights
    lie in one basin, so their average is a working model (whether it beats the best of them is for held-out
    images to say). Floating-point tensors (BatchNorm running statistics included, as the training EMA does) are
    averaged in float32 and returned as float32; integer buffers (``num_batches_tracked``) are the first
    checkpoint's. The result keeps the first checkpoint's config, architecture and metadata.
    """
    if len(checkpoints) < 2:
        raise CheckpointError(f"averaging needs at least 2 checkpoints; got {len(checkpoints)}")
    first = checkpoints[0]
    for i, ckpt in enumerate(checkpoints[1:], 2):
        if ckpt.config != first.config:
            raise CheckpointError(
                f"checkpoint {i} is a different model ({ckpt.arch or 'non-standard'}: {ckpt.config}) than checkpoint "
                f"1 ({first.arch or 'non-standard'}: {first.config}); only one architecture's weights can be averaged"
            )
        if ckpt.meta.get("categories") != first.meta.get("categories"):
            raise CheckpointError(f"checkpoint {i} names other classes than checkpoint 1; average one task's models")
        if ckpt.state_dict.keys() != first.state_dict.keys():
            missing = sorted(first.state_dict.keys() ^ ckpt.state_dict.keys())
            raise CheckpointError(f"checkpoint {i} has other tensors than checkpoint 1: {', '.join(missing[:6])}")
    state = {}
    for key, tensor in first.state_dict.items():
        if not tensor.is_floating_point():
            state[key] = tensor.clone()
            continue
        state[key] = torch.stack([ckpt.state_dict[key].float() for ckpt in checkpoints]).mean(0)
    return Checkpoint(state, first.layout, first.config, first.arch, dict(first.meta))
