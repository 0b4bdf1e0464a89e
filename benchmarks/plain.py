"""The yardstick: a plain, single-process PyTorch training loop written by hand.

Deliberately not ``trainers.loop``: uint8 images in memory, ``randperm``, batched
crop + flip, forward / backward / SGD step, and an evaluation pass per epoch; nothing else
(no metrics all-reduce, checkpoint or report). Shared with raysweep: the model builder
(with fast_cifar's whitening stem set from the same first training images), the optimizer's
parameter groups and schedule, and Lookahead, so both sides train the same network from
the same initial weights with the same updates. Also shared: raysweep's malloc setting
(``trainers.memory.keep_freed_memory``), so a comparison with raysweep measures Ray's cost
alone; the ``overhead`` benchmark measures what the setting itself is worth.

``Recipe`` holds the training recipe once; ``Recipe.from_config`` reads it from the raysweep
config it is to follow, and refuses what this loop does not implement.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainers.augment import alternating_flips
from trainers.config import ModelConfig, TrainRunConfig
from trainers.data import ImageData, Split
from trainers.memory import keep_freed_memory
from trainers.models import build_model
from trainers.tta import TTA


@dataclass(frozen=True)
class Recipe:
    """Nesterov SGD with a triangular or one-cycle rate, a larger rate for BatchNorm shifts,
    Lookahead, label smoothing, random crop of the zero-padded image and horizontal flip
    (at random, or alternating):
    the recipe of ``examples/cifar10_fast.yaml``."""

    model: str = "fast_cifar"
    batch_size: int = 1024
    lr: float = 1.5
    momentum: float = 0.85
    nesterov: bool = True
    weight_decay: float = 1.33e-3
    schedule: str = "triangle"
    warmup_epochs: float = 0.0
    norm_bias_lr_scale: float = 64.0
    lookahead_every: int = 5
    label_smoothing: float = 0.2
    crop_padding: int = 2
    flip: float = 0.5
    alternate_flip: bool = False
    fill: str = "zeros"
    precision: str = "fp32"  # fp32 | bf16
    channels_last: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: TrainRunConfig, precision: str) -> "Recipe":
        """The same recipe as a raysweep config (``precision`` resolved: fp32 or bf16).
        Refuses what this plain loop does not implement, rather than differ silently."""
        o, a = cfg.optim, cfg.augment
        unsupported = {
            "optim.name": (o.name, "momentum"), "optim.schedule": (o.schedule, ("onecycle", "triangle")),
            "optim.l1": (o.l1, 0.0), "loss.name": (cfg.loss.name, "cross_entropy"),
            "augment.rotation": (a.rotation, 0.0), "augment.shift": (a.shift, 0.0),
            "model.dropout": (cfg.model.dropout, 0.0), "model.width": (cfg.model.width, 1),
        }
        bad = [f"{k}={v!r} (the plain loop does {want!r})" for k, (v, want) in unsupported.items()
               if v != want and not (isinstance(want, tuple) and v in want)]
        if bad or precision not in ("fp32", "bf16"):
            raise ValueError(f"plain loop cannot follow: {', '.join(bad) or precision}")
        return cls(model=cfg.model.name, batch_size=cfg.train.batch_size, lr=o.lr, momentum=o.momentum,
                   nesterov=o.nesterov, weight_decay=o.weight_decay, schedule=o.schedule,
                   warmup_epochs=o.warmup_epochs, norm_bias_lr_scale=o.norm_bias_lr_scale,
                   lookahead_every=o.lookahead_every,
                   label_smoothing=cfg.loss.label_smoothing, crop_padding=a.crop_padding, flip=a.flip,
                   alternate_flip=a.alternate_flip, fill=a.fill,
                   precision=precision, channels_last=cfg.train.channels_last, seed=cfg.train.seed)

    def to_dict(self) -> dict:
        return asdict(self)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_config(overrides: list[str], example: str = "cifar10_fast") -> TrainRunConfig:
    """``examples/<example>.yaml`` with ``section.key=value`` overrides."""
    from trainers.config import load_run_config

    return load_run_config(str(EXAMPLES / f"{example}.yaml"), overrides)


def optim_config(recipe: Recipe):
    from trainers.config import OptimConfig

    return OptimConfig(name="momentum", lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                       weight_decay=recipe.weight_decay, schedule=recipe.schedule, warmup_epochs=recipe.warmup_epochs,
                       norm_bias_lr_scale=recipe.norm_bias_lr_scale, lookahead_every=recipe.lookahead_every)


def amp(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


@torch.no_grad()
def accuracy(net, prepare, fmt, split: Split, precision: str, tta: str = "none", batch_size: int = 1024) -> float:
    """Top-1 accuracy on ``split`` with test-time augmentation ``tta``: raysweep's own
    (``trainers.tta``), so both sides of a comparison get the same advantage."""
    net.eval()
    correct = 0
    for s in range(0, len(split), batch_size):
        x = prepare(split.x[s:s + batch_size]).contiguous(memory_format=fmt)
        with amp(precision):
            logits = TTA[tta](net, x)
        correct += int((logits.argmax(1) == split.y[s:s + batch_size]).sum())
    return correct / max(1, len(split))


def _pad(x: torch.Tensor, pad: int, fill: str) -> torch.Tensor:
    """Zero padding, or (``reflection``) the edge mirrored with the edge pixel repeated, as
    raysweep's grid_sample resample reads pixels outside the image."""
    if fill == "zeros":
        return F.pad(x, (pad,) * 4)
    x = torch.cat([x[..., :pad].flip(-1), x, x[..., -pad:].flip(-1)], -1)
    return torch.cat([x[..., :pad, :].flip(-2), x, x[..., -pad:, :].flip(-2)], -2)


