"""Pictures drawn from the result tables (matplotlib, no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_curves(history: pa.Table, title: str = "") -> bytes:
    """Loss and accuracy per epoch, train and validation, as PNG bytes."""
    h = history.to_pydict()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(h["epoch"], h["train_loss"], "o-", label="train")
    ax_loss.plot(h["epoch"], h["val_loss"], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(h["epoch"], h["train_accuracy"], "o-", label="train")
    ax_acc.plot(h["epoch"], h["val_accuracy"], "o-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _png(fig)


def optimisation_history(trials: pa.Table, metric: str, mode: str) -> bytes:
    """Each finished trial's best value in start order, and the best so far."""
    rows = [r for r in trials.to_pylist() if r.get(f"best_{metric}") is not None]
    values = [r[f"best_{metric}"] for r in rows]
    best_so_far, current = [], None
    for v in values:
        current = v if current is None else (max if mode == "max" else min)(current, v)
        best_so_far.append(current)
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = ["tab:blue" if r["status"] in ("completed", "early_stopped") else "tab:red" for r in rows]
    ax.scatter(range(1, len(values) + 1), values, c=colours, label="trial (red: failed/diverged)")
    ax.step(range(1, len(values) + 1), best_so_far, where="post", color="tab:orange", label="best so far")
    ax.set(xlabel="trial", ylabel=f"best {metric}", title="optimisation history")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def importance(importances: dict[str, float]) -> bytes:
    """Hyperparameter importance (Optuna's fANOVA), largest on top."""
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(3, len(items)) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set(xlabel="importance", title="hyperparameter importance")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def learning_curves(epochs: pa.Table, metric: str, best_trial: str | None) -> bytes:
    """``metric`` per epoch for every trial; the best trial drawn bold."""
    rows = epochs.to_pylist()
    fig, ax = plt.subplots(figsize=(8, 5))
    for trial in sorted({r["trial_id"] for r in rows}):
        points = sorted((r["epoch"], r[metric]) for r in rows if r["trial_id"] == trial)
        xs, ys = zip(*points)
        if trial == best_trial:
            ax.plot(xs, ys, "o-", color="tab:red", lw=2.5, zorder=3, label=f"best: {trial}")
        else:
            ax.plot(xs, ys, "-", color="tab:gray", alpha=0.5, lw=1)
    ax.set(xlabel="epoch", ylabel=metric, title="learning curves of all trials")
    ax.grid(alpha=0.3)
    if best_trial:
        ax.legend()
    return _png(fig)


def pareto_front(points: list[list[float]], on_front: list[bool], names: list[str], modes: list[str]) -> bytes:
    """Each finished trial's objective values, the Pareto front highlighted (and joined, in
    order of the first axis). Two objectives: one scatter; three: the three pairs side by
    side (each panel marks the trials on the 3-D front, so a front point may look dominated
    in one pair)."""
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.5), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        rest = [p for p, on in zip(points, on_front) if not on]
        front = sorted((p for p, on in zip(points, on_front) if on), key=lambda p: (p[i], p[j]))
        if rest:
            ax.scatter([p[i] for p in rest], [p[j] for p in rest], color="tab:gray", alpha=0.6, label="dominated")
        ax.plot([p[i] for p in front], [p[j] for p in front], "o-", color="tab:red", lw=1.5, label="Pareto front")
        ax.set(xlabel=f"{names[i]} ({modes[i]})", ylabel=f"{names[j]} ({modes[j]})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Pareto front: {sum(on_front)} of {len(points)} trials")
    return _png(fig)
