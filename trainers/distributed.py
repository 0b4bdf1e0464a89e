"""The thin Ray boundary: turn Ray's config dict into our config and call the plain loop.

``run_training`` builds one ``TorchTrainer`` (N data-parallel workers, DDP over gloo on CPU
or nccl on GPU); ``train_loop_per_worker`` is what each worker runs. Callbacks (the results
store) are handed down by the caller, so this package never imports ``cluster``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
from ray.train import (Checkpoint, CheckpointConfig, CheckpointUploadMode, FailureConfig, LoggingConfig, RunConfig,
                       ScalingConfig)
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.constants import (DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                                               get_env_vars_to_propagate)
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

from trainers import preemption
from trainers.checkpoints import load_state, save_state
from trainers.config import TrainRunConfig
from trainers.loop import StreamedInputs, WorkerContext, fit
from trainers.position import POSITION_KEY, PREEMPTED_KEY, is_position_report
from trainers.process_group import torch_config
from trainers.streaming import StreamPlan, build_datasets

# Fault drill: with "EPOCH:MARKER_FILE" in this variable of the launching process, rank 1
# (or 0 if alone) dies once, just before it reports EPOCH, so tests (and users) can check
# that a restarted run resumes from its last checkpoint. The marker makes it happen once.
FAULT_ENV = "RAYSWEEP_FAIL_ONCE_AT_EPOCH"


class RayTrainReporter:
    """Each epoch's metrics go to ``ray.train.report``; rank 0 attaches the checkpoint.
    So do positions inside an epoch (``trainers.position``), which the callbacks pass by."""

    saves_positions = True

    def __init__(self, rank: int, world_size: int, fault: str | None = None):
        self.rank, self.world_size = rank, world_size
        self.fault = _parse_fault(fault)

    def restore(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_state(directory)

    def report(self, metrics: dict, state: dict | None) -> None:
        if not is_position_report(metrics):
            self._maybe_fail(metrics["epoch"])
        if state is None:
            ray.train.report(metrics)
            return
        storage = ray.train.get_context().get_storage()
        if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            # Saved straight into the run directory. Ray's upload would copy it there from a
            # temporary one: a second write of the whole state (23 MB for fast_cifar with
            # lookahead), 60-120 ms an epoch on 2 busy cores, little on idle ones.
            name = storage.make_default_checkpoint_dir_name()
            directory = save_state(state, Path(storage.experiment_fs_path) / name).parent
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory), checkpoint_dir_name=name,
                             checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
            return
        with tempfile.TemporaryDirectory() as directory:  # cloud storage: Ray uploads it
            save_state(state, directory)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))

    def _maybe_fail(self, epoch: int) -> None:
        if self.fault is None:
            return
        fail_epoch, marker = self.fault
        if epoch == fail_epoch and self.rank == min(1, self.world_size - 1) and not marker.exists():
            marker.write_text("failed once\n")
            os._exit(1)


def _parse_fault(spec: str | None):
    if not spec:
        return None
    epoch, marker = spec.split(":", 1)
    return int(epoch), Path(marker)


def _quiet_report_log() -> None:
    """Ray Train 2.60 logs every report at INFO, whole metrics dict included, on a logger
    named by its file path (so LoggingConfig misses it); our callbacks already print a line
    per epoch."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. ``config``: ``{"run": TrainRunConfig dict, "data":
    ImageData or a ref to one, or a StreamPlan whose splits arrive as dataset shards}``."""
    _quiet_report_log()
    cfg = TrainRunConfig.from_dict(config["run"])
    data = config["data"]
    data = ray.get(data) if isinstance(data, ray.ObjectRef) else data
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    ctx = WorkerContext(rank=rank, world_size=world, device=ray.train.torch.get_device(),
                        wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
                        preemption=preemption.listen(config.get("sigterm_drill"), rank, world))
    inputs = None
    if isinstance(data, StreamPlan):
        inputs = StreamedInputs(data, ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"),
                                ctx, cfg)
    try:
        fit(cfg, data, ctx, RayTrainReporter(rank, world, config.get("fault")), inputs)
    finally:
        preemption.stand_down()


def times_fitting(have: float, need: float) -> int:
    """How many ``need``s fit in ``have``. Not ``have // need``: 1.0 // 0.1 is 9.0 in binary
    floating point (0.1 is a hair above a tenth), so the tolerance goes on the quotient."""
    return math.floor(have / need + 1e-9)


@dataclass(frozen=True)
class Placement:
    """How many workers, and what each one takes from the cluster."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # Ray's placement-group strategy for the workers: PACK (fewest nodes: the fastest
    # all-reduce) or SPREAD (one worker per node where possible: losing a node costs fewer
    # workers; also how tests show workers on different nodes).
    strategy: str = "PACK"

    def scaling_config(self) -> ScalingConfig:
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return ScalingConfig(num_workers=self.workers, use_gpu=self.use_gpu, resources_per_worker=resources,
                             placement_strategy=self.strategy)


