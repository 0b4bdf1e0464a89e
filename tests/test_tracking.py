"""MLflow and TensorBoard logging (cluster/tracking.py), read back with MLflow's client and
TensorBoard's event reader. Most tests feed the tracker synthetic results without Ray; one
small search and one small train show the logs match the Parquet tables."""

from __future__ import annotations

import json
import socket
import time

# The dev extra installs both (setup.py): a missing one fails here rather than skipping.
import mlflow
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing import event_accumulator

from cluster.cli import main
from cluster.tracking import MLFLOW_HTTP_BOUNDS, TrackingOptions, open_tracker


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """MLflow puts a sqlite store's artifacts in ./mlruns: keep them in tmp_path."""
    monkeypatch.chdir(tmp_path)
    for key in MLFLOW_HTTP_BOUNDS:  # set by the tracker for its process; each test starts clean
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def _client(tmp_path):
    return mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def _runs(client):
    experiment = client.get_experiment_by_name("raysweep")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def _scalars(event_dir, tag):
    acc = event_accumulator.EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}, acc


EPOCHS = {"t1": [{"epoch": 1, "train_loss": 1.5, "val_accuracy": 0.5, "lr": 0.01},
                 {"epoch": 2, "train_loss": 0.75, "val_accuracy": 0.625, "lr": 0.005}],
          "t2": [{"epoch": 1, "train_loss": 2.0, "val_accuracy": 0.25, "lr": 0.1}]}


def _synthetic_search(tracker):
    tracker.open("", "search", {"optim.lr": 0.01, "search.trials": 2}, {"raysweep.kind": "tune"})
    for tid, rows in EPOCHS.items():
        tracker.open(tid, tid, {"optim.lr": rows[0]["lr"], "model.name": "cnn"}, {"raysweep.trial_id": tid}, parent="")
        for row in rows:
            tracker.epoch(tid, {k: v for k, v in row.items() if k != "epoch"}, row["epoch"])
    tracker.close("t1", "completed", {"best_val_accuracy": 0.625}, {"summary.json": b"{}"}, "/ckpt/t1")
    tracker.close("t2", "diverged", {"best_val_accuracy": 0.25}, {})
    tracker.close("", "completed", {"best_val_accuracy": 0.625}, {"summary.json": b'{"status": "ok"}'}, "/ckpt/t1")


def test_a_search_is_a_parent_run_with_a_nested_run_and_an_event_dir_per_trial(in_tmp):
    options = TrackingOptions(mlflow=f"sqlite:///{in_tmp}/mlflow.db", tensorboard="")
    tracker = open_tracker(options, str(in_tmp / "exp"), str(in_tmp / "exp"), "exp")
    assert [s.name for s in tracker.sinks] == ["MLflow", "TensorBoard"]
    _synthetic_search(tracker)
    client = _client(in_tmp)
    runs = _runs(client)
    assert set(runs) == {"search", "t1", "t2"}
    parent = runs["search"].info.run_id
    assert runs["t1"].data.tags["mlflow.parentRunId"] == parent == runs["t2"].data.tags["mlflow.parentRunId"]
    assert "mlflow.parentRunId" not in runs["search"].data.tags
    history = client.get_metric_history(runs["t1"].info.run_id, "train_loss")
    assert {m.step: m.value for m in history} == {1: 1.5, 2: 0.75}
    t1, t2 = runs["t1"].data, runs["t2"].data
    assert t1.params["optim.lr"] == "0.01" and t1.params["model.name"] == "cnn"
    assert t1.tags["raysweep.status"] == "completed" and t1.tags["raysweep.checkpoint"] == "/ckpt/t1"
    assert t1.tags["raysweep.trial_id"] == "t1" and t1.tags["raysweep.version"]
    assert (runs["t1"].info.status, runs["t2"].info.status) == ("FINISHED", "FAILED")
    assert t2.tags["raysweep.status"] == "diverged"
    assert [f.path for f in client.list_artifacts(parent)] == ["summary.json"]
    # TensorBoard: one directory per trial, none for the parent; hparams beside the curves.
    root = in_tmp / "exp" / "tensorboard"
    assert sorted(p.name for p in root.iterdir()) == ["t1", "t2"]
    values, acc = _scalars(root / "t1", "val_accuracy")
    assert values == {1: 0.5, 2: 0.625}
    assert _scalars(root / "t2", "lr")[0] == {1: pytest.approx(0.1)}
    assert "_hparams_/session_start_info" in acc.Tags()["tensors"] + list(acc.summary_metadata)


