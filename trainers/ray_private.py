"""Ray Train's and Tune's private parts that raysweep uses, all here, each behind a gate.

Policy (docs/internals.md): raysweep runs on the supported Ray versions (setup.py) through
Ray's public API. A private part stays only where it earns its place (a side-by-side
benchmark in one run shows >= 3% of epoch time or >= 1 s per trial, or it fixes a bug the
public path has), and only on the exact Ray versions where its tests passed
(``PRIVATE_RAY_VERSIONS``); on any other Ray, or with ``RAYSWEEP_RAY_PRIVATE=0`` in the
environment of the process that starts Ray, ``enabled()`` is False and callers take the
public path (``ray.train.torch.TorchTrainer``, Ray's ``TuneReportCallback``).

Kept: ``LeanTorchTrainer`` for `raysweep train` (no placement-group cleaner, no Ray Data
actors for fits without a Ray Dataset, ``AdaptivePollController``: 17.8% less epoch time
than Ray's ``TorchTrainer`` side by side, docs/internals.md), ``forgive_deleted_checkpoints``
(a resumed search does not fail a trial over a checkpoint Tune already deleted) and
``autoscaler_max_resources``. Gone: the Tune trial that hosted Ray Train's controller in
its own thread (no gain measured; Tune trials use Ray's public ``TorchTrainer``).
"""

from __future__ import annotations

import logging
import os
import threading

import ray
import ray.train
import ray.train.torch

# Ray versions (major.minor) on which tests/test_train_ray.py, test_tune.py and
# test_connect.py passed with these parts on. Add one only after running them there.
PRIVATE_RAY_VERSIONS = ("2.60",)
ENV = "RAYSWEEP_RAY_PRIVATE"  # "0": the public path on every Ray (A/B runs, or a workaround)

try:  # the private layout of Ray 2.60; another Ray may lack or move any of these
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
    from ray.train._internal import checkpoint_manager
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.constants import (DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                                                   get_env_vars_to_propagate)
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
except ImportError:
    TrainController = FixedScalingPolicy = None

log = logging.getLogger(__name__)


def ray_minor(version: str | None = None) -> str:
    return ".".join((version or ray.__version__).split(".")[:2])


def enabled(version: str | None = None) -> bool:
    """Whether the private parts are on here: the imports worked, this Ray is one they were
    tested on, and the user did not turn them off."""
    return (os.environ.get(ENV, "1") != "0" and TrainController is not None
            and ray_minor(version) in PRIVATE_RAY_VERSIONS)


class LeanTorchTrainer(ray.train.torch.TorchTrainer):
    """A TorchTrainer that starts fewer processes per fit (each a process start and imports:
    seconds on a small machine). Only where ``enabled()``.

    - No Ray Data actor (DatasetManager) when it is given no Ray Dataset: ours travel as
      one object ref.
    - No placement-group cleaner actor: this trainer is for fits started from a driver
      (``raysweep train``), never inside a Tune trial (whose actor Tune may kill). The cleaner removes the workers' placement group
      if the controller dies without doing so; but that group lives only as long as the Ray
      job, and a driver whose controller died gets the error from ``fit()`` and ends its
      job. The cleaner is not free either: it asks Ray's state API (dashboard, GCS) about
      the controller every second, throughout training.
    - No AutoscalingCoordinator actor (Ray Data's broker of resources between Data and
      Train) when it is given no Ray Dataset: there is nothing to share resources with, and
      a workers' placement group that does not fit is still demand that Ray's autoscaler
      sees. Like every idle Python Ray process it cost ~0.8% of a core all through training.
    - The controller is an ``AdaptivePollController``: it polls its workers
      less often while their reports come slowly.
    """

    def _create_default_callbacks(self):
        unneeded = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unneeded)]

    def _initialize_and_run_controller(self, **controller_init_kwargs) -> ray.train.Result:
        if not self.datasets and type(controller_init_kwargs["scaling_policy"]) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = _FixedScalingWithoutCoordinator(self.scaling_config)
        return self._run_controller_actor(**controller_init_kwargs)

    def _run_controller_actor(self, **controller_init_kwargs) -> ray.train.Result:
        """Ray 2.60's ``DataParallelTrainer._initialize_and_run_controller``, with
        ``AdaptivePollController`` as the controller actor's class."""
        env_vars = get_env_vars_to_propagate()
        env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
        actor_class = ray.remote(  # on the driver's node, as Ray places its own
            num_cpus=0, label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
            runtime_env={"env_vars": env_vars})(AdaptivePollController)
        controller = actor_class.remote(**controller_init_kwargs)
        if threading.current_thread() is threading.main_thread():
            self._register_sigint_handler(controller)  # Ctrl-C aborts the run gracefully
        ray.get(controller.run.remote())
        return ray.get(controller.get_result.remote())


