"""The preemption notice: SIGTERM to a Ray Train worker becomes a flag the loop reads.

Kubernetes and the clouds announce a preemption with SIGTERM (then SIGKILL after the
grace period: ``terminationGracePeriodSeconds`` on Kubernetes). In a Ray worker process
Ray's own handler (``ray._private.worker.Worker.main_loop``) turns SIGTERM into
``SystemExit`` on the main thread: the worker dies and Ray Train counts a failure against
``max_failures``. Ray Train runs the training function in a thread of its own, where Python
cannot set signal handlers (only the main thread may), so ``listen`` asks the worker
actor's main thread to install ours, through the actor's ``__ray_call__`` (Ray's developer
API for running a function on an actor; Ray Train's worker is a synchronous actor, whose
calls run on the main thread between the controller's polls).

Ours only sets ``NOTICE`` while training runs; the loop (``trainers.position.StepGate``)
then checkpoints at the next step boundary that every rank agrees on and stops as
preempted. Outside training, and on a second SIGTERM, Ray's handler runs as before.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import ray.train

from trainers.position import is_position_report, is_restored_report

MAX_RESTARTS = 20  # fits again after SIGTERM stops, per run_training call (Ray's own preemption budget is unlimited)
# Preemption drill: with "STEP:MARKER_FILE" in this variable of the launching process, rank 1
# (or 0 if alone) sends itself SIGTERM once, at its STEP-th step boundary counted over the
# whole run, so tests (and users) can check that the run stops, restarts and loses nothing.
DRILL_ENV = "RAYSWEEP_SIGTERM_ONCE_AT_STEP"

NOTICE = threading.Event()  # set by SIGTERM while training runs
_ACTIVE = threading.Event()  # training runs in this process
_previous = None  # the handler ours replaced (Ray's)

log = logging.getLogger(__name__)


def _on_sigterm(signum, frame):
    if not _ACTIVE.is_set() or NOTICE.is_set():  # not training, or asked twice: Ray's way out
        if callable(_previous):
            _previous(signum, frame)
        raise SystemExit(128 + signum)
    NOTICE.set()
    print("raysweep: SIGTERM (preemption notice): checkpointing at the next step, then stopping", flush=True)


def install(_actor=None) -> bool:
    """On the main thread of this process: put ``_on_sigterm`` in front of the current
    SIGTERM handler (once). ``_actor``: the actor instance, passed by ``__ray_call__``."""
    global _previous
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        _previous = signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def listen(drill: str | None = None, rank: int = 0, world: int = 1) -> threading.Event | None:
    """In a Ray Train worker's training thread: install the handler on the actor's main
    thread and return the notice to watch, or None (with a warning) where that fails.
    ``drill``: see ``DRILL_ENV``."""
    NOTICE.clear()
    try:
        ray.get(ray.get_runtime_context().current_actor.__ray_call__.remote(install))
    except Exception as e:  # noqa: BLE001 -- the run goes on, as Ray alone would run it
        log.warning("no preemption notice on this worker (SIGTERM ends it as a failure): %s", e)
        return None
    _ACTIVE.set()
    if drill and rank == min(1, world - 1):
        step, marker = drill.split(":", 1)
        if not Path(marker).exists():
            return _Drill(int(step), Path(marker))
    return NOTICE


def stand_down() -> None:
    """Training has ended in this process: SIGTERM is Ray's again."""
    _ACTIVE.clear()


class _Drill:
    """``NOTICE``, read by ``StepGate`` once per step boundary; at the ``at``-th it sends this
    process a real SIGTERM (the handler sets ``NOTICE``), once per marker file."""

    def __init__(self, at: int, marker: Path):
        self.at, self.marker, self.boundaries = at, marker, 0

    def is_set(self) -> bool:
        self.boundaries += 1
        if self.boundaries == self.at and not self.marker.exists():
            self.marker.write_text("sent SIGTERM once\n")
            os.kill(os.getpid(), signal.SIGTERM)
        return NOTICE.is_set()


class EpochReportsOnly(ray.train.UserCallback):
    """A caller's callback, shown each epoch's report but not the positions inside epochs
    (``trainers.position``): ``history.parquet`` and Tune see each epoch once. The report a
    resumed fit repeats (``is_restored_report``) reaches only callbacks whose
    ``takes_restored_reports`` is true, as those that key their rows by epoch."""

    def __init__(self, callback: ray.train.UserCallback):
        self.callback = callback

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if is_position_report(metrics[0]):
            return
        if is_restored_report(metrics[0]) and not getattr(self.callback, "takes_restored_reports", False):
            return
        self.callback.after_report(run_context, metrics, checkpoint)

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.callback.after_exception(run_context, worker_exceptions)
