"""The thin Ray boundary: turn Ray's config dict into our config and call the plain loop.

``run_training`` builds one ``TorchTrainer`` (N data-parallel workers, DDP over gloo on CPU
or nccl on GPU); ``train_loop_per_worker`` is what each worker runs. Callbacks (the results
store) are handed down by the caller, so this package never imports ``cluster``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
from ray.train import (Checkpoint, CheckpointConfig, CheckpointUploadMode, FailureConfig, LoggingConfig, RunConfig,
                       ScalingConfig)

from trainers import preemption, ray_private
from trainers.checkpoints import load_state, save_state
from trainers.config import TrainRunConfig
from trainers.loop import StreamedInputs, WorkerContext, fit
from trainers.position import POSITION_KEY, PREEMPTED_KEY, RESTORED_KEY, is_position_report
from trainers.process_group import torch_config
from trainers.streaming import StreamPlan, build_datasets

# Fault drill: with "EPOCH:MARKER_FILE" in this variable of the launching process, rank 1
# (or 0 if alone) dies once, just before it reports EPOCH, so tests (and users) can check
# that a restarted run resumes from its last checkpoint. The marker makes it happen once.
FAULT_ENV = "RAYSWEEP_FAIL_ONCE_AT_EPOCH"
# Ray Train's controller collects a report when it next polls the workers: a worker that dies
# before that poll takes its last report with it, and the run resumes from the checkpoint
# before (seen once under load: a 0.2 s digits epoch, then the drill). The drill waits until
# the controller has recorded the previous epoch (progress.json, which its history callback
# writes after Ray registered the checkpoint), so it always tests the resume it names.
FAULT_WAIT_S = 60.0


class RayTrainReporter:
    """Each epoch's metrics go to ``ray.train.report``; rank 0 attaches the checkpoint.
    So do positions inside an epoch (``trainers.position``), which the callbacks pass by."""

    saves_positions = True

    def __init__(self, rank: int, world_size: int, fault: str | None = None):
        self.rank, self.world_size = rank, world_size
        self.fault = _parse_fault(fault)

    def restore(self) -> dict | None:
        """The checkpoint's state; an epoch's checkpoint also has its report sent again first,
        by every rank (Ray takes a report once all ranks made it). A worker's checkpoint is
        kept when its report reaches Ray's controller, before the callbacks that record the
        epoch see it: a driver killed between the two (seen on S3) resumed after an epoch
        that history.parquet never got."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        if "report" in state and state.get("position") is None:
            ray.train.report({**state["report"], RESTORED_KEY: True})
        return state

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
            _wait_until_recorded(epoch - 1)
            marker.write_text("failed once\n")
            os._exit(1)


def _wait_until_recorded(epoch: int) -> None:
    """The fault drill's wait (``FAULT_WAIT_S``); local storage only, where tests run it."""
    storage = ray.train.get_context().get_storage()
    if epoch < 1 or not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return
    progress = Path(storage.experiment_fs_path) / "progress.json"
    deadline = time.monotonic() + FAULT_WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(progress.read_text()).get("epoch", 0) >= epoch:
                return
        time.sleep(0.05)


def _parse_fault(spec: str | None):
    if not spec:
        return None
    epoch, marker = spec.split(":", 1)
    return int(epoch), Path(marker)


def _quiet_report_log() -> None:
    """Ray Train (2.58-2.60) logs every report at INFO, whole metrics dict included, on a
    logger named by its file path (so LoggingConfig misses it); our callbacks already print
    a line per epoch. Found among the loggers by name, not by importing a private module:
    on a Ray without such loggers this does nothing."""
    ray_dir = os.path.dirname(ray.__file__)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(ray_dir) and name.endswith(".py"):
            logging.getLogger(name).setLevel(logging.WARNING)


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


def ray_trainer(*args, in_trial: bool = False, **kwargs) -> ray.train.torch.TorchTrainer:
    """A ``TorchTrainer``: raysweep's leaner one for a fit of its own where its private Ray
    parts are on (``trainers.ray_private``), Ray's own otherwise and inside a Tune trial."""
    if ray_private.enabled() and not in_trial:
        return ray_private.LeanTorchTrainer(*args, **kwargs)
    return ray.train.torch.TorchTrainer(*args, **kwargs)


