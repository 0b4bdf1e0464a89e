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
