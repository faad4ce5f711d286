"""Top-1 / top-5 / loss evaluation over a data loader, sharded across processes when distributed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .distributed import all_sum


@dataclass
class EvalResult:
    loss: float
    top1: float  # percent
    top5: float  # percent
    count: int
    skipped: int = 0
    targets: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False)
    preds: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), repr=False)

    def to_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "top1": self.top1, "top5": self.top5, "count": self.count, "skipped": self.skipped}


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """Autocast context for ``amp`` in {"none", "bf16", "fp16"}."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor, int]],
    device: torch.device,
    amp: str = "none",
    keep_predictions: bool = False,
    progress: bool = False,
    hflip: bool = False,
) -> EvalResult:
    """Mean cross-entropy, top-1 and top-5 accuracy (in %) over ``batches`` of ``(images, labels, skipped)``.

    ``hflip`` averages the logits of each image and its mirror image (test-time augmentation; twice the compute).
    When distributed, each process passes its own shard and the totals are summed over processes.
    """
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, count, skipped = 0.0, 0.0, 0.0, 0, 0
    targets, preds = [], []
    for images, labels, n_skipped in tqdm(batches, desc="eval", disable=not progress, leave=False):
        skipped += n_skipped
        if labels.numel() == 0:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images).float()
            if hflip:
                logits = (logits + model(images.flip(-1)).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk == labels[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        count += labels.numel()
        if keep_predictions:
            targets.append(labels.cpu())
            preds.append(topk[:, 0].cpu())
    model.train(was_training)
    loss_sum, top1, top5, count, skipped = all_sum([loss_sum, top1, top5, count, skipped], device)
    n = max(count, 1)
    result = EvalResult(loss_sum / n, 100 * top1 / n, 100 * top5 / n, int(count), int(skipped))
    if keep_predictions and targets:
        result.targets, result.preds = torch.cat(targets), torch.cat(preds)
    return result