def test_a_tracking_server_that_is_down_warns_once_and_the_rest_goes_on(in_tmp, capsys):
    with socket.socket() as s:  # a free port with nothing listening once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    tracker = open_tracker(TrackingOptions(mlflow=f"http://127.0.0.1:{port}", tensorboard=str(in_tmp / "tb")),
                           str(in_tmp / "exp"), None, "exp")
    assert time.monotonic() - started < 60  # MLflow's own retries would take minutes
    _synthetic_search(tracker)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raysweep: warning")]
    assert len(warnings) == 1 and f"MLflow logging to http://127.0.0.1:{port} stopped" in warnings[0]
    assert "Parquet tables" in warnings[0]
    assert _scalars(in_tmp / "tb" / "exp" / "t1", "train_loss")[0] == {1: 1.5, 2: 0.75}


def test_a_sink_that_fails_mid_run_warns_once_and_is_dropped(in_tmp, capsys):
    tracker = open_tracker(TrackingOptions(tensorboard=str(in_tmp / "tb")), str(in_tmp), None, "exp")

    class Broken:
        name, where = "Broken", "nowhere"

        def __getattr__(self, _):
            raise OSError("disk full")

    tracker.sinks.append(Broken())
    _synthetic_search(tracker)
    err = capsys.readouterr().err
    assert err.count("raysweep: warning: Broken logging to nowhere stopped (OSError: disk full)") == 1
    assert [s.name for s in tracker.sinks] == ["TensorBoard"]


