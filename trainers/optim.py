"""Optimizers and learning-rate schedules looked up by name."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainers.config import OptimConfig
from trainers.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULES: Registry = Registry("schedule")


def _trainable(model: nn.Module):
    return [p for p in model.parameters() if p.requires_grad]


@OPTIMIZERS.register("sgd")
def _sgd(model, cfg: OptimConfig):
    return torch.optim.SGD(_trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("momentum")
def _momentum(model, cfg: OptimConfig):
    return torch.optim.SGD(
        _trainable(model), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


@OPTIMIZERS.register("adagrad")
def _adagrad(model, cfg: OptimConfig):
    return torch.optim.Adagrad(_trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(model, cfg: OptimConfig):
    return torch.optim.Adam(_trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(model, cfg: OptimConfig):
    return torch.optim.AdamW(_trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)


# A schedule maps (step, total_steps, warmup_steps) to a multiplier of the base rate.
@SCHEDULES.register("constant")
def _constant(step: int, total: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


@SCHEDULES.register("cosine")
def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@SCHEDULES.register("onecycle")
def _onecycle(step: int, total: int, warmup: int) -> float:
    """Linear rise over the warm-up (30% of training if none is set), then linear fall to 0."""
    warmup = warmup or max(1, int(0.3 * total))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def build_optimizer(model: nn.Module, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
    """Returns (optimizer, LambdaLR scheduler stepped once per batch)."""
    optimizer = OPTIMIZERS[cfg.name](model, cfg)
    schedule = SCHEDULES[cfg.schedule]
    total, warmup = steps_per_epoch * epochs, int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, total, warmup))
    return optimizer, scheduler
