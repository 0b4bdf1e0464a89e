"""`raysweep train` end to end on a real local Ray (2 CPUs)."""

import json
import time

import pyarrow.parquet as pq
import pytest

from cluster.cli import main
from cluster.tables import HISTORY_SCHEMA
from trainers.distributed import FAULT_ENV

pytestmark = pytest.mark.usefixtures("ray_local")


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.smoke
def test_digits_two_workers_learns_and_writes_results(tmp_path):
    # 4 epochs, not the default 12: learning itself is shown without Ray (tests/test_loop.py);
    # here it is that 2 DDP workers learn too, and what the run leaves behind.
    assert main(["train", "--workers", "2", "--storage", str(tmp_path), "--name", "digits",
                 "--set", "train.epochs=4"]) == 0
    run = tmp_path / "digits"
    summary = _summary(run)
    assert summary["status"] == "completed" and summary["epochs_run"] == 4
    assert summary["test_accuracy"] >= 0.9, summary
    for key in ("test_precision", "test_recall", "test_f1", "best_epoch", "checkpoint", "config"):
        assert key in summary
    history = pq.read_table(run / "history.parquet")
    assert history.schema.equals(HISTORY_SCHEMA)
    assert history.column("epoch").to_pylist() == list(range(1, 5))
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # Checkpoints are written straight into the run directory, and Ray still deletes those
    # it no longer keeps (the best and the latest).
    kept = sorted(c for c in run.glob("checkpoint_*") if c.is_dir())
    assert 1 <= len(kept) <= 2 and all((c / "state.pt").is_file() for c in kept), kept
    assert not list(run.rglob("*.partial"))
    assert summary["checkpoint"].rstrip("/").split("/")[-1] in {c.name for c in kept}
    # A fit given no Ray Dataset starts no Ray Data resource broker (LeanTorchTrainer, where
    # raysweep's private Ray parts are on; Ray's public TorchTrainer starts one).
    from ray.util.state import list_actors

    from trainers import ray_private

    if ray_private.enabled():
        assert not [a.class_name for a in list_actors(limit=10_000) if "AutoscalingCoordinator" in a.class_name]
    # Users read it with their own tools.
    import duckdb
    import polars as pl

    best = duckdb.sql(f"select max(val_accuracy) from '{run / 'history.parquet'}'").fetchall()[0][0]
    assert best == pytest.approx(pl.read_parquet(run / "history.parquet")["val_accuracy"].max())


def test_a_worker_that_dies_mid_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAULT_ENV, f"3:{marker}")
    code = main(["train", "--workers", "2", "--storage", str(tmp_path), "--name", "fault",
                 "--set", "train.epochs=5"])
    assert code == 0 and marker.exists()  # the worker really died once
    summary = _summary(tmp_path / "fault")
    # Restarted from a checkpoint (the last one Ray had processed), not from scratch.
    assert summary["status"] == "completed" and 1 <= summary["resumed_from_epoch"] <= 2
    epochs = pq.read_table(tmp_path / "fault" / "history.parquet").column("epoch").to_pylist()
    assert epochs == [1, 2, 3, 4, 5]


def test_a_streamed_epoch_resumed_from_a_position_skips_the_batches_it_had_done():
    """docs/train.md: for a streamed set a position is a batch count, so the resumed epoch
    keeps its length (which images Ray Data's split hands a shard is its own to decide)."""
    import numpy as np
    import ray
    import torch

    from trainers.config import TrainRunConfig
    from trainers.inputs import StreamedInputs
    from trainers.loop import WorkerContext
    from trainers.streaming import StreamPlan

    ds = ray.data.from_items([{"image": np.full((1, 2, 2), i, np.uint8), "label": i} for i in range(40)])
    plan = StreamPlan(classes=[str(i) for i in range(40)], mean=(0.5,), std=(0.25,), shape=(1, 2, 2), train_rows=40,
                      val_rows=0, test_rows=0, sample=torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    inputs = StreamedInputs(plan, ds, ds, WorkerContext(), TrainRunConfig.from_dict({}))
    whole = [y.tolist() for _, y, _ in inputs.train_batches(1, 8, torch.Generator())]
    restored = []
    resumed = [y.tolist() for _, y, _ in inputs.train_batches(1, 8, torch.Generator(), skip=2,
                                                               after_order=lambda: restored.append(True))]
    assert [len(b) for b in whole] == [8] * 5 and [len(b) for b in resumed] == [8] * 3 and restored == [True]
    assert sorted(sum(whole, [])) == list(range(40))


def test_an_interrupted_run_continues_where_it_stopped_with_resume(tmp_path, monkeypatch, capsys):
    """Also when the driver died after Ray kept epoch 2's checkpoint but before its history
    row was written (seen with S3 storage, tests/test_streaming.py): the resume records it."""
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAULT_ENV, f"3:{marker}")  # the worker dies before reporting epoch 3
    argv = ["train", "--workers", "1", "--storage", str(tmp_path), "--name", "again",
            "--set", "train.epochs=3", "--set", "train.max_failures=0", "--set", "train.checkpoint_every=1"]
    assert main(argv) == 1 and marker.exists()  # no retries: the run stops, failed
    assert _summary(tmp_path / "again")["status"] == "failed"
    history = tmp_path / "again" / "history.parquet"
    recorded = pq.read_table(history).to_pylist()
    assert [r["epoch"] for r in recorded] == [1, 2]
    pq.write_table(pq.read_table(history).slice(0, 1), history)  # as if the driver died before writing epoch 2
    assert main(argv) == 2 and "pass --resume" in capsys.readouterr().err  # the name is taken
    assert main(argv + ["--resume"]) == 0
    summary = _summary(tmp_path / "again")
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] == 2
    rows = pq.read_table(history).to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[1] == recorded[1]  # epoch 2 as it was reported
    assert capsys.readouterr().out.count("epoch   2") == 0  # recorded, not printed again


