"""`raysweep train`: one data-parallel training run, its tables, summary and curves."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import ray
import ray.train

from cluster.callbacks import TrainHistoryCallback
from cluster.connect import check_fits, connect
from cluster.cost import Prices, Reserved, describe, usage
from cluster.guard import check_run_target
from cluster.plots import training_curves
from cluster.store import ResultsStore
from cluster.tracking import Tracker, TrackingOptions, flatten, open_tracker, track_train_end
from trainers.checkpoints import evaluate_state, load_state
from trainers.config import TrainRunConfig
from trainers.configtools import ConfigError, clean_error
from trainers.configpaths import check_paths
from trainers.data import ImageData
from trainers.streaming import DECODE_CPUS, StreamPlan, build_dataset, load_for_training
from trainers.distributed import Placement, best_checkpoint, checkpoint_uri, run_training
from trainers.loop import STOP_DIVERGED, STOP_EARLY

# A single fit's embedded Ray starts without the dashboard (``cluster.connect.embedded_ray_options``).
EMBEDDED_DASHBOARD = False

COMPLETED, EARLY_STOPPED, DIVERGED, FAILED = "completed", "early_stopped", "diverged", "failed"


@dataclass(frozen=True)
class TrainRequest:
    cfg: TrainRunConfig
    placement: Placement
    storage: str
    name: str
    address: str | None = None
    resume: bool = False  # continue the run at <storage>/<name>; without it that name must be new
    prices: Prices | None = None  # fills summary.json's cost
    tracking: TrackingOptions = field(default_factory=TrackingOptions)  # MLflow / TensorBoard (cluster.tracking)


def default_name(cfg: TrainRunConfig, kind: str = "train") -> str:
    return f"{kind}-{cfg.model.name}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def status_from(metrics: dict) -> str:
    return {STOP_DIVERGED: DIVERGED, STOP_EARLY: EARLY_STOPPED}.get(metrics.get("stop_reason", ""), COMPLETED)


@ray.remote
def _evaluate_checkpoint(checkpoint: ray.train.Checkpoint, split, use_gpu: bool, confusion: bool = False) -> dict:
    """``split``: an in-memory ``Split``, or a streamed set's test Dataset (read here, in batches)."""
    device = "cuda" if use_gpu else "cpu"
    with checkpoint.as_directory() as directory:
        return evaluate_state(load_state(directory), split, device=device, prefix="test", confusion=confusion)


def evaluate_on_test(checkpoint: ray.train.Checkpoint, data_ref, use_gpu: bool, confusion: bool = False) -> dict:
    """The checkpoint's test metrics, computed in a Ray task (next to the data, on a GPU if asked);
    with ``confusion``, also ``test_confusion_matrix`` and ``test_classes`` (see evaluate_state)."""
    if isinstance(data_ref, StreamPlan):
        split = build_dataset(data_ref, "test")
    else:
        split = ray.get(data_ref).test if isinstance(data_ref, ray.ObjectRef) else data_ref.test
    task = _evaluate_checkpoint.options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    return ray.get(task.remote(checkpoint, split, use_gpu, confusion))


def check_placement(p: Placement, workers_flag: str = "--workers") -> None:
    """What the CLI's flags check, for callers of the Python API too: Ray took 0 CPUs per
    worker, and -1 crashed its raylet."""
    problems = []
    if not (isinstance(p.workers, int) and p.workers >= 1):
        problems.append(f"{workers_flag}: {p.workers!r} must be a whole number >= 1")
    if not (math.isfinite(p.cpus_per_worker) and p.cpus_per_worker > 0):
        problems.append(f"--cpus-per-worker: {p.cpus_per_worker!r} must be a finite number > 0, e.g. 1")
    if p.use_gpu and not (math.isfinite(p.gpus_per_worker) and 0 < p.gpus_per_worker <= 1):
        problems.append(f"--gpus-per-worker: {p.gpus_per_worker!r} must lie in (0, 1]")
    if problems:
        raise ConfigError(problems)


