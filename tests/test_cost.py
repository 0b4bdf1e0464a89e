"""cluster.cost: usage, prices and budgets, as plain functions (no Ray)."""

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml

from cluster.cli import main
from cluster.cost import (PRICE_LABELS, Budget, BudgetStopper, Prices, Reserved, node_type_prices, parse_prices, total,
                          usage)
from trainers.configtools import ConfigError
from trainers.distributed import Placement


def test_prices_parse_from_the_flag_and_from_a_mapping():
    assert parse_prices("gpu_hour=1.2,cpu_hour=0.05") == Prices(gpu_hour=1.2, cpu_hour=0.05)
    assert parse_prices(" cpu_hour = 0.5 ") == Prices(cpu_hour=0.5)  # a price left out costs 0
    assert parse_prices({"gpu_hour": 2}) == Prices(gpu_hour=2.0)
    assert parse_prices("gpu_hour=0") == Prices()  # free is a price
    assert parse_prices(None) is None


@pytest.mark.parametrize("text, says", [
    ("gpu=1.2", "unknown price 'gpu'; known: gpu_hour, cpu_hour"),
    ("gpu_hour=-1", "gpu_hour='-1' must be a finite number >= 0"),
    ("gpu_hour=nan", "must be a finite number >= 0"),
    ("cpu_hour=inf", "must be a finite number >= 0"),
    ("cpu_hour=cheap", "must be a finite number >= 0"),
    ("gpu_hour=1,gpu_hour=2", "gpu_hour given twice"),
    ("gpu_hour", "'gpu_hour' is not KEY=VALUE"),
    ("", "is not KEY=VALUE"),
])
def test_bad_prices_are_refused_naming_the_flag(text, says):
    with pytest.raises(ConfigError) as e:
        parse_prices(text)
    assert "--price: " in str(e.value) and says in str(e.value)


def test_bad_prices_from_the_api_name_its_argument():
    with pytest.raises(ConfigError, match=r"prices: gpu_hour=True must be a finite number"):
        parse_prices({"gpu_hour": True}, "prices")
    with pytest.raises(ConfigError, match="prices: no price given"):
        parse_prices({}, "prices")


@pytest.mark.parametrize("command", [["train"], ["tune", "--space", "digits_cnn"]])
def test_the_commands_refuse_a_bad_price_before_anything_runs(command, tmp_path, capsys):
    assert main([*command, "--storage", str(tmp_path), "--price", "gpu_hour=1,tpu_hour=3"]) == 2
    err = capsys.readouterr().err
    assert "--price: unknown price 'tpu_hour'" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # no run directory: refused before Ray started


def test_usage_is_reserved_resources_times_wall_time():
    two = Reserved.of(Placement(workers=2, cpus_per_worker=1.5))
    assert two == Reserved(cpus=3.0, gpus=0.0)
    quarter = Reserved.of(Placement(workers=1, use_gpu=True, cpus_per_worker=1.0, gpus_per_worker=0.25),
                          driver_cpus=0.5)
    assert quarter == Reserved(cpus=1.5, gpus=0.25)
    used = usage(quarter, 7200.0, Prices(gpu_hour=2.0, cpu_hour=0.1))
    assert used["cpu_seconds"] == 10800 and used["gpu_seconds"] == 1800
    assert math.isclose(used["cost"], 3 * 0.1 + 0.5 * 2.0)
    assert usage(quarter, 10.0, None)["cost"] is None  # no prices, no cost
    assert usage(quarter, None, Prices()) == {"cpu_seconds": None, "gpu_seconds": None, "cost": None}
    rows = [usage(two, 10.0, Prices(cpu_hour=3.6)), usage(two, None, None), usage(two, 20.0, Prices(cpu_hour=3.6))]
    assert total(rows) == {"cpu_seconds": 90.0, "gpu_seconds": 0.0, "cost": pytest.approx(0.09)}
    assert total([usage(two, 1.0, None)])["cost"] is None


def test_budgets_name_the_first_limit_reached_and_refuse_ones_that_never_stop():
    spent = {"cpu_seconds": 7200.0, "gpu_seconds": 1800.0, "cost": 4.0}
    assert Budget(cpu_hours=3).exceeded(spent) is None
    assert Budget(cpu_hours=2).exceeded(spent) == "CPU-hours budget spent: 2 of 2 (--budget-cpu-hours)"
    assert "GPU-hours budget spent: 0.5 of 0.5 (--budget-gpu-hours)" == Budget(gpu_hours=0.5, cost=9).exceeded(spent)
    assert "(--budget-cost)" in Budget(cost=3.5).exceeded(spent)
    assert not Budget().any and Budget(cost=1).any
    problems = Budget(gpu_hours=1, cost=2).problems(prices=None, use_gpu=False)
    assert any("--budget-cost: 2 needs prices" in p and "--price" in p for p in problems)
    assert any("--budget-gpu-hours: 1 never stops" in p and "--gpu" in p for p in problems)
    assert Budget(gpu_hours=1, cost=2).problems(prices=Prices(gpu_hour=1), use_gpu=True) == []


