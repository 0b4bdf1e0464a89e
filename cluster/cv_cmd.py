"""`raysweep train --cv K`: stratified K-fold cross-validation, each fold a Ray Train run.

Layout under ``<storage>/<name>/``: ``fold-<i>/`` (each fold's own run: checkpoints,
history.parquet, progress.json, fold.json once it has finished), ``refit/`` with
``--cv-refit``, and the run's tables: ``cv.parquet`` (one row per fold), ``history.parquet``
(every fold's epochs, with a ``fold`` column) and ``summary.json`` (mean and std per metric).

Folds run at once as far as the cluster fits them: each in a driver thread calling
``run_training`` under its own name (Ray Train's ``fit()`` blocks its thread; the fits are
independent runs with their own controller and workers). A resumed run (``--resume``)
re-makes the same folds (``search_spaces.cv`` is a pure function of seed and labels) and
skips each fold whose ``fold.json`` says it finished.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pyarrow as pa
import ray
import ray.train

from cluster.callbacks import TrainHistoryCallback
from cluster.connect import capacity, check_fits, connect
from cluster.cost import Reserved, describe, total, usage
from cluster.guard import check_run_target
from cluster.store import ResultsStore
from cluster.tables import CV_HISTORY_SCHEMA, rows_to_table
from cluster.train_cmd import (COMPLETED, EARLY_STOPPED, EMBEDDED_DASHBOARD, FAILED, TrainRequest, check_placement,
                               evaluate_on_test, status_from)
from search_spaces.cv import check_cv_data, cv_problems, fold_data, pool, refit_data
from trainers.configpaths import check_paths
from trainers.configtools import ConfigError, clean_error
from trainers.data import ImageData
from trainers.distributed import (Placement, best_checkpoint, checkpoint_uri, ray_train_env, run_training,
                                  times_fitting)
from trainers.streaming import StreamPlan, load_for_training

FINISHED = (COMPLETED, EARLY_STOPPED)
# The per-epoch metrics a fold's row carries, at its best epoch and at its last one.
FOLD_METRICS = ("train_loss", "train_penalty", "train_accuracy", "val_loss", "val_accuracy", "val_precision",
                "val_recall", "val_f1")


def check_cv_request(req: TrainRequest, folds: int) -> None:
    """What can be refused without the data, before anything is read or started."""
    problems = cv_problems(folds, [])
    if req.tracking.mlflow is not None or req.tracking.tensorboard is not None:
        problems.append("--mlflow/--tensorboard: not available with --cv yet; drop them, or train without --cv")
    if problems:
        raise ConfigError(problems)


def cv_data(data: ImageData | StreamPlan, folds: int, seed: int) -> list[ImageData]:
    """Each fold's data; a streamed set is refused: its val split is a fixed band of its
    files (``trainers.streaming.plan_stream``), not images that can be dealt into folds."""
    check_cv_data(data, folds)  # shared with tune --cv
    return fold_data(data, folds, seed)


def keep_fold_plan(store: ResultsStore, req: TrainRequest, folds: int) -> None:
    """Record what the folds are made of (``cv.json``); a resume must make the same folds, or
    the finished ones it skips would belong to another split."""
    plan = {"folds": folds, "data_seed": req.cfg.data.seed, "data": req.cfg.to_dict()["data"]}
    plan = json.loads(json.dumps(plan))  # as read back: tuples become lists
    before = store.read_json("cv.json")
    if before is None and req.resume and store.exists("summary.json"):
        raise ConfigError([f"--cv: {store.uri} is a run without --cv; resume it without --cv, or choose a new --name"])
    if before is not None and before != plan:
        raise ConfigError([f"--cv {folds}: {store.uri} was cross-validated with --cv {before['folds']}, data.seed "
                           f"{before['data_seed']} and its own data settings; resume it with those, or choose a new "
                           "--name"])
    store.write_json("cv.json", plan)


def folds_at_once(placement: Placement, folds: int) -> int:
    """How many folds the cluster runs side by side (each takes one placement's workers)."""
    have = capacity()
    fit = times_fitting(have.get("CPU", 0.0), placement.workers * placement.cpus_per_worker)
    if placement.use_gpu:
        fit = min(fit, times_fitting(have.get("GPU", 0.0), placement.workers * placement.gpus_per_worker))
    return max(1, min(folds, fit))


def run_cv(req: TrainRequest, folds: int, refit: bool = False, data: ImageData | None = None) -> dict:
    """Cross-validate; with ``refit``, train on all training images for the folds' mean best
    epoch count and evaluate that model on the test split. Returns the summary."""
    check_placement(req.placement)
    check_cv_request(req, folds)
    check_paths([req.cfg])
    store = check_run_target(req.storage, req.name, req.resume, "train")
    data = data or load_for_training(req.cfg)
    per_fold = cv_data(data, folds, req.cfg.data.seed)  # before Ray starts: data errors come first
    keep_fold_plan(store, req, folds)
    connect(req.address, dashboard=EMBEDDED_DASHBOARD)
    check_fits(req.placement)
    parallel = folds_at_once(req.placement, folds)
    print(f"raysweep train: {req.name}: {folds}-fold cross-validation of {req.cfg.model.name} on "
          f"{req.cfg.data.name} ({len(pool(data))} training images, {len(data.test)} test untouched), "
          f"{parallel} fold(s) at a time x {req.placement.workers} worker(s); results in {store.uri}", flush=True)
    started = time.time()
    with ray_train_env(), ThreadPoolExecutor(parallel) as threads:  # env set once: threads share os.environ
        rows = list(threads.map(lambda i: _fold(req, store, i, per_fold[i - 1]), range(1, folds + 1)))
    summary = {"name": req.name, "config": req.cfg.to_dict(), "workers": req.placement.workers, "cv_folds": folds,
               "folds_at_once": parallel, "status": COMPLETED if all(r["status"] in FINISHED for r in rows) else FAILED}
    _write_tables(store, rows)
    summary.update(mean_std(rows))
    if refit and summary["status"] == COMPLETED:
        summary["refit"] = _refit(req, store, data, summary["mean"]["best_epoch"])
        if summary["refit"]["status"] not in FINISHED:
            summary["status"] = FAILED
        summary.update({k: v for k, v in summary["refit"].items() if k.startswith("test_")})
    summary["wall_seconds"] = round(time.time() - started, 2)
    spent = [r for r in rows + [summary.get("refit") or {}] if r.get("cpu_seconds") is not None]
    summary.update(total(spent))  # each fold's and the refit's reserved time
    store.write_json("summary.json", summary)
    print(format_cv(summary, rows, store), flush=True)
    return summary


def _fold(req: TrainRequest, store: ResultsStore, fold: int, data: ImageData) -> dict:
    name = f"fold-{fold}"
    fold_store = ResultsStore(store.uri, name)
    done = fold_store.read_json("fold.json")
    if done and done.get("status") in FINISHED:  # a resumed run keeps what it finished
        print(f"fold {fold}: finished before ({done['status']}); skipped", flush=True)
        return done
    started = time.time()
    callback = TrainHistoryCallback(store.uri, name, prefix=f"fold {fold}  ")
    base = {"fold": fold, "train_images": len(data.train), "val_images": len(data.val)}
    try:
        result = run_training(req.cfg, ray.put(data), req.placement, store.uri, name, callbacks=[callback])
    except ray.train.TrainingFailedError as e:
        return {**base, "status": FAILED, "error": f"{type(e).__name__}: {clean_error(str(e))}",
                **_usage(req, started)}
    history = fold_store.read_table("history.parquet")
    es = req.cfg.train.early_stopping
    row = {**base, "status": status_from(fold_store.read_json("progress.json") or {}),
           **fold_metrics(history.to_pylist() if history is not None else [], es.metric, es.mode)}
    if (checkpoint := best_checkpoint(result, es.metric, es.mode)) is not None:
        row["checkpoint"] = checkpoint_uri(checkpoint)
    row.update(_usage(req, started))
    fold_store.write_json("fold.json", row)
    return row


def _usage(req: TrainRequest, started: float) -> dict:
    return usage(Reserved.of(req.placement), round(time.time() - started, 2), req.prices)


def fold_metrics(history: list[dict], metric: str, mode: str) -> dict:
    """A fold's row from its epochs: the number run, the best epoch by ``metric`` (the one its
    checkpoint was picked by) and ``best_<m>``/``final_<m>`` of every metric."""
    if not history:
        return {"epochs_run": 0}
    pick = max if mode == "max" else min
    best = pick(history, key=lambda r: r[metric])  # the first of equals, as the checkpoint
    return {"epochs_run": len(history), "best_epoch": int(best["epoch"]),
            **{f"best_{m}": best.get(m) for m in FOLD_METRICS}, **{f"final_{m}": history[-1].get(m) for m in FOLD_METRICS}}


def mean_std(rows: list[dict]) -> dict:
    """``mean`` and ``std`` (sample std, n-1) of every numeric fold column over the folds that
    finished; ``std`` is None with fewer than two."""
    ok = [r for r in rows if r.get("status") in FINISHED]
    keys = [k for k in ok[0] if k != "fold" and isinstance(ok[0][k], (int, float)) and not isinstance(ok[0][k], bool)] \
        if ok else []
    values = {k: [r[k] for r in ok if isinstance(r.get(k), (int, float))] for k in keys}
    return {"mean": {k: statistics.fmean(v) for k, v in values.items() if v},
            "std": {k: statistics.stdev(v) if len(v) > 1 else None for k, v in values.items() if v}}


def _write_tables(store: ResultsStore, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every fold's keys, failed ones too
    store.write_table("cv.parquet", pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]))
    epochs = []
    for r in rows:
        history = ResultsStore(store.uri, f"fold-{r['fold']}").read_table("history.parquet")
        epochs += [{**e, "fold": r["fold"]} for e in (history.to_pylist() if history is not None else [])]
    store.write_table("history.parquet", rows_to_table(epochs, CV_HISTORY_SCHEMA))


