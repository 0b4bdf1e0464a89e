"""A cross-validated trial (``raysweep tune --cv K``): K fold models that advance together.

Each fold's model is trained by the ordinary loop (``trainers.loop.fit``) in a thread of
the trial's own process, and the folds take turns: fold 1 trains epoch e and reports, then
fold 2 trains epoch e, ... and once all K have reported, the trial reports one epoch to
Tune, the folds' mean and std (``search_spaces.cv.fold_summary``) with each fold's own
metrics under ``folds``. Only one fold computes at a time, so K folds cost a one-worker
trial's resources and ASHA judges each epoch on the fold mean.

Early stopping (``train.early_stopping``) is decided on the fold mean, here, not per fold.
A checkpoint holds every fold's state (``fold-<i>/state.pt``) and ``cv.json`` (the epoch,
the mean's early-stopping state, the fold digest): it resumes the trial, but it is no model
to predict with (``raysweep train --cv K --cv-refit`` makes the final one).
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import replace
from pathlib import Path

from search_spaces.cv import fold_data, fold_indices, fold_summary, folds_digest, pool
from trainers.checkpoints import load_state, save_state
from trainers.configtools import ConfigError
from trainers.data import ImageData
from trainers.loop import STOP_DIVERGED, STOP_EARLY, EarlyStopper, WorkerContext, fit

BUNDLE_FILE = "cv.json"
_GO, _STOP = "go", "stop"


def cv_search_problems(search) -> list[str]:
    """What a ``SearchConfig`` with ``cv`` cannot do (before the data is read: K against the
    smallest class comes with the data, ``search_spaces.cv.check_cv_data``)."""
    from search_spaces.cv import cv_problems

    if search.cv is None:
        return []
    out = cv_problems(search.cv, [])
    if search.placement.workers > 1:
        out.append(f"--workers-per-trial: {search.placement.workers} with --cv {search.cv}: a cross-validated trial "
                   "trains its folds in turn in one process; use --workers-per-trial 1 (or drop --cv)")
    if search.objectives is not None:
        out.append(f"--objectives: not available with --cv {search.cv} (a fold mean is one number); drop one of them")
    return out


class _Fold:
    """One fold's ``fit`` in its own thread, which runs only while the trial waits in ``step``.
    It is the fit's ``Reporter``: each report hands the epoch over and waits for the next turn."""

    def __init__(self, number: int, cfg, data: ImageData, ctx: WorkerContext, state: dict | None):
        self.number, self.cfg, self.data, self.ctx, self.state = number, cfg, data, ctx, state
        self.turn: queue.Queue = queue.Queue()
        self.out: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"cv-fold-{number}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.turn.get() == _STOP:
            return
        try:
            fit(self.cfg, self.data, self.ctx, self)
            self.out.put(("done", None, None))
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 (handed to the trial's thread, which raises it)
            self.out.put(("error", e, None))

    def restore(self) -> dict | None:
        return self.state

    def report(self, metrics: dict, state: dict | None) -> None:
        self.out.put(("report", {**metrics, "fold": self.number}, state))
        if self.turn.get() == _STOP:
            raise _Stopped

    def step(self) -> tuple:
        """Let the fold train to its next report (or its end): ``(kind, metrics, state)``."""
        self.turn.put(_GO)
        return self.out.get()

    def stop(self) -> None:
        self.turn.put(_STOP)
        self.thread.join()


class _Stopped(Exception):
    """The trial ended (ASHA, early stopping, an error): a waiting fold leaves its fit."""


def fit_folds(cfg, data: ImageData, ctx: WorkerContext, reporter, k: int, seed: int) -> dict:
    """Train ``k`` stratified folds of ``data`` (``fold_indices`` with ``seed``: the same in
    every trial and on resume) epoch by epoch; ``reporter.report(metrics, bundle)`` once per
    epoch with the fold mean (``bundle``: every fold's state, when a checkpoint is due), and
    ``reporter.restore()`` a bundle to go on from. Returns the last epoch's metrics."""
    digest = folds_digest(fold_indices(pool(data).y.numpy(), k, seed))
    es = cfg.train.early_stopping
    saved = reporter.restore()
    if saved is not None and saved["digest"] != digest:
        raise ConfigError([f"--cv {k}: this trial's checkpoint was made with other folds (digest {saved['digest']}, "
                           f"now {digest}); resume with the search's own --cv, --seed and data settings"])
    stopper = EarlyStopper(es.metric, es.mode, es.patience, es.min_delta, **(saved or {}).get("early_stopping", {}))
    # Every fold checkpoints every epoch (a bundle needs all K at once) and never stops alone.
    fold_cfg = replace(cfg, train=replace(cfg.train, checkpoint_every=1, early_stopping=replace(es, patience=0)))
    folds = [_Fold(i, fold_cfg, d, ctx, saved["folds"][i - 1] if saved else None)
             for i, d in enumerate(fold_data(data, k, seed), 1)]
    metrics: dict = {}
    try:
        while True:
            steps = [f.step() for f in folds]  # in turn: fold 1's epoch, then fold 2's, ...
            if errors := [s[1] for s in steps if s[0] == "error"]:
                raise errors[0]
            if any(s[0] == "done" for s in steps):  # every fold ran its epochs
                return metrics
            metrics = _epoch(steps, digest, stopper, es)
            last = metrics["epoch"] == cfg.train.epochs or metrics["stop_reason"] in (STOP_EARLY, STOP_DIVERGED)
            epoch = metrics["epoch"]
            due = last or metrics["best_epoch"] == epoch or epoch % cfg.train.checkpoint_every == 0
            bundle = None
            if due and metrics["stop_reason"] != STOP_DIVERGED:
                bundle = {"epoch": metrics["epoch"], "early_stopping": stopper.state(), "digest": digest,
                          "folds": [s[2] for s in steps]}
            reporter.report(metrics, bundle)
            if metrics["stop_reason"]:
                return metrics
    finally:
        for f in folds:
            f.stop()


def _epoch(steps: list[tuple], digest: str, stopper: EarlyStopper, es) -> dict:
    """The trial's report of one epoch: the folds' mean and std, each fold's own metrics,
    and the stop reason of the fold mean (a diverged fold ends the trial as diverged)."""
    reports = [s[1] for s in steps]
    metrics = {**fold_summary(reports), "folds": reports, "cv_digest": digest, "stop_reason": "", "message": "",
               "resumed_from_epoch": reports[0].get("resumed_from_epoch", 0)}
    if bad := [r for r in reports if r.get("stop_reason") == STOP_DIVERGED]:
        metrics.update(stop_reason=STOP_DIVERGED, message=f"fold {bad[0]['fold']}: {bad[0]['message']}")
        return metrics
    stopper.update(metrics[es.metric], metrics["epoch"])
    metrics["best_epoch"] = stopper.best_epoch
    if stopper.should_stop:
        metrics.update(stop_reason=STOP_EARLY, message=f"no fold-mean {es.metric} gain for {es.patience} epochs")
    return metrics


def save_bundle(bundle: dict, directory: str | Path) -> None:
    """A cross-validated trial's checkpoint: ``fold-<i>/state.pt`` and ``cv.json``."""
    for i, state in enumerate(bundle["folds"], 1):
        save_state(state, Path(directory) / f"fold-{i}")
    meta = {k: bundle[k] for k in ("epoch", "early_stopping", "digest")} | {"folds": len(bundle["folds"])}
    (Path(directory) / BUNDLE_FILE).write_text(json.dumps(meta))


def load_bundle(directory: str | Path) -> dict:
    meta = json.loads((Path(directory) / BUNDLE_FILE).read_text())
    return {**meta, "folds": [load_state(Path(directory) / f"fold-{i}") for i in range(1, meta["folds"] + 1)]}
