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
import signal
import threading

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


def listen() -> threading.Event | None:
    """In a Ray Train worker's training thread: install the handler on the actor's main
    thread and return the notice to watch, or None (with a warning) where that fails."""
    import ray

    NOTICE.clear()
    try:
        ray.get(ray.get_runtime_context().current_actor.__ray_call__.remote(install))
    except Exception as e:  # noqa: BLE001 -- the run goes on, as Ray alone would run it
        log.warning("no preemption notice on this worker (SIGTERM ends it as a failure): %s", e)
        return None
    _ACTIVE.set()
    return NOTICE


def stand_down() -> None:
    """Training has ended in this process: SIGTERM is Ray's again."""
    _ACTIVE.clear()
