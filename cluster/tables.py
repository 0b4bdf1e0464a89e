"""The schemas of raysweep's result tables, in one place (docs/train.md and docs/tune.md document them)."""

from __future__ import annotations

import pyarrow as pa

EPOCH_FIELDS = [
    pa.field("epoch", pa.int32()),
    pa.field("train_loss", pa.float64()),
    pa.field("train_penalty", pa.float64()),
    pa.field("train_accuracy", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("val_accuracy", pa.float64()),
    pa.field("val_precision", pa.float64()),
    pa.field("val_recall", pa.float64()),
    pa.field("val_f1", pa.float64()),
    pa.field("lr", pa.float64()),
    pa.field("epoch_seconds", pa.float64()),
    pa.field("images_per_second", pa.float64()),
]

HISTORY_SCHEMA = pa.schema(EPOCH_FIELDS)  # history.parquet of `raysweep train`
EPOCHS_SCHEMA = pa.schema([pa.field("trial_id", pa.string())] + EPOCH_FIELDS)  # epochs.parquet of `raysweep tune`
CV_HISTORY_SCHEMA = pa.schema([pa.field("fold", pa.int32())] + EPOCH_FIELDS)  # history.parquet of `train --cv`


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly ``schema``'s columns from metric dicts (missing -> null)."""
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    return pa.table(columns, schema=schema)


class EpochLog:
    """Rows keyed by (trial, epoch): an epoch re-run after a restart replaces its row,
    so the table holds every epoch exactly once."""

    def __init__(self, schema: pa.Schema, existing: pa.Table | None = None):
        self.schema = schema
        self.rows: dict[tuple, dict] = {}
        for row in existing.to_pylist() if existing is not None else []:
            self.rows[self._key(row)] = row

    def _key(self, row: dict) -> tuple:
        return row.get("trial_id", ""), int(row["epoch"])

    def add(self, metrics: dict) -> None:
        row = {f.name: metrics.get(f.name) for f in self.schema}
        self.rows[self._key(row)] = row

    def drop_after(self, trial_id: str, epoch: int) -> None:
        for key in [k for k in self.rows if k[0] == trial_id and k[1] > epoch]:
            del self.rows[key]

    def table(self) -> pa.Table:
        return rows_to_table([self.rows[k] for k in sorted(self.rows)], self.schema)
