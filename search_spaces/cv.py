"""Stratified K-fold cross-validation folds: which training images validate in which fold.

Plain functions, no Ray. The fold assignment is a pure function of ``(labels, k, seed)``,
so a resumed run (or a rerun with the same data seed) gets the same folds.

    >>> import numpy as np
    >>> folds = fold_indices(np.array([0, 0, 0, 1, 1, 1]), k=3, seed=0)
    >>> sorted(np.concatenate(folds).tolist())
    [0, 1, 2, 3, 4, 5]
"""

from __future__ import annotations

import hashlib
import statistics

import numpy as np
import torch

from trainers.configtools import ConfigError
from trainers.data import DataError, ImageData, Split, channel_stats
from trainers.streaming import StreamPlan

# A cross-validated epoch (``fold_summary``): the mean over the folds of each of these, and
# the sample std (n-1, as ``train --cv``'s summary) of the validation ones as ``<m>_std``.
FOLD_MEAN_METRICS = ("train_loss", "train_penalty", "train_accuracy", "val_loss", "val_accuracy", "val_precision",
                     "val_recall", "val_f1", "lr", "images_per_second")
FOLD_STD_METRICS = ("val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1")


def cv_problems(k, labels, flag: str = "--cv") -> list[str]:
    """Why ``k`` folds cannot be made of ``labels`` (empty: they can). Every fold of a
    stratified split needs at least one image of each class, so ``k`` may not exceed the
    smallest class's count."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        return [f"{flag}: {k!r} must be a whole number >= 2 (the number of folds, e.g. {flag} 5)"]
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    present = counts[counts > 0]
    if present.size and k > present.min():
        cls = int(np.flatnonzero(counts == present.min())[0])
        return [f"{flag}: {k} folds but class {cls} has only {int(present.min())} training image(s); every fold "
                f"needs one of each class, so use {flag} {int(present.min())} or fewer"]
    return []


def fold_indices(labels, k: int, seed: int) -> list[np.ndarray]:
    """The validation indices of each of ``k`` folds (sorted int64 arrays; disjoint, together
    every index once). Stratified: each class's images, shuffled with ``seed``, are dealt
    round the folds, each class starting where the last one stopped, so fold sizes differ by
    at most one and each fold's class counts differ by at most one."""
    if problems := cv_problems(k, labels):
        raise ConfigError(problems)
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    start = 0
    for cls in np.unique(labels):  # sorted: the order, and so the folds, depend on the labels only
        members = rng.permutation(np.flatnonzero(labels == cls))
        fold_of[members] = (start + np.arange(len(members))) % k
        start = (start + len(members)) % k
    return [np.flatnonzero(fold_of == f) for f in range(k)]


def check_cv_data(data, k, flag: str = "--cv") -> None:
    """Refuse folds that cannot be made of ``data``: a streamed set (its val split is a fixed
    band of its files, ``trainers.streaming.plan_stream``, not images that can be dealt into
    folds), or ``k`` above the smallest class count of its training images."""
    if isinstance(data, StreamPlan):
        raise DataError(f"{flag}: this data set streams through Ray Data, whose train/val split is a fixed band of its "
                        f"files; set data.streaming=false (if it fits in memory) or drop {flag}")
    if problems := cv_problems(k, pool(data).y.numpy(), flag):
        raise ConfigError(problems)


def folds_digest(folds: list[np.ndarray]) -> str:
    """A short fingerprint of a fold assignment (``fold_indices``): equal digests, equal folds."""
    h = hashlib.sha256()
    for f in folds:
        h.update(np.asarray(f, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def fold_summary(reports: list[dict]) -> dict:
    """One cross-validated epoch from its folds' reports (all of the same epoch): the mean of
    each ``FOLD_MEAN_METRICS``, ``<m>_std`` of each ``FOLD_STD_METRICS``, and ``epoch_seconds``
    summed (the folds train one after another, so the epoch took them all)."""
    epochs = {r["epoch"] for r in reports}
    if len(epochs) != 1:
        raise ValueError(f"folds out of step: epochs {sorted(epochs)}")
    out = {"epoch": epochs.pop(), "epoch_seconds": sum(r["epoch_seconds"] for r in reports)}
    out.update({m: statistics.fmean(r[m] for r in reports) for m in FOLD_MEAN_METRICS})
    out.update({f"{m}_std": statistics.stdev(r[m] for r in reports) for m in FOLD_STD_METRICS})
    return out


def pool(data: ImageData) -> Split:
    """All the images a run may train on: its train and validation splits (never the test)."""
    return Split(torch.cat([data.train.x, data.val.x]), torch.cat([data.train.y, data.val.y]))


def fold_data(data: ImageData, k: int, seed: int) -> list[ImageData]:
    """One ``ImageData`` per fold: the fold's validation images replace the usual val split,
    the other folds train, the test split is the same object throughout. Normalisation
    statistics come from each fold's own training images (nothing leaks from its val)."""
    everything = pool(data)
    out = []
    for val_idx in fold_indices(everything.y.numpy(), k, seed):
        keep = np.ones(len(everything), dtype=bool)
        keep[val_idx] = False
        train_idx = torch.from_numpy(np.flatnonzero(keep))
        train = Split(everything.x[train_idx], everything.y[train_idx])
        val = Split(everything.x[torch.from_numpy(val_idx)], everything.y[torch.from_numpy(val_idx)])
        mean, std = channel_stats(train.x)
        out.append(ImageData(train, val, data.test, data.classes, mean, std))
    return out


def refit_data(data: ImageData) -> ImageData:
    """The refit's data: every training image (train + val) trains. The loop still needs a
    val split to report on; it gets the usual one, which is now trained on too, so the
    refit's val figures are not held out (the refit is judged on the test split only)."""
    everything = pool(data)
    mean, std = channel_stats(everything.x)
    return ImageData(everything, data.val, data.test, data.classes, mean, std)
