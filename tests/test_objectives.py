"""Multi-objective search as plain functions, without Ray: the objectives registry and its
refusals, the Pareto front against a brute-force check, the network measures, the values a
trial reports and what the searcher tells Optuna."""

import dataclasses
import itertools
import math
import pickle
import random
import time

import optuna
import pytest
import ray
import torch
from torch import nn

from cluster.cli import main
from cluster.cost import Prices, Reserved, usage
from cluster.results_cmd import front_first
from cluster.tune_results import PARETO, front_of, with_front
from search_spaces.objectives import (OBJECTIVES, Goal, TrialObjectives, objective_column, pareto_mask,
                                      parse_objectives, trial_objectives)
from search_spaces.samplers import SAMPLERS, choose
from search_spaces.space import load_space
from search_spaces.tuner import SearchConfig, build_searcher, default_scheduler
from trainers.config import TrainRunConfig
from trainers.configtools import ConfigError
from trainers.data import load_data
from trainers.distributed import Placement
from trainers.model_measures import count_params, forward_flops, latency_ms, measure_model


# --- parsing and refusals -------------------------------------------------------------
def test_objectives_parse_with_their_default_directions():
    goals = parse_objectives("val_accuracy:max, latency_ms ,params:min")
    assert goals == (Goal("val_accuracy", "max"), Goal("latency_ms", "min"), Goal("params", "min"))
    assert parse_objectives(["val_loss", "cost"]) == (Goal("val_loss", "min"), Goal("cost", "min"))
    assert parse_objectives(None) == parse_objectives("") == ()
    assert {"val_accuracy", "val_loss", "latency_ms", "params", "flops", "cost"} <= set(OBJECTIVES.names())


@pytest.mark.parametrize("text, says", [
    ("val_accuracy:max", "1 objective(s) given; give 2 or 3"),
    ("val_accuracy,params,flops,latency_ms", "4 objective(s) given"),
    ("params:min,val_accuracy:max", "the first objective (params) must be a validation metric"),
    ("val_accuracy:max,speed:min", "unknown objective 'speed'"),
    ("val_accuracy:max,params:down", "direction 'down' is not max or min"),
    ("val_accuracy:max,params,params", "params given twice"),
    ("val_loss:max,params", "val_loss is always minimised"),
])
def test_bad_objectives_are_refused_naming_the_flag_value_and_fix(text, says):
    with pytest.raises(ConfigError) as e:
        parse_objectives(text)
    assert says in str(e.value) and "--objectives" in str(e.value)


def test_what_needs_one_number_is_refused_with_objectives():
    two = "val_accuracy:max,params:min"
    assert default_scheduler(two) == "none" and default_scheduler(None) == "asha"
    assert not SearchConfig(objectives=two, scheduler="none").problems()
    problems = " | ".join(SearchConfig(objectives=two, scheduler="asha", target="val_accuracy=0.9").problems())
    assert "--scheduler: asha" in problems and "use --scheduler none" in problems
    assert "--target: val_accuracy=0.9" in problems and "drop --target" in problems
    gpu = SearchConfig(objectives="val_accuracy,latency_ms", scheduler="none",
                       placement=Placement(workers=2, use_gpu=True)).problems()
    assert len(gpu) == 1 and "--workers-per-trial 1" in gpu[0]


def test_a_sampler_that_cannot_take_several_objectives_is_refused(monkeypatch):
    # Every sampler of Optuna 5.0 takes them; the refusal is for one registered otherwise.
    assert all(SAMPLERS[n].multi_objective for n in SAMPLERS.names())
    monkeypatch.setitem(SAMPLERS._items, "qmc", dataclasses.replace(SAMPLERS["qmc"], multi_objective=False))
    problems = SearchConfig(objectives="val_accuracy,params", scheduler="none", searcher="qmc").problems()
    assert len(problems) == 1 and "qmc cannot optimise several objectives" in problems[0] and "tpe" in problems[0]
    choice = choose("auto", load_space("digits_cnn"), 12, objectives=2)
    assert choice.name == "tpe" and "auto chose tpe for 2 objectives" in choice.notes[0]


