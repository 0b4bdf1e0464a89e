"""Experiment tracking: MLflow runs and TensorBoard event directories, written on the driver.

A search is one MLflow parent run with one nested child run per trial (the child carries
the ``mlflow.parentRunId`` tag); a ``train`` is one run. Each run holds the resolved config
(flattened) as params, every epoch's metrics at step = epoch, the tags ``raysweep.status``,
``raysweep.trial_id`` and ``raysweep.version``, the checkpoint's URI as the tag
``raysweep.checkpoint`` (a link, not a copy), and ``summary.json`` and curves as artifacts.
TensorBoard gets one event directory per trial (or per train run) with the same metrics
and the hparams.

The Parquet tables are the record. A tracker that fails (a tracking server down, a full
disk) warns once, is dropped, and the run goes on. Both backends are optional extras:
``raysweep[mlflow]``, ``raysweep[tensorboard]``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from trainers.configtools import ConfigError

# A run's metrics as the Parquet tables name them (cluster.tables.EPOCH_FIELDS, less "epoch").
EPOCH_METRICS = ("train_loss", "train_penalty", "train_accuracy", "val_loss", "val_accuracy", "val_precision",
                 "val_recall", "val_f1", "lr", "epoch_seconds", "images_per_second")
GOOD = ("completed", "early_stopped", "budget_stopped")  # MLflow FINISHED; any other status is FAILED
# A tracking server that is down must cost seconds, not MLflow's default of 7 retries with
# exponential backoff (minutes). A user's own setting of these wins.
MLFLOW_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MLFLOW_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call


@dataclass(frozen=True)
class TrackingOptions:
    """``mlflow``: None is off, "" MLflow's default store, else a tracking URI.
    ``tensorboard``: None is off, "" ``<experiment>/tensorboard``, else a local directory."""

    mlflow: str | None = None
    tensorboard: str | None = None

    def problems(self, storage: str) -> list[str]:
        """Missing extras and a TensorBoard directory that cannot be local, found before Ray starts."""
        out = []
        for flag, value, module, extra in (("--mlflow", self.mlflow, "mlflow", "mlflow"),
                                           ("--tensorboard", self.tensorboard, "tensorboardX", "tensorboard")):
            if value is not None and importlib.util.find_spec(module) is None:
                out.append(f"{flag}: needs the {module} package, which is not installed; "
                           f"pip install 'raysweep[{extra}]'")
        if self.tensorboard == "" and "://" in storage and not storage.startswith("file://"):
            out.append(f"--tensorboard: the results go to {storage}, and event files are written locally; "
                       "name a local directory: --tensorboard DIR")
        if self.tensorboard and "://" in self.tensorboard:
            out.append(f"--tensorboard: {self.tensorboard!r} is a URI; name a local directory")
        return out


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``; lists stay values."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def epoch_metrics(result: dict) -> dict[str, float]:
    """The numbers of one epoch's report that the tables keep."""
    return {k: float(result[k]) for k in EPOCH_METRICS
            if isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool)}


def raysweep_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raysweep")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown"


class MlflowSink:
    """Runs in one MLflow experiment (``$MLFLOW_EXPERIMENT_NAME``, else "raysweep")."""

    name = "MLflow"

    def __init__(self, uri: str):
        for key, value in MLFLOW_HTTP_BOUNDS.items():
            os.environ.setdefault(key, value)
        import mlflow

        self.client = mlflow.MlflowClient(uri or None)  # None: $MLFLOW_TRACKING_URI, else MLflow's default
        self.where = self.client.tracking_uri
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "raysweep")
        found = self.client.get_experiment_by_name(experiment)  # the first request: a server down fails here
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.runs: dict[str, str] = {}

    def open(self, key: str, name: str, params: dict, tags: dict, parent: str | None) -> None:
        from mlflow.entities import Param

        tags = {**tags, **({"mlflow.parentRunId": self.runs[parent]} if parent is not None else {})}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self.runs[key] = run_id
        items = [Param(k, _text(v, 6000)) for k, v in params.items()]
        for i in range(0, len(items), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MLFLOW_PARAMS_PER_BATCH])

    def epoch(self, key: str, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.runs[key], metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, key: str, status: str, tags: dict, summary: dict, files: dict[str, bytes]) -> None:
        run_id = self.runs.pop(key)
        for k, v in tags.items():
            self.client.set_tag(run_id, k, _text(v, 5000))
        with tempfile.TemporaryDirectory() as tmp:
            for relative, data in files.items():
                Path(tmp, relative).write_bytes(data)
            if files:
                self.client.log_artifacts(run_id, tmp)
        self.client.set_terminated(run_id, "FINISHED" if status in GOOD else "FAILED")