def _refit(req: TrainRequest, store: ResultsStore, data: ImageData, mean_best_epoch: float) -> dict:
    """One model on every training image for the folds' mean best epoch count (no early
    stopping: there is no held-out val), its last checkpoint evaluated on the test split."""
    refit_store = ResultsStore(store.uri, "refit")
    if (done := refit_store.read_json("refit.json")) and done.get("status") in FINISHED:
        return done
    epochs = max(1, round(mean_best_epoch))
    train = replace(req.cfg.train, epochs=epochs, early_stopping=replace(req.cfg.train.early_stopping, patience=0))
    cfg = replace(req.cfg, train=train)
    started, ref = time.time(), ray.put(refit_data(data))
    print(f"refit: {epochs} epoch(s) on all {len(pool(data))} training images", flush=True)
    try:
        with ray_train_env():
            result = run_training(cfg, ref, req.placement, store.uri, "refit",
                                  callbacks=[TrainHistoryCallback(store.uri, "refit", prefix="refit   ")])
    except ray.train.TrainingFailedError as e:
        return {"status": FAILED, "epochs": epochs, "error": f"{type(e).__name__}: {clean_error(str(e))}"}
    out = {"status": status_from(refit_store.read_json("progress.json") or {}), "epochs": epochs}
    if result.checkpoint is not None and out["status"] in FINISHED:
        out.update(evaluate_on_test(result.checkpoint, ref, req.placement.use_gpu))
        out["checkpoint"] = checkpoint_uri(result.checkpoint)
    out.update(_usage(req, started))
    refit_store.write_json("refit.json", out)
    return out


