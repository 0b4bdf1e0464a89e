"""The training loop, as plain functions that run with or without Ray.

``fit`` drives epochs on one worker (rank) and hands each epoch's metrics and, when due, a
checkpoint state to a ``Reporter``: Ray Train's report in a worker, Tune's in a one-worker
trial, a list in tests. Metrics cover every rank: sums and the confusion matrix are
all-reduced, so every rank sees the same numbers and takes the same decisions.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from trainers.augment import augment_batch
from trainers.config import TrainRunConfig
from trainers.data import ImageData
from trainers.inputs import Batch, MemoryInputs, StreamedInputs, split_batches  # noqa: F401 (their old home)
from trainers.losses import compute_loss, l1_penalty
from trainers.memory import keep_freed_memory
from trainers.metrics import all_reduce_min, all_reduce_sum, confusion_matrix, scores_from_confusion
from trainers.models import build_model
from trainers.optim import Lookahead, build_optimizer
from trainers.position import (POSITION_KEY, PREEMPTED_KEY, StepGate, capture, resume_rng, train_state,
                               usable_position, worst_score)
from trainers.preprocess import preprocess_meta

STOP_EARLY, STOP_DIVERGED = "early_stopped", "diverged"
NEVER = 2**62  # "no bad step" in a min-reduction


class Reporter(Protocol):
    def restore(self) -> dict | None:
        """The state of the last checkpoint, or None on a fresh start."""

    def report(self, metrics: dict, state: dict | None) -> None:
        """Called once per epoch by every rank; ``state`` (rank 0 only) is to be checkpointed
        within the call: its tensors are the live ones, which training changes after it."""


@dataclass
class ListReporter:
    """Keeps reports in memory: for tests and single-process use."""

    saves_positions = True  # takes mid-epoch checkpoints (trainers.position); Tune's reporter does not
    resume_from: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    states: list[dict] = field(default_factory=list)

    def restore(self):
        return self.resume_from

    def report(self, metrics, state):
        self.metrics.append(metrics)
        if state is not None:  # a copy: the live tensors keep training
            self.states.append(copy.deepcopy(state))


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m  # DDP under Ray Train
    preemption: threading.Event | None = None  # set on SIGTERM (trainers.preemption)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware has it natively, else fp32 (emulated bf16 is slow)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Normalizer(nn.Module):
    """uint8 ``(N, C, H, W)`` -> float, scaled to [0, 1] and standardised per channel."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("inv_std", 1 / (torch.tensor(std).view(1, -1, 1, 1) * 255))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on a fresh float copy: on CPU about 3x faster than one out-of-place
        # addcmul broadcasting (1, C, 1, 1) over the batch (0.16 vs 0.52 ms per 512 CIFAR images).
        return x.to(torch.float32, copy=True).mul_(self.inv_std).sub_(self.mean * self.inv_std)


@dataclass
class EpochStats:
    """One rank's sums over an epoch's steps so far (a resumed epoch starts from a position's)."""

    loss_sum: torch.Tensor  # the data loss alone, as evaluate() measures it on validation
    penalty_sum: torch.Tensor  # the L1 term added to it for the gradient
    correct: torch.Tensor  # on augmented training batches, as seen by the model
    count: int
    first_bad_step: torch.Tensor  # -1 while every loss is finite
    seconds: float = 0.0
    steps: int = 0

    @classmethod
    def start(cls, device: torch.device, position: dict | None = None, rank: int = 0) -> "EpochStats":
        """Zeros, or a position's sums (all ranks' together, so on rank 0 alone)."""
        zero = torch.zeros((), device=device, dtype=torch.float64)
        stats = cls(zero, zero.clone(), zero.clone(), 0, torch.full((), -1, device=device, dtype=torch.long))
        if position is not None:
            stats.steps, stats.seconds = position["step"], position["seconds"]
            if rank == 0:
                loss, correct, count, penalty = position["sums"].to(device).unbind()
                stats.loss_sum, stats.correct, stats.count, stats.penalty_sum = loss, correct, int(count), penalty
                stats.first_bad_step.fill_(position["first_bad_step"])
        return stats


