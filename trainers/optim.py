"""Optimizers and learning-rate schedules looked up by name."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainers.config import OptimConfig
from trainers.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULES: Registry = Registry("schedule")


def _trainable(model: nn.Module, cfg: OptimConfig):
    """Parameter groups: normalisation-layer biases first when ``norm_bias_lr_scale`` != 1,
    at ``lr * scale`` and ``weight_decay / scale`` (the same decay per step, as airbench
    does: BatchNorm shifts need a far larger rate than conv weights), then the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    scale = cfg.norm_bias_lr_scale
    if scale == 1:
        return params
    norm_biases = {id(m.bias) for m in model.modules()
                   if isinstance(m, NORM_LAYERS) and m.bias is not None and m.bias.requires_grad}
    rest = [p for p in params if id(p) not in norm_biases]
    biases = [p for p in params if id(p) in norm_biases]
    groups = [{"params": rest}]  # first: its rate is the one reported as ``lr``
    if biases:
        groups.append({"params": biases, "lr": cfg.lr * scale, "weight_decay": cfg.weight_decay / scale})
    return groups


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@OPTIMIZERS.register("sgd")
def _sgd(model, cfg: OptimConfig):
    return torch.optim.SGD(_trainable(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("momentum")
def _momentum(model, cfg: OptimConfig):
    return torch.optim.SGD(
        _trainable(model, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


@OPTIMIZERS.register("adagrad")
def _adagrad(model, cfg: OptimConfig):
    return torch.optim.Adagrad(_trainable(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(model, cfg: OptimConfig):
    return torch.optim.Adam(_trainable(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(model, cfg: OptimConfig):
    return torch.optim.AdamW(_trainable(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


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


@SCHEDULES.register("triangle")
def _triangle(step: int, total: int, warmup: int) -> float:
    """airbench's: linear rise from 0.2 to 1 over the warm-up (23% of training if none is
    set), then linear fall to 0.07 at the last step."""
    warmup = warmup or max(1, int(0.23 * total))
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return 1.0 - 0.93 * min(1.0, (step - warmup) / max(1, total - 1 - warmup))


class Lookahead:
    """Lookahead with a rising pull (airbench): every ``every`` steps the weights (and
    BatchNorm statistics) are averaged into a slow copy with decay ``0.95**5 * progress**3``
    and reset to it; ``finish()`` leaves the slow copy in the network. Early in training the
    decay is ~0, so it only starts to smooth once the rate falls."""

    def __init__(self, net: nn.Module, every: int, total_steps: int):
        self.net, self.every, self.total = net, every, max(1, total_steps)
        self.slow = {k: v.detach().clone() for k, v in self._floats().items()}
        self.step = 0

    def _floats(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.net.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def after_step(self) -> None:
        self.step += 1
        if self.step % self.every == 0:
            self._pull(0.95**5 * (self.step / self.total) ** 3)

    @torch.no_grad()
    def finish(self) -> None:
        self._pull(1.0)

    def _pull(self, decay: float) -> None:
        for key, fast in self._floats().items():
            slow = self.slow[key]
            slow.lerp_(fast, 1 - decay)
            fast.copy_(slow)

    @torch.no_grad()
    def show_slow(self) -> dict[str, torch.Tensor]:
        """Put the slow weights in the network (to evaluate and checkpoint them) and return a
        copy of the fast ones, which ``restore_fast`` puts back to go on training."""
        fast = {}
        for key, value in self._floats().items():
            fast[key] = value.clone()
            value.copy_(self.slow[key])
        return fast

    @torch.no_grad()
    def restore_fast(self, fast: dict[str, torch.Tensor]) -> None:
        for key, value in self._floats().items():
            value.copy_(fast[key])

    def state_dict(self, fast: dict[str, torch.Tensor] | None = None) -> dict:
        """``fast``: the fast weights when the network holds the slow ones (``show_slow``)."""
        return {"step": self.step, "slow": self.slow} | ({"fast": fast} if fast is not None else {})

    def load_state_dict(self, state: dict) -> None:
        """Also puts a checkpoint's fast weights back in the network: its ``model`` holds the
        slow ones, and training resumes from the fast."""
        self.step = state["step"]
        for key, value in state["slow"].items():
            self.slow[key].copy_(value)
        if "fast" in state:
            self.restore_fast(state["fast"])


def build_optimizer(model: nn.Module, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
    """Returns (optimizer, LambdaLR scheduler stepped once per batch)."""
    optimizer = OPTIMIZERS[cfg.name](model, cfg)
    schedule = SCHEDULES[cfg.schedule]
    total, warmup = steps_per_epoch * epochs, int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, total, warmup))
    return optimizer, scheduler
