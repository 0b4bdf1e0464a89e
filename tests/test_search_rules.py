"""Samplers (``--searcher``) and stop rules (``--target``, ``--time-budget``) as plain
functions, without Ray: the registry, auto's choice, the parsers, the stopper's logic."""

import pickle

import optuna
import pytest

from cluster.cli import main
from search_spaces.samplers import SAMPLERS, SEARCHERS, build_sampler, choose
from search_spaces.space import load_space, parse_space
from search_spaces.stop_rules import STOPPED, StopRules, Target, parse_duration_s, parse_target
from search_spaces.tuner import SearchConfig, build_searcher
from trainers.configtools import ConfigError

CONTINUOUS = parse_space({"name": "c", "params": {
    "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2, "default": 1e-3},
    "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.5, "default": 0.1},
    "augment.crop_padding": {"type": "int", "low": 0, "high": 4, "default": 2}}}, "c.yaml")


def _sampled(name: str, space, trials: int, seed: int) -> list[dict]:
    study = optuna.create_study(direction="maximize", sampler=build_sampler(choose(name, space, trials), seed))
    objective = space.define_by_run()
    study.optimize(lambda t: objective(t) or sum(v for v in t.params.values() if isinstance(v, float)),
                   n_trials=trials)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_explores_a_conditional_space_offline_and_is_seeded(name):
    # 11 trials: GP and TPE fit their models after 10 startup trials (one GP fit takes ~3 s
    # here, so seeding is checked on fewer); the space's "when:" and loguniform_or_zero
    # dimensions are absent from some trials.
    space = load_space("digits_cnn")
    assert all(3.0e-4 <= p["optim.lr"] <= 2.0e-2 for p in _sampled(name, space, 11, seed=3))
    assert _sampled(name, space, 4, seed=3) == _sampled(name, space, 4, seed=3) != _sampled(name, space, 4, seed=4)


def test_tpe_is_multivariate_and_groups_conditional_dimensions():
    sampler = build_sampler(choose("tpe", CONTINUOUS, 12), 0)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate and sampler._group  # no public getter; these are what group=True sets
    assert isinstance(build_sampler(choose("gp", CONTINUOUS, 12), 0), optuna.samplers.GPSampler)
    assert isinstance(build_sampler(choose("qmc", CONTINUOUS, 12), 0), optuna.samplers.QMCSampler)


def test_auto_chooses_gp_for_10_to_100_trials_over_continuous_dimensions_and_tpe_otherwise():
    gp = choose("auto", CONTINUOUS, 20)
    assert gp.name == "gp" and "auto chose gp" in gp.notes[0]
    assert choose("auto", CONTINUOUS, 9).name == "tpe" and choose("auto", CONTINUOUS, 101).name == "tpe"
    digits = choose("auto", load_space("digits_cnn"), 20)
    assert digits.name == "tpe" and "optim.name" in digits.notes[0] and "optim.momentum" in digits.notes[0]


def test_gp_and_qmc_name_the_conditional_dimensions_they_draw_at_random():
    for name in ("gp", "qmc", "random"):
        notes = " ".join(choose(name, load_space("digits_cnn"), 20).notes)
        assert "optim.momentum" in notes and "optim.l1" in notes and "at random" in notes
    assert choose("tpe", load_space("digits_cnn"), 20).notes == ()
    assert choose("gp", CONTINUOUS, 20).notes == ()


def test_optuna_is_a_deprecated_name_of_tpe_that_still_works():
    choice = choose("optuna", CONTINUOUS, 5)
    assert choice.name == "tpe" and len(choice.notes) == 1 and "deprecated" in choice.notes[0]
    assert "optuna" in SEARCHERS and not SearchConfig(searcher="optuna").problems()


def test_model_based_samplers_start_at_the_space_defaults(tmp_path):
    space = load_space("digits_cnn")
    for name, first in (("tpe", True), ("gp", True), ("qmc", False), ("random", False)):
        searcher = build_searcher(space, SearchConfig(searcher=name, trials=4), f"s-{name}", None)
        assert bool(searcher._points_to_evaluate) is first, name
        pickle.dumps(searcher)  # Tune saves the searcher with the experiment
    for first_point, first in (("default", True), ("none", False)):  # a comparison starts every searcher alike
        for name in ("tpe", "random"):
            searcher = build_searcher(space, SearchConfig(searcher=name, first_point=first_point), f"f-{name}", None)
            assert bool(searcher._points_to_evaluate) is first, (name, first_point)
    assert SearchConfig(first_point="sometimes").problems() == [
        "--first-point: 'sometimes' is not one of auto, default, none"]


def test_parse_target_takes_the_metrics_direction_and_refuses_bad_ones():
    acc, loss = parse_target("val_accuracy=0.9"), parse_target(" val_loss = 0.2 ")
    assert acc == Target("val_accuracy", 0.9) and acc.reached({"val_accuracy": 0.9})
    assert not acc.reached({"val_accuracy": 0.89}) and not acc.reached({"val_accuracy": float("nan")})
    assert loss.reached({"val_loss": 0.19}) and not loss.reached({"val_loss": 0.21}) and not loss.reached({})
    for bad, words in (("val_accuracy", "not METRIC=VALUE"), ("=0.9", "not METRIC=VALUE"),
                       ("accuracy=0.9", "unknown metric 'accuracy'"), ("val_f1=high", "not a finite number"),
                       ("val_f1=inf", "not a finite number")):
        with pytest.raises(ConfigError) as e:
            parse_target(bad)
        assert "--target" in str(e.value) and words in str(e.value) and "val_accuracy" in str(e.value), bad


