"""cv: what a K-fold cross-validated figure says, against a single validation split, on
digits with the default run (``examples/digits_cnn.yaml``, 1 worker per fit).

- **K-fold:** ``raysweep.train(config, cv=K, cv_refit=True)``, as a user runs it: the
  standard deviation of ``val_accuracy`` (at each fold's best epoch) across the K folds,
  and the gap between the CV mean and the refit's test accuracy (the refit trains on all
  training images for the folds' mean best epoch count).
- **Single split:** the same config trained ``splits`` times with ``raysweep.train``, each
  with another ``data.seed`` and a validation share of 1/K (a fold's): the standard
  deviation of the validation accuracy at the best epoch across those splits, and the mean
  gap between each run's validation accuracy and its own test accuracy. ``data.seed`` also
  carves the test split (``trainers.data.load_data``), so each of these runs is scored on
  its own test split; the K-fold run keeps seed 0's.

No target: the figures say how far to trust one number. Recorded ``met`` is None.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import REPO, Result, local_ray, set_threads

SIZES = {
    "full": dict(folds=5, splits=5, overrides=[]),
    "quick": dict(folds=3, splits=3, overrides=["train.epochs=6"]),
    "smoke": dict(folds=2, splits=2, overrides=["train.epochs=2", "data.limit=300"]),
}
CONFIG = REPO / "examples" / "digits_cnn.yaml"


def _best_val_accuracy(storage: str, name: str, best_epoch: int) -> float:
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(storage) / name / "history.parquet", columns=["epoch", "val_accuracy"]).to_pylist()
    found = [r["val_accuracy"] for r in rows if r["epoch"] == best_epoch]
    if not found:
        raise RuntimeError(f"{name}: history.parquet has no epoch {best_epoch}, the summary's best_epoch")
    return found[0]


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def run(mode: str = "full") -> Result:
    import raysweep

    size = SIZES[mode]
    k, threads = size["folds"], set_threads()
    storage = tempfile.mkdtemp(prefix="raysweep-bench-cv-")
    fit = dict(workers=1, cpus_per_worker=1.0, storage=storage)
    try:
        with local_ray(threads, timing=False):
            cv = raysweep.train(str(CONFIG), overrides=size["overrides"], cv=k, cv_refit=True, name="cv", **fit)
            singles = []
            for seed in range(size["splits"]):
                over = size["overrides"] + [f"data.seed={seed}", f"data.val_fraction={1 / k:.6g}"]
                s = raysweep.train(str(CONFIG), overrides=over, name=f"split-{seed}", **fit)
                if s.get("status") not in ("completed", "early_stopped"):
                    raise RuntimeError(f"single split {seed} ended {s.get('status')}: {s.get('error')}")
                singles.append({"seed": seed, "val_accuracy": _best_val_accuracy(storage, f"split-{seed}",
                                                                                 s["best_epoch"]),
                                "test_accuracy": s["test_accuracy"], "best_epoch": s["best_epoch"]})
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if cv.get("status") != "completed":
        raise RuntimeError(f"cross-validation ended {cv.get('status')}")
    cv_mean, cv_std = cv["mean"]["best_val_accuracy"], cv["std"]["best_val_accuracy"]
    cv_gap = cv_mean - cv["test_accuracy"]
    single_vals = [s["val_accuracy"] for s in singles]
    single_gaps = [s["val_accuracy"] - s["test_accuracy"] for s in singles]
    single_std = _std(single_vals)
    rows = [[f"{k}-fold CV + refit", k + 1, cv_mean, cv_std, cv["test_accuracy"], cv_gap, abs(cv_gap)],
            [f"single split x {len(singles)} seeds", len(singles), statistics.fmean(single_vals), single_std,
             statistics.fmean(s["test_accuracy"] for s in singles), statistics.fmean(single_gaps),
             statistics.fmean(abs(g) for g in single_gaps)]]
    return Result(
        name="cv", value=cv_std, target="none: how far one validation figure can be trusted", met=None,
        unit=f"std of val_accuracy across {k} folds",
        headers=["estimate", "fits", "val acc mean", "val acc std", "test acc", "val - test", "|val - test|"],
        rows=rows,
        notes=[f"digits, {CONFIG.relative_to(REPO)} {' '.join(size['overrides'])}".rstrip()
               + "; 1 worker per fit, each fit's val accuracy at its best epoch (the one its checkpoint is)",
               f"CV: raysweep.train(cv={k}, cv_refit=True); test acc = the refit's ({cv['refit']['epochs']} epochs "
               "on all training images), scored once",
               f"single split: data.seed 0..{len(singles) - 1}, data.val_fraction 1/{k}; each run scores its own "
               "test split (data.seed carves it too); val acc std = across those splits"],
        details={"cv": {"mean": cv["mean"], "std": cv["std"], "test_accuracy": cv["test_accuracy"],
                        "refit_epochs": cv["refit"]["epochs"], "gap": cv_gap},
                 "single": singles, "single_std": single_std, "single_mean_abs_gap":
                     statistics.fmean(abs(g) for g in single_gaps), "folds": k},
    )
