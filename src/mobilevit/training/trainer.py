"""The one training loop of every task: multi-scale sampler, AdamW + cosine, label smoothing, EMA, AMP, DDP;
for classifiers also MixUp / CutMix of the batches and knowledge distillation from a frozen teacher.

What differs between classification and segmentation (data, loss, metrics) is a
:class:`~mobilevit.training.tasks.Task`, chosen by the model name. Run with ``mobilevit train --config RECIPE`` (one process) or under ``torchrun`` (many GPUs / nodes).
Everything a run needs to continue exactly is in ``OUTPUT/last.pt``, written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoints.io import atomic_path, save_checkpoint, save_peer
from ..data.datasets import data_location
from ..data.device import DeviceBatches, cache_batches
from ..data.sampler import MultiScaleBatchSampler, mix_seed, multiscale_sizes
from ..factory import create_model
from ..models.peers import TorchvisionModel
from . import distributed
from .evaluate import autocast
from .optim import ModelEMA, build_optimizer, cosine_lr
from .recipe import TrainConfig
from .tasks import load_teacher, state_digest, task_of

log = logging.getLogger(__name__)

STATE_FORMAT = "mobilevit-train-state"
STEP_FIELDS = ["step", "epoch", "size", "batch", "lr", "loss"]
# options that may differ between a run and its resumption (they change the numbers by float rounding at most;
# output: a run directory may be moved, e.g. to another machine)
RESUME_MAY_CHANGE = {"workers", "device", "data_on_device", "progress", "tensorboard", "max_steps", "log_every",
                     "checkpoint_every_steps", "output"}  # fmt: skip


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the message names the last usable checkpoint."""


@dataclass
class RunState:
    epoch: int = 0
    micro: int = 0  # batches of the current epoch already consumed
    step: int = 0  # optimizer steps so far
    best_score: float = -1.0  # of the task's score metric (top-1, mIoU) on the validation set