class AdaptivePollController(TrainController or object):
    """Ray's controller, polling its workers often only while their reports come often.

    A worker's report waits in a one-slot queue until the controller's next poll, and a
    second report blocks the worker until then; the end of a run is also seen at a poll. So
    a short interval keeps short epochs and short trials moving, but each poll wakes the
    controller and the worker's Ray threads: at 0.2 s, a sleeping 1-worker fit's controller
    and worker took 1.3% and 1.4% of a core vs 0.65% and 0.85% at Ray's 2 s (2026-11-30),
    which a 2-thread training step on 2 cores pays for in wall time.

    Here the interval is ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (f) until the first report
    (start-up, when the first epoch's length is unknown) and after every poll that brings a
    report; after each poll that brings none it grows 1.5x, up to 1 s. Each gap is then at
    most half the time since the last collected report plus f, so a report is collected
    before the next one is made (the worker never waits) for epochs longer than 2f, and the
    end of a run, which comes right after its last report, is seen within 1 s. A 9 s epoch
    costs ~12 polls instead of ~45: a 1-worker fit that slept and reported every 9 s
    took 0.83% and 0.92% of a core in its controller and worker, as at a fixed 2 s (0.75%,
    0.97%).
    """

    SLOWEST_S = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fastest_s = self._health_check_interval_s
        self._reported = False

    async def _poll_workers(self):
        status = await super()._poll_workers()
        if any(s.training_report is not None for s in status.worker_statuses.values()):
            self._reported = True
            self._health_check_interval_s = self._fastest_s
        elif self._reported:
            self._health_check_interval_s = min(1.5 * self._health_check_interval_s,
                                                max(self.SLOWEST_S, self._fastest_s))
        return status


class _FixedScalingWithoutCoordinator(FixedScalingPolicy or object):
    """Ray's fixed-size policy, minus its resource requests to the AutoscalingCoordinator
    (the actor is created by the first request)."""

    def _maybe_send_resource_request(self):
        pass

    def _send_resource_request(self):
        pass

    def _cancel_resource_request(self):
        pass


def autoscaler_max_resources() -> dict | None:
    """The most resources the autoscaler may bring, as the GCS holds them (what Ray Train
    itself checks a request against); None where this Ray has no such call (callers then
    read the cluster launcher's config)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except (ImportError, AttributeError):
        return None


def forgive_deleted_checkpoints() -> None:
    """After a crash, a resumed search starts from Tune's last experiment snapshot, which
    is up to 10 s old: a trial it resumes can list a checkpoint that Tune already deleted
    (num_to_keep) after the snapshot. Ray 2.60 then fails that trial when it deletes the
    checkpoint again. A checkpoint that is gone is deleted, so the driver's checkpoint
    manager is told to treat it so. Elsewhere (not ``enabled()``) Ray's behaviour stays:
    such a trial fails and Tune retries it (``--trial-retries``)."""
    if not enabled():
        return
    delete = checkpoint_manager._delete_fs_path
    if getattr(delete, "forgiving", False):
        return

    def delete_unless_gone(fs, fs_path):
        try:
            delete(fs=fs, fs_path=fs_path)
        except FileNotFoundError:
            pass

    delete_unless_gone.forgiving = True
    checkpoint_manager._delete_fs_path = delete_unless_gone
