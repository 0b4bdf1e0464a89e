"""The search report: one self-contained HTML file drawn from a search's tables.

Built from ``trials.parquet``, ``epochs.parquet`` and ``best.json`` alone, so it can be
rebuilt from any storage (local or ``s3://``) and for either searcher. Optuna's own
visualisation module draws what it can from an in-memory study made from the trials
table; the learning curves and the confusion matrix are plain plotly. plotly.js is
embedded once, so the file opens offline (no CDN, no network).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Callable

import optuna
import pyarrow as pa

GOOD = ("completed", "early_stopped", "budget_stopped")  # trials whose best value Optuna may rank
FAILED = ("failed", "diverged")
HIDDEN_COLUMNS = ("checkpoint",)  # long paths: best.json and trials.parquet hold them
REFRESH_S = 15  # how often a report written during a search reloads itself
SCRIPT_END = "</script"


@dataclass
class ReportData:
    """What the report is drawn from. ``best``: best.json's content ({} while the search runs)."""

    trials: pa.Table | None
    epochs: pa.Table | None
    best: dict = field(default_factory=dict)
    metric: str = "val_accuracy"
    mode: str = "max"
    title: str = "search"
    _study: optuna.Study | None = None

    @property
    def rows(self) -> list[dict]:
        return self.trials.to_pylist() if self.trials is not None else []

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = study_from_rows(self.rows, param_columns(self.trials), self.metric, self.mode,
                                          self.objectives())
        return self._study

    def objectives(self) -> list[tuple[str, str]]:
        """A multi-objective search's (name, mode): best.json's, or while it runs the table's
        ``objective_<name>`` columns with each objective's default direction."""
        from search_spaces.objectives import OBJECTIVES

        if self.best.get("objectives"):
            return [(o["name"], o["mode"]) for o in self.best["objectives"]]
        names = [c.removeprefix("objective_") for c in (self.trials.column_names if self.trials else [])
                 if c.startswith("objective_")]
        return [(n, OBJECTIVES[n].mode) for n in names if n in OBJECTIVES]

    def best_trial_id(self) -> str | None:
        if self.best.get("trial_id"):
            return self.best["trial_id"]
        good = [r for r in self.rows if r["status"] in GOOD and _finite(r.get(f"best_{self.metric}"))]
        if not good:
            return None
        sign = 1 if self.mode == "max" else -1
        return max(good, key=lambda r: sign * r[f"best_{self.metric}"])["trial_id"]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def param_columns(trials: pa.Table | None) -> list[str]:
    """The searched keys' columns: between ``status`` and ``epochs_run`` (cluster.tune_results.trials_schema)."""
    if trials is None:
        return []
    names = trials.column_names
    return names[names.index("status") + 1: names.index("epochs_run")]


def distribution(values: list):
    """An Optuna distribution covering ``values`` (the tables keep values, not the space):
    numbers above 0 spanning more than a decade (x20) read as log scale, as the spaces' rates do."""
    if any(isinstance(v, (str, bool)) for v in values):
        return optuna.distributions.CategoricalDistribution(sorted(set(values), key=str))
    low, high = min(values), max(values)
    if all(isinstance(v, int) for v in values):
        return optuna.distributions.IntDistribution(low, high)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=low > 0 and high >= 20 * low)