def test_search_config_refuses_budgets_that_are_not_positive_numbers():
    from search_spaces.tuner import SearchConfig

    problems = SearchConfig(budget_gpu_hours=0, budget_cpu_hours=float("nan"), budget_cost=-1).problems()
    for flag in ("--budget-gpu-hours: 0", "--budget-cpu-hours: nan", "--budget-cost: -1"):
        assert any(p.startswith(flag) and "finite number > 0" in p for p in problems), (flag, problems)
    assert SearchConfig(budget_cpu_hours=0.5).problems() == []


def test_tune_refuses_a_cost_budget_without_prices_before_ray_starts(tmp_path, capsys):
    assert main(["tune", "--space", "digits_cnn", "--storage", str(tmp_path), "--budget-cost", "5"]) == 2
    assert "--budget-cost: 5.0 needs prices" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _ledger(tmp_path, prices=Prices(cpu_hour=3.6)):
    from cluster.tune_results import SearchResultsCallback
    from search_spaces.space import load_space

    return SearchResultsCallback(str(tmp_path), "s", load_space("digits_cnn"), max_epochs=1,
                                 reserved=Reserved(cpus=2.0), prices=prices)


def test_the_budget_stops_the_search_and_the_running_trials_at_it(tmp_path, capsys):
    """The stopper reads the callback's ledger (finished trials plus the running ones so
    far); when it fires, Tune stops the running trials without on_trial_complete, so the
    ledger records them as stopped by the budget, at that moment."""
    ledger = _ledger(tmp_path)
    done, running = SimpleNamespace(trial_id="done", config={}), SimpleNamespace(trial_id="running", config={})
    for trial in (done, running):
        ledger.on_trial_start(0, [], trial)
    ledger._records["done"].started -= 10.0
    ledger.on_trial_result(0, [], done, {"epoch": 1, "val_accuracy": 0.9})
    ledger.on_trial_complete(0, [], done)  # 10 s x 2 CPUs
    stopper = BudgetStopper(Budget(cpu_hours=30 / 3600), ledger)
    assert not stopper.stop_all() and not stopper("done", {})
    ledger._records["running"].started -= 6.0  # 20 + 12 CPU-seconds >= 30
    assert stopper.stop_all() and stopper.stop_all()  # and it stays stopped
    assert stopper("running", {}) and stopper.reason.startswith("CPU-hours budget spent: ")
    spent_hours = float(stopper.reason.removeprefix("CPU-hours budget spent: ").split()[0])
    assert spent_hours == pytest.approx(32 / 3600, abs=2 / 3600)  # + the moments this test takes (a busy machine)
    assert stopper.reason.endswith("of 0.00833333 (--budget-cpu-hours)")
    assert "CPU-hours budget spent" in capsys.readouterr().out
    rows = {r["trial_id"]: r for r in pq.read_table(tmp_path / "s" / "trials.parquet").to_pylist()}
    assert rows["done"]["status"] == "completed" and rows["running"]["status"] == "budget_stopped"
    for row in rows.values():
        assert row["cpu_seconds"] == pytest.approx(2 * row["wall_seconds"]) and row["gpu_seconds"] == 0
        assert row["cost"] == pytest.approx(row["cpu_seconds"] * 3.6 / 3600)
    assert rows["done"]["wall_seconds"] == pytest.approx(10.0, abs=0.5)
    assert rows["running"]["wall_seconds"] == pytest.approx(6.0, abs=0.5)
    assert total(rows.values())["cpu_seconds"] == pytest.approx(ledger.spent()["cpu_seconds"])
    ledger.on_trial_complete(0, [], running)  # a late end from Tune changes nothing
    assert pq.read_table(tmp_path / "s" / "trials.parquet").column("status").to_pylist()[1] == "budget_stopped"


def test_a_resumed_search_counts_what_its_trials_used_before(tmp_path):
    before = _ledger(tmp_path, prices=None)
    trial = SimpleNamespace(trial_id="t", config={})
    before.on_trial_start(0, [], trial)
    before._records["t"].started = time.time() - 5.0
    before.on_trial_complete(0, [], trial)
    resumed = _ledger(tmp_path, prices=None)  # a new driver process reads trials.parquet
    assert resumed.spent()["cpu_seconds"] == pytest.approx(10.0, abs=0.5) and resumed.spent()["cost"] is None


