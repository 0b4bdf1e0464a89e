"""Every benchmark's --smoke variant runs and prints its JSON line, so the scripts cannot
rot. Only the shape of the result is checked here: speed is measured by the real runs
(`make bench`, docs/benchmarks.md), never by tests. No ../shared data needed:
the cifar10 smoke variant makes a tiny Parquet set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import BENCHMARKS, run_benchmark
from benchmarks.common import alternate

REPO = Path(__file__).resolve().parent.parent
KEYS = {"name", "value", "target", "met", "unit", "mode", "command", "table", "details", "notes", "machine",
        "versions", "date", "wall_seconds"}


def check(rec: dict, name: str) -> None:
    assert KEYS <= rec.keys(), KEYS - rec.keys()
    assert rec["name"] == name and rec["mode"] == "smoke"
    assert rec["met"] in (True, False, None)
    assert rec["value"] is None or isinstance(rec["value"], (int, float))
    assert {"cpu", "cores", "torch_cpu_capability"} <= rec["machine"].keys()
    assert {"python", "torch", "ray"} <= rec["versions"].keys()
    json.dumps(rec)  # one JSON object


# serve: its smoke run starts Ray Serve (49 s here on a busy 2-core machine), over the 20 s a
# smoke test may cost; tests/test_serve.py deploys the same application through the same API.
NO_SMOKE_TEST = {"serve"}


def test_every_benchmark_has_a_smoke_test():
    tested = {"augment", "precision", "gpu", "overhead", "cifar10", "trial_overhead", "search", "cv", "data_scale"}
    assert set(BENCHMARKS) == tested | NO_SMOKE_TEST


def test_alternate_runs_both_sides_in_abba_order_after_warmup():
    calls = []
    samples = alternate({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0},
                        reps=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert samples == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}


@pytest.mark.parametrize("name", ["augment", "precision", "gpu"])
def test_smoke_without_ray(name, tmp_path):
    rec = run_benchmark(name, "smoke", out_dir=tmp_path)
    check(rec, name)
    assert json.loads((tmp_path / f"{name}.smoke.json").read_text())["name"] == name


def test_gpu_benchmark_skips_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rec = run_benchmark("gpu", "smoke", out_dir=None)
    assert rec["met"] is None and rec["value"] is None and "no GPU" in rec["unit"]


def test_command_line_prints_a_table_then_the_json_line_last(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("== gpu (smoke)")
    check(json.loads(lines[-1]), "gpu")
    assert (tmp_path / "gpu.smoke.json").is_file()


def test_data_scale_smoke_runs_raysweep_train_streamed_and_watches_its_processes(tmp_path, monkeypatch):
    """A streamed `raysweep train` subprocess (its own Ray), before this module starts a Ray
    of its own; smoke runs the N set only, so no ratio. The generated set goes to a
    temporary cache, not the checkout's."""
    from benchmarks import data_scale

    monkeypatch.setattr(data_scale, "CACHE", tmp_path / "cache")
    rec = run_benchmark("data_scale", "smoke", out_dir=None)
    check(rec, "data_scale")
    d = rec["details"]
    assert set(d["memory"]) == {"N"} and rec["value"] is None and rec["met"] is None
    assert d["memory"]["N"]["peaks"]["driver"]["rss_mib"] > 0 and d["memory"]["N"]["peaks"]["train_worker"]["rss_mib"] > 0
    assert d["throughput_met"] is None and "skipped" in d["throughput"]
    for run in d["memory"].values():
        assert run["epochs"][0]["images_per_second"] > 0
        assert {"driver", "train_worker", "data_task", "raylet"} <= run["kinds_seen"].keys()
        assert 0 < run["epochs"][0]["decode_cpu_share"] < 1


def test_trial_overhead_smoke_times_both_searches_as_whole_commands():
    """Each side is its own process (its own Ray), before this module starts a Ray of its own."""
    rec = run_benchmark("trial_overhead", "smoke", out_dir=None)
    check(rec, "trial_overhead")
    runs = rec["details"]["runs"]
    assert set(runs) == {"raysweep 1w", "plain 1w"}
    for side in runs.values():  # the whole command's wall, which holds at least the training it timed
        assert side[0]["search_wall"] > sum(side[0]["trial_train"]) > 0 and len(side[0]["trial_train"]) == 1
    assert rec["value"] == rec["details"]["median_overhead_per_trial"]["raysweep 1w"] > 0


@pytest.fixture(scope="module")
def bench_ray():
    """One local Ray (2 CPUs) for the Ray-based smoke runs, with the in-worker timing hook
    the benchmarks install when they start Ray themselves."""
    import ray

    from benchmarks.common import local_ray

    if ray.is_initialized():
        ray.shutdown()
    with local_ray(2):
        yield