# Ray Train 2.60 settings for our fits; a value already in the environment wins. Ray
# copies RAY_TRAIN_* variables from the process that calls fit() to its controller and
# workers, so they are set around each fit only (Tune trials that build their own
# TorchTrainer keep Ray's defaults).
RAY_TRAIN_ENV = {
    # The controller polls its workers every 2 s by default; a worker's report waits in
    # a one-slot queue for the next poll, and the end of a run is seen one poll late.
    # That cost up to 2 s per epoch and ~2 s per fit. AdaptivePollController polls every
    # 0.2 s while reports come quickly, and less often while they do not.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # Prometheus metrics callbacks on the controller and every worker: nothing reads them.
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


@contextlib.contextmanager
def ray_train_env():
    added = {k: v for k, v in RAY_TRAIN_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class LeanTorchTrainer(ray.train.torch.TorchTrainer):
    """A TorchTrainer that starts fewer processes per fit (each a process start and imports:
    seconds on a small machine). Uses Ray Train's private parts (pinned ray version).

    - No Ray Data actor (DatasetManager) when it is given no Ray Dataset: ours travel as
      one object ref.
    - No placement-group cleaner actor when the controller is an actor of its own, started
      from a driver (``raysweep train``). The cleaner removes the workers' placement group
      if the controller dies without doing so; but that group lives only as long as the Ray
      job, and a driver whose controller died gets the error from ``fit()`` and ends its
      job. The cleaner is not free either: it asks Ray's state API (dashboard, GCS) about
      the controller every second, throughout training.
    - No AutoscalingCoordinator actor (Ray Data's broker of resources between Data and
      Train) when it is given no Ray Dataset: there is nothing to share resources with, and
      a workers' placement group that does not fit is still demand that Ray's autoscaler
      sees. Like every idle Python Ray process it cost ~0.8% of a core all through training.
    - With ``host_controller``, Ray Train's own ``TrainController`` runs in this process
      (in the calling thread) instead of in an actor of its own. Only inside a Ray actor
      (a Tune trial): the workers are handed ``current_actor`` as their controller, and
      Ray's placement-group cleaner watches this actor, which is what dies when Tune ends
      a trial. Its callbacks then run in this thread, so a Tune trial can pass its reports
      to ``tune.report`` directly.
    - Either way the controller is an ``AdaptivePollController``: it polls its workers
      less often while their reports come slowly.
    """

    def __init__(self, *args, host_controller: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.host_controller = host_controller

    def _create_default_callbacks(self):
        unneeded = () if self.datasets else (DatasetsCallback,)
        if not self.host_controller:  # a Tune trial's actor can be killed: keep its cleaner
            unneeded += (PlacementGroupCleanerCallback,)
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unneeded)]

    def _initialize_and_run_controller(self, **controller_init_kwargs) -> ray.train.Result:
        if not self.datasets and type(controller_init_kwargs["scaling_policy"]) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = _FixedScalingWithoutCoordinator(self.scaling_config)
        if not self.host_controller:
            return self._run_controller_actor(**controller_init_kwargs)
        if ray.get_runtime_context().get_actor_id() is None:
            raise RuntimeError("host_controller=True needs to run inside a Ray actor (e.g. a Tune trial)")
        controller = AdaptivePollController(**controller_init_kwargs)
        try:
            asyncio.run(controller.run())
        except BaseException:  # e.g. SystemExit from tune.report: Tune is ending this trial
            _abort_workers(controller)
            raise
        return controller.get_result()

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


class AdaptivePollController(TrainController):
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


class _FixedScalingWithoutCoordinator(FixedScalingPolicy):
    """Ray's fixed-size policy, minus its resource requests to the AutoscalingCoordinator
    (the actor is created by the first request)."""

    def _maybe_send_resource_request(self):
        pass

    def _send_resource_request(self):
        pass

    def _cancel_resource_request(self):
        pass


def _abort_workers(controller: TrainController) -> None:
    """What ``TrainController.abort`` does, without ending the process it runs in (ours):
    stop the placement-group cleaner, then end the workers and give their resources back
    now, not when this actor dies."""
    controller._controller_callback_manager.invoke_best_effort("before_controller_abort")
    if (worker_group := controller.get_worker_group()) is not None:
        worker_group.abort()


def run_training(cfg: TrainRunConfig, data, placement: Placement, storage_path: str, name: str,
                 callbacks: list | None = None, host_controller: bool = False) -> ray.train.Result:
    """Fit one model with Ray Train. ``data`` is an ``ImageData``, an object ref to one, or a
    ``StreamPlan`` (its train and val splits then stream to the workers through Ray Data).

    Re-running with the same ``(storage_path, name)`` resumes from the last checkpoint.
    Raises ``ray.train.TrainingFailedError`` once the workers have failed more than
    ``cfg.train.max_failures`` times. ``host_controller``: see ``LeanTorchTrainer``.

    A fit that a SIGTERM stopped (``trainers.preemption``) ends on a position checkpoint;
    it is fitted again on the same name, so it resumes there, up to ``preemption.MAX_RESTARTS``
    times. Those stops are not failures: ``max_failures`` is left for real ones.
    """
    callbacks = [preemption.EpochReportsOnly(cb) for cb in callbacks or []]
    with ray_train_env():
        for restart in range(preemption.MAX_RESTARTS + 1):
            result = _trainer(cfg, data, placement, storage_path, name, callbacks, host_controller).fit()
            if not (result.metrics or {}).get(PREEMPTED_KEY):
                return result
            # Every rank stopped right after the step it checkpointed: no step is redone.
            print(f"raysweep: {name}: preempted (SIGTERM) in epoch {result.metrics['epoch']} after step "
                  f"{result.metrics[POSITION_KEY]}, checkpointed there; restarting from it "
                  f"({restart + 1}/{preemption.MAX_RESTARTS}); steps redone: 0", flush=True)
    raise ray.train.TrainingFailedError(f"{name}: preempted {preemption.MAX_RESTARTS + 1} times in one run; "
                                        "stopped (resume it later with --resume and the same name)")


def _trainer(cfg: TrainRunConfig, data, placement: Placement, storage_path: str, name: str, callbacks: list,
             host_controller: bool) -> LeanTorchTrainer:
    es = cfg.train.early_stopping
    return LeanTorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.to_dict(), "data": data, "fault": os.environ.get(FAULT_ENV),
                           "sigterm_drill": os.environ.get(preemption.DRILL_ENV)},
        scaling_config=placement.scaling_config(),
        datasets=build_datasets(data) if isinstance(data, StreamPlan) else None,
        torch_config=torch_config(),  # the process group stays on loopback when Ray is
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),  # our callbacks print the progress
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=es.metric, checkpoint_score_order=es.mode
            ),
        ),
        host_controller=host_controller,
    )


def best_checkpoint(result: ray.train.Result, metric: str, mode: str) -> Checkpoint | None:
    """The checkpoint with the best ``metric`` (Ray keeps it and the latest)."""
    scored = [(c, m) for c, m in (result.best_checkpoints or [])
              if m.get(metric) == m.get(metric) and not is_position_report(m)]  # positions: mid-epoch
    if not scored:
        return result.checkpoint
    pick = max if mode == "max" else min
    return pick(scored, key=lambda cm: cm[1][metric])[0]


# pyarrow filesystem type -> URI scheme, for paths kept for later (summary.json, best.json).
_SCHEMES = {"S3FileSystem": "s3", "GcsFileSystem": "gs", "AzureFileSystem": "abfs", "HadoopFileSystem": "hdfs"}


def checkpoint_uri(checkpoint: Checkpoint) -> str:
    """Where a checkpoint is, as a full URI on remote storage: Ray's ``Checkpoint.path`` is a
    path within its filesystem (``bucket/run/checkpoint_...``), which nothing can open later
    without the scheme."""
    scheme = _SCHEMES.get(type(checkpoint.filesystem).__name__)
    path = checkpoint.path
    return f"{scheme}://{path.lstrip('/')}" if scheme and "://" not in path else path