def eval_batches(n: int, batch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's share of ``range(n)`` in batches; shares are disjoint and unpadded, so totals are exact."""
    mine = list(range(rank, n, world))
    return [mine[i : i + batch] for i in range(0, len(mine), batch)]


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    return amp


def read_train_state(path: Path) -> dict[str, Any]:
    """Load ``last.pt`` safely (tensors and plain data only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read training state {path}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a mobilevit training state (use it with --weights, not --resume)")
    return state


class Trainer:
    """One training run; ``Trainer(cfg).fit()``. In DDP every process builds its own ``Trainer``."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.dist, self.device = distributed.setup(cfg.device)
        self.out = Path(cfg.output)
        state = None
        if resume:
            state = read_train_state(self.out / "last.pt")
            cfg = self._resumed_config(cfg, state)
        elif (self.out / "last.pt").exists():
            raise FileExistsError(
                f"{self.out / 'last.pt'} exists: pass --resume to continue that run, or choose another output"
            )
        self.cfg = cfg
        self.amp = resolve_amp(cfg.amp, self.device)
        self.task = task_of(cfg.model)
        self.task.check_config(cfg)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self._build_data()
        self.model = create_model(
            cfg.model, weights=cfg.weights, num_classes=len(self.classes), **cfg.model_overrides
        ).to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.mix = self.task.batch_mix(cfg, len(self.classes))
        # the teacher: frozen, in eval mode, on every rank (not wrapped in DDP), never saved with the student
        self.teacher = load_teacher(cfg.teacher, self.classes) if cfg.teacher else None
        if self.teacher is not None:
            self.teacher.to(self.device, memory_format=self.memory_format)
        self.ema = ModelEMA(self.model, cfg.ema_momentum, cfg.ema_warmup) if cfg.ema_momentum > 0 else None
        self.net: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.head_lr_scale)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        per_step = cfg.base_batch * self.dist.world_size
        self.accum = max(1, round(cfg.effective_batch / per_step)) if cfg.effective_batch else 1
        self.steps_per_epoch = math.ceil(len(self.sampler) / self.accum)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.run = RunState()
        self.saved_step: int | None = None
        self.sums = [0.0] * 5  # this process's loss * images, correct, counted (images/pixels), images, skipped
        torch.manual_seed(cfg.seed + 1 + self.dist.rank)  # dropout differs across ranks
        self.teacher_digest = state_digest(self.teacher) if self.teacher is not None else None
        if state is not None:
            self._load_state(state)
        self.writer = self._tensorboard()

    # -- setup ---------------------------------------------------------------------------------
    def _resumed_config(self, cfg: TrainConfig, state: dict[str, Any]) -> TrainConfig:
        saved = TrainConfig(**state["config"])
        changed = sorted(k for k, v in cfg.to_dict().items() if k not in RESUME_MAY_CHANGE and saved.to_dict()[k] != v)
        # the same dataset named otherwise ("fashion-mnist" or its directory, a relative path) is no change
        if "data" in changed and data_location(cfg.data) == data_location(saved.data):
            changed.remove("data")
        if changed:
            raise ValueError(
                f"--resume continues the run in {self.out} exactly, but these options differ from it: {changed}; "
                "drop them or start a new run in another output directory"
            )
        world = state.get("world_size", 1)
        if world != self.dist.world_size:
            raise ValueError(f"{self.out} was trained with {world} processes; resume it with the same number")
        for key in RESUME_MAY_CHANGE:
            setattr(saved, key, getattr(cfg, key))
        return saved

    def _build_data(self) -> None:
        cfg, rank, world = self.cfg, self.dist.rank, self.dist.world_size
        data = self.task.build_data(cfg)
        self.train_set, self.val_set, self.classes, self.preprocess = (
            data.train_set,
            data.val_set,
            data.classes,
            data.preprocess,
        )
        sizes = (
            multiscale_sizes(
                cfg.base_size, cfg.base_batch, cfg.min_size, cfg.max_size, cfg.num_scales, cfg.size_divisor
            )
            if cfg.multiscale
            else [(cfg.base_size, cfg.base_batch)]
        )
        self.sampler = MultiScaleBatchSampler(
            len(self.train_set), sizes=sizes, shuffle=True, seed=cfg.seed, rank=rank, world_size=world, drop_last=True,
            repeats=cfg.repeated_aug,
        )  # fmt: skip
        pin = self.device.type == "cuda"
        # loaders get their own generator: creating an iterator must not consume the global (dropout) RNG
        self.loader = DataLoader(
            self.train_set, batch_sampler=self.sampler, num_workers=cfg.workers, collate_fn=data.collate, pin_memory=pin,
            generator=torch.Generator(),
        )  # fmt: skip
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader = DataLoader(
                self.val_set,
                batch_sampler=eval_batches(len(self.val_set), cfg.eval_batch, rank, world),
                num_workers=cfg.workers,
                collate_fn=data.collate,
                pin_memory=pin,
                generator=torch.Generator(),
            )
        if cfg.data_on_device:  # the same batches (up to float rounding), made on the device
            self.loader = DeviceBatches(self.train_set, self.sampler, self.device, cfg.workers)
            if self.val_loader is not None:
                self.val_loader = cache_batches(self.val_loader, self.device)

    def _tensorboard(self) -> Any:
        if not (self.cfg.tensorboard and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # -- checkpoints ---------------------------------------------------------------------------
    def _rank_states(self) -> list[dict[str, Any]]:
        """Every process's RNG state and running epoch sums (gathered to all ranks)."""
        mine = {"rng": torch.get_rng_state(), "sums": list(self.sums)}
        if not self.dist.enabled:
            return [mine]
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def save_state(self) -> None:
        """Write ``last.pt`` atomically (every process must call it: RNG states are gathered).

        Weights that are no longer finite never replace the last checkpoint.
        """
        ranks = self._rank_states()
        if not self.dist.is_main:
            return
        if not all(torch.isfinite(v).all() for v in self.model.state_dict().values() if v.is_floating_point()):
            log.warning("weights are not finite at step %d: %s keeps step %s", self.run.step, self.out / "last.pt",
                        self.saved_step)  # fmt: skip
            return
        state = {
            "format": STATE_FORMAT,
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
            "epoch": self.run.epoch,
            "micro": self.run.micro,
            "step": self.run.step,
            "best_score": self.run.best_score,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ranks": ranks,
            "teacher_digest": self.teacher_digest,  # the teacher itself is not saved
        }
        with atomic_path(self.out / "last.pt") as tmp:
            torch.save(state, tmp)
        self.saved_step = self.run.step

    def _load_state(self, state: dict[str, Any]) -> None:
        if state.get("teacher_digest") != self.teacher_digest:
            raise ValueError(
                f"--resume continues the run in {self.out} exactly, but the weights in teacher={self.cfg.teacher} "
                "are not those the run started with"
            )
        self.model.load_state_dict(state["model"])
        if self.ema and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        mine = state["ranks"][self.dist.rank]
        torch.set_rng_state(mine["rng"])
        self.sums = list(mine["sums"])
        if len(self.sums) == 4:  # written before segmentation: loss * images, correct, images, skipped
            self.sums.insert(3, self.sums[2])
        best = state.get("best_score", state.get("best_top1"))
        self.run = RunState(state["epoch"], state["micro"], state["step"], best)
        self.saved_step = self.run.step
        # drop rows written after the checkpoint
        _truncate_csv(self.out / "steps.csv", lambda r: int(r["step"]) <= self.run.step)
        _truncate_csv(self.out / "metrics.csv", lambda r: int(r["epoch"]) <= self.run.epoch)
        log.info("resumed %s at epoch %d, step %d", self.out, self.run.epoch, self.run.step)

    def save_weights(self, model: nn.Module, name: str, extra: dict[str, Any]) -> Path:
        """The model alone in our safetensors format, with class names and eval preprocessing."""
        meta = {"categories": self.classes, "preprocess": self.preprocess, "training": extra}
        if isinstance(model, TorchvisionModel):
            return save_peer(model, self.out / name, meta)
        return save_checkpoint(model.state_dict(), model.config, self.out / name, arch=self.cfg.model, meta=meta)

    # -- loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            log.info(
                "training %s (%s) on %d images (%d classes), %d epochs x %d steps, %d process(es) x accumulation %d, amp=%s",
                cfg.model, self.task.name, len(self.train_set), len(self.classes), cfg.epochs, self.steps_per_epoch,
                self.dist.world_size, self.accum, self.amp,
            )  # fmt: skip
            extras = cfg.classification_only() + (["mix_prob", "mix_switch_prob"] if cfg.mixing else [])
            if extras:
                log.info("options beyond the paper's recipe: %s", ", ".join(f"{k}={getattr(cfg, k)}" for k in extras))
        last: dict[str, Any] = {}
        try:
            while self.run.epoch < cfg.epochs and not self._reached_max_steps():
                last = self._train_epoch()
                if self._reached_max_steps() and self.run.micro:
                    break
            return self._finish(last)
        finally:
            if self.writer:
                self.writer.close()
            distributed.teardown()

    def _reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.run.step >= self.cfg.max_steps

    def _train_epoch(self) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        self.sampler.set_epoch(run.epoch, start_step=run.micro)
        self.net.train()
        if run.micro == 0:
            self.sums = [0.0] * 5
        start, seen_now = time.perf_counter(), 0
        n_batches = len(self.sampler)
        lr = cosine_lr(run.step, self.total_steps, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.warmup_init_lr)
        bar = tqdm(
            total=n_batches, initial=run.micro, desc=f"epoch {run.epoch + 1}/{cfg.epochs}",
            disable=not (cfg.progress and self.dist.is_main), dynamic_ncols=True, leave=False,
        )  # fmt: skip
        for images, targets, n_skipped in self.loader:
            boundary = (run.micro + 1) % self.accum == 0 or run.micro + 1 == n_batches
            lr = cosine_lr(run.step, self.total_steps, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.warmup_init_lr)
            loss, hits, counted = self._forward_backward(images, targets, boundary, lr)
            used = len(targets) if len(targets) >= 2 else 0
            batch = (loss * used, hits, counted, used, n_skipped)
            self.sums = [a + b for a, b in zip(self.sums, batch, strict=True)]
            seen_now += len(targets)
            run.micro += 1
            bar.update()
            if boundary:
                self._optimizer_step(lr)
                if run.step % cfg.log_every == 0 and self.dist.is_main:
                    self._log_step(images.shape[-1], len(targets), lr, loss)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", size=images.shape[-1])
                if cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0:
                    self.save_state()
                if self._reached_max_steps():
                    break
        bar.close()
        loss_total, correct_total, counted_total, seen_total, skipped_total = distributed.all_sum(
            self.sums, self.device
        )
        (seen_now,) = distributed.all_sum([seen_now], self.device)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {
            "epoch": run.epoch + 1, "step": run.step, "lr": lr,
            "train_loss": loss_total / max(seen_total, 1),
            "epoch_seconds": seconds, "images_per_second": seen_now / seconds, "skipped_images": int(skipped_total),
        }  # fmt: skip
        if self.task.train_metric:
            row[f"train_{self.task.train_metric}"] = 100 * correct_total / max(counted_total, 1)
        if skipped_total and self.dist.is_main:
            log.warning("epoch %d: skipped %d unreadable images", run.epoch + 1, int(skipped_total))
        if run.micro < n_batches:  # stopped by max_steps inside the epoch
            self.save_state()
            return row
        row |= self._validate()
        self._log_epoch(row)
        run.epoch, run.micro = run.epoch + 1, 0
        self.save_state()
        return row

    def _forward_backward(
        self, images: Tensor, targets: Tensor, boundary: bool, lr: float
    ) -> tuple[float, float, float]:
        """Accumulate gradients of one batch; returns its loss, correct predictions and counted predictions."""
        scale = 1.0
        if len(targets) < 2:  # unreadable items left < 2 (BatchNorm needs 2): skip, DDP gets a zero-weight batch
            if not self.dist.enabled:
                return 0.0, 0.0, 0.0
            images, targets = self.task.placeholder_batch(self.cfg.base_size)
            scale = 0.0
        images = images.to(self.device, non_blocking=True)
        targets = self.task.to_device(targets, self.device)
        if self.mix is not None:  # seeded per (seed, epoch, batch of the epoch, rank): resumable
            seed = mix_seed(self.cfg.seed, self.run.epoch, self.run.micro, self.dist.rank)
            images, targets = self.mix(images, targets, seed)
        images = images.contiguous(memory_format=self.memory_format)
        sync = contextlib.nullcontext() if boundary or not self.dist.enabled else self.net.no_sync()
        with sync:
            with autocast(self.device, self.amp):
                loss, hits, counted = self.task.forward_loss(self.net, images, targets, self.cfg, self.teacher)
            # the step's one host sync, before backward: the host then queues backward and the optimizer step
            loss_value, hits_value, counted_value = torch.stack(
                [loss.detach(), hits.to(loss.dtype), counted.to(device=loss.device, dtype=loss.dtype)]
            ).tolist()
            if not math.isfinite(loss_value):
                self._diverged(loss_value, lr)
            self.scaler.scale(loss * scale / self.accum).backward()
        return loss_value * scale, hits_value * scale, counted_value * scale

    def _optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # states saved before head_lr_scale lack it
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model, self.run.step)
        self.run.step += 1

    def _diverged(self, loss: float, lr: float) -> None:
        self.save_state()  # kept only if the weights are still finite
        where = f"epoch {self.run.epoch + 1}, step {self.run.step}"
        if self.saved_step is None:
            ckpt = "no checkpoint was written before (set checkpoint_every_steps to keep one)"
        else:
            ckpt = f"{self.out / 'last.pt'} holds the last finite weights (step {self.saved_step})"
        raise TrainingDiverged(
            f"loss became {loss} at {where} (lr {lr:.3g}); {ckpt}. Lower the learning rate, set grad_clip, "
            "or use amp=none/bf16 instead of fp16, then start a new run (or weights=.../last.pt to fine-tune from it)."
        )

    def _validate(self) -> dict[str, Any]:
        if self.val_loader is None:
            return {}
        row: dict[str, Any] = {}
        models = [("val", self.model)] + ([("ema_val", self.ema.module)] if self.ema else [])
        score = self.task.score
        if self.dist.enabled:  # BatchNorm statistics drift per rank after DDP's broadcast: evaluate rank 0's
            for _, model in models:
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)
        for prefix, model in models:
            metrics = self.task.evaluate(model, self.val_loader, self.device, self.amp)
            row |= {f"{prefix}_{k}": v for k, v in metrics.items()}
            if metrics[score] > self.run.best_score:
                self.run.best_score = metrics[score]
                if self.dist.is_main:
                    extra = {"epoch": self.run.epoch + 1, f"val_{score}": metrics[score], "ema": prefix == "ema_val"}
                    self.save_weights(model, "best.safetensors", extra)
        return row

    def _log_step(self, size: int, batch: int, lr: float, loss: float) -> None:
        row = {"step": self.run.step, "epoch": self.run.epoch + 1, "size": size, "batch": batch, "lr": lr, "loss": loss}
        _append_csv(self.out / "steps.csv", STEP_FIELDS, row)
        if self.writer:
            self.writer.add_scalar("train/loss", loss, self.run.step)
            self.writer.add_scalar("train/lr", lr, self.run.step)

    def _log_epoch(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        _append_csv(self.out / "metrics.csv", self.task.metric_fields(), row)
        if self.writer:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        shown = ("train_loss", f"val_{self.task.score}", f"ema_val_{self.task.score}")
        parts = [f"{k}={v:.4g}" for k, v in row.items() if k in shown]
        log.info("epoch %d/%d: %s", row["epoch"], self.cfg.epochs, " ".join(parts))

    def _finish(self, last: dict[str, Any]) -> dict[str, Any]:
        if not self.dist.is_main:
            return last
        if self.val_loader is None or not (self.out / "best.safetensors").exists():
            final = self.ema.module if self.ema else self.model
            self.save_weights(final, "best.safetensors", {"epoch": self.run.epoch, "ema": self.ema is not None})
        if (self.out / "metrics.csv").exists():
            from .report import plot_curves

            plot_curves(self.out / "metrics.csv", self.out / "curves.png", title=f"{self.cfg.model} on {self.cfg.data}")
        return last | {f"best_{self.task.score}": self.run.best_score, "output": str(self.out)}


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train with ``cfg``; returns the last epoch's metrics. ``resume`` continues ``cfg.output/last.pt``."""
    return Trainer(cfg, resume).fit()


def _append_csv(path: Path, fields: list[str], row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})


def _truncate_csv(path: Path, keep_row: Callable[[dict[str, str]], bool]) -> None:
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
        fields = list(rows[0].keys()) if rows else None
    if fields is None:
        return
    keep = [r for r in rows if keep_row(r)]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)
