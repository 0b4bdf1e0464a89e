"""`raysweep tune` end to end on a real local Ray (2 CPUs)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.tune import Callback

from cluster.cli import main
from cluster.tables import EPOCHS_SCHEMA
from cluster.tune_results import trials_schema
from search_spaces.space import load_space
from trainers.checkpoints import evaluate_state, load_state
from trainers.config import TrainRunConfig
from trainers.data import load_data

pytestmark = pytest.mark.usefixtures("ray_local")
REPO = Path(__file__).resolve().parent.parent


def _tune(tmp_path, name, *extra):
    return main(["tune", "--storage", str(tmp_path), "--name", name, *extra])


def _trials(run_dir):
    return pq.read_table(run_dir / "trials.parquet").to_pylist()


def test_small_search_with_asha_writes_tables_plots_and_best(tmp_path):
    assert _tune(tmp_path, "s", "--space", "digits_cnn", "--trials", "6", "--max-epochs", "4",
                 "--grace-period", "1", "--reduction-factor", "2", "--seed", "1", "--set", "train.tta=flip") == 0
    run = tmp_path / "s"
    trials = _trials(run)
    assert len(trials) == 6 and len({t["trial_id"] for t in trials}) == 6
    statuses = {t["status"] for t in trials}
    assert statuses <= {"completed", "early_stopped"} and "early_stopped" in statuses  # ASHA stopped some
    assert any(t["epochs_run"] < 4 for t in trials) and any(t["epochs_run"] == 4 for t in trials)
    epochs = pq.read_table(run / "epochs.parquet")
    assert epochs.schema.equals(EPOCHS_SCHEMA)
    assert epochs.num_rows == sum(t["epochs_run"] for t in trials)
    pairs = list(zip(epochs.column("trial_id").to_pylist(), epochs.column("epoch").to_pylist()))
    assert len(pairs) == len(set(pairs))
    best = json.loads((run / "best.json").read_text())
    assert best["trial_id"] in {t["trial_id"] for t in trials}
    assert best["best_val_accuracy"] == max(t["best_val_accuracy"] for t in trials)
    assert 0.5 < best["test_accuracy"] <= 1 and {"test_precision", "test_recall", "test_f1"} <= set(best)
    assert Path(best["checkpoint"], "state.pt").is_file()
    # best.json's test metrics are the best checkpoint's with the config's test-time augmentation.
    cfg = TrainRunConfig.from_dict(best["config"])
    assert cfg.train.tta == "flip"
    test = load_data(cfg.data).test
    direct = evaluate_state(load_state(best["checkpoint"]), test, tta="flip")
    assert best["test_accuracy"] == pytest.approx(direct["test_accuracy"])
    assert best["test_loss"] == pytest.approx(direct["test_loss"])
    for png in ("optimisation_history.png", "importance.png", "learning_curves.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    # The study lives in the experiment directory, for optuna-dashboard and resumes.
    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run / "optuna.journal"))))
    assert len(study.trials) == 6
    # The space's default point is among the trials (the searcher's first point).
    assert any(t["optim_lr"] == 2.0e-3 and t["optim_name"] == "adam" for t in trials)


def test_uri_storage_and_the_results_command_without_ray(tmp_path, capsys):
    uri = f"file://{tmp_path}"  # any pyarrow.fs URI (s3://, gs://, ...) takes the same path
    assert main(["tune", "--storage", uri, "--name", "r", "--space", "digits_cnn", "--trials", "2",
                 "--max-epochs", "2", "--scheduler", "none"]) == 0
    assert json.loads((tmp_path / "r" / "best.json").read_text())["test_accuracy"] > 0.5
    capsys.readouterr()
    assert main(["results", f"{uri}/r", "--format", "json", "--top", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["epochs_run"] == 2
    assert main(["results", str(tmp_path / "r"), "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 3  # header + 2 trials
    assert main(["results", str(tmp_path / "missing")]) == 2


@pytest.mark.smoke
def test_two_worker_trials_stopped_by_asha_do_not_hang_the_search(tmp_path):
    """Ray Train's workers of a trial that ASHA stops must give their CPUs back (guide)."""
    start = time.monotonic()
    assert _tune(tmp_path, "w2", "--space", "digits_cnn", "--trials", "3", "--max-epochs", "3",
                 "--workers-per-trial", "2", "--grace-period", "1", "--reduction-factor", "2", "--seed", "3") == 0
    trials = _trials(tmp_path / "w2")
    assert len(trials) == 3 and all(t["status"] in ("completed", "early_stopped") for t in trials)
    assert any(t["status"] == "early_stopped" for t in trials)
    assert all(t["checkpoint"] for t in trials)
    assert time.monotonic() - start < 400
    # Each trial hosts Ray Train's controller in its Tune actor; when the actor is gone,
    # so is its workers' placement group (Ray's cleaner watches the actor).
    deadline = time.monotonic() + 30
    while (left := _live_placement_groups()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left


def _live_placement_groups() -> list[str]:
    import ray.util

    return [pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"]


class TrialActors(Callback):
    """The Ray actor each trial started in."""

    def __init__(self):
        self.ids = []

    def on_trial_start(self, iteration, trials, trial, **info):
        self.ids.append(trial.temporary_state.ray_actor._actor_id.hex())


@pytest.mark.smoke
def test_one_worker_trials_run_one_after_another_in_one_actor(tmp_path):
    """A fresh actor per trial is a process start and a torch import each time. Tune
    reuses the actor, also after ASHA stops a trial mid-run (its thread must end at once)."""
    from search_spaces.tuner import SearchConfig, build_tuner
    from trainers.data import load_data
    from trainers.distributed import Placement

    space = load_space("digits_cnn")
    base = {"data": {"name": "digits", "limit": 300}, "train": {"epochs": 3}}
    search = SearchConfig(trials=4, max_epochs=3, scheduler="asha", grace_period=1, reduction_factor=2,
                          concurrent=1, seed=0, placement=Placement(workers=1, cpus_per_worker=1.0)).validate()
    actors = TrialActors()
    data = load_data(space.trial_config(base, space.default_point()).data)
    results = build_tuner(space, base, data, search, str(tmp_path), "reuse", [actors], concurrent=1,
                          experiment_dir=None, resume=False).fit()
    assert not results.errors
    epochs_run = sorted(r.metrics["training_iteration"] for r in results)
    assert epochs_run[0] < 3 == epochs_run[-1], epochs_run  # ASHA stopped at least one trial
    assert len(actors.ids) == 4 and len(set(actors.ids)) == 1, actors.ids


FAULTY_SPACE = """
name: faulty
fixed: {optim.name: sgd, train.seed: 0}
params:
  model.name: {type: categorical, choices: [simple_cnn, fast_cifar]}   # fast_cifar cannot take 8x8 digits
  optim.lr: {type: categorical, choices: [0.05, 9.5]}                   # 9.5 overflows in epoch 1
"""


def test_failing_and_diverging_trials_are_recorded_and_not_learned_from(tmp_path):
    space = tmp_path / "faulty.yaml"
    space.write_text(FAULTY_SPACE)
    code = _tune(tmp_path, "f", "--space", str(space), "--trials", "6", "--max-epochs", "1", "--searcher", "random",
                 "--scheduler", "none", "--seed", "0", "--trial-retries", "0")
    assert code == 0
    trials = _trials(tmp_path / "f")
    assert len(trials) == 6
    by_status = {s: [t for t in trials if t["status"] == s] for s in ("completed", "diverged", "failed")}
    assert all(by_status.values()), [(t["model_name"], t["optim_lr"], t["status"]) for t in trials]
    assert all(t["model_name"] == "fast_cifar" and t["error"] for t in by_status["failed"])
    assert all(t["optim_lr"] == 9.5 and "non-finite" in t["error"] for t in by_status["diverged"])
    study = optuna.load_study(study_name="f", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "f" / "optuna.journal"))))
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == len(by_status["failed"]) + len(by_status["diverged"])