def crop_flip(x: torch.Tensor, pad: int, flip: float, gen: torch.Generator, flips: torch.Tensor | None = None,
              fill: str = "zeros") -> torch.Tensor:
    """airbench-style: translate by up to ``pad`` pixels (``fill``: zeros or reflection), one
    masked copy per vertical then per horizontal offset; mirror with probability ``flip``,
    or where ``flips``."""
    n, _, h, w = x.shape
    if pad:
        padded = _pad(x, pad, fill)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = torch.empty_like(padded[:, :, :h, :])
        for s in range(2 * pad + 1):
            m = dy == s
            rows[m] = padded[m, :, s:s + h, :]
        out = torch.empty_like(x)
        for s in range(2 * pad + 1):
            m = dx == s
            out[m] = rows[m, :, :, s:s + w]
        x = out
    if flips is not None or flip > 0:
        m = flips if flips is not None else torch.rand(n, generator=gen) < flip
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


class Plain:
    """One model and its optimiser; ``epoch()`` trains one pass, ``evaluate()`` scores."""

    def __init__(self, data: ImageData, recipe: Recipe, epochs: int):
        self.recipe, self.data = recipe, data
        from trainers.loop import WHITENING_IMAGES
        from trainers.optim import Lookahead, build_optimizer

        keep_freed_memory()  # as raysweep's fit does
        torch.manual_seed(recipe.seed)  # raysweep seeds the same way: the same initial weights
        c, h, _ = data.shape
        self.fmt = torch.channels_last if recipe.channels_last and c > 1 else torch.contiguous_format
        self.mean = torch.tensor(data.mean).view(1, -1, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(data.std).view(1, -1, 1, 1) * 255)
        net = build_model(ModelConfig(name=recipe.model), c, h, data.num_classes)
        if hasattr(net, "init_from_data"):
            net.init_from_data(self.prepare(data.train.x[:WHITENING_IMAGES]))
        self.net = net.to(memory_format=self.fmt)
        steps_per_epoch = math.ceil(len(data.train) / recipe.batch_size)
        self.opt, self.schedule = build_optimizer(self.net, optim_config(recipe), steps_per_epoch, epochs)
        self.lookahead = (Lookahead(self.net, recipe.lookahead_every, steps_per_epoch * epochs)
                          if recipe.lookahead_every else None)
        self.epochs, self.epochs_left = epochs, epochs
        self.gen = torch.Generator().manual_seed(recipe.seed)
        self.first_batch_t: float | None = None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) * self.inv_std

    def epoch(self) -> float:
        """One training pass; returns its seconds."""
        r, train = self.recipe, self.data.train
        start = time.perf_counter()
        self.net.train()
        epoch = self.epochs - self.epochs_left + 1
        flips = alternating_flips(len(train), epoch, r.seed) if r.alternate_flip else None
        for idx in torch.randperm(len(train), generator=self.gen).split(r.batch_size):
            if self.first_batch_t is None:
                self.first_batch_t = time.time()
            # index_select as raysweep's loop does (x[idx] is ~20x slower on CPU): the same data work
            x = crop_flip(self.prepare(train.x.index_select(0, idx)), r.crop_padding, r.flip, self.gen,
                          None if flips is None else flips.index_select(0, idx), r.fill
                          ).contiguous(memory_format=self.fmt)
            y = train.y.index_select(0, idx)
            with amp(r.precision):
                logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=r.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.schedule.step()
            if self.lookahead is not None:
                self.lookahead.after_step()
        self.epochs_left -= 1
        if self.lookahead is not None and self.epochs_left == 0:
            self.lookahead.finish()
        return time.perf_counter() - start

    def evaluate(self, split: Split, tta: str = "none") -> float:
        return accuracy(self.net, self.prepare, self.fmt, split, self.recipe.precision, tta)


def run(data: ImageData, recipe: Recipe, epochs: int, eval_split: Split | None = None,
        stop_after: int | None = None) -> dict:
    """Train ``epochs`` epochs (or stop after ``stop_after`` of them, schedule unchanged),
    evaluating ``eval_split`` (default: validation) after each."""
    t0 = time.time()
    plain = Plain(data, recipe, epochs)
    split = eval_split if eval_split is not None else data.val
    rows = []
    for epoch in range(1, (stop_after or epochs) + 1):
        train_s = plain.epoch()
        start = time.perf_counter()
        acc = plain.evaluate(split)
        eval_s = time.perf_counter() - start
        rows.append({"epoch": epoch, "train_seconds": train_s, "eval_seconds": eval_s,
                     "epoch_seconds": train_s + eval_s, "accuracy": acc})
    return {"epochs": rows, "startup_seconds": plain.first_batch_t - t0, "plain": plain}