@pytest.mark.parametrize("extra, says", [
    (["--objectives", "val_accuracy:max,cost:min"], "--objectives cost: a trial's cost needs prices"),
    (["--objectives", "val_accuracy:max,params:min", "--scheduler", "asha"], "--scheduler: asha"),
    (["--objectives", "val_accuracy:max,params:min", "--target", "val_accuracy=0.9"], "--target: val_accuracy=0.9"),
    (["--objectives", "params:min,val_accuracy:max"], "must be a validation metric"),
])
def test_the_cli_refuses_before_ray_starts(tmp_path, capsys, extra, says, no_ray_before):
    code = main(["tune", "--space", "digits_cnn", "--storage", str(tmp_path), "--name", "r", *extra])
    assert code == 2 and says in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "r").exists()


# --- the Pareto front --------------------------------------------------------------------
def _brute_force_front(points, modes):
    def better_or_equal(a, b):
        return all((x >= y) if m == "max" else (x <= y) for x, y, m in zip(a, b, modes))

    ok = [all(v is not None and math.isfinite(v) for v in p) for p in points]
    return [ok[i] and not any(ok[j] and better_or_equal(points[j], points[i]) and points[j] != points[i]
                              for j in range(len(points))) for i in range(len(points))]


@pytest.mark.parametrize("modes", [("max", "min"), ("min", "min"), ("max", "min", "min"), ("max", "max", "min")])
def test_pareto_mask_matches_brute_force_with_ties_duplicates_and_gaps(modes):
    rng = random.Random(len(modes) * 7 + modes.count("max"))
    for _ in range(40):
        # a few values only: many ties and exact duplicates; some missing or NaN
        points = [[rng.choice([0.0, 1.0, 2.0, 3.0]) for _ in modes] for _ in range(rng.randint(0, 14))]
        for p in rng.sample(points, k=min(2, len(points))):
            p[rng.randrange(len(modes))] = rng.choice([None, math.nan])
        assert pareto_mask(points, modes) == _brute_force_front(points, modes), points


def test_pareto_mask_on_a_known_front():
    points = [(0.9, 100), (0.95, 300), (0.9, 100), (0.8, 50), (0.85, 200), (0.95, 400)]
    assert pareto_mask(points, ("max", "min")) == [True, True, True, True, False, False]


def test_the_front_column_counts_only_trials_with_a_result_and_best_json_lists_it():
    goals = parse_objectives("val_accuracy:max,params:min")
    acc, par = objective_column("val_accuracy"), objective_column("params")
    rows = [{"trial_id": "a", "status": "completed", acc: 0.9, par: 10.0, "checkpoint": "/a", "optim_lr": 0.1},
            {"trial_id": "b", "status": "failed", acc: 0.99, par: 1.0, "checkpoint": None, "optim_lr": 0.2},
            {"trial_id": "c", "status": "early_stopped", acc: 0.95, par: 20.0, "checkpoint": "/c", "optim_lr": 0.3},
            {"trial_id": "d", "status": "completed", acc: 0.8, par: 30.0, "checkpoint": "/d", "optim_lr": 0.4}]
    marked = with_front(rows, goals)
    assert [r[PARETO] for r in marked] == [True, False, True, False]  # b failed: it does not dominate a
    front = front_of(marked, goals, ["optim_lr"])
    assert [t["trial_id"] for t in front] == ["c", "a"]
    assert front[0] == {"trial_id": "c", "values": {"val_accuracy": 0.95, "params": 20.0},
                        "params": {"optim_lr": 0.3}, "checkpoint": "/c"}
    assert [r["trial_id"] for r in front_first(marked)] == ["a", "c", "b", "d"]


# --- measures ------------------------------------------------------------------------------
def test_params_and_flops_of_a_tiny_network():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    net[0].bias.requires_grad_(False)
    assert count_params(net) == 4 * 9 + 4 * 64 * 10 + 10
    x = torch.zeros(2, 1, 8, 8)
    assert forward_flops(net, x) == 2 * (4 * 64 * 9) + 2 * (256 * 10)  # per image, 2 per multiply-add


