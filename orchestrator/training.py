"""The plain-PyTorch pieces of pretraining: model, optimiser, schedule, one epoch of steps,
checkpoint files, a worker's batches. The probes that measure the encoder are `orchestrator.probes`.

`orchestrator.epoch_loop` puts them together into the one epoch loop (in a Ray Train worker or in a
Tune trial's own process); `benchmarks/overhead.py` runs them in a single process without Ray.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.config import Config

STATE_FILE = "state.pt"


# --- model, optimiser, schedule -----------------------------------------------------------------

def build_model(cfg: Config) -> nn.Module:
    """`METHODS[method.name](build_encoder(model.encoder, model.cifar_stem, **model.encoder_args), **method kwargs)`."""
    from methods import METHODS
    from methods.encoders import build_encoder

    encoder = build_encoder(cfg.model.encoder, cifar_stem=cfg.model.cifar_stem, **cfg.model.encoder_args)
    return METHODS[cfg.method.name](encoder, **cfg.method_kwargs())


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Biases and norm weights get no weight decay (as in SimCLR/BYOL's LARS setups)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum), LARS (You et al., 2017; SimCLR/BYOL) or AdamW at the peak LR.

    One multi-tensor step, not a loop over parameters: SGD and AdamW fused (one kernel per group)
    when the model is on CUDA, foreach otherwise; LARS its foreach implementation.
    """
    o, lr = cfg.optim, cfg.effective_lr()
    groups = _param_groups(model, o.weight_decay)
    param = next(model.parameters(), None)
    fused = param is not None and param.is_cuda
    if o.name in ("sgd", "adamw"):
        for g in groups:
            g.pop("lars_exclude", None)
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=o.sgd_momentum, fused=fused, foreach=None if fused else True)
        return torch.optim.AdamW(groups, lr=lr, fused=fused, foreach=None if fused else True)
    from methods.lars import LARS

    return LARS(groups, lr=lr, momentum=o.sgd_momentum, trust_coefficient=o.lars_eta)


def compile_wanted(cfg: Config, device: torch.device) -> bool:
    """`optim.compile` resolved: "auto" = on for CUDA, off elsewhere (on the 2-core CPU machine the
    demo's compiled step was 5 % faster for a 40 s compile, more than its whole training;
    benchmarks/README.md, "GPU step")."""
    setting = cfg.optim.compile
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_model(cfg: Config, model: nn.Module, device: torch.device, **compile_kwargs: Any) -> bool:
    """`torch.compile` the method's forward in place (encoder, head and loss in one graph, where the
    method allows) when `compile_wanted`; returns whether it did.

    In place (`nn.Module.compile`): the state dict keeps its keys, checkpoints and registered
    encoders are unchanged, and a DDP wrapper made afterwards calls the compiled forward. The
    compile itself runs at the first step (`train_one_epoch` reports that step's time apart).
    `compile_kwargs` go to `torch.compile` (e.g. backend="eager" in a test).
    """
    if not compile_wanted(cfg, device):
        return False
    model.compile(**compile_kwargs)
    return True


