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
