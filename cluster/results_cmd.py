"""`raysweep results`: read a search's (or a run's) tables without starting Ray."""

from __future__ import annotations

import json
import sys

import pyarrow as pa

from cluster.cli import EXIT_BAD_REQUEST, EXIT_OK, command, non_negative_int
from cluster.store import ResultsStore

FORMATS = ("table", "csv", "json")


def split_experiment(experiment: str) -> tuple[str, str]:
    """``runs/tune-x`` or ``s3://bucket/runs/tune-x`` -> (storage, name)."""
    trimmed = experiment.rstrip("/")
    storage, _, name = trimmed.rpartition("/")
    return storage or ".", name


def _arguments(p):
    p.add_argument("experiment", help="an experiment directory or URI, e.g. runs/tune-digits_cnn-... or s3://b/runs/x")
    p.add_argument("--top", type=non_negative_int, default=10, help="rows to show, best first (0 = all)")
    p.add_argument("--format", choices=FORMATS, default="table")


def ranked(table: pa.Table, metric: str, mode: str) -> list[dict]:
    sign = 1 if mode == "max" else -1
    rows = table.to_pylist()
    key = f"best_{metric}"
    return sorted(rows, key=lambda r: (r.get(key) is None, -sign * (r.get(key) or 0.0)))


@command("results", "show a search's trials (trials.parquet) or a run's history, best first")(_arguments)
def _results(args) -> int:
    storage, name = split_experiment(args.experiment)
    store = ResultsStore(storage, name, role="EXPERIMENT")
    trials = store.read_table("trials.parquet")
    if trials is None:
        history = store.read_table("history.parquet")
        if history is None:
            print(f"raysweep results: no trials.parquet or history.parquet under {store.uri}", file=sys.stderr)
            return EXIT_BAD_REQUEST
        rows = history.to_pylist()
    else:
        best = store.read_json("best.json") or {}
        rows = ranked(trials, best.get("metric", "val_accuracy"), best.get("mode", "max"))
    rows = rows[: args.top] if args.top else rows
    print(render(rows, args.format))
    return EXIT_OK


def render(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    import pandas as pd

    frame = pd.DataFrame(rows)
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    frame = frame.drop(columns=[c for c in ("checkpoint", "error") if c in frame and frame[c].isna().all()])
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.4g}".format):
        return frame.to_string(index=False)