@dataclass
class Model:
    """The network and what it needs to read raw images: saved together in checkpoints."""

    net: nn.Module
    normalize: Normalizer
    memory_format: torch.memory_format

    def prepare(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.normalize(x_uint8).contiguous(memory_format=self.memory_format)




def train_one_epoch(model: Model, batches: Iterable[Batch], cfg: TrainRunConfig, optimizer, scheduler,
                    gen: torch.Generator, precision: str, device: torch.device, scaler=None,
                    lookahead: Lookahead | None = None, stats: EpochStats | None = None,
                    at_boundary: Callable[[EpochStats], bool] | None = None) -> EpochStats:
    """One pass over this rank's batches: augment, forward, loss + L1, step. The stats keep
    the data loss and the L1 penalty apart, so ``train_loss`` and ``val_loss`` measure the same thing.
    ``stats``: the sums of a resumed epoch; ``at_boundary`` runs after each step, True stops the epoch."""
    stats = stats or EpochStats.start(device)
    start = time.perf_counter() - stats.seconds
    model.net.train()
    for images, y, flips in batches:
        # Augment in NCHW and only then go channels_last: grid_sample reads NCHW about 2x faster.
        x = augment_batch(model.normalize(images), cfg.augment, gen, flips)
        x = x.contiguous(memory_format=model.memory_format)
        with autocast_for(precision, device):
            logits = model.net(x)
            data_loss = compute_loss(logits, y, cfg.loss)
        loss = data_loss
        if cfg.optim.l1 > 0:
            penalty = cfg.optim.l1 * l1_penalty(model.net)
            loss = data_loss + penalty
            stats.penalty_sum += penalty.detach().double() * len(y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if lookahead is not None:
            lookahead.after_step()
        # Track divergence on the device: a host sync per step would stall GPUs.
        bad = ~torch.isfinite(loss.detach())
        first_bad = stats.first_bad_step
        stats.first_bad_step = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, stats.steps), first_bad)
        stats.loss_sum += data_loss.detach().double() * len(y)
        stats.correct += (logits.detach().argmax(1) == y).sum()
        stats.count += len(y)
        stats.steps += 1
        stats.seconds = time.perf_counter() - start
        if at_boundary is not None and at_boundary(stats):
            break
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def evaluate(model: Model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], cfg: TrainRunConfig,
             num_classes: int, precision: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (loss sum, confusion matrix) over ``batches``; all-reduce them to combine ranks."""
    net = getattr(model.net, "module", model.net)  # skip DDP's forward hooks when evaluating
    net.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    cm = torch.zeros(num_classes, num_classes, device=device, dtype=torch.long)
    for x, y in batches:
        with autocast_for(precision, device):
            logits = net(model.prepare(x))
        loss_sum += compute_loss(logits, y, cfg.loss).double() * len(y)
        cm += confusion_matrix(y, logits.argmax(1), num_classes)
    return loss_sum, cm


def reduce_validation(loss_sum: torch.Tensor, cm: torch.Tensor, prefix: str) -> dict[str, float]:
    all_reduce_sum(loss_sum)
    all_reduce_sum(cm)
    total = max(1, int(cm.sum()))
    scores = scores_from_confusion(cm)
    return {f"{prefix}_loss": float(loss_sum) / total, **{f"{prefix}_{k}": v for k, v in scores.items()}}


@dataclass
class EarlyStopper:
    metric: str
    mode: str
    patience: int
    min_delta: float
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; True when it is the best so far."""
        sign = 1 if self.mode == "max" else -1
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}


WHITENING_IMAGES = 5000  # enough for a stable 2x2-patch covariance (airbench's figure)


def build_worker_model(cfg: TrainRunConfig, data, device: torch.device) -> Model:
    """The network on ``device``; one that learns a first layer from the data (fast_cifar's
    whitening stem) sees the first training images (a streamed set's sample), the same on
    every rank. ``data``: an ``ImageData`` or a ``streaming.StreamPlan``."""
    channels, height, _ = data.shape
    net = build_model(cfg.model, channels, height, data.num_classes)
    normalize = Normalizer(data.mean, data.std)
    if hasattr(net, "init_from_data"):
        first = data.train.x if isinstance(data, ImageData) else data.sample
        net.init_from_data(normalize(first[:WHITENING_IMAGES]))
    fmt = torch.channels_last if cfg.train.channels_last and channels > 1 else torch.contiguous_format
    return Model(net.to(device, memory_format=fmt), normalize.to(device), fmt)


