"""`raysweep results`: read a search's (or a run's) tables without starting Ray."""

from __future__ import annotations

import json
import math
import sys

import pyarrow as pa

from cluster.cli import EXIT_BAD_REQUEST, EXIT_OK, command, non_negative_int
from cluster.store import ResultsStore
from trainers.config import EARLY_STOP_METRICS
from trainers.configtools import ConfigError, records_of

FORMATS = ("table", "csv", "json")


def split_experiment(experiment: str) -> tuple[str, str]:
    """``runs/tune-x`` or ``s3://bucket/runs/tune-x`` -> (storage, name)."""
    trimmed = experiment.rstrip("/")
    storage, _, name = trimmed.rpartition("/")
    _, uri, rest = experiment.partition("://")
    if not name or (uri and "/" not in rest.strip("/")):  # "s3://", "file://", "s3://bucket": no run named
        raise ConfigError([f"EXPERIMENT {experiment!r}: names no run; give its directory, e.g. runs/tune-x or "
                           "s3://bucket/runs/tune-x"])
    return storage or ".", name


def _arguments(p):
    p.add_argument("experiment", help="an experiment directory or URI, e.g. runs/tune-digits_cnn-... or s3://b/runs/x")
    p.add_argument("--top", type=non_negative_int, default=10, help="rows to show, best first (0 = all)")
    p.add_argument("--format", choices=FORMATS, default="table")


def ranked(table: pa.Table, key: str, mode: str) -> list[dict]:
    """Rows best first by column ``key``: descending for a max-mode metric, ascending for a
    min-mode one (a loss); rows without a finite value last, in their order."""
    sign = -1 if mode == "max" else 1

    def order(row: dict) -> tuple:
        value = row.get(key)
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        return (not finite, sign * value if finite else 0.0)

    return sorted(table.to_pylist(), key=order)


def front_first(rows: list[dict]) -> list[dict]:
    """A multi-objective search's rows with its Pareto front (``pareto`` true) first, each
    part in its ranked order; rows of other tables unchanged."""
    return sorted(rows, key=lambda row: not row.get("pareto"))


def run_metric(summary: dict) -> str:
    """A train run's ranking metric: its early-stopping metric, which picked its checkpoint
    (val_accuracy while the run has no summary.json yet)."""
    es = ((summary.get("config") or {}).get("train") or {}).get("early_stopping") or {}
    metric = es.get("metric")
    return metric if metric in EARLY_STOP_METRICS else "val_accuracy"


@command("results", "show a search's trials (trials.parquet) or a run's history, best first")(_arguments)
def _results(args) -> int:
    storage, name = split_experiment(args.experiment)
    store = ResultsStore(storage, name, role="EXPERIMENT")
    with records_of(store.uri):
        return _show(args, store)


def _show(args, store: ResultsStore) -> int:
    trials = store.read_table("trials.parquet")
    if trials is None:
        history = store.read_table("history.parquet")
        if history is None:
            print(f"raysweep results: no trials.parquet or history.parquet under {store.uri}", file=sys.stderr)
            return EXIT_BAD_REQUEST
        summary = store.read_json("summary.json") or {}
        metric = run_metric(summary)
        rows = ranked(history, metric, EARLY_STOP_METRICS[metric])
    else:
        summary = store.read_json("best.json") or {}
        rows = front_first(ranked(trials, f"best_{summary.get('metric', 'val_accuracy')}", summary.get("mode", "max")))
    rows = rows[: args.top] if args.top else rows
    print(render(rows, args.format))
    if args.format == "table" and summary.get("cpu_seconds") is not None:  # csv and json stay plain rows
        from cluster.cost import describe

        stopped = f"; stopped: {str(summary['stop_reason'])[:200]}" if summary.get("stop_reason") else ""
        print(f"used {describe(summary)}{stopped}")
    return EXIT_OK


def render(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    import pandas as pd

    frame = pd.DataFrame(rows)
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    frame = frame.drop(columns=[c for c in ("checkpoint", "error", "cost") if c in frame and frame[c].isna().all()])
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.4g}".format):
        return frame.to_string(index=False)
