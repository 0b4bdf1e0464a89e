"""`raysweep tune --cv K`: the tables, checks and records of a cross-validated search.

Each trial trains K folds that advance together (``search_spaces.cv_trial``) and reports
their mean per epoch. ``epochs.parquet`` then holds, per trial and epoch, the mean row
(``fold`` null: the numbers Tune, ASHA and the searcher saw, with ``<m>_std`` over the
folds and ``cv_digest``, the fold assignment's fingerprint) and one row per fold (``fold``
1..K, those columns null). ``trials.parquet`` keeps its columns, each a fold mean, plus
``best_<m>_std``/``final_<m>_std`` (the folds' std at that epoch) and ``cv_digest`` (equal
in every trial).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from cluster.store import ResultsStore
from cluster.tables import EPOCHS_SCHEMA, EpochLog
from search_spaces.cv import FOLD_STD_METRICS, check_cv_data, fold_indices, folds_digest, pool
from trainers.config import EARLY_STOP_METRICS
from trainers.configtools import ConfigError, FileReadError

FOLD = "fold"
CV_PLAN = "cv.json"
DIGEST = "cv_digest"
BEST_CONFIG = "best_config.yaml"  # the best trial's whole config, for `raysweep train --config`


def cv_epochs_schema() -> pa.Schema:
    return pa.schema(list(EPOCHS_SCHEMA) + [pa.field(FOLD, pa.int32())]
                     + [pa.field(f"{m}_std", pa.float64()) for m in FOLD_STD_METRICS] + [pa.field(DIGEST, pa.string())])


class FoldEpochLog(EpochLog):
    """Rows keyed by (trial, epoch, fold): the mean row (fold null, sorted first) and each fold's."""

    def _key(self, row: dict) -> tuple:
        return row.get("trial_id", ""), int(row["epoch"]), row.get(FOLD) or 0

    def add_result(self, result: dict, trial_id: str) -> None:
        self.add({**result, "trial_id": trial_id, FOLD: None})
        for fold in result.get("folds") or []:
            self.add({**fold, "trial_id": trial_id})


def mean_rows(epochs: pa.Table | None) -> pa.Table | None:
    """One row per trial per epoch (the fold means) of a cross-validated search's
    ``epochs.parquet``, as learning curves want it; any other table as it is."""
    if epochs is None or FOLD not in epochs.column_names:
        return epochs
    return epochs.filter(pc.is_null(epochs[FOLD]))


def trials_fields(metrics: tuple[str, ...]) -> list[pa.Field]:
    return ([pa.field(f"{kind}_{m}_std", pa.float64()) for m in metrics for kind in ("best", "final")]
            + [pa.field(DIGEST, pa.string())])


def trial_columns(rec, metrics: tuple[str, ...]) -> dict:
    """A trial's std columns: the folds' std at the epoch of its best fold mean (the latest of
    equals, as ``best_epoch``) and at its last epoch; its fold digest."""
    final = rec.epochs[max(rec.epochs)] if rec.epochs else {}
    out = {DIGEST: final.get(DIGEST)}
    for m in metrics:
        at = rec.best_epoch(m, EARLY_STOP_METRICS[m])
        out[f"best_{m}_std"] = rec.epochs[at].get(f"{m}_std") if at is not None else None
        out[f"final_{m}_std"] = final.get(f"{m}_std")
    return out


def check_cv_request(req) -> None:
    """What the request's other options refuse with --cv, before anything is read or started:
    the trackers log one row per epoch, and a --cv search has K + 1."""
    if req.search.cv is not None and (req.tracking.mlflow is not None or req.tracking.tensorboard is not None):
        raise ConfigError(["--mlflow/--tensorboard: not available with --cv yet; drop them, or tune without --cv"])


def keep_cv_plan(store: ResultsStore, req, data, data_config: dict) -> None:
    """Record what the folds are made of (``cv.json``: K, the seed, the data settings and the
    fold digest); a resumed search must make the same folds, and a search may not change
    between with and without --cv."""
    k = req.search.cv
    before = store.read_json(CV_PLAN)
    if before is not None and not (isinstance(before.get("folds"), int) and isinstance(before.get("seed"), int)):
        raise FileReadError([f"{store.uri}/{CV_PLAN}: its folds and seed are not as raysweep writes them; the file "
                             "was changed, or is not raysweep's"])
    if req.resume and (before is None) != (k is None):
        now, then = (f"--cv {k}", "without --cv") if k else ("no --cv", f"with --cv {before['folds']}")
        raise ConfigError([f"--resume: {store.uri} was searched {then}; resume it the same way ({now} given)"])
    if k is None:
        return
    check_cv_data(data, k)
    digest = folds_digest(fold_indices(pool(data).y.numpy(), k, req.search.seed))
    plan = json.loads(json.dumps({"folds": k, "seed": req.search.seed, "data": data_config, "digest": digest}))
    if before is not None and before != plan:
        raise ConfigError([f"--cv {k}: {store.uri} was cross-validated with --cv {before['folds']}, --seed "
                           f"{before['seed']} and its own data settings; resume it with those, or choose a new --name"])
    store.write_json(CV_PLAN, plan)


def no_model(k: int, uri: str) -> str:
    """Why a cross-validated search names no checkpoint (best.json; `predict`/`export` show it)."""
    return (f"a --cv search keeps no model to predict with (a trial's checkpoint is its {k} fold models, for "
            f"resuming); make the final model on all training images: raysweep train --config "
            f"{uri}/{BEST_CONFIG} --cv {k} --cv-refit (or without --cv)")


def cv_record(req, store: ResultsStore, config: dict) -> dict:
    """best.json's entries for a cross-validated search; writes the best trial's ``config``
    as ``best_config.yaml``, which `raysweep train --cv K --cv-refit` takes as it is."""
    import yaml

    store.write_bytes(BEST_CONFIG, yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False).encode())
    return {"cv_folds": req.search.cv, "checkpoint": None, "no_checkpoint_reason": no_model(req.search.cv, store.uri)}
