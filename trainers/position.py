"""Checkpoints inside an epoch: when to take one (``StepGate``) and what it holds (its position).

A position is what an exact resume needs beyond the weights and optimiser: the epoch and
the steps done in it, each rank's RNG states (the epoch's shuffle and augmentation
generator after those steps, torch's global generator for dropout) and the epoch's metric
sums so far. The data order itself is not stored: each rank's permutation is drawn again
from the epoch's seed, then that rank's generator state is put back, so the resumed epoch
sees exactly the batches the first run had not reached yet.

Reports of positions carry ``POSITION_KEY`` (the step) so that the callbacks that build
``history.parquet`` and feed Tune pass them by (``is_position_report``); a report that
also carries ``PREEMPTED_KEY`` ends a fit that a SIGTERM stopped.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

POSITION_KEY = "position_step"
PREEMPTED_KEY = "preempted"
# A resumed fit's first report: the epoch its checkpoint ended, as reported then (its
# "report"), repeated because Ray may have kept the checkpoint while the process that was
# to record the report died (``RayTrainReporter.restore``). Rows keyed by epoch take it once.
RESTORED_KEY = "restored_report"


def is_position_report(metrics: dict) -> bool:
    return metrics.get(POSITION_KEY) is not None


def worst_score(mode: str) -> float:
    """A position's score for Ray's checkpoint ranking: never the best. Finite, because Ray
    keeps its ranking in a JSON snapshot that turns nan and inf into null (a resumed fit then
    failed multiplying None)."""
    return -sys.float_info.max if mode == "max" else sys.float_info.max


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class StepGate:
    """At each step boundary, whether to stop (a rank got SIGTERM) and whether to save a position.

    All ranks must agree: ``ray.train.report`` is a barrier. The flags are all-reduced (MAX),
    asynchronously: each boundary starts the reduction of its own flags and reads the one
    started a step earlier, which has long finished. A blocking all-reduce of 2 floats over
    gloo took 2.8 ms on this 2-core machine under load (mostly waking the other process),
    which is 10-30% of a small CPU step; started and read a step later it blocks on nothing.
    The cost is one step of delay: a notice seen at step s stops the run after step s+1.
    On a GPU the read is a host sync, so there the flags are read every ``GPU_EVERY`` steps.
    """

    GPU_EVERY = 16

    def __init__(self, every_minutes: float, notice: threading.Event | None, device: torch.device,
                 clock: Callable[[], float] = time.monotonic):
        self.every_s = every_minutes * 60
        self.notice, self.device, self.clock = notice, device, clock
        self.last = clock()
        self.every_steps = 1 if device.type == "cpu" else self.GPU_EVERY
        self.boundaries = 0
        self.pending: tuple | None = None

    @property
    def active(self) -> bool:
        return self.every_s > 0 or self.notice is not None

    def _local(self) -> torch.Tensor:
        due = self.every_s > 0 and self.clock() - self.last >= self.every_s
        preempted = self.notice is not None and self.notice.is_set()
        return torch.tensor([float(preempted), float(due)], device=self.device)

    def check(self) -> tuple[bool, bool]:
        """(stop as preempted, save a position): the same on every rank."""
        self.boundaries += 1
        if not self.active or self.boundaries % self.every_steps:
            return False, False
        flags = self._local()
        if _distributed():
            decided = self._collect()
            self.pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True), flags)
            flags = decided
        stop, due = bool(flags[0]), bool(flags[1])
        if stop or due:
            self.last = self.clock()
        return stop, due

    def _collect(self) -> torch.Tensor:
        if self.pending is None:
            return torch.zeros(2)
        work, flags = self.pending
        work.wait()
        self.pending = None
        return flags.cpu()

    def close(self) -> None:
        """Wait for the reduction still in flight (every rank started it)."""
        if self.pending is not None:
            self._collect()


def _rng_bytes(gen: torch.Generator, device: torch.device) -> torch.Tensor:
    states = [gen.get_state(), torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return torch.cat([s.view(torch.uint8) for s in states])


def _rng_from_bytes(raw: torch.Tensor, gen: torch.Generator, device: torch.device) -> None:
    sizes = [gen.get_state().numel(), torch.get_rng_state().numel()]
    if device.type == "cuda":
        sizes.append(torch.cuda.get_rng_state(device).numel())
    parts = raw.split(sizes)
    gen.set_state(parts[0].clone())
    torch.set_rng_state(parts[1].clone())
    if device.type == "cuda":
        torch.cuda.set_rng_state(parts[2].clone(), device)


def capture(epoch: int, step: int, gen: torch.Generator, stats, lr: float, rank: int,
            device: torch.device) -> dict | None:
    """The position after ``step`` steps of ``epoch``, on rank 0 (None elsewhere). Every
    rank calls it: the RNG states are gathered and the metric sums reduced (copies: each
    rank goes on with its own sums)."""
    rng = _rng_bytes(gen, device)
    sums = torch.stack([stats.loss_sum, stats.correct, torch.tensor(float(stats.count), device=stats.loss_sum.device,
                                                                     dtype=torch.float64), stats.penalty_sum])
    first_bad = stats.first_bad_step.clone()
    rngs = [rng]
    if _distributed():
        comm = rng.to(device)  # nccl moves device tensors only
        rngs = [torch.empty_like(comm) for _ in range(dist.get_world_size())]
        dist.all_gather(rngs, comm)
        rngs = [r.cpu() for r in rngs]
        sums = sums.clone()
        dist.all_reduce(sums)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)  # -1 unless some rank saw a bad step
    if rank != 0:
        return None
    return {"epoch": epoch, "step": step, "rng": rngs, "sums": sums.cpu(), "first_bad_step": int(first_bad),
            "seconds": stats.seconds, "lr": lr}


def resume_rng(position: dict, rank: int, gen: torch.Generator, device: torch.device) -> None:
    """Put this rank's RNG states back (after its epoch's permutation was drawn again)."""
    _rng_from_bytes(position["rng"][rank], gen, device)


def train_state(net, optimizer, scheduler, stopper, lookahead, fast, epoch: int, meta: dict) -> dict:
    """A checkpoint's state after ``epoch`` whole epochs. ``fast``: Lookahead's fast weights
    when the network holds the slow ones."""
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "early_stopping": stopper.state(), "epoch": epoch, "meta": meta}
    if lookahead is not None:
        state["lookahead"] = lookahead.state_dict(fast)
    return state


def is_restored_report(metrics: dict) -> bool:
    return bool(metrics.get(RESTORED_KEY))


def usable_position(position: dict | None, world: int) -> dict | None:
    """A position taken with another number of workers had other shards: its epoch restarts."""
    if position is not None and len(position["rng"]) != world:
        print(f"raysweep: the checkpoint's position (epoch {position['epoch']}, step {position['step']}) was taken "
              f"with {len(position['rng'])} workers, not {world}: epoch {position['epoch']} restarts", flush=True)
        return None
    return position
