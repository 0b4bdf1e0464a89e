"""Contract tests per shipped search space, and the validation of users' spaces."""

import math

import optuna
import pytest
import yaml

from search_spaces.space import params_to_keys, parse_space, shipped_spaces, load_space
from trainers.configtools import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_promised_spaces_ship():
    assert {"digits_cnn", "cifar_resnet18", "cifar_fast", "transfer_resnet50"} <= set(shipped_spaces())


@pytest.mark.parametrize("name", shipped_spaces())
def test_every_shipped_space_samples_inside_its_bounds_and_converts_to_optuna(name):
    space = load_space(name)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(space.default_point())
    dims = {d.key: d for d in space.dimensions}
    for i in range(12):
        trial = study.ask()
        space.define_by_run()(trial)
        cfg = space.trial_config({}, trial.params)  # a valid train config every time
        for key, value in params_to_keys(trial.params).items():
            d = dims[key]
            if d.type == "categorical":
                assert value in d.choices
            elif not (d.type == "loguniform_or_zero" and value == 0):
                assert d.low <= value <= d.high, (key, value)
            section, field = key.split(".", 1)
            assert getattr(getattr(cfg, section), field) == value
        for key, d in dims.items():  # conditional dimensions only appear when their condition holds
            if d.when and key in trial.params:
                assert all(trial.params[k] in v for k, v in d.when.items())
        study.tell(trial, float(i))
    for key, value in space.fixed.items():
        section, field = key.split(".", 1)
        assert getattr(getattr(cfg, section), field) == value


def test_defaults_are_the_first_point():
    space = load_space("digits_cnn")
    point = space.default_point()
    assert point["optim.lr"] == 2.0e-3 and point["optim.l1.off"] is True and "optim.momentum" not in point


def test_every_problem_is_reported_at_once():
    raw = yaml.safe_load("""
name: bad
params:
  optim.lrr: {type: uniform, low: 0, high: 1}
  optim.lr: {type: loguniform, low: 0, high: 1}
  optim.weight_decay: {type: uniform, low: 0.5, high: 0.1}
  optim.name: {type: categorical, choices: []}
  model.dropout: {type: beta, low: 0, high: 1}
  optim.momentum: {type: uniform, low: 0.8, high: 0.9, when: {model.dropout: [0.1]}}
  optim: {type: uniform, low: 0, high: 1}
""")
    with pytest.raises(ConfigError) as err:
        parse_space(raw, "bad.yaml")
    text = "\n".join(err.value.problems)
    assert "'optim.lrr' is not a train-config key; 'lrr' is unknown there" in text
    assert "optim.lr.low: 0 must be > 0 on a log scale" in text
    assert "optim.weight_decay: low 0.5 > high 0.1" in text
    assert "optim.name.choices: empty" in text
    assert "model.dropout.type: 'beta' is not a known distribution" in text
    assert "'model.dropout' must be a categorical dimension" in text
    assert "'optim' is a section, not a value" in text
    assert len(err.value.problems) == 7


def test_unknown_space_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="shipped: .*digits_cnn"):
        load_space("nope")


def test_loguniform_or_zero_turns_off_and_on():
    space = parse_space({"name": "l1", "params": {"optim.l1": {"type": "loguniform_or_zero", "low": 1e-6,
                                                               "high": 1e-3}}}, "l1.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = set()
    for _ in range(20):
        t = study.ask()
        space.define_by_run()(t)
        values.add(space.trial_config({}, t.params).optim.l1 == 0)
        study.tell(t, 0.0)
    assert values == {True, False}
    assert math.isclose(space.trial_config({}, {"optim.l1.off": False, "optim.l1": 1e-4}).optim.l1, 1e-4)


def test_what_the_user_sets_beats_a_spaces_fixed_keys_and_samples_beat_both():
    space = load_space("cifar_fast")  # fixes data.root: ./data/cifar10 and optim.name: momentum
    cfg = space.trial_config({"data": {"root": "/mnt/cifar"}, "train": {"epochs": 3}}, {"optim.lr": 0.5})
    assert (cfg.data.root, cfg.data.name, cfg.train.epochs, cfg.optim.lr) == ("/mnt/cifar", "parquet", 3, 0.5)
    assert cfg.optim.name == "momentum"


def test_concurrency_counts_cpus_and_gpus():
    from search_spaces.tuner import SearchConfig, concurrency
    from trainers.distributed import Placement

    assert concurrency(SearchConfig(trials=12), {"CPU": 2}) == 2
    assert concurrency(SearchConfig(trials=12, placement=Placement(workers=2)), {"CPU": 5}) == 2
    gpu = SearchConfig(trials=12, placement=Placement(workers=1, use_gpu=True, gpus_per_worker=0.5))
    assert concurrency(gpu, {"CPU": 16, "GPU": 2}) == 4
    assert concurrency(SearchConfig(trials=1), {"CPU": 8}) == 1