def test_latency_is_the_median_of_timed_calls_after_the_warm_ups():
    calls = []
    delays = iter([0.0] * 3 + [0.001] * 4 + [0.02] * 2 + [0.003] * 4)  # 3 warm-ups, then 10 timed

    def forward():
        calls.append(1)
        time.sleep(next(delays))

    ms = latency_ms(forward, torch.device("cpu"), warmup=3, repeats=10)
    assert len(calls) == 13 and 2.5 <= ms <= 15  # the median: one of the 3 ms calls, not the 20 ms outliers


def test_a_trial_measures_its_network_as_fit_builds_it_and_reports_cost_so_far():
    cfg = TrainRunConfig.from_dict({"data": {"name": "digits"}, "model": {"name": "simple_cnn"}})
    data = load_data(cfg.data)
    goals = parse_objectives("val_accuracy,latency_ms,flops")
    extra = trial_objectives(goals, cfg, data, torch.device("cpu"), cost_per_s=0.5, started=time.time() - 10)
    values = extra()
    assert set(values) == {"latency_ms", "flops"}  # no cost objective: no cost reported
    assert 0 < values["latency_ms"] < 1000 and values["flops"] > 0
    assert pickle.loads(pickle.dumps(extra)).measures == extra.measures  # it travels to Ray Train's controller
    from trainers.loop import build_worker_model, autocast_for

    built = build_worker_model(cfg, data, torch.device("cpu"))
    again = measure_model({"params", "flops"}, built, data.shape, torch.device("cpu"),
                          lambda: autocast_for("fp32", "cpu"))
    assert again["flops"] == values["flops"] and again["params"] == count_params(built.net)
    # cost: the driver's rate (reserved x prices) x the seconds since the trial started
    reserved, prices = Reserved(cpus=2.0, gpus=0.5), Prices(gpu_hour=1.2, cpu_hour=0.05)
    rate = prices.cost(reserved.cpus, reserved.gpus)
    cost = TrialObjectives({}, rate, started=time.time() - 100)()["cost"]
    assert cost == pytest.approx(usage(reserved, 100, prices)["cost"], rel=0.01)


# --- what Optuna is told ---------------------------------------------------------------------
def test_the_searcher_tells_optuna_the_values_of_the_best_epoch_by_the_first_objective():
    space = load_space("digits_cnn")
    search = SearchConfig(trials=2, objectives="val_accuracy:max,cost:min", scheduler="none", searcher="random")
    searcher = build_searcher(dataclasses.replace(space, metric="val_accuracy"), search, "s", None)
    assert searcher.metric == ["val_accuracy", "cost"] and searcher.mode == ["max", "min"]
    for trial_id, epochs in (("t1", [(0.5, 1.0), (0.7, 2.0), (0.7, 3.0), (0.6, 4.0)]), ("t2", [(0.4, 1.0)])):
        assert searcher.suggest(trial_id)
        for acc, cost in epochs:
            searcher.on_trial_result(trial_id, {"val_accuracy": acc, "cost": cost, "training_iteration": 1})
        searcher.on_trial_complete(trial_id, {"val_accuracy": epochs[-1][0], "cost": epochs[-1][1]})
    told = [t.values for t in searcher._ot_study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert told == [[0.7, 3.0], [0.4, 1.0]]  # of equal accuracies the latest epoch, as the tables pick


def test_every_combination_of_two_objectives_parses():
    for a, b in itertools.permutations(OBJECTIVES.names(), 2):
        if OBJECTIVES[a].kind == "reported":
            assert [g.name for g in parse_objectives(f"{a},{b}")] == [a, b]


def test_the_api_takes_objectives_and_refuses_as_the_cli_does(tmp_path, no_ray_before):
    import raysweep

    with pytest.raises(ConfigError, match=r"--objectives cost: .*add --price .*prices="):
        raysweep.tune("digits_cnn", objectives="val_accuracy:max,cost:min", storage=str(tmp_path), name="a")
    with pytest.raises(ConfigError, match="--scheduler: asha"):
        raysweep.tune("digits_cnn", objectives=["val_accuracy", "params"], scheduler="asha", storage=str(tmp_path))
    assert not ray.is_initialized() and not (tmp_path / "a").exists()
