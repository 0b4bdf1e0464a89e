"""raysweep's Python API: what the `raysweep` commands do, as functions that return their
results instead of exit codes.

    import raysweep
    run = raysweep.train(overrides={"train.epochs": 3}, workers=1, name="first")
    best = raysweep.tune("digits_cnn", trials=8, max_epochs=4)
    table = raysweep.results("runs/first")        # a pyarrow Table, best first

A request refused before anything ran raises ``ValueError`` (``ConfigError`` or
``DataError``, naming each field, value and fix) or ``ClusterError`` (the cluster cannot
do what was asked). Work that ran and failed is reported in what is returned
(``status``), as the commands report it in their exit code.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

from trainers.configtools import ConfigError, shown

__all__ = ["ConfigError", "export", "predict", "results", "serve", "train", "tune"]

Overrides = Mapping[str, Any] | Iterable[str]


def run_values(config: str | Path | Mapping | None, overrides: Overrides | None) -> dict:
    """The user's settings: a YAML file's or a dict's sections, then ``overrides`` given as
    ``{"optim.lr": 0.01}`` or as the CLI's ``["optim.lr=0.01"]``. Validated by the caller."""
    from trainers.config import load_run_values
    from trainers.configtools import merge, set_path

    if not (config is None or isinstance(config, (str, Path, Mapping))):
        raise ConfigError([f"config: {shown(config)} is neither a YAML file's path nor a mapping of settings"])
    if not (overrides is None or isinstance(overrides, Mapping) or (
            isinstance(overrides, (list, tuple)) and all(isinstance(o, str) for o in overrides))):
        raise ConfigError([f"overrides: {shown(overrides)} is neither a mapping such as {{'optim.lr': 0.01}} nor a "
                           "list of 'key=value' texts"])
    by_key = overrides if isinstance(overrides, Mapping) else {}
    texts = [] if isinstance(overrides, Mapping) else list(overrides or ())
    values = load_run_values(str(config) if isinstance(config, (str, Path)) else None, texts)
    if isinstance(config, Mapping):
        values = merge(copy.deepcopy(dict(config)), values)
    for key, value in by_key.items():
        set_path(values, str(key).split("."), value)
    return values


def _name(name: str | None, resume: bool, default: str) -> str:
    if resume and name is None:
        raise ConfigError(["resume: name the run to continue (name=...)"])
    return default if name is None else name  # "" is refused by the run's checks, not defaulted


def _tracking(mlflow: str | bool | None, tensorboard: str | bool | None):
    """``True``: MLflow's default store / TensorBoard beside the tables; a string: a tracking
    URI / a directory; ``None`` or ``False``: off (cluster.tracking)."""
    from cluster.tracking import TrackingOptions

    def option(value):
        return "" if value is True else None if value in (None, False) else str(value)

    return TrackingOptions(mlflow=option(mlflow), tensorboard=option(tensorboard))


def train(config: str | Path | Mapping | None = None, *, overrides: Overrides | None = None, workers: int = 2,
          cpus_per_worker: float = 1.0, gpu: bool = False, storage: str = "./runs", name: str | None = None,
          address: str | None = None, resume: bool = False, prices: Mapping[str, float] | str | None = None,
          mlflow: str | bool | None = None, tensorboard: str | bool | None = None, cv: int | None = None,
          cv_refit: bool = False) -> dict:
    """`raysweep train`: one data-parallel run. Returns its ``summary.json`` (``status``,
    test metrics, ``checkpoint`` URI, ``cpu_seconds``, ``gpu_seconds``, ``cost`` given
    ``prices`` such as ``{"gpu_hour": 1.2, "cpu_hour": 0.05}``, ...). ``mlflow``/``tensorboard``:
    ``True`` or a tracking URI / a directory, as ``--mlflow``/``--tensorboard``. ``cv=K``:
    stratified K-fold cross-validation instead (``--cv K``; the summary then has ``mean``
    and ``std`` per metric), with ``cv_refit=True`` the refit evaluated on the test split."""
    from cluster import train_cmd
    from cluster.cost import parse_prices
    from trainers.config import TrainRunConfig
    from trainers.distributed import Placement

    cfg = TrainRunConfig.from_dict(run_values(config, overrides))  # the placement: train_cmd.check_placement
    placement = Placement(workers=workers, use_gpu=gpu, cpus_per_worker=cpus_per_worker)
    req = train_cmd.TrainRequest(cfg, placement, storage, _name(name, resume, train_cmd.default_name(cfg)),
                                 address, resume=resume, prices=parse_prices(prices, "prices"),
                                 tracking=_tracking(mlflow, tensorboard))
    if cv is not None or cv_refit:
        from cluster import cv_cmd

        if cv is None:
            raise ConfigError(["cv_refit: refits after cross-validation; give cv=K too (e.g. cv=5)"])
        return cv_cmd.run_cv(req, cv, refit=cv_refit)
    return train_cmd.run(req)