@pytest.mark.parametrize("name", ["overhead", "cifar10", "search", "cv"])
def test_smoke_on_ray(name, bench_ray, tmp_path):
    rec = run_benchmark(name, "smoke", out_dir=tmp_path)
    check(rec, name)
    if name in ("overhead", "cifar10"):  # timed inside the Ray worker, not from history
        runs = rec["details"]["runs"]["raysweep"] if name == "overhead" else [rec["details"]["sides"]["raysweep"]]
        assert all(r["startup_seconds"] is not None for r in runs)
    if name == "overhead":  # the headline is Ray's public path; the private parts' side runs beside it where on
        from trainers import ray_private

        assert rec["value"] == rec["details"]["ratio"] and "public" in rec["unit"]
        assert ("private" in rec["details"]["runs"]) == ray_private.enabled()
        assert (rec["details"]["private_ratio"] or 0) > 0 or not ray_private.enabled()
    if name == "search":  # every strategy starts alike; the headline is the best non-random strategy's
        d = rec["details"]
        assert d["first_point"] == "none" and d["best_strategy"] == "gp+asha"
        assert rec["value"] == d["worst_problem_fraction"]["gp+asha"] and set(d["fractions"]["digits"]) == {
            "random", "gp+asha"}
    if name == "cv":  # K-fold std and gap from raysweep's own summary, beside single splits of a fold's share
        d = rec["details"]
        assert rec["value"] == d["cv"]["std"]["best_val_accuracy"] >= 0 and d["folds"] == 2
        assert len(d["single"]) == 2 and {s["seed"] for s in d["single"]} == {0, 1}
        assert all(0 <= s["val_accuracy"] <= 1 and 0 <= s["test_accuracy"] <= 1 for s in d["single"])
    if name == "cifar10":  # raysweep's own summary.json figure, with TTA; validation carved from training
        ours, d = rec["details"]["sides"]["raysweep"], rec["details"]
        assert rec["value"] == ours["test_accuracy"] and ours["tta"] == "flip_translate"
        assert d["val_images"] > 0 and d["train_images"] + d["val_images"] == 256 and d["test_images"] == 64


def test_cpu_between_splits_a_process_tree_from_the_rest():
    from benchmarks.common import cpu_between

    before = {1: (0, 5.0, "init"), 10: (1, 1.0, "driver"), 11: (10, 2.0, "raylet"), 12: (11, 0.0, "ray::Worker"),
              20: (1, 3.0, "other")}
    after = {1: (0, 5.5, "init"), 10: (1, 9.0, "driver"), 11: (10, 2.5, "raylet"), 12: (11, 7.0, "ray::Worker"),
             13: (11, 0.25, "ray::Actor"), 20: (1, 4.0, "other")}
    out = cpu_between({str(k): list(v) for k, v in before.items()}, after, root=10, exclude={12})
    assert out["ray"] == 0.75  # raylet 0.5 + the new actor 0.25; the training worker and the root left out
    assert out["others"] == 1.5  # init 0.5 + other 1.0
    assert out["top"] == [["raylet", 11, 0.5], ["ray::Actor", 13, 0.25]]


def test_a_search_kept_in_the_cache_is_reused_only_by_the_same_clean_commit(tmp_path, monkeypatch):
    from benchmarks import search

    ran = []
    monkeypatch.setenv(search.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(search, "one_search", lambda *a: ran.append(a) or [{"trial": "t", "epoch": 1, "value": 0.5}])
    problem = search.SIZES["smoke"]["problems"]["digits"]
    for commit, runs in (("abc1234", 1), ("abc1234", 1), ("def5678", 2), ("def5678+dirty", 3), ("def5678+dirty", 4)):
        monkeypatch.setattr(search, "versions", lambda commit=commit: {"raysweep_commit": commit})
        reused = []
        out = search._search_or_cached(problem, "gp+asha", 0, 2, str(tmp_path), "n", reused)
        assert out == [{"trial": "t", "epoch": 1, "value": 0.5}] and len(ran) == runs, commit
    assert search._cache_file(problem, "random", 0, 2) is None  # a dirty tree keeps nothing
    monkeypatch.setattr(search, "versions", lambda: {"raysweep_commit": "abc1234", "optuna": "5.0.0"})
    key = search._cache_file(problem, "random", 0, 2)
    assert key not in (search._cache_file(problem, "random", 1, 2), search._cache_file(problem, "random", 0, 1))
    monkeypatch.setattr(search, "versions", lambda: {"raysweep_commit": "abc1234", "optuna": "5.1.0"})
    assert search._cache_file(problem, "random", 0, 2) != key  # another Optuna: another search