def test_parse_duration_accepts_seconds_minutes_hours_and_refuses_the_rest():
    assert [parse_duration_s(t) for t in ("90", "90s", "30m", "1.5h", "2M")] == [90, 90, 1800, 5400, 120]
    for bad in ("0", "0m", "-5s", "5x", "m", "", "nan", "1e999h"):
        with pytest.raises(ConfigError, match="--time-budget: .* e.g. 30m"):
            parse_duration_s(bad)


def test_search_config_reports_bad_searcher_target_and_time_budget_at_once():
    problems = SearchConfig(searcher="cmaes", target="acc=1", time_budget_s=0).problems()
    assert len(problems) == 3, problems
    assert "'cmaes'" in problems[0] and "tpe" in problems[0]
    assert "unknown metric 'acc'" in problems[1] and "0 must be a duration > 0" in problems[2]
    for bad in (-1, float("nan"), True, "30m"):
        assert SearchConfig(time_budget_s=bad).problems(), bad
    assert not SearchConfig(target="val_loss=0.1", time_budget_s=1800).problems()
    assert SearchConfig().stop_rules() is None


@pytest.mark.parametrize("argv, words", [
    (["--searcher", "cmaes"], "invalid choice: 'cmaes'"),
    (["--target", "val_acc=0.9"], "--target: unknown metric 'val_acc'"),
    (["--target", "val_accuracy:0.9"], "--target: 'val_accuracy:0.9' is not METRIC=VALUE"),
    (["--time-budget", "0s"], "--time-budget: '0s' is not a duration > 0"),
])
def test_the_cli_refuses_bad_stop_rules_and_searchers_before_ray(tmp_path, capsys, argv, words):
    try:
        code = main(["tune", "--space", "digits_cnn", "--storage", str(tmp_path), *argv])
    except SystemExit as e:  # argparse's refusal
        code = e.code
    assert code == 2 and words in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran


class Ledger:
    def __init__(self):
        self.told = []

    def budget_spent(self, reason, status):
        self.told.append((reason, status))


def test_target_stops_the_trial_that_reached_it_then_the_search_and_tells_the_ledger_once():
    ledger = Ledger()
    rules = StopRules(parse_target("val_accuracy=0.9"), ledger=ledger)
    assert not rules("a", {"val_accuracy": 0.5}) and not rules.stop_all()
    assert rules("b", {"val_accuracy": 0.95})
    assert rules.stop_all() and rules.stop_all() and rules("c", {"val_accuracy": 0.1})  # racing results stop too
    assert ledger.told == [("target val_accuracy >= 0.9 reached by trial b (--target)", STOPPED)]


def test_time_budget_counts_from_the_first_check_and_a_resumed_search_gets_what_was_left():
    now = [100.0]
    ledger = Ledger()
    rules = StopRules(time_budget_s=10, ledger=ledger, clock=lambda: now[0])
    assert not rules.stop_all()  # starts the clock
    now[0] = 106.0
    assert not rules.stop_all() and rules.left_s == pytest.approx(4)
    resumed = pickle.loads(pickle.dumps(rules))  # Tune restores it from tuner.pkl
    resumed.clock = lambda: now[0]
    now[0] = 500.0  # the driver was down meanwhile: not counted
    assert not resumed.stop_all()
    now[0] = 504.0
    assert resumed.stop_all() and resumed.reason == "time budget of 10 s spent (--time-budget)"
    assert resumed.ledger.told == [(resumed.reason, STOPPED)] and ledger.told == []


def test_the_ledger_records_trials_a_rule_stopped_and_why_for_best_json(tmp_path, capsys):
    from types import SimpleNamespace

    from cluster.cost import Reserved
    from cluster.store import ResultsStore
    from cluster.tune_cmd import TuneRequest, spending
    from cluster.tune_results import STOP_FILE, SearchResultsCallback

    space = load_space("digits_cnn")
    ledger = SearchResultsCallback(str(tmp_path), "s", space, max_epochs=3, reserved=Reserved(cpus=1.0))
    ledger.on_trial_start(0, [], SimpleNamespace(trial_id="t1", config={"optim.lr": 0.01, "optim.name": "adam"}))
    rules = StopRules(parse_target("val_loss=0.1"), ledger=ledger)
    rules("t1", {"val_loss": 0.05})
    assert rules.stop_all()
    store = ResultsStore(str(tmp_path), "s")
    rows = store.read_table("trials.parquet").to_pylist()
    assert [(r["trial_id"], r["status"]) for r in rows] == [("t1", STOPPED)]
    reason = store.read_json(STOP_FILE)["stop_reason"]
    assert reason == "target val_loss <= 0.1 reached by trial t1 (--target)"
    req = TuneRequest(space, {}, SearchConfig(trials=6, budget_cpu_hours=1e-9), str(tmp_path), "s")
    assert spending(req, rows, reason)["stop_reason"] == reason  # what a stopper recorded comes first
    assert spending(req, rows)["stop_reason"].startswith("CPU-hours budget spent")  # as before: from the totals
    assert spending(TuneRequest(space, {}, SearchConfig(trials=6), str(tmp_path), "s"), rows)["stop_reason"] == \
        "all 6 trials ran (--trials)"
    assert f"stopped: {reason}" in capsys.readouterr().out


def test_the_result_a_stopper_ends_a_trial_on_is_told_to_optuna():
    """Tune skips the searcher's on_trial_result for a result whose trial it stops (a target
    reached at the first epoch); Optuna must still get that value, not FAIL."""
    searcher = build_searcher(load_space("digits_cnn"), SearchConfig(searcher="random"), "s", None)
    assert searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"val_accuracy": 0.93, "epoch": 1, "done": True})
    (trial,) = searcher._ot_study.get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.93