def tune(space: str | Path, config: str | Path | Mapping | None = None, *, overrides: Overrides | None = None,
         workers_per_trial: int = 1, cpus_per_worker: float = 1.0, gpu: bool = False, gpus_per_worker: float = 1.0,
         storage: str = "./runs", name: str | None = None, address: str | None = None, resume: bool = False,
         prices: Mapping[str, float] | str | None = None, mlflow: str | bool | None = None,
         tensorboard: str | bool | None = None, **search: Any) -> dict:
    """`raysweep tune`: a search over ``space`` (a shipped space's name or a YAML file).
    ``search`` takes ``SearchConfig``'s fields: trials, max_epochs, searcher, scheduler,
    grace_period, reduction_factor, concurrent, seed, trial_max_failures, budget_gpu_hours,
    budget_cpu_hours, budget_cost (needs ``prices``), target (``"val_accuracy=0.95"``),
    time_budget_s, objectives (``"val_accuracy:max,params:min"``: a Pareto front, scheduler
    then none), cv (K: each trial's objective its K-fold mean, docs/tune.md), first_point
    (auto, default, none: which searchers start at the space's defaults); searcher is one of
    auto (the default), tpe, gp, qmc, random, nsga2. Returns
    ``best.json`` (``status``, the best trial's values, metrics and checkpoint, the search's
    ``cpu_seconds``, ``gpu_seconds``, ``cost`` and ``stop_reason``, why it ended; with objectives
    its ``front``). ``mlflow``
    and ``tensorboard`` as in ``train``: a parent run, a child run per trial."""
    import time

    from cluster import tune_cmd
    from cluster.cost import parse_prices
    from cluster.guard import safe_name_part
    from search_spaces.space import load_space
    from search_spaces.tuner import SearchConfig, default_scheduler
    from trainers.config import TrainRunConfig
    from trainers.distributed import Placement

    loaded = load_space(str(space))
    user = run_values(config, overrides)
    TrainRunConfig.from_dict(user)  # what the user set must be valid on its own
    known = set(SearchConfig.__dataclass_fields__) - {"placement"}
    if unknown := sorted(set(search) - known):
        raise ConfigError([f"tune: unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"])
    placement = Placement(workers=workers_per_trial, use_gpu=gpu, cpus_per_worker=cpus_per_worker,
                          gpus_per_worker=gpus_per_worker)
    if wrong := SearchConfig(placement=placement, **search).type_problems():  # before the lines below use them
        raise ConfigError(wrong)
    search.setdefault("scheduler", default_scheduler(search.get("objectives")))
    search.setdefault("grace_period", SearchConfig.grace_period)
    search["grace_period"] = min(search["grace_period"], search.get("max_epochs", SearchConfig.max_epochs))
    searched = SearchConfig(placement=placement, **search).validate()
    default = f"tune-{safe_name_part(loaded.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    req = tune_cmd.TuneRequest(loaded, user, searched, storage, _name(name, resume, default), address, resume=resume,
                               prices=parse_prices(prices, "prices"), tracking=_tracking(mlflow, tensorboard))
    return tune_cmd.run(req)