PROGRESS_SECONDS = 60.0


def with_progress(batches: Iterable[Batch], epoch: int, steps: int,
                  every_s: float = PROGRESS_SECONDS) -> Iterator[Batch]:
    """The batches, with a line every ``every_s`` seconds inside a long epoch (a streamed
    epoch can take hours; the epoch's own line comes only at its end). ``steps`` is this
    rank's expected count, approximate for a streamed set."""
    start = last = time.perf_counter()
    images = 0
    for step, batch in enumerate(batches, 1):
        yield batch
        images += len(batch[1])
        if (now := time.perf_counter()) - last >= every_s:
            last = now
            print(f"epoch {epoch:3d}  step {step}/~{steps} ({min(step / max(steps, 1), 1):.0%})  "
                  f"{images / (now - start):.0f} img/s on this worker", flush=True)


def checkpoint_meta(cfg: TrainRunConfig, data) -> dict:
    """What a checkpoint needs beyond weights to read raw images and name classes."""
    return {"config": cfg.to_dict(), "classes": list(data.classes), "mean": list(data.mean),
            "std": list(data.std), "image_shape": list(data.shape),
            "preprocess": preprocess_meta(cfg.data.resize_hw, data.shape[0])}


def fit(cfg: TrainRunConfig, data, ctx: WorkerContext, reporter: Reporter, inputs=None) -> dict:
    """Train for ``cfg.train.epochs`` (or until stopped); returns the last epoch's metrics.

    ``data`` is an ``ImageData`` (this rank's shard is taken from it) or, for a streamed
    set, the ``StreamPlan`` with ``inputs`` (``StreamedInputs``) holding this rank's shards.
    """
    keep_freed_memory()  # every step re-allocates its activations: reuse pages, don't fault in new ones
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    device, world = ctx.device, ctx.world_size
    model = build_worker_model(cfg, data, device)
    model.net = ctx.wrap_model(model.net)
    inputs = inputs or MemoryInputs(data, ctx, cfg)
    local_batch = max(1, cfg.train.batch_size // world)
    steps = math.ceil(inputs.rows / local_batch)
    optimizer, scheduler = build_optimizer(model.net, cfg.optim, steps, cfg.train.epochs)
    plain_net = getattr(model.net, "module", model.net)  # without DDP's wrapper
    every = cfg.optim.lookahead_every
    lookahead = Lookahead(plain_net, every, steps * cfg.train.epochs) if every else None
    precision = resolve_precision(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    es = cfg.train.early_stopping
    stopper = EarlyStopper(es.metric, es.mode, es.patience, es.min_delta)
    first_epoch, position = 1, None
    if (state := reporter.restore()) is not None:
        plain_net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if lookahead is not None and "lookahead" in state:
            lookahead.load_state_dict(state["lookahead"])
        scheduler.load_state_dict(state["scheduler"])
        stopper = EarlyStopper(es.metric, es.mode, es.patience, es.min_delta, **state["early_stopping"])
        first_epoch = state["epoch"] + 1  # a position's epoch is the one it is inside
        position = usable_position(state.get("position"), world)
    meta = checkpoint_meta(cfg, data)
    positions = getattr(reporter, "saves_positions", False)
    gate = StepGate(cfg.train.checkpoint_every_minutes if positions else 0.0,
                    ctx.preemption if positions else None, device)
    metrics: dict = {}
    for epoch in range(first_epoch, cfg.train.epochs + 1):
        gen = torch.Generator(device).manual_seed(cfg.train.seed * 100_003 + epoch * 1009 + ctx.rank)
        resume, position = position, None
        lr = resume["lr"] if resume else optimizer.param_groups[0]["lr"]  # at the epoch's first step
        batches = inputs.train_batches(epoch, local_batch, gen, skip=resume["step"] if resume else 0,
                                       after_order=(lambda: resume_rng(resume, ctx.rank, gen, device)) if resume else None)
        if ctx.rank == 0:
            batches = with_progress(batches, epoch, steps)
        stopped_at: list[int] = []

        def at_boundary(stats: EpochStats) -> bool:
            stop, due = gate.check()
            if stop or due:  # every rank: the position's collectives and report are barriers
                pos = capture(epoch, stats.steps, gen, stats, lr, ctx.rank, device)
                state = None if pos is None else train_state(plain_net, optimizer, scheduler, stopper, lookahead,
                                                             None, epoch - 1, meta) | {"position": pos}
                reporter.report({"epoch": epoch, POSITION_KEY: stats.steps, PREEMPTED_KEY: stop,
                                 es.metric: worst_score(es.mode)}, state)
            if stop:
                stopped_at.append(stats.steps)
            return stop

        stats = train_one_epoch(model, batches, cfg, optimizer, scheduler, gen, precision, device, scaler, lookahead,
                                EpochStats.start(device, resume, ctx.rank), at_boundary if gate.active else None)
        if stopped_at:  # preempted: the fit ends here, and the caller starts it again from the position
            gate.close()
            return {"epoch": epoch, POSITION_KEY: stopped_at[0], PREEMPTED_KEY: True}
        # Every epoch is evaluated, early-stopped on and checkpointed with the slow weights,
        # not only the scheduled last: a run stopped early (ASHA, patience, a cut) ends on
        # them too. Training goes on from the fast weights (put back after the report), so a
        # full run trains as before, and a checkpoint keeps them for an exact resume.
        fast = lookahead.show_slow() if lookahead is not None else None
        eval_start = time.perf_counter()
        val_metrics = reduce_validation(*evaluate(model, inputs.val_batches(), cfg, data.num_classes, precision,
                                                  device), prefix="val")
        count = torch.tensor(float(stats.count), device=device, dtype=torch.float64)
        sums = all_reduce_sum(torch.stack([stats.loss_sum, stats.correct, count, stats.penalty_sum]))
        first_bad = all_reduce_min(torch.where(stats.first_bad_step >= 0, stats.first_bad_step, NEVER))
        metrics = {
            "epoch": epoch,
            "train_loss": float(sums[0] / sums[2]),  # the data loss, comparable with val_loss
            "train_penalty": float(sums[3] / sums[2]),  # l1 * sum|w|, what the optimiser adds to it
            "train_accuracy": float(sums[1] / sums[2]),
            **val_metrics,
            "lr": lr,
            "epoch_seconds": stats.seconds + time.perf_counter() - eval_start,
            "images_per_second": float(sums[2]) / max(stats.seconds, 1e-9),
            "stop_reason": "",
            "message": "",
            "resumed_from_epoch": first_epoch - 1,  # > 0 after a restart from a checkpoint
        }
        if int(first_bad) != NEVER:  # some rank saw a non-finite loss
            metrics.update(stop_reason=STOP_DIVERGED, message=(
                f"loss became non-finite in epoch {epoch} at step {int(first_bad)} (learning rate {lr:.3g}); "
                "lower optim.lr or add warm-up"))
            reporter.report(metrics, None)
            gate.close()
            return metrics
        is_best = stopper.update(metrics[es.metric], epoch)
        metrics["best_epoch"] = stopper.best_epoch
        last = epoch == cfg.train.epochs or stopper.should_stop
        if stopper.should_stop:
            metrics.update(stop_reason=STOP_EARLY, message=f"no {es.metric} gain for {es.patience} epochs")
        due = last or is_best or epoch % cfg.train.checkpoint_every == 0
        state = None
        if due and ctx.rank == 0:
            # With the epoch's report, which a resume from it repeats (RayTrainReporter.restore).
            state = train_state(plain_net, optimizer, scheduler, stopper, lookahead, fast, epoch, meta) | {
                "report": dict(metrics)}
        reporter.report(metrics, state)
        if fast is not None:
            lookahead.restore_fast(fast)
        if stopper.should_stop:
            break
    gate.close()
    return metrics

