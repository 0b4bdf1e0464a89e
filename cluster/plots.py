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