def predict(checkpoint: str, data: str, out: str | Path, **options: Any) -> dict:
    """`raysweep predict`: one Parquet row per input of ``data`` (``imagefolder:DIR``,
    ``parquet:PATH``, a named set such as ``digits``; local or URI) at ``out``. ``options``
    take the command's: batch_size, top_k, use_gpu, actors, cpus_per_actor, precision,
    address, unknown_classes, tta (default: the checkpoint's ``train.tta``). Returns the report (rows, errors, metrics when labelled)."""
    from cluster.predict_cmd import PredictRequest, run_predict

    req = PredictRequest(checkpoint, data, Path(out), **options)
    if problems := req.problems():
        raise ConfigError(problems)
    return run_predict(req)


def export(checkpoint: str, out: str | Path, format: str = "torchscript", tta: str | None = None) -> Path:
    """`raysweep export`: the checkpoint as one file plain PyTorch loads, with test-time
    augmentation ``tta`` inside (default: the checkpoint's ``train.tta``); returns its path."""
    from cluster.predict_cmd import EXPORT_FORMATS, load_checkpoint

    if format not in EXPORT_FORMATS:
        raise ConfigError([f"format: {format!r} is not one of {', '.join(sorted(EXPORT_FORMATS))}"])
    state, _, _ = load_checkpoint(checkpoint)
    return Path(EXPORT_FORMATS[format](state, Path(out), tta))


def serve(checkpoint: str | Path, *, trial: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          replicas: int = 1, autoscale: tuple[int, int] | None = None, gpu: bool = False, max_batch: int = 32,
          address: str | None = None, precision: str | None = None, tta: str | None = None, **options: Any):
    """`raysweep serve`: deploy ``checkpoint`` (found as ``predict`` finds it; ``trial``: that
    trial of a tune experiment) as the Ray Serve application ``raysweep`` and return once it
    answers. ``options``: max_body_bytes, top_k, cpus_per_replica, batch_wait_s
    (``cluster.serve_http.ServeOptions``). Returns ``Served``: ``url`` (POST images to
    ``url + "/predict"``), ``handle`` (Serve's ``DeploymentHandle``) and ``model`` (its id
    and origin). It keeps serving while this process's Ray runs; end it with
    ``ray.serve.delete("raysweep")`` (or ``ray.serve.shutdown()``)::

        served = raysweep.serve("runs/first", port=8000)
        requests.post(served.url + "/predict", data=open("digit.png", "rb").read()).json()["pred_class"]
    """
    import dataclasses

    from cluster.serve_app import deploy
    from cluster.serve_http import ServeOptions

    named = {"host", "port", "replicas", "autoscale", "gpu", "max_batch"}
    known = {f.name for f in dataclasses.fields(ServeOptions)} - named
    if unknown := sorted(set(options) - known):
        raise ConfigError([f"serve: unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"])
    opts = ServeOptions(host=host, port=port, replicas=replicas, autoscale=tuple(autoscale) if autoscale else None,
                        gpu=gpu, max_batch=max_batch, **options)
    return deploy(str(checkpoint), trial, opts, address, precision, tta)


def results(experiment: str | Path):
    """`raysweep results`: a search's trials or a run's epochs as a pyarrow Table, best first
    (a multi-objective search's Pareto front first)."""
    import pyarrow as pa

    from cluster.results_cmd import front_first, ranked, run_metric, split_experiment
    from cluster.store import ResultsStore
    from trainers.config import EARLY_STOP_METRICS

    store = ResultsStore(*split_experiment(str(experiment)))
    if (table := store.read_table("trials.parquet")) is not None:
        best = store.read_json("best.json") or {}
        metric, mode = best.get("metric", "val_accuracy"), best.get("mode", "max")
        key = f"best_{metric}" if f"best_{metric}" in table.column_names else metric
    elif (table := store.read_table("history.parquet")) is not None:
        key = run_metric(store.read_json("summary.json") or {})
        mode = EARLY_STOP_METRICS[key]
    else:
        raise FileNotFoundError(f"no trials.parquet or history.parquet under {store.uri}")
    return pa.Table.from_pylist(front_first(ranked(table, key, mode)), schema=table.schema)
