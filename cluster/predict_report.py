"""What `raysweep predict` writes: the predictions file (published whole or not at all),
its counts and metrics, the confusion matrix picture and the lines it prints."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class PredictError(RuntimeError):
    """Predict ran but its output cannot be trusted (e.g. rows went missing); nothing was published."""


def output_schema(checkpoint: str, classes: list[str]):
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("label", pa.int64()), ("label_class", pa.string()),
        ("pred_index", pa.int64()), ("pred_class", pa.string()),
        ("topk_classes", pa.list_(pa.string())), ("topk_probs", pa.list_(pa.float32())),
        ("error", pa.string()),
    ], metadata={"checkpoint": checkpoint, "classes": json.dumps(classes)})


def output_table(batch: dict, classes: list[str], schema):
    """A predicted batch (numpy columns from the model actors) -> rows of ``schema``."""
    import pyarrow as pa

    err = [str(e) if e else None for e in batch["error"]]
    label = [int(v) if v >= 0 else None for v in batch["label"]]
    pred = [int(p) if e is None else None for p, e in zip(batch["pred_index"], err)]
    topk_c = [[classes[j] for j in row] if e is None else None for row, e in zip(batch["topk_index"], err)]
    topk_p = [[float(p) for p in row] if e is None else None for row, e in zip(batch["topk_probs"], err)]
    return pa.table({
        "id": [str(i) for i in batch["id"]],
        "label": label,
        "label_class": [classes[v] if v is not None else None for v in label],
        "pred_index": pred,
        "pred_class": [classes[p] if p is not None else None for p in pred],
        "topk_classes": topk_c, "topk_probs": topk_p, "error": err,
    }, schema=schema)


@dataclass
class Tally:
    """Counts over the written rows. ``labelled`` = ``scored`` (in the metrics) +
    ``labelled_errors`` (labelled inputs that could not be predicted)."""

    classes: int
    rows: int = 0
    errors: int = 0
    labelled: int = 0
    labelled_errors: int = 0
    first_error: str = ""
    cm: np.ndarray = field(default=None)  # int64 [true, predicted]

    def __post_init__(self):
        self.cm = np.zeros((self.classes, self.classes), dtype=np.int64)

    def add(self, batch: dict) -> None:
        err = np.array([bool(e) for e in batch["error"]], dtype=bool)
        labelled = np.asarray(batch["label"]) >= 0
        self.rows += len(err)
        self.errors += int(err.sum())
        if err.any() and not self.first_error:
            self.first_error = str(batch["error"][err][0])
        self.labelled += int(labelled.sum())
        self.labelled_errors += int((labelled & err).sum())
        scored = labelled & ~err
        np.add.at(self.cm, (np.asarray(batch["label"])[scored], np.asarray(batch["pred_index"])[scored]), 1)

    @property
    def scored(self) -> int:
        return int(self.cm.sum())


def write_predictions(batches, out: Path, schema, classes: list[str], expected: int) -> Tally:
    """Write every batch to a hidden file beside ``out`` and publish it (``os.replace``) only
    when it holds exactly ``expected`` rows; on any failure nothing is published and the
    hidden file is removed."""
    import pyarrow.parquet as pq

    tally = Tally(len(classes))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                writer.write_table(output_table(batch, classes, schema))
                tally.add(batch)
        if tally.rows != expected:
            raise PredictError(f"predict made {tally.rows} rows for {expected} inputs, so {out} was not written; "
                               "did the inputs change while predict ran? run it again")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return tally


def side_file(out: Path, suffix: str) -> Path:
    return out.with_name(f"{out.stem}.{suffix}")


def confusion_png(cm: np.ndarray, classes: list[str], title: str = "") -> bytes:
    """cm[true, predicted] as a PNG heat map with counts."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    size = min(16, 2 + 0.5 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    if k <= 30:
        hi = cm.max() / 2 if cm.size else 0
        for t in range(k):
            for p in range(k):
                if cm[t, p]:
                    ax.text(p, t, int(cm[t, p]), ha="center", va="center", fontsize=8,
                            color="white" if cm[t, p] > hi else "black")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def format_report(r: dict, first_error: str) -> str:
    lines = []
    if "accuracy" in r:
        lines.append("metrics     " + "  ".join(f"{k} {r[k]:.4f}" for k in ("accuracy", "precision", "recall", "f1"))
                     + f"  (macro, over {r['scored']} of {r['labelled']} labelled inputs"
                     + (f"; {r['labelled'] - r['scored']} of them not predicted" if r['labelled'] > r['scored'] else "")
                     + ")")
    if r["errors"]:
        lines.append(f"errors      {r['errors']} of {r['inputs']} input(s) not predicted (see the error column), "
                     f"e.g. {first_error[:300]}")
    lines.append(f"wrote       {r['out']} ({r['rows']} rows for {r['inputs']} inputs, {r['seconds']:.1f} s)"
                 + (f", {r['confusion_png']}" if "confusion_png" in r else ""))
    return "\n".join(lines)
