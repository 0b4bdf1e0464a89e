"""Classification metrics from a confusion matrix, which sums across ranks exactly.

Precision, recall and F1 over a sharded validation set cannot be averaged from per-rank
values; the confusion matrix can be all-reduced and the metrics computed once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[true, predicted]`` counts, int64 ``(K, K)``, on the inputs' device."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (in place); a no-op without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def scores_from_confusion(cm: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1, as scikit-learn computes them: the macro mean
    runs over the classes present in the labels or the predictions (a class absent from both
    would add a 0 and cap, say, recall on a folder of 2 of 10 classes at 0.2), and a class
    present but never predicted (or never true) scores 0 there (``zero_division=0``)."""
    cm = cm.double()
    tp = cm.diag()
    predicted, actual = cm.sum(0), cm.sum(1)
    present = (predicted > 0) | (actual > 0)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp))
    total = cm.sum()
    n = max(1, int(present.sum()))  # an empty matrix scores 0 throughout
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "precision": float(precision[present].sum() / n),
        "recall": float(recall[present].sum() / n),
        "f1": float(f1[present].sum() / n),
    }