def study_from_rows(rows: list[dict], params: list[str], metric: str, mode: str,
                    objectives: list[tuple[str, str]] = ()) -> optuna.Study:
    """An in-memory study of the finished trials: good ones COMPLETE with their best value
    (with ``objectives``, their ``objective_<name>`` values: a multi-objective study),
    failed and diverged ones FAIL (as the search told its own study); running ones left out."""
    def direction(m: str) -> str:
        return "maximize" if m == "max" else "minimize"

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line at every trial's end
    try:
        study = optuna.create_study(directions=[direction(m) for _, m in objectives] or [direction(mode)])
    finally:
        optuna.logging.set_verbosity(level)
    finished = [r for r in rows if r["status"] in GOOD + FAILED]
    dists = {}
    for p in params:
        values = [r[p] for r in finished if r.get(p) is not None]
        if values:
            dists[p] = distribution(values)
    for r in finished:
        trial_params = {p: r[p] for p in dists if r.get(p) is not None}
        values = [r.get(f"objective_{n}") for n, _ in objectives] or [r.get(f"best_{metric}")]
        ok = r["status"] in GOOD and all(_finite(v) for v in values)
        study.add_trial(optuna.trial.create_trial(
            params=trial_params, distributions={p: dists[p] for p in trial_params},
            values=values if ok else None,
            state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
            user_attrs={"trial_id": r["trial_id"]}))
    return study


# --- sections: (title, draw(data) -> plotly figure, HTML text, or None to leave it out) ---------
def _completed(data: ReportData, at_least: int) -> bool:
    return len(data.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) >= at_least


def _target(data: ReportData):
    """For Optuna's one-objective plots: the first objective when a study has several."""
    return (lambda t: t.values[0]) if len(data.study.directions) > 1 else None


def _history(data: ReportData):
    if not _completed(data, 1):
        return None
    from optuna.visualization import plot_optimization_history

    return plot_optimization_history(data.study, target=_target(data), target_name=f"best {data.metric}")


def _importance(data: ReportData):
    if not _completed(data, 2):
        return "<p>Parameter importance needs at least two finished trials.</p>"
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import plot_param_importances

    try:
        return plot_param_importances(data.study, evaluator=FanovaImportanceEvaluator(seed=0),
                                      target=_target(data), target_name=f"best {data.metric}")
    except (RuntimeError, ValueError) as e:  # e.g. every trial had the same values
        return f"<p>No parameter importance: {html.escape(str(e))}</p>"


def _parallel(data: ReportData):
    if not _completed(data, 1):
        return None
    from optuna.visualization import plot_parallel_coordinate

    return plot_parallel_coordinate(data.study, target=_target(data), target_name=f"best {data.metric}")


def _slice(data: ReportData):
    if not _completed(data, 1):
        return None
    from optuna.visualization import plot_slice

    return plot_slice(data.study, target=_target(data), target_name=f"best {data.metric}")


def _pareto(data: ReportData):
    """Optuna's Pareto-front plot, for a search of several objectives (``--objectives``);
    left out for one."""
    if len(data.study.directions) < 2:
        return None
    from optuna.visualization import plot_pareto_front

    return plot_pareto_front(data.study)


def _curves(data: ReportData):
    import plotly.graph_objects as go

    if data.epochs is None or not data.epochs.num_rows:
        return None
    best_id, fig = data.best_trial_id(), go.Figure()
    rows = data.epochs.to_pylist()
    for trial in sorted({r["trial_id"] for r in rows}, key=lambda t: t == best_id):  # the best drawn last, on top
        points = sorted((r["epoch"], r[data.metric]) for r in rows if r["trial_id"] == trial)
        best = trial == best_id
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                 name=f"best: {trial}" if best else trial,
                                 line={"width": 4 if best else 1.5, "color": "crimson" if best else None},
                                 opacity=1.0 if best else 0.55))
    fig.update_layout(title="Learning curves of all trials", xaxis_title="epoch", yaxis_title=data.metric)
    return fig