class TensorBoardSink:
    """One event directory per run: ``<root>/<key>`` (``<root>`` itself for the key "")."""

    name = "TensorBoard"

    def __init__(self, root: str):
        import tensorboardX  # noqa: F401  (the missing extra shows here, not at the first epoch)

        self.where = root
        self.params: dict[str, dict] = {}
        self.writers: dict = {}
        self.parents: set[str] = set()

    def _writer(self, key: str):
        if key not in self.writers:
            from tensorboardX import SummaryWriter

            self.writers[key] = SummaryWriter(logdir=os.path.join(self.where, key) if key else self.where)
        return self.writers[key]

    def open(self, key: str, name: str, params: dict, tags: dict, parent: str | None) -> None:
        self.params[key] = params
        if parent is not None:
            self.parents.add(parent)

    def epoch(self, key: str, metrics: dict, step: int) -> None:
        writer = self._writer(key)
        for k, v in metrics.items():
            writer.add_scalar(k, v, step)

    def close(self, key: str, status: str, tags: dict, summary: dict, files: dict[str, bytes]) -> None:
        """The hparams of a run that trained; a search's parent has none (its trials do)."""
        params = self.params.pop(key, {})
        if key in self.parents:
            return
        from tensorboardX.summary import hparams

        writer = self._writer(key)
        scores = {f"hparam/{k}": float(v) for k, v in summary.items()
                  if k.startswith(("best_", "final_", "test_")) and isinstance(v, (int, float))
                  and not isinstance(v, bool) and math.isfinite(v)}
        values = {k: v if isinstance(v, (bool, int, float, str)) else _text(v, 500) for k, v in params.items()}
        values["status"] = status
        for event in hparams(values, scores):  # in the run's own directory, beside its curves
            writer.file_writer.add_summary(event)
        for k, v in scores.items():
            writer.add_scalar(k, v)
        writer.close()
        del self.writers[key]


class Tracker:
    """The sinks of one experiment. A sink that raises warns once and is dropped: tracking
    never stops a run whose tables are its record."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)
        self.open_keys: set[str] = set()
        self.closed: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # noqa: BLE001  any failure of a tracker: warned, never fatal
                self.sinks.remove(sink)
                warn(sink.name, sink.where, e)

    def open(self, key: str, name: str, params: dict, tags: dict, parent: str | None = None) -> None:
        if key in self.open_keys:  # a resumed trial starts again: its run is already open
            return
        self.open_keys.add(key)
        self._each("open", key, name, params, {"raysweep.version": raysweep_version(), **tags}, parent)

    def epoch(self, key: str, metrics: dict, step: int) -> None:
        if key in self.open_keys and metrics:
            self._each("epoch", key, metrics, step)

    def close(self, key: str, status: str, summary: dict, files: dict[str, bytes] | None = None,
              checkpoint: str | None = None) -> None:
        if key not in self.open_keys:
            return
        self.open_keys.discard(key)
        self.closed.add(key)
        tags = {"raysweep.status": status, **({"raysweep.checkpoint": checkpoint} if checkpoint else {})}
        self._each("close", key, status, tags, summary, files or {})


def warn(backend: str, where: str, error: BaseException) -> None:
    reason = str(error).strip().splitlines()[-1][:600] if str(error).strip() else ""
    print(f"raysweep: warning: {backend} logging to {where} stopped ({type(error).__name__}: {reason}); "
          "the run goes on and its results are in the Parquet tables", file=sys.stderr, flush=True)


SINKS = {"mlflow": MlflowSink, "tensorboard": TensorBoardSink}


def open_tracker(options: TrackingOptions, experiment_uri: str, local_dir: str | None, name: str) -> Tracker:
    """The sinks ``options`` asks for. ``local_dir``: the experiment's directory when the
    results are local (a default TensorBoard root beside the tables)."""
    if problems := options.problems(experiment_uri):
        raise ConfigError(problems)
    where = {"mlflow": options.mlflow,
             "tensorboard": None if options.tensorboard is None else
             os.path.join(options.tensorboard, name) if options.tensorboard else
             os.path.join(local_dir or experiment_uri.removeprefix("file://"), "tensorboard")}
    sinks = []
    for kind, target in where.items():
        if target is None:
            continue
        try:
            sinks.append(SINKS[kind](target))
        except Exception as e:  # noqa: BLE001  e.g. the tracking server is down: warned, the run goes on
            warn(SINKS[kind].name, target or "MLflow's default store", e)
    return Tracker(sinks)


class SearchTracking(tune.Callback):
    """Feeds the tracker from Tune's events on the driver: a child run per trial, its
    epochs as they arrive. Listed after ``SearchResultsCallback``, whose row of a trial
    gives its final status. Tune pickles callbacks into its experiment state: the live
    tracker stays out, so a resumed search's callback does nothing and
    ``track_search_end`` logs what it missed from the tables."""

    def __init__(self, tracker: Tracker, results, space, base: dict):
        self.tracker, self.results, self.space, self.base = tracker, results, space, base

    def __getstate__(self):
        return {}

    def on_trial_start(self, iteration, trials, trial, **info):
        if getattr(self, "tracker", None):
            self.tracker.open(trial.trial_id, trial.trial_id, trial_params(self.space, self.base, trial.config),
                              {"raysweep.trial_id": trial.trial_id, "raysweep.status": "running"}, parent="")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if getattr(self, "tracker", None) and "epoch" in result:
            self.tracker.epoch(trial.trial_id, epoch_metrics(result), int(result["epoch"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial.trial_id)

    def _close(self, trial_id: str) -> None:
        if getattr(self, "tracker", None) and (row := self.results.row_of(trial_id)):
            self.tracker.close(trial_id, row["status"], row, {"summary.json": _json(row)}, row.get("checkpoint"))


def trial_params(space, base: dict, point: dict) -> dict:
    """A trial's resolved config, flattened; its sampled values alone if they do not resolve."""
    try:
        return flatten(space.trial_config(base, point).to_dict())
    except ConfigError:
        return flatten(dict(point))