def test_divergence_stops_with_status_and_message(tmp_path, capsys):
    # Plain SGD at lr 9.5 on digits overflows within the first epoch for these seeds.
    code = main(["train", "--workers", "1", "--storage", str(tmp_path), "--name", "nan",
                 "--set", "optim.name=sgd", "--set", "optim.lr=9.5", "--set", "train.epochs=4"])
    assert code == 1
    summary = _summary(tmp_path / "nan")
    assert summary["status"] == "diverged" and summary["epochs_run"] == 1
    assert "epoch 1 at step" in summary["message"] and "learning rate 9.5" in summary["message"]
    assert "diverged" in capsys.readouterr().out


def test_requests_the_cluster_can_never_fit_are_refused_at_once(tmp_path, capsys):
    start = time.monotonic()
    assert main(["train", "--workers", "3", "--storage", str(tmp_path)]) == 2
    assert main(["train", "--gpu", "--storage", str(tmp_path)]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "needs 3 CPUs but the cluster has 2" in err and "the cluster has no GPU" in err


def test_bad_input_exits_2_before_ray_work(tmp_path, capsys):
    assert main(["train", "--set", "model.name=vgg", "--set", "optim.lr=0", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.name: 'vgg'" in err and "optim.lr: 0.0 must be > 0.0" in err
    assert main(["train", "--set", "data.name=parquet", "--set", f"data.root={tmp_path}/none",
                 "--storage", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was started or written


def test_cv_three_folds_with_refit_and_a_resume_that_skips_finished_folds(tmp_path, capsys):
    """`train --cv 3 --cv-refit` on digits: 1 worker of half a CPU a fold, so all 3 folds run at once on 2 CPUs
    (one wave of fit start-ups, not two)."""
    args = ["train", "--workers", "1", "--cpus-per-worker", "0.5", "--storage", str(tmp_path), "--name", "cv",
            "--cv", "3", "--cv-refit", "--set", "train.epochs=2"]
    assert main(args) == 0
    run = tmp_path / "cv"
    folds = pq.read_table(run / "cv.parquet").to_pylist()
    assert [f["fold"] for f in folds] == [1, 2, 3] and all(f["status"] == "completed" for f in folds)
    assert sum(f["val_images"] for f in folds) == folds[0]["train_images"] + folds[0]["val_images"]
    assert all(f["best_val_accuracy"] > 0.5 and "test_accuracy" not in f for f in folds)  # no test figure per fold
    history = pq.read_table(run / "history.parquet")
    assert history.column("fold").to_pylist() == [1, 1, 2, 2, 3, 3]
    summary = _summary(run)
    assert summary["folds_at_once"] == 3
    accs = [f["best_val_accuracy"] for f in folds]
    assert summary["mean"]["best_val_accuracy"] == pytest.approx(sum(accs) / 3)
    assert summary["std"]["best_val_accuracy"] > 0
    assert summary["refit"]["epochs"] == 2 and summary["test_accuracy"] == summary["refit"]["test_accuracy"] > 0.5
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0  # the same folds, none run again
    out = capsys.readouterr().out
    assert out.count("finished before (completed); skipped") == 3 and "train_loss" not in out, out[-2000:]
    assert pq.read_table(run / "cv.parquet").to_pylist() == folds
