"""The search report's HTML builder on synthetic tables: no Ray, no browser."""

from __future__ import annotations

import re

import optuna
import pyarrow as pa
import pytest

from cluster.report_html import ReportData, build_report, distribution, param_columns, study_from_rows
from cluster.tables import EPOCHS_SCHEMA, rows_to_table
from cluster.tune_results import trials_schema
from search_spaces.space import load_space

EVIL = "<script>alert('x')</script>"


def synthetic(n_good: int = 4) -> ReportData:
    """``n_good`` finished trials, one failed (with markup in its error), one running."""
    rows, epochs = [], []
    for i in range(n_good):
        acc = [0.5 + 0.1 * i + 0.05 * e for e in (1, 2)]
        rows.append({"trial_id": f"t{i}", "status": "completed", "optim_name": ["adam", "adamw"][i % 2],
                     "optim_lr": 3e-4 * 4 ** i, "model_dropout": 0.1 * i, "optim_momentum": None,
                     "epochs_run": 2, "best_epoch": 2, "best_val_accuracy": max(acc), "final_val_accuracy": acc[-1]})
        epochs += [{"trial_id": f"t{i}", "epoch": e, "val_accuracy": a, "val_loss": 1 - a} for e, a in zip((1, 2), acc)]
    rows.append({"trial_id": "bad", "status": "failed", "optim_name": "adam", "optim_lr": 1e-3, "epochs_run": 0,
                 "error": EVIL})
    rows.append({"trial_id": "run", "status": "running", "optim_name": "adam", "optim_lr": 2e-3, "epochs_run": 1})
    schema = trials_schema(load_space("digits_cnn"))
    best = {"status": "ok", "trial_id": f"t{n_good - 1}", "metric": "val_accuracy", "mode": "max",
            "test_confusion_matrix": [[5, 1], [0, 4]], "test_classes": ["cat", "dog"]}
    return ReportData(rows_to_table(rows, schema), rows_to_table(epochs, EPOCHS_SCHEMA), best, title="synthetic")


def sections(page: str) -> list[str]:
    return re.findall(r"<section><h2>([^<]*)</h2>", page)


@pytest.fixture(scope="module")
def page() -> str:
    return build_report(synthetic(), live=False)


def test_the_page_has_every_trial_as_a_row_best_first_and_every_plot(page):
    body = page.split('<table id="trials">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr( class=best)?>\s*<td>([^<]*)</td>", body)
    assert [r[1] for r in rows] == ["t3", "t2", "t1", "t0", "bad", "run"]  # best first, unscored last
    assert rows[0][0] == " class=best" and all(not r[0] for r in rows[1:])
    assert sections(page) == ["Trials", "Optimisation history", "Parameter importance",
                              "Parameters against the objective", "Slices: each parameter against the objective",
                              "Learning curves", "Confusion matrix of the best trial"]
    assert page.count('class="plotly-graph-div"') == 6
    assert '"name":"best: t3"' in page and '"z":[[5,1],[0,4]]' in page


def test_the_page_is_offline_and_embeds_plotly_once(page):
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()) == 1
    ours = page.replace(get_plotlyjs(), "")  # the library names a CDN only for maps (topojson), unused here
    assert not re.search(r"<script[^>]*\bsrc=", ours) and "http" not in ours.replace("http-equiv", "")
    assert ours.count("Plotly.newPlot") == 6


def test_text_from_the_tables_is_escaped(page):
    assert EVIL not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_a_running_search_reloads_itself_and_the_final_report_does_not(page):
    assert '<meta http-equiv="refresh"' in build_report(synthetic(), live=True)
    assert "http-equiv" not in page


def test_before_two_trials_finish_the_page_says_what_is_missing():
    data = synthetic(n_good=1)
    data.best = {}
    page = build_report(data, live=True)
    assert "needs at least two finished trials" in page and "No confusion matrix yet" in page
    empty = build_report(ReportData(None, None, title="new"), live=True)
    assert "No trial has started yet" in empty
    assert sections(empty) == ["Trials", "Parameter importance", "Confusion matrix of the best trial"]  # notes only