def format_cv(summary: dict, rows: list[dict], store: ResultsStore) -> str:
    mean, std = summary.get("mean", {}), summary.get("std", {})
    lines = [f"status      {summary['status']} ({summary['cv_folds']} folds)"]
    for r in rows:
        lines.append(f"fold {r['fold']:<6} {r['status']}" + (f"  best epoch {r['best_epoch']}  best val_acc "
                     f"{r['best_val_accuracy']:.4f}" if r.get("best_epoch") else f"  {r.get('error', '')[-500:]}"))
    if "best_val_accuracy" in mean:
        spread = std.get("best_val_accuracy")
        lines.append(f"cv          val_accuracy {mean['best_val_accuracy']:.4f}"
                     + (f" ± {spread:.4f} (std over folds)" if spread is not None else ""))
    if "test_accuracy" in summary:
        lines.append(f"test        accuracy {summary['test_accuracy']:.4f}  f1 {summary['test_f1']:.4f}  "
                     f"(the refit: {summary['refit']['epochs']} epochs on all training images)")
    else:
        lines.append("test        not evaluated: no fold model is judged on the test split (add --cv-refit)")
    lines.append(f"used        {describe(summary)}")
    lines.append(f"results     {store.uri}/  (cv.parquet, history.parquet with fold, summary.json, fold-*/)")
    return "\n".join(lines)