def steps_per_epoch(cfg: Config, train_rows: int, world_size: int) -> int:
    """Optimiser steps per epoch: each worker gets rows // world (equal split), batches drop the rest.

    With the world size dividing the global batch B this is rows // B at any world size, so an
    elastic run resized between epochs keeps its per-step LR and momentum schedules.
    """
    from pipelines.stream import steps_per_epoch as stream_steps

    return max(1, stream_steps(train_rows, world_size, cfg.optim.batch_size // world_size))


class LRAndWeightDecaySchedule(torch.optim.lr_scheduler.LambdaLR):
    """The LR's `LambdaLR`, and with `weight_decay_end` the weight decay of the decayed group on a
    per-step cosine from its initial value to `weight_decay_end` (DINO's main_dino.py: 0.04 -> 0.4,
    `wd_schedule`). Its state is the step count alone, so a resumed run continues both schedules."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float], total_steps: int,
                 weight_decay_end: float | None) -> None:
        self.total_steps, self.weight_decay_end = total_steps, weight_decay_end
        self.weight_decay_start = [float(g["weight_decay"]) for g in optimizer.param_groups]
        super().__init__(optimizer, lr_lambda)

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        super().step(epoch)
        if self.weight_decay_end is None:
            return
        from methods.schedules import cosine_schedule

        for group, start in zip(self.optimizer.param_groups, self.weight_decay_start, strict=True):
            if start > 0:  # biases and norm weights stay at 0, as DINO's get_params_groups
                group["weight_decay"] = cosine_schedule(self.last_epoch, self.total_steps, start,
                                                        self.weight_decay_end)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up then cosine decay to 0 (SGDR, Loshchilov & Hutter 2017); with
    `optim.weight_decay_end`, the weight decay on a cosine to it as well (`LRAndWeightDecaySchedule`)."""
    from methods.schedules import warmup_cosine

    total = steps * cfg.optim.epochs
    warmup = int(round(steps * cfg.optim.warmup_epochs))
    return LRAndWeightDecaySchedule(
        optimizer, lambda step: warmup_cosine(step, max_steps=total, warmup_steps=warmup, base_value=1.0),
        total, cfg.optim.weight_decay_end)


# --- one epoch ----------------------------------------------------------------------------------

def seed_everything(seed: int, rank: int, epoch: int) -> int:
    """Seed torch, numpy and random from (seed, rank, epoch); returns the derived seed."""
    s = (seed * 1_000_003 + epoch * 9_176 + rank * 131) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(
        model, nn.parallel.DistributedDataParallel) else model


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing on CPU (bf16 on CPU is slower than fp32 here)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LambdaLR, batches: Iterable[tuple[torch.Tensor, ...]],
                    *, device: torch.device, first_step: int, total_steps: int,
                    max_steps: int | None = None, on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train over `batches` of (view1, view2[, local]); returns the mean loss/diagnostics, steps, images, seconds.

    Args:
        model: the method module, possibly DDP-wrapped; `forward(x1, x2) -> {"loss", ...}`, or
            `forward(x1, x2, local)` when the batches carry DINO's local crops.
        first_step: global step at the start of the epoch (for the momentum schedule's progress).
        total_steps: steps of the whole run.
        max_steps: stop after this many steps (keeps workers in lockstep if a shard runs long).
        on_step: called with the step index within the epoch after each optimiser step.

    A method's own steps are hooks it may define (none is method-specific here):
    `on_epoch_start(epoch)` (epochs done, `first_step // max_steps`), `before_optimizer_step()`
    (after backward: DINO's gradient clipping and last-layer freeze, SwAV's prototype freeze) and
    `update_momentum(progress)` (after the step: EMA targets).
    """
    module = unwrap(model)
    model.train()
    if hasattr(module, "on_epoch_start"):
        module.on_epoch_start(first_step // max_steps if max_steps else 0)
    channels_last = device.type == "cuda"
    # Running sums stay on the device: a float() per step would make the host wait for every step.
    sums: dict[str, torch.Tensor] = {}
    steps = images = 0
    first_step_seconds = 0.0
    start = time.perf_counter()
    for v1, v2, *local in batches:
        if max_steps is not None and steps >= max_steps:
            break
        v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
        local = [t.to(device, non_blocking=True) for t in local]
        if channels_last:
            v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            out = model(v1, v2, *local)
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hasattr(module, "before_optimizer_step"):
            module.before_optimizer_step()
        optimizer.step()
        scheduler.step()
        if hasattr(module, "update_momentum"):
            module.update_momentum(min(1.0, (first_step + steps + 1) / max(1, total_steps)))
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1:
                v = v.detach().reshape(()).float()
                sums[k] = sums[k] + v if k in sums else v
        steps += 1
        images += v1.shape[0]
        if steps == 1:  # the first step carries a compile (and cuDNN's autotuning): reported apart
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_step_seconds = time.perf_counter() - start
        if on_step is not None:
            on_step(steps)
    totals = torch.stack(list(sums.values())).tolist() if sums else []  # the epoch's one wait for the device
    seconds = time.perf_counter() - start
    result = {k: v / max(1, steps) for k, v in zip(sums, totals)}
    result.update(steps=float(steps), images=float(images), seconds=seconds, first_step_seconds=first_step_seconds)
    return result


# --- checkpoints --------------------------------------------------------------------------------

def save_state(path: Path, *, module: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LambdaLR, epoch: int, metrics: dict[str, float],
               seed: int, history: list[dict[str, float]] | None = None) -> None:
    """Write the checkpoint file (plain tensors and containers only: loads with weights_only=True).

    `history` holds every epoch's metrics so far (small), so that a resumed run can still log the
    epochs whose report the MLflow callback never saw.
    """
    torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "rng": {"seed": seed, "epoch": epoch, "torch": torch.get_rng_state()},
                "metrics": {k: float(v) for k, v in metrics.items()}, "history": history or []}, path)


def load_state(path: Path | Any) -> dict[str, Any]:
    """Read a checkpoint file (a path or a binary file object) with weights_only=True (no pickled code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `encoder.*` entries of a method's state dict, prefix removed."""
    return {k[len("encoder."):]: v for k, v in model_state.items() if k.startswith("encoder.")}


# --- batches ------------------------------------------------------------------------------------

class TrainBatches:
    """This worker's two-view batches, one epoch at a time, from either loader (`orchestrator.data`).

    memory: the decoded split from the object store, this rank's slice of the epoch's global
    permutation (`pipelines.memory`); stream: `shard()`, the worker's Ray Data `DataIterator`
    (`get_dataset_shard` in a Train worker, the whole dataset's iterator in a one-process trial).
    Views come from `TwoViewAugment` seeded per (run seed, rank, epoch), so a resumed epoch
    repeats the views of an uninterrupted one.
    """

    def __init__(self, cfg: Config, decoded: dict[str, Any] | None, device: torch.device, rank: int,
                 world: int, shard: Callable[[], Any] | None = None) -> None:
        self.cfg, self.device, self.rank, self.world, self.shard = cfg, device, rank, world, shard
        self.batch_size = cfg.optim.batch_size // world
        self.memory = None
        if decoded is not None:
            from pipelines.memory import MemoryBatches

            self.memory = MemoryBatches(decoded["train"], device)

    def epoch(self, epoch: int, epoch_seed: int) -> Iterable[tuple[torch.Tensor, ...]]:
        from pipelines.augment import TwoViewAugment

        cfg = self.cfg
        augment_on = "worker" if self.memory is not None else cfg.resolved_augment_on()
        # optim.compile also fuses the views on a GPU (pipelines.augment: one compiled graph per view)
        fuse = self.device.type == "cuda" and compile_wanted(cfg, self.device)
        augment = TwoViewAugment(cfg.augment_preset(), size=cfg.data.image_size, seed=epoch_seed,
                                 compile=fuse, **cfg.augment_kwargs()) if augment_on == "worker" else None
        if self.memory is not None:
            from pipelines.memory import epoch_indices

            indices = epoch_indices(self.memory.rows, self.world, self.rank, self.batch_size,
                                    seed=cfg.run.seed, epoch=epoch)
            return self.memory.epoch(indices, batch_size=self.batch_size, augment=augment)
        from pipelines.stream import iter_two_view_batches

        if self.shard is None:
            raise ValueError("TrainBatches: the stream loader needs shard (a DataIterator factory)")
        return iter_two_view_batches(self.shard(), batch_size=self.batch_size,
                                     augment=augment, device=self.device, augment_on=augment_on)