def test_train_summary_carries_usage_and_cost(tmp_path, capsys):
    from cluster.store import ResultsStore
    from cluster.train_cmd import TrainRequest, _finish

    req = TrainRequest(cfg=None, placement=Placement(workers=2, use_gpu=True, cpus_per_worker=2.0),
                       storage=str(tmp_path), name="r", prices=Prices(gpu_hour=1.8, cpu_hour=0.36))
    summary = {"status": "completed"}
    _finish(ResultsStore(str(tmp_path), "r"), summary, time.time() - 100.0, req)
    saved = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert saved["cpu_seconds"] == pytest.approx(4 * saved["wall_seconds"])
    assert saved["gpu_seconds"] == pytest.approx(2 * saved["wall_seconds"])  # one GPU per worker
    assert saved["cost"] == pytest.approx(saved["wall_seconds"] * (4 * 0.36 + 2 * 1.8) / 3600)
    assert saved["wall_seconds"] == pytest.approx(100.0, abs=1.0)
    assert "used        0.1111 CPU-hours, 0.05556 GPU-hours, cost 0.14" in capsys.readouterr().out


# -- prices per node type (--price FILE.yaml) -----------------------------------------------

GPU_PRICE, CPU_PRICE = PRICE_LABELS["gpu_hour"], PRICE_LABELS["cpu_hour"]


def _priced_cluster_yaml(tmp_path, gpu="3.06", gpu_cpu="0.1") -> str:
    """The shipped cluster.yaml with prices in its node types' labels; Ray's own schema and
    checks accept it (labels are the only free-form field of a node type)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    from test_cluster_yaml import ROOT

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = config["available_node_types"]
    types["gpu"]["labels"] = {GPU_PRICE: gpu, CPU_PRICE: gpu_cpu}
    types["gpu_spot"]["labels"] = {GPU_PRICE: "1.1"}
    types["head"]["labels"] = {CPU_PRICE: "0.05"}
    validate_config(prepare_config(config))
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_node_type_prices_from_cluster_yaml_labels_and_the_upper_bound(tmp_path):
    path = _priced_cluster_yaml(tmp_path)
    assert node_type_prices(path) == {"gpu": Prices(gpu_hour=3.06, cpu_hour=0.1), "gpu_spot": Prices(gpu_hour=1.1),
                                      "head": Prices(cpu_hour=0.05)}
    # which node type a trial ran on is not traced: every run pays the dearest price of each
    assert parse_prices(path) == Prices(gpu_hour=3.06, cpu_hour=0.1)


def test_node_type_prices_from_kuberay_group_annotations(tmp_path):
    """The shipped RayCluster and RayJob with prices annotated on group pod templates still
    pass strict CRD validation; the head group is KubeRay's `headgroup`."""
    from test_k8s import _docs, schema_errors

    for name, kind in (("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")):
        doc = _docs(name)[kind]
        spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
        spec["headGroupSpec"]["template"].setdefault("metadata", {})["annotations"] = {CPU_PRICE: "0.2"}
        gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
        gpu["template"].setdefault("metadata", {}).setdefault("annotations", {}).update({GPU_PRICE: "2.5"})
        assert schema_errors(doc) == []
        path = tmp_path / name
        path.write_text(yaml.safe_dump_all([{"kind": "ConfigMap", "metadata": {"name": "x"}}, doc]))
        assert node_type_prices(str(path)) == {"headgroup": Prices(cpu_hour=0.2), "gpu": Prices(gpu_hour=2.5)}
        assert parse_prices(str(path)) == Prices(gpu_hour=2.5, cpu_hour=0.2)


def test_bad_price_files_are_refused_naming_file_node_type_key_and_value(tmp_path):
    path = _priced_cluster_yaml(tmp_path, gpu="-1", gpu_cpu="cheap")
    config = yaml.safe_load(open(path))
    config["available_node_types"]["gpu_spot"]["labels"] = {GPU_PRICE: 1.1}  # a number: Ray wants strings
    open(path, "w").write(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as e:
        parse_prices(path)
    said = str(e.value)
    assert f"--price {path}: node type 'gpu': {GPU_PRICE}: '-1' must be a finite number >= 0" in said
    assert f"node type 'gpu': {CPU_PRICE}: 'cheap'" in said and f"node type 'gpu_spot': {GPU_PRICE}: 1.1" in said
    (tmp_path / "plain.yaml").write_text("data:\n  name: digits\n")
    with pytest.raises(ConfigError, match="neither a cluster.yaml .* nor a KubeRay RayCluster or RayJob"):
        parse_prices(str(tmp_path / "plain.yaml"))
    with pytest.raises(ConfigError, match="no node type states a price"):
        parse_prices(str(Path(__file__).resolve().parents[1] / "cluster.yaml"))


def test_train_refuses_a_missing_price_file_before_anything_runs(tmp_path, capsys):
    assert main(["train", "--storage", str(tmp_path), "--price", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"--price: no file at '{tmp_path / 'nope.yaml'}'" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