def run(req: TrainRequest, data: ImageData | None = None) -> dict:
    """Train, evaluate the best checkpoint on the test split, write the results; returns the summary."""
    check_placement(req.placement)
    check_paths([req.cfg])  # the files the config names: before Ray starts, like the rest
    store = check_run_target(req.storage, req.name, req.resume, "train")  # before Ray starts
    tracker = open_tracker(req.tracking, store.uri, store.local_path(""), req.name)
    data = data or load_for_training(req.cfg)  # before Ray starts: data errors come first
    streamed = isinstance(data, StreamPlan)
    connect(req.address, dashboard=EMBEDDED_DASHBOARD)
    check_fits(req.placement, reserve_cpus=DECODE_CPUS if streamed else 0.0)
    data_ref = data if streamed else ray.put(data)
    started = time.time()
    print(f"raysweep train: {req.name}: {req.cfg.model.name} on {req.cfg.data.name} ({_describe(data)}), "
          f"{req.placement.workers} worker(s){' on GPU' if req.placement.use_gpu else ''}; results in {store.uri}",
          flush=True)
    summary = {"name": req.name, "config": req.cfg.to_dict(), "workers": req.placement.workers}
    tracker.open("", req.name, flatten({**summary["config"], "placement": vars(req.placement)}),
                 {"raysweep.kind": "train"})
    try:
        result = run_training(req.cfg, data_ref, req.placement, store.storage, req.name,
                              callbacks=[TrainHistoryCallback(store.storage, req.name)])
    except ray.train.TrainingFailedError as e:
        summary.update(status=FAILED, error=f"{type(e).__name__}: {clean_error(str(e))}")
        _finish(store, summary, started, req, tracker)
        return summary
    history = store.read_table("history.parquet")
    last = store.read_json("progress.json") or {}  # Result.metrics is the last checkpoint's
    es = req.cfg.train.early_stopping
    summary.update(status=status_from(last), message=last.get("message", ""),
                   epochs_run=history.num_rows if history is not None else 0,
                   best_epoch=last.get("best_epoch"), resumed_from_epoch=last.get("resumed_from_epoch", 0))
    checkpoint = best_checkpoint(result, es.metric, es.mode)
    if checkpoint is not None and summary["status"] != DIVERGED:
        summary.update(evaluate_on_test(checkpoint, data_ref, req.placement.use_gpu))
        summary["checkpoint"] = checkpoint_uri(checkpoint)
    if history is not None and history.num_rows:
        store.write_bytes("curves.png", training_curves(history, title=req.name))
    _finish(store, summary, started, req, tracker)
    return summary


def _describe(data: ImageData | StreamPlan) -> str:
    if isinstance(data, StreamPlan):
        return (f"streaming ~{data.train_rows} train / ~{data.val_rows} val / ~{data.test_rows} test images "
                f"of {'x'.join(map(str, data.shape))} through Ray Data")
    return f"{len(data.train)} train / {len(data.val)} val / {len(data.test)} test images"


def _finish(store: ResultsStore, summary: dict, started: float, req: TrainRequest,
            tracker: Tracker | None = None) -> None:
    summary["wall_seconds"] = round(time.time() - started, 2)
    # What the workers reserved (Ray Train's controller takes no CPU) over the run's wall time.
    summary.update(usage(Reserved.of(req.placement), summary["wall_seconds"], req.prices))
    store.write_json("summary.json", summary)
    track_train_end(tracker, store, summary)
    print(format_summary(summary, store), flush=True)


def _tta_note(level: str) -> str:
    return "" if level == "none" else f"  (test-time augmentation {level})"


def format_summary(summary: dict, store: ResultsStore) -> str:
    lines = [f"status      {summary['status']}"
             + (f" after {summary.get('epochs_run')} epochs (best epoch {summary.get('best_epoch')})"
                if summary.get("epochs_run") else "")]
    if summary.get("message"):
        lines.append(f"message     {summary['message']}")
    if summary.get("error"):
        lines.append(f"error       {summary['error'][-2000:]}")
    if "test_accuracy" in summary:
        lines.append("test        " + "  ".join(
            f"{k.removeprefix('test_')} {summary[k]:.4f}"
            for k in ("test_accuracy", "test_precision", "test_recall", "test_f1"))
            + _tta_note(summary.get("config", {}).get("train", {}).get("tta", "none")))
    lines.append(f"used        {describe(summary)}")
    lines.append(f"results     {store.uri}/  (history.parquet, summary.json, curves.png, progress.json)")
    if summary.get("checkpoint"):
        lines.append(f"checkpoint  {summary['checkpoint']}")
    return "\n".join(lines)
