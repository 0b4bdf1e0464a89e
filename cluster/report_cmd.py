"""`raysweep report`: (re)build a search's ``report.html`` from its tables, without Ray.

A search writes the report itself as trials finish (``write_report(live=True)``, which
reloads itself in the browser) and once more when it ends; this command rebuilds it, for
example for a search kept on ``s3://``.
"""

from __future__ import annotations

import sys
import time
import webbrowser
from pathlib import Path

from cluster.cli import EXIT_BAD_REQUEST, EXIT_OK, command
from cluster.report_html import REFRESH_S, ReportData, build_report
from cluster.store import ResultsStore
from cluster.tune_cv import mean_rows
from trainers.configtools import records_of

REPORT = "report.html"


def load_report_data(store: ResultsStore, metric: str | None = None, mode: str | None = None) -> ReportData:
    """The tables and best.json under ``store``; the ranking metric from best.json unless given."""
    best = store.read_json("best.json") or {}
    # mean_rows: a --cv search's fold rows are no learning curves of their own.
    return ReportData(store.read_table("trials.parquet"), mean_rows(store.read_table("epochs.parquet")), best,
                      metric or best.get("metric", "val_accuracy"), mode or best.get("mode", "max"), store.name)


def write_report(store: ResultsStore, live: bool, metric: str | None = None, mode: str | None = None) -> str:
    """Write ``report.html`` beside the tables; returns where it is (a local path or a URI)."""
    store.write_bytes(REPORT, build_report(load_report_data(store, metric, mode), live).encode())
    return store.local_path(REPORT) or f"{store.uri}/{REPORT}"


def try_write_report(store: ResultsStore, live: bool, metric: str, mode: str) -> str | None:
    """``write_report`` for a search, which a report that cannot be drawn must not end: a
    one-line warning instead (the tables are written; ``raysweep report`` rebuilds it)."""
    try:
        return write_report(store, live=live, metric=metric, mode=mode)
    except Exception as e:  # noqa: BLE001 - the search is the main path; the report is a view of it
        print(f"raysweep tune: warning: report.html not updated ({type(e).__name__}: {e}); "
              "the tables are; rebuild it later with `raysweep report`", flush=True)
        return None


class LiveReport:
    """Rewrites the report as trials finish, for ``SearchResultsCallback``: at most every
    ``min_interval_s`` (drawing takes about a second of the driver's CPU; the page reloads
    every ``REFRESH_S`` anyway, and the search's end writes the final one); after a failure
    it warns once and stops trying."""

    def __init__(self, metric: str, mode: str, min_interval_s: float = REFRESH_S):
        self.metric, self.mode, self.min_interval_s, self.warned = metric, mode, min_interval_s, False
        self.written_at = 0.0

    def __call__(self, store: ResultsStore) -> None:
        if time.monotonic() - self.written_at < self.min_interval_s:
            return
        self.written_at = time.monotonic()
        if not self.warned and try_write_report(store, True, self.metric, self.mode) is None:
            self.warned = True


def _arguments(p):
    p.add_argument("experiment", help="a search's directory or URI, e.g. runs/search or s3://bucket/runs/search")
    p.add_argument("--open", action="store_true", help="open the report in a web browser (local storage)")


@command("report", "(re)build a search's report.html: trials, history, importance, curves (offline HTML)")(_arguments)
def _report(args) -> int:
    from cluster.results_cmd import split_experiment

    storage, name = split_experiment(args.experiment)
    store = ResultsStore(storage, name, role="EXPERIMENT")
    if store.read_table("trials.parquet") is None:
        print(f"raysweep report: no trials.parquet under {store.uri}: EXPERIMENT must be a search's "
              "directory (raysweep tune writes one; a train run has no report)", file=sys.stderr)
        return EXIT_BAD_REQUEST
    with records_of(store.uri):
        running = store.read_json("best.json") is None  # best.json is written when the search ends
        where = write_report(store, live=running)
    print(f"report      {where}{'  (search still running: the page reloads itself)' if running else ''}")
    if args.open:
        local = store.local_path(REPORT)
        if local is None:
            print(f"raysweep report: --open: {where} is remote; copy it to this machine to open it", file=sys.stderr)
        else:
            webbrowser.open(Path(local).as_uri())
    return EXIT_OK