def _confusion(data: ReportData):
    import plotly.graph_objects as go

    cm = data.best.get("test_confusion_matrix")
    if not cm:
        return "<p>No confusion matrix yet: it is computed on the test split when the search ends.</p>"
    classes = [str(c) for c in data.best.get("test_classes") or range(len(cm))]
    fig = go.Figure(go.Heatmap(z=cm, x=classes, y=classes, colorscale="Blues", text=cm, texttemplate="%{text}",
                               hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    fig.update_layout(title=f"Best trial {data.best.get('trial_id')} on the test split",
                      height=min(1200, 200 + 40 * len(cm)), xaxis_title="predicted", yaxis_title="true",
                      yaxis_autorange="reversed",
                      xaxis_type="category", yaxis_type="category")
    return fig


SECTIONS: list[tuple[str, Callable[[ReportData], object]]] = [
    ("Optimisation history", _history),
    ("Parameter importance", _importance),
    ("Parameters against the objective", _parallel),
    ("Slices: each parameter against the objective", _slice),
    ("Learning curves", _curves),
    ("Confusion matrix of the best trial", _confusion),
    ("Pareto front", _pareto),
]


# --- the page ---------------------------------------------------------------------------------
def trials_table(data: ReportData) -> str:
    """Every trial, best first; a header click sorts by that column (a small script below)."""
    if data.trials is None or not data.trials.num_rows:
        return "<p>No trial has started yet.</p>"
    columns = [c for c in data.trials.column_names if c not in HIDDEN_COLUMNS]
    key, sign = f"best_{data.metric}", (-1 if data.mode == "max" else 1)
    rows = sorted(data.rows, key=lambda r: (not _finite(r.get(key)), sign * r[key] if _finite(r.get(key)) else 0))
    best_id = data.best_trial_id()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr{' class=best' if r['trial_id'] == best_id else ''}>"
        + "".join(_cell(r.get(c)) for c in columns) + "</tr>\n" for r in rows)
    return f'<table id="trials"><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>'


def _cell(value) -> str:
    if value is None:
        return "<td></td>"
    if _finite(value):
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f'<td data-v="{value!r}">{text}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _figure_html(fig) -> str:
    if fig is None or isinstance(fig, str):
        return fig or ""
    fig.update_layout(height=max(420, fig.layout.height or 0), margin={"t": 60})
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def build_report(data: ReportData, live: bool) -> str:
    """The whole page. ``live``: the search is running, so the page reloads itself every
    ``REFRESH_S`` seconds; the final report (written when the search ends) does not."""
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs()
    if SCRIPT_END in plotly_js.lower():  # it goes inside <script>: it must not end it early
        raise ValueError("plotly.js holds a closing script tag; cannot embed it")
    sections = "".join(
        f"<section><h2>{html.escape(title)}</h2>{body}</section>\n"
        for title, draw in SECTIONS if (body := _figure_html(draw(data))))
    refresh = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if live else ""
    state = "running: this page reloads itself" if live else "finished"
    counts = {}
    for r in data.rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
    return PAGE.format(title=html.escape(data.title), refresh=refresh, plotly_js=plotly_js, state=state,
                       summary=html.escape(summary), metric=html.escape(data.metric), mode=html.escape(data.mode),
                       table=trials_table(data), sections=sections, sort_js=SORT_JS)


SORT_JS = """
document.querySelectorAll('#trials th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], up = th.dataset.dir !== 'up';
  const key = td => td.dataset.v !== undefined ? parseFloat(td.dataset.v) : td.textContent;
  const rows = Array.from(body.rows).sort((a, b) => {
    const x = key(a.cells[i]), y = key(b.cells[i]);
    const c = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
    return up ? c : -c;
  });
  th.dataset.dir = up ? 'up' : 'down';
  rows.forEach(r => body.appendChild(r));
}));
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<title>raysweep report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }}
th {{ background: #eee; cursor: pointer; }}
tr.best {{ background: #fde2e2; font-weight: bold; }}
.scroll {{ overflow-x: auto; }}
section {{ margin-top: 2em; }}
</style>
<script>{plotly_js}</script>
</head><body>
<h1>raysweep search {title}</h1>
<p>{state}; {summary}; ranked by best {metric} ({mode}). Click a column's header to sort.</p>
<section><h2>Trials</h2><div class="scroll">{table}</div></section>
{sections}
<script>{sort_js}</script>
</body></html>
"""