def search_params(space, base: dict, search) -> dict:
    """The parent run's params: the config every trial starts from, and how the search runs."""
    settings = {k: v for k, v in vars(search).items() if k != "placement"}
    return {**trial_params(space, base, space.default_point()), "search.space": space.name,
            **{f"search.{k}": v for k, v in settings.items()},
            **{f"search.placement.{k}": v for k, v in vars(search.placement).items()}}


def track_search_end(tracker: Tracker, store, space, base: dict, best: dict) -> None:
    """Closes every trial's run from ``trials.parquet`` (a budget-stopped trial ends without a
    Tune event; a resumed search's trials are logged here whole), then the parent."""
    if not tracker:
        return
    from cluster.tune_results import param_column

    trials, epochs = store.read_table("trials.parquet"), store.read_table("epochs.parquet")
    by_trial: dict[str, list] = {}
    for row in epochs.to_pylist() if epochs is not None else []:
        by_trial.setdefault(row["trial_id"], []).append(row)
    for row in trials.to_pylist() if trials is not None else []:
        tid = row["trial_id"]
        if tid not in tracker.open_keys and tid not in tracker.closed:
            point = {d.key: row[param_column(d.key)] for d in space.dimensions if row.get(param_column(d.key)) is not None}
            tracker.open(tid, tid, trial_params(space, base, point),
                         {"raysweep.trial_id": tid, "raysweep.logged_from": "tables"}, parent="")
            for e in sorted(by_trial.get(tid, []), key=lambda e: e["epoch"]):
                tracker.epoch(tid, epoch_metrics(e), int(e["epoch"]))
        tracker.close(tid, row["status"], row, {"summary.json": _json(row)}, row.get("checkpoint"))
    files = {"summary.json": _json(best)}
    for png in ("optimisation_history.png", "learning_curves.png", "importance.png"):
        if (data := _read(store, png)) is not None:
            files[png] = data
    tracker.close("", "completed" if best.get("status") == "ok" else "failed", best, files, best.get("checkpoint"))


def track_train_end(tracker: Tracker | None, store, summary: dict) -> None:
    """A train run's epochs from ``history.parquet`` (Ray Train's callbacks run in its
    controller, not on the driver, so the driver logs them when the run ends), then its end."""
    if not tracker:
        return
    history = store.read_table("history.parquet")
    for row in history.to_pylist() if history is not None else []:
        tracker.epoch("", epoch_metrics(row), int(row["epoch"]))
    files = {"summary.json": _json(summary)}
    if (curves := _read(store, "curves.png")) is not None:
        files["curves.png"] = curves
    tracker.close("", summary["status"], summary, files, summary.get("checkpoint"))


def _read(store, relative: str) -> bytes | None:
    if not store.exists(relative):
        return None
    with store.fs.open_input_stream(store.path(relative)) as f:
        return f.read()


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def _text(value, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:limit]