def test_a_search_where_every_trial_fails_exits_nonzero_with_reasons(tmp_path, capsys):
    space = tmp_path / "broken.yaml"
    space.write_text("name: broken\nfixed: {model.name: fast_cifar}\n"
                     "params: {optim.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}}\n")
    assert _tune(tmp_path, "b", "--space", str(space), "--trials", "2", "--max-epochs", "1", "--trial-retries", "0") == 1
    out = capsys.readouterr().out
    assert "no trial succeeded" in out and "failed:" in out
    assert json.loads((tmp_path / "b" / "best.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("cv", [[], ["--cv", "2", "--set", "data.limit=300"]], ids=["plain", "cv"])
def test_resume_after_the_driver_is_killed_loses_and_repeats_nothing(tmp_path, cv):
    """Also for a --cv search (each trial's checkpoint is its folds' bundle): the resumed
    trials keep the search's folds, and no (trial, epoch, fold) row is written twice."""
    cmd = [sys.executable, "-m", "cluster.cli", "tune", "--space", "digits_cnn", "--trials", "4", "--max-epochs", "2",
           "--scheduler", "none", "--storage", str(tmp_path), "--name", "k", "--concurrent", "1", *cv]
    # Its own embedded Ray (not this module's), so killing its process group kills it all.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    table = tmp_path / "k" / "trials.parquet"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if table.exists() and sum(r["status"] == "completed" for r in pq.read_table(table).to_pylist()) >= 2:
                break
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("no two trials finished in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, as if the machine died
        proc.wait()
        log.close()
    before = {r["trial_id"]: r for r in pq.read_table(table).to_pylist() if r["status"] == "completed"}
    assert _tune(tmp_path, "k", "--space", "digits_cnn", "--trials", "4", "--max-epochs", "2", "--scheduler", "none",
                 "--concurrent", "1", *cv, "--resume") == 0
    after = {r["trial_id"]: r for r in _trials(tmp_path / "k")}
    # A trial started after Tune's last snapshot (taken at most every 10 s) is not resumed:
    # the search runs 4 others, and that one reads "lost", not "running" for ever.
    resumed = {i: r for i, r in after.items() if r["status"] != "lost"}
    assert len(resumed) == 4 and all(r["status"] == "completed" for r in resumed.values()), after
    assert all(r["error"] for r in after.values() if r["status"] == "lost")
    for trial_id, row in before.items():  # finished trials kept as they were, not re-run
        assert after[trial_id]["wall_seconds"] == row["wall_seconds"]
    epochs = pq.read_table(tmp_path / "k" / "epochs.parquet").to_pylist()
    rows = [(e["trial_id"], e["epoch"], e.get("fold")) for e in epochs]
    assert len(rows) == len(set(rows))
    per_epoch = 3 if cv else 1  # a --cv epoch: its fold mean and one row per fold
    assert sum(e["trial_id"] in resumed for e in epochs) == 4 * 2 * per_epoch
    if cv:  # every trial, before the kill and after, on the search's one fold assignment
        assert len({r["cv_digest"] for r in resumed.values()}) == 1 and None not in {
            r["cv_digest"] for r in resumed.values()}


def test_a_cpu_hours_budget_stops_the_search_and_records_why(tmp_path, capsys):
    """6 CPU-seconds: a digits trial of 2 epochs takes ~0.5-3 s here (the first one longest),
    so the budget runs out after a few of the 50 trials; the trial running then is stopped at it."""
    budget_s = 6.0
    assert _tune(tmp_path, "budget", "--space", "digits_cnn", "--trials", "50", "--max-epochs", "2", "--scheduler",
                 "none", "--concurrent", "1", "--budget-cpu-hours", str(budget_s / 3600),
                 "--price", "cpu_hour=0.5") == 0
    out = capsys.readouterr().out
    trials = _trials(tmp_path / "budget")
    assert 1 <= len(trials) < 50 and {t["status"] for t in trials} <= {"completed", "budget_stopped"}, trials
    spent = sum(t["cpu_seconds"] for t in trials)
    assert budget_s <= spent < 2 * budget_s  # stopped at the budget, not after the running trial's end
    assert all(t["cpu_seconds"] == t["wall_seconds"] and t["gpu_seconds"] == 0 for t in trials)  # 1 CPU a trial
    assert all(t["cost"] == pytest.approx(t["cpu_seconds"] * 0.5 / 3600) for t in trials)
    best = json.loads((tmp_path / "budget" / "best.json").read_text())
    assert best["stop_reason"].startswith("CPU-hours budget spent:") and "(--budget-cpu-hours)" in best["stop_reason"]
    assert best["cpu_seconds"] == pytest.approx(spent) and best["cost"] == pytest.approx(spent * 0.5 / 3600)
    assert f"stopped: {best['stop_reason']}" in out
    assert f"next        raysweep results {tmp_path / 'budget'}" in out  # the one line to look at them


def test_a_target_ends_the_search_once_a_trial_reaches_it(tmp_path, capsys):
    """The default point (the first trial) reaches 50% on digits within 3 epochs; the
    search then ends instead of running its 6 trials."""
    assert _tune(tmp_path, "target", "--space", "digits_cnn", "--trials", "6", "--max-epochs", "3", "--scheduler",
                 "none", "--concurrent", "1", "--searcher", "tpe", "--target", "val_accuracy=0.5") == 0
    out = capsys.readouterr().out
    trials = _trials(tmp_path / "target")
    assert 1 <= len(trials) < 6 and max(t["best_val_accuracy"] for t in trials) >= 0.5, trials
    best = json.loads((tmp_path / "target" / "best.json").read_text())
    assert best["stop_reason"] == f"target val_accuracy >= 0.5 reached by trial {best['trial_id']} (--target)"
    lines = out.rstrip().splitlines()
    assert lines[-4] == f"search ended: {best['stop_reason']}" and lines[-1].startswith("next        raysweep results")


def test_trials_schema_is_pinned():
    schema = trials_schema(load_space("digits_cnn"))
    expected = pa.schema([
        ("trial_id", pa.string()), ("status", pa.string()),
        ("optim_name", pa.string()), ("optim_lr", pa.float64()), ("optim_momentum", pa.float64()),
        ("optim_weight_decay", pa.float64()), ("optim_l1", pa.float64()), ("model_dropout", pa.float64()),
        ("loss_label_smoothing", pa.float64()), ("augment_rotation", pa.float64()), ("augment_shift", pa.float64()),
        ("epochs_run", pa.int32()), ("best_epoch", pa.int32()),
        ("best_val_accuracy", pa.float64()), ("final_val_accuracy", pa.float64()),
        ("best_val_loss", pa.float64()), ("final_val_loss", pa.float64()),
        ("best_val_f1", pa.float64()), ("final_val_f1", pa.float64()),
        ("wall_seconds", pa.float64()), ("cpu_seconds", pa.float64()), ("gpu_seconds", pa.float64()),
        ("cost", pa.float64()), ("checkpoint", pa.string()), ("error", pa.string()),
    ])
    assert schema.equals(expected)


def test_requests_that_can_never_fit_are_refused(tmp_path, capsys):
    assert _tune(tmp_path, "x", "--space", "digits_cnn", "--workers-per-trial", "3") == 2
    assert "CPUs but the cluster has 2" in capsys.readouterr().err


def test_a_multi_objective_search_records_its_pareto_front(tmp_path, capsys):
    """Three objectives, one of them cost: the table's pareto column is the brute-force front
    of its objective columns, and best.json, pareto.png, results and export --trial follow it."""
    assert _tune(tmp_path, "mo", "--space", "digits_cnn", "--trials", "4", "--max-epochs", "1", "--seed", "2",
                 "--objectives", "val_accuracy:max,params:min,cost:min", "--price", "cpu_hour=3.6") == 0
    out = capsys.readouterr().out
    run = tmp_path / "mo"
    trials = _trials(run)
    names = ("objective_val_accuracy", "objective_params", "objective_cost")
    assert len(trials) == 4 and all(t["status"] == "completed" for t in trials)
    for t in trials:
        assert t["objective_val_accuracy"] == t["best_val_accuracy"]
        assert t["objective_params"] == trials[0]["objective_params"] > 1000  # the space keeps the network's size
        assert 0 < t["objective_cost"] <= t["cost"]  # its cost at its reported epoch; the driver's covers all of it

    def dominated(a, b):  # b dominates a: max accuracy, min params and cost
        ge = [b[0] >= a[0], b[1] <= a[1], b[2] <= a[2]]
        return all(ge) and tuple(a) != tuple(b)

    points = [[t[n] for n in names] for t in trials]
    assert [t["pareto"] for t in trials] == [not any(dominated(p, q) for q in points) for p in points]
    front = {t["trial_id"] for t in trials if t["pareto"]}
    best = json.loads((run / "best.json").read_text())
    assert best["objectives"] == [{"name": "val_accuracy", "mode": "max"}, {"name": "params", "mode": "min"},
                                  {"name": "cost", "mode": "min"}]
    assert {f["trial_id"] for f in best["front"]} == front
    assert all(Path(f["checkpoint"]).is_dir() for f in best["front"])
    assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "<h2>Pareto front</h2>" in (run / "report.html").read_text()  # Optuna's plot_pareto_front
    assert f"pareto front: {len(front)} of 4 finished trials" in out
    # Optuna was told each trial's point (three directions), as the table holds it.
    study = optuna.load_study(study_name="mo", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run / "optuna.journal"))))
    assert len(study.directions) == 3
    assert sorted(t.values for t in study.trials) == sorted(points)
    # results: the front first; export --trial: any trial of it
    assert main(["results", str(run), "--format", "json", "--top", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["pareto"] for r in rows] == sorted((r["pareto"] for r in rows), reverse=True)
    pick = best["front"][-1]["trial_id"]
    assert main(["export", "--checkpoint", str(run), "--trial", pick, "--out", str(tmp_path / "m.pt")]) == 0
    assert best["front"][-1]["checkpoint"] in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(run), "--trial", "nope", "--out", str(tmp_path / "n.pt")]) == 2
    assert "--trial: 'nope' is not a trial of" in capsys.readouterr().err