def run_training(cfg: TrainRunConfig, data, placement: Placement, storage_path: str, name: str,
                 callbacks: list | None = None, in_trial: bool = False) -> ray.train.Result:
    """Fit one model with Ray Train. ``data`` is an ``ImageData``, an object ref to one, or a
    ``StreamPlan`` (its train and val splits then stream to the workers through Ray Data).

    Re-running with the same ``(storage_path, name)`` resumes from the last checkpoint.
    Raises ``ray.train.TrainingFailedError`` once the workers have failed more than
    ``cfg.train.max_failures`` times. ``in_trial``: called inside a Tune trial (see ``ray_trainer``).

    A fit that a SIGTERM stopped (``trainers.preemption``) ends on a position checkpoint;
    it is fitted again on the same name, so it resumes there, up to ``preemption.MAX_RESTARTS``
    times. Those stops are not failures: ``max_failures`` is left for real ones.
    """
    callbacks = [preemption.EpochReportsOnly(cb) for cb in callbacks or []]
    with ray_train_env():
        for restart in range(preemption.MAX_RESTARTS + 1):
            result = _trainer(cfg, data, placement, storage_path, name, callbacks, in_trial).fit()
            if not (result.metrics or {}).get(PREEMPTED_KEY):
                return result
            # Every rank stopped right after the step it checkpointed: no step is redone.
            print(f"raysweep: {name}: preempted (SIGTERM) in epoch {result.metrics['epoch']} after step "
                  f"{result.metrics[POSITION_KEY]}, checkpointed there; restarting from it "
                  f"({restart + 1}/{preemption.MAX_RESTARTS}); steps redone: 0", flush=True)
    raise ray.train.TrainingFailedError(f"{name}: preempted {preemption.MAX_RESTARTS + 1} times in one run; "
                                        "stopped (resume it later with --resume and the same name)")


def _trainer(cfg: TrainRunConfig, data, placement: Placement, storage_path: str, name: str, callbacks: list,
             in_trial: bool):
    es = cfg.train.early_stopping
    return ray_trainer(
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
        in_trial=in_trial,
    )


def best_checkpoint(result: ray.train.Result, metric: str, mode: str) -> Checkpoint | None:
    """The checkpoint with the best ``metric`` (Ray keeps it and the latest)."""
    scored = [(c, m) for c, m in (result.best_checkpoints or [])
              if m.get(metric) == m.get(metric) and not is_position_report(m)]  # positions: mid-epoch
    if not scored:
        return result.checkpoint
    pick = max if mode == "max" else min
    return pick(scored, key=lambda cm: cm[1][metric])[0]


def _bucket_uri(scheme: str):
    return lambda fs, path: f"{scheme}://{path}"


def _abfs_uri(fs, path: str) -> str:
    """``abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/REST``, the form docs/cluster.md gives
    for --storage: pyarrow's path starts at the container and the account is not in it.
    pyarrow (26) has no public getter for the account; its pickled options (``__reduce__``,
    how the filesystem travels to Ray's workers) carry it. Only the account name and
    its DFS domain are used, never the key or token kept next to them. An account behind
    another endpoint (an emulator's ``host:port``) has no such URI: the path stays bare."""
    options = next((a for a in fs.__reduce__()[1] if isinstance(a, dict)), {})
    account, domain = options.get("account_name"), options.get("dfs_storage_authority") or ""
    if not account or not domain.startswith("."):
        return f"abfs://{path}"
    container, _, rest = path.partition("/")
    return f"abfs://{container}@{account}{domain}/{rest}"


# pyarrow filesystem type -> the URI of a path on it, for paths kept for later (summary.json, best.json).
_URIS = {"S3FileSystem": _bucket_uri("s3"), "GcsFileSystem": _bucket_uri("gs"), "AzureFileSystem": _abfs_uri,
         "HadoopFileSystem": _bucket_uri("hdfs")}


def checkpoint_uri(checkpoint: Checkpoint) -> str:
    """Where a checkpoint is, as a full URI on remote storage: Ray's ``Checkpoint.path`` is a
    path within its filesystem (``bucket/run/checkpoint_...``), which nothing can open later
    without the scheme (and, on Azure, the account)."""
    to_uri, path = _URIS.get(type(checkpoint.filesystem).__name__), checkpoint.path
    return to_uri(checkpoint.filesystem, path.lstrip("/")) if to_uri and "://" not in path else path
