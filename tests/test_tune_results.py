"""cluster.tune_results: the best trial's checkpoint is one that Tune kept."""

from cluster.tune_results import TrialRecord


def test_best_checkpoint_of_tied_epochs_is_one_tune_kept(tmp_path):
    """Tune's own checkpoint manager (what each trial uses, num_to_keep=2 as in
    search_spaces.tuner) deletes the older of equally scored checkpoints; a small
    validation set ties often (digits' 108 validation images)."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    scores = {1: 0.80, 2: 0.90, 3: 0.9722, 4: 0.95, 5: 0.9722, 6: 0.9722}
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_accuracy",
                                                  checkpoint_score_order="max"))
    record = TrialRecord("t", {})
    for epoch, score in scores.items():
        directory = tmp_path / f"checkpoint_{epoch - 1:06d}"
        directory.mkdir()
        manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(directory)),
                                                    {"val_accuracy": score, "epoch": epoch}))
        record.epochs[epoch] = {"val_accuracy": score}
        record.checkpoints[epoch] = str(directory)
    best = record.best_checkpoint("val_accuracy", "max")
    assert (tmp_path / best.rsplit("/", 1)[1]).is_dir(), sorted(p.name for p in tmp_path.iterdir())
    assert record.epochs[int(best[-6:]) + 1]["val_accuracy"] == 0.9722
    assert record.best_epoch("val_accuracy", "max") == int(best[-6:]) + 1  # trials.parquet's best_epoch names it


def test_a_trial_the_resumed_search_does_not_know_reads_lost(tmp_path):
    """Tune's snapshot predates a trial that started just before the driver died: the
    resumed search never continues it, so its row must not read "running" for ever."""
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from cluster.tune_results import SearchResultsCallback
    from search_spaces.space import load_space

    space = load_space("digits_cnn")
    before = SearchResultsCallback(str(tmp_path), "s", space, max_epochs=3)  # the driver that died
    for trial_id in ("kept", "gone"):
        before.on_trial_start(0, [], SimpleNamespace(trial_id=trial_id, config={}))
    resumed = SearchResultsCallback(str(tmp_path), "s", space, max_epochs=3)
    resumed.on_step_begin(0, [SimpleNamespace(trial_id="kept")])
    rows = pq.read_table(tmp_path / "s" / "trials.parquet").to_pylist()
    status = {r["trial_id"]: (r["status"], r["error"]) for r in rows}
    assert status["kept"] == ("running", None)
    assert status["gone"][0] == "lost" and "snapshot" in status["gone"][1]


def test_best_columns_hold_each_metrics_own_best_over_the_epochs(tmp_path):
    """best_val_loss is the lowest val_loss, best_val_f1 the highest val_f1, even when the
    search's metric (val_accuracy) peaks at another epoch; best_epoch follows the metric."""
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from cluster.tune_results import SearchResultsCallback
    from search_spaces.space import load_space

    space = load_space("digits_cnn")
    assert space.metric == "val_accuracy"
    callback = SearchResultsCallback(str(tmp_path), "s", space, max_epochs=3)
    trial = SimpleNamespace(trial_id="t", config={})
    callback.on_trial_start(0, [], trial)
    for epoch, (acc, loss, f1) in enumerate([(0.8, 0.5, 0.7), (0.9, 0.6, 0.85), (0.85, 0.4, 0.9)], 1):
        callback.on_trial_result(0, [], trial, {"epoch": epoch, "val_accuracy": acc, "val_loss": loss, "val_f1": f1})
    callback.on_trial_complete(0, [], trial)
    row = pq.read_table(tmp_path / "s" / "trials.parquet").to_pylist()[0]
    assert row["best_epoch"] == 2 and row["best_val_accuracy"] == 0.9
    assert (row["best_val_loss"], row["best_val_f1"]) == (0.4, 0.9)
    assert (row["final_val_loss"], row["final_val_f1"]) == (0.4, 0.9)


def test_fractional_resources_count_every_trial_that_fits():
    """1.0 // 0.1 is 9.0 in floating point: ten 0.1-GPU trials must still count as ten."""
    from search_spaces.tuner import SearchConfig, concurrency, times_fitting
    from trainers.distributed import Placement

    assert times_fitting(1.0, 0.1) == 10 and times_fitting(0.3, 0.1) == 3 and times_fitting(0.99, 0.1) == 9
    gpu = SearchConfig(trials=20, placement=Placement(workers=1, use_gpu=True, cpus_per_worker=0.1, gpus_per_worker=0.1))
    assert concurrency(gpu, {"CPU": 1.0, "GPU": 1.0}) == 10


def test_results_of_a_train_run_rank_epochs_best_first_by_its_metric(tmp_path, capsys):
    """`raysweep results` promises best first: ascending for a loss (min mode), descending
    for accuracy (max mode); a non-finite value ranks last."""
    import json

    import pyarrow.parquet as pq

    from cluster.cli import main
    from cluster.results_cmd import ranked
    from cluster.tables import HISTORY_SCHEMA, rows_to_table

    history = rows_to_table([{"epoch": 1, "val_loss": 0.9, "val_accuracy": 0.6},
                             {"epoch": 2, "val_loss": 0.3, "val_accuracy": 0.8},
                             {"epoch": 3, "val_loss": float("nan"), "val_accuracy": 0.7},
                             {"epoch": 4, "val_loss": 0.5, "val_accuracy": 0.9}], HISTORY_SCHEMA)
    for name, summary, expected in (
            ("by_loss", {"config": {"train": {"early_stopping": {"metric": "val_loss"}}}}, [2, 4, 1, 3]),
            ("by_accuracy", None, [4, 2, 3, 1])):  # no summary.json yet: val_accuracy
        run = tmp_path / name
        run.mkdir()
        pq.write_table(history, run / "history.parquet")
        if summary:
            (run / "summary.json").write_text(json.dumps(summary))
        capsys.readouterr()
        assert main(["results", str(run), "--format", "json"]) == 0
        assert [r["epoch"] for r in json.loads(capsys.readouterr().out)] == expected, name
    trials = rows_to_table([{"epoch": 1, "val_loss": 0.4}, {"epoch": 2, "val_loss": 0.2}, {"epoch": 3}], HISTORY_SCHEMA)
    assert [r["epoch"] for r in ranked(trials, "val_loss", "min")] == [2, 1, 3]
    assert [r["epoch"] for r in ranked(trials, "val_loss", "max")] == [1, 2, 3]


def test_a_failed_trials_error_cell_keeps_the_reason_without_build_paths():
    from cluster.tune_results import _last_line

    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
             "RuntimeError: [/__w/vision/vision/torchvision/csrc/io/image/cpu/decode_jpeg.cpp:123] "
             "Unsupported marker type 0xff")
    cell = _last_line(trace)
    assert "Unsupported marker type" in cell and "/__w/" not in cell