def test_the_study_has_finished_trials_only_failed_ones_as_fail():
    data = synthetic()
    study = data.study
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4 and states.count(optuna.trial.TrialState.FAIL) == 1
    assert study.best_trial.user_attrs["trial_id"] == "t3" and study.best_value == pytest.approx(0.9)
    assert param_columns(data.trials)[:2] == ["optim_name", "optim_lr"]
    assert "optim_momentum" not in study.best_trial.params  # a conditional key that was off


def test_a_min_mode_search_ranks_the_lowest_first():
    data = synthetic()
    study = study_from_rows(data.rows, param_columns(data.trials), "val_accuracy", "min")
    assert study.best_trial.user_attrs["trial_id"] == "t0"


def test_distributions_are_inferred_from_the_values():
    assert distribution([3e-4, 1e-3, 2e-2]).log
    assert not distribution([0.0, 1e-5, 1e-4]).log  # loguniform_or_zero: 0 is a value
    assert isinstance(distribution(["adam", "sgd"]), optuna.distributions.CategoricalDistribution)
    assert isinstance(distribution([True, False]), optuna.distributions.CategoricalDistribution)
    assert isinstance(distribution([16, 64]), optuna.distributions.IntDistribution)


def test_the_pareto_front_appears_only_for_several_objectives(page):
    assert "Pareto front" not in sections(page)
    data = synthetic()
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, loss in [(0.9, 0.3), (0.8, 0.2), (0.7, 0.5)]:
        study.add_trial(optuna.trial.create_trial(values=[acc, loss], params={"x": acc},
                                                  distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))
    data._study = study
    assert "Pareto front" in sections(build_report(data, live=False))


def test_params_columns_follow_the_trials_schema():
    schema = trials_schema(load_space("digits_cnn"))
    table = pa.table({f.name: pa.array([], f.type) for f in schema}, schema=schema)
    assert param_columns(table) == ["optim_name", "optim_lr", "optim_momentum", "optim_weight_decay", "optim_l1",
                                    "model_dropout", "loss_label_smoothing", "augment_rotation", "augment_shift"]


def test_the_search_callback_rewrites_a_live_report_as_each_trial_ends(tmp_path):
    """What a running search writes (SearchResultsCallback, fed as by Tune): a page that
    reloads itself, one row more after each trial."""
    from types import SimpleNamespace

    from cluster.report_cmd import LiveReport
    from cluster.tune_results import SearchResultsCallback

    space = load_space("digits_cnn")
    callback = SearchResultsCallback(str(tmp_path), "live", space, max_epochs=1,
                                     report=LiveReport(space.metric, space.mode, min_interval_s=0))
    for i in range(2):
        trial = SimpleNamespace(trial_id=f"t{i}", config={**space.default_point(), "optim.lr": 1e-3 * (i + 1)})
        callback.on_trial_start(0, [], trial)
        callback.on_trial_result(0, [], trial, {"epoch": 1, "val_accuracy": 0.5 + i / 10, "val_loss": 1.0})
        callback.on_trial_complete(0, [], trial)
        page = (tmp_path / "live" / "report.html").read_text()
        assert '<meta http-equiv="refresh"' in page
        assert page.split('<table id="trials">')[1].split("</table>")[0].count("<tr") == i + 2
    assert callback.report.warned is False


def test_a_report_that_cannot_be_written_warns_once_and_the_search_goes_on(tmp_path, capsys):
    from cluster.report_cmd import LiveReport
    from cluster.store import ResultsStore

    (tmp_path / "blocked").write_text("a file where the storage directory belongs")
    live = LiveReport("val_accuracy", "max", min_interval_s=0)
    for _ in range(2):
        live(ResultsStore(str(tmp_path / "blocked"), "x"))  # raises nothing
    assert capsys.readouterr().out.count("warning: report.html not updated") == 1