def test_a_missing_extra_is_refused_with_what_to_install(tmp_path, monkeypatch, capsys, no_ray_before):
    import sys

    import ray

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: importlib finds no spec
    code = main(["train", "--mlflow", "--storage", str(tmp_path), "--name", "x", "--tensorboard", "s3://b/tb"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--mlflow: needs the mlflow package" in err and "pip install 'raysweep[mlflow]'" in err
    assert "--tensorboard: 's3://b/tb' is a URI" in err
    assert not (tmp_path / "x").exists()
    import raysweep  # the API refuses the same way, before any Ray or data work

    with pytest.raises(raysweep.ConfigError, match=r"pip install 'raysweep\[mlflow\]'"):
        raysweep.train(mlflow=True, workers=1, storage=str(tmp_path), name="api")
    assert not ray.is_initialized(), "a refused request started Ray"
    problems = TrackingOptions(tensorboard="").problems("s3://bucket/runs")
    assert problems and "name a local directory" in problems[0]


def test_trials_the_search_did_not_see_live_are_logged_whole_from_the_tables(tmp_path):
    """A resumed search's trials (its callback comes back from Tune's pickle without the
    tracker) and budget-stopped ones (no Tune event) are logged from the tables at the end."""
    import pyarrow as pa

    from cluster.store import ResultsStore
    from cluster.tables import EPOCHS_SCHEMA
    from cluster.tracking import track_search_end
    from cluster.tune_results import trials_schema
    from search_spaces.space import load_space

    space, store = load_space("digits_cnn"), ResultsStore(str(tmp_path), "s")
    trials = [{"trial_id": "a", "status": "budget_stopped", "optim_lr": 0.003, "best_val_accuracy": 0.5},
              {"trial_id": "b", "status": "completed", "optim_lr": 0.01, "best_val_accuracy": 0.75}]
    store.write_table("trials.parquet", pa.Table.from_pylist(trials, trials_schema(space)))
    store.write_table("epochs.parquet", pa.Table.from_pylist(
        [{"trial_id": "a", "epoch": 1, "val_accuracy": 0.5}, {"trial_id": "b", "epoch": 1, "val_accuracy": 0.5},
         {"trial_id": "b", "epoch": 2, "val_accuracy": 0.75}], EPOCHS_SCHEMA))
    tracker = open_tracker(TrackingOptions(tensorboard=""), store.uri, store.local_path(""), "s")
    tracker.open("", "s", {}, {})
    tracker.open("b", "b", {}, {}, parent="")  # seen live, then the driver ended before its end
    track_search_end(tracker, store, space, {}, {"status": "ok", "best_val_accuracy": 0.75})
    assert not tracker.open_keys and tracker.closed == {"", "a", "b"}
    assert _scalars(tmp_path / "s" / "tensorboard" / "a", "val_accuracy")[0] == {1: 0.5}
    _, acc = _scalars(tmp_path / "s" / "tensorboard" / "b", "hparam/best_val_accuracy")
    assert acc.Scalars("hparam/best_val_accuracy")[0].value == 0.75


@pytest.mark.usefixtures("ray_local")
def test_a_small_search_and_a_train_logged_to_both_match_the_tables(in_tmp):
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    assert main(["tune", "--storage", str(in_tmp), "--name", "s", "--space", "digits_cnn", "--trials", "2",
                 "--max-epochs", "2", "--scheduler", "none", "--mlflow", uri, "--tensorboard"]) == 0
    assert main(["train", "--workers", "1", "--storage", str(in_tmp), "--name", "one", "--set", "train.epochs=2",
                 "--mlflow", uri, "--tensorboard", str(in_tmp / "tb")]) == 0
    client = _client(in_tmp)
    runs = _runs(client)
    trials = pq.read_table(in_tmp / "s" / "trials.parquet").to_pylist()
    assert set(runs) == {"s", "one"} | {t["trial_id"] for t in trials} and len(trials) == 2
    parent = runs["s"].info.run_id
    best = json.loads((in_tmp / "s" / "best.json").read_text())
    assert runs["s"].data.tags["raysweep.checkpoint"] == best["checkpoint"]
    assert {f.path for f in client.list_artifacts(parent)} >= {"summary.json", "learning_curves.png"}
    for row in pq.read_table(in_tmp / "s" / "epochs.parquet").to_pylist():
        child = runs[row["trial_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent
        assert "raysweep.logged_from" not in child.data.tags  # logged live, from Tune's events
        assert child.data.tags["raysweep.status"] == "completed" and child.info.status == "FINISHED"
        steps = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "val_loss")}
        assert steps[row["epoch"]] == pytest.approx(row["val_loss"])
        events, _ = _scalars(in_tmp / "s" / "tensorboard" / row["trial_id"], "val_accuracy")
        assert events[row["epoch"]] == pytest.approx(row["val_accuracy"])
    # The train run: one run without a parent, its epochs as in history.parquet.
    history = pq.read_table(in_tmp / "one" / "history.parquet").to_pylist()
    run = runs["one"]
    assert "mlflow.parentRunId" not in run.data.tags and run.data.params["train.epochs"] == "2"
    assert run.data.tags["raysweep.checkpoint"] == json.loads((in_tmp / "one" / "summary.json").read_text())["checkpoint"]
    steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert steps == {r["epoch"]: pytest.approx(r["train_loss"]) for r in history}
    assert {f.path for f in client.list_artifacts(run.info.run_id)} == {"summary.json", "curves.png"}
    assert _scalars(in_tmp / "tb" / "one", "lr")[0] == {r["epoch"]: pytest.approx(r["lr"]) for r in history}