def test_a_cross_validated_search_reports_fold_means_and_keeps_the_same_folds(tmp_path, capsys):
    import statistics

    from search_spaces.cv import fold_indices, folds_digest, pool

    seed = 5
    args = ["tune", "--space", "digits_cnn", "--storage", str(tmp_path), "--name", "cv", "--cv", "2", "--trials", "2",
            "--max-epochs", "2", "--grace-period", "1", "--reduction-factor", "2", "--seed", str(seed),
            "--set", "data.limit=300"]
    assert main(args) == 0
    run = tmp_path / "cv"
    trials = pq.read_table(run / "trials.parquet").to_pylist()
    epochs = pq.read_table(run / "epochs.parquet").to_pylist()
    assert len(trials) == 2 and all(t["status"] in ("completed", "early_stopped") for t in trials)
    means = [e for e in epochs if e["fold"] is None]
    assert len(means) == sum(t["epochs_run"] for t in trials) and len(epochs) == 3 * len(means)
    for m in means:
        folds = [e for e in epochs if e["trial_id"] == m["trial_id"] and e["epoch"] == m["epoch"] and e["fold"]]
        assert sorted(f["fold"] for f in folds) == [1, 2]
        for metric in ("val_accuracy", "val_loss", "val_f1"):
            assert m[metric] == pytest.approx(statistics.fmean(f[metric] for f in folds))
            assert m[f"{metric}_std"] == pytest.approx(statistics.stdev(f[metric] for f in folds))
    for t in trials:
        mine = [m for m in means if m["trial_id"] == t["trial_id"]]
        best = max(mine, key=lambda m: (m["val_accuracy"], m["epoch"]))
        assert t["best_val_accuracy"] == best["val_accuracy"] and t["best_val_accuracy_std"] == best["val_accuracy_std"]
        assert t["checkpoint"] is None
    # The same folds in every trial: the digest each trial reported is that of the search's seed.
    probe = TrainRunConfig.from_dict({"data": {"name": "digits", "limit": 300}})
    expected = folds_digest(fold_indices(pool(load_data(probe.data)).y.numpy(), 2, seed))
    assert {t["cv_digest"] for t in trials} == {expected}
    assert json.loads((run / "cv.json").read_text())["digest"] == expected
    # What the searcher was told is each trial's best fold mean.
    study = optuna.load_study(study_name="cv", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run / "optuna.journal"))))
    assert sorted(t.value for t in study.trials) == sorted(t["best_val_accuracy"] for t in trials)
    best = json.loads((run / "best.json").read_text())
    assert best["cv_folds"] == 2 and best["checkpoint"] is None and "test_accuracy" not in best
    from trainers.config import load_run_values  # the final model's config, as `train --cv 2 --cv-refit` reads it

    assert TrainRunConfig.from_dict(load_run_values(str(run / "best_config.yaml"))).to_dict() == best["config"]
    # --resume restores the search (Tune's state, the CV trainable) with the same folds and repeats nothing.
    assert main(args + ["--resume"]) == 0
    again = pq.read_table(run / "trials.parquet").to_pylist()
    assert [(t["trial_id"], t["best_val_accuracy"], t["cv_digest"]) for t in again] == [
        (t["trial_id"], t["best_val_accuracy"], t["cv_digest"]) for t in trials]
    assert pq.read_table(run / "epochs.parquet").num_rows == len(epochs)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--data", "digits", "--out", str(tmp_path / "p")]) == 2
    assert "--cv search keeps no model" in capsys.readouterr().err
    tid = trials[0]["trial_id"]
    assert main(["export", "--checkpoint", str(run), "--trial", tid, "--out", str(tmp_path / "m")]) == 2
    assert "--cv search keeps no model" in capsys.readouterr().err
    bundle = next(run.glob("trial_*/checkpoint_*"))  # a trial's own checkpoint: its folds, to resume it
    assert sorted(p.name for p in bundle.iterdir()) == ["cv.json", "fold-1", "fold-2"]
    assert main(["export", "--checkpoint", str(bundle), "--out", str(tmp_path / "m")]) == 2
    assert "a --cv trial's checkpoint holds its fold models" in capsys.readouterr().err
