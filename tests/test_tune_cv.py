"""`raysweep tune --cv K` without Ray: fold means per epoch, a trial's folds, refusals.
The one real cross-validated search is in test_tune.py (it shares that module's Ray)."""

import json
import statistics

import pytest

from cluster.cli import main
from search_spaces.cv import fold_indices, fold_summary, folds_digest, pool
from trainers.config import TrainRunConfig
from trainers.configtools import ConfigError
from trainers.data import load_data

LIMIT = ["--set", "data.limit=300"]


def _fold(epoch, acc, loss, seconds=1.0):
    return {"epoch": epoch, "train_loss": loss, "train_penalty": 0.0, "train_accuracy": acc, "val_loss": loss,
            "val_accuracy": acc, "val_precision": acc, "val_recall": acc, "val_f1": acc, "lr": 0.01,
            "images_per_second": 100.0, "epoch_seconds": seconds}


def test_an_epochs_fold_summary_is_the_mean_and_sample_std_with_seconds_summed():
    row = fold_summary([_fold(2, 0.8, 0.5), _fold(2, 0.6, 0.7, 2.0), _fold(2, 0.7, 0.6)])
    assert row["epoch"] == 2 and row["val_accuracy"] == pytest.approx(0.7) and row["val_loss"] == pytest.approx(0.6)
    assert row["val_accuracy_std"] == pytest.approx(0.1) and row["val_f1_std"] == pytest.approx(0.1)  # n-1
    assert row["epoch_seconds"] == 4.0  # the folds train in turn: the epoch took them all
    with pytest.raises(ValueError, match="out of step"):
        fold_summary([_fold(1, 0.5, 1.0), _fold(2, 0.5, 1.0)])


def test_folds_advance_together_and_a_trial_resumes_from_its_bundle_exactly(tmp_path):
    """No Ray: the trial's loop with a list reporter; its bundle saved and loaded as Tune's
    checkpoint directory is, then a restart from epoch 1 repeats epoch 2 to the bit."""
    from search_spaces.cv_trial import fit_folds, load_bundle, save_bundle
    from trainers.loop import ListReporter, WorkerContext

    cfg = TrainRunConfig.from_dict({"data": {"name": "digits", "limit": 200}, "model": {"name": "simple_cnn"},
                                    "train": {"epochs": 2, "batch_size": 64}})
    data = load_data(cfg.data)
    full = ListReporter()
    fit_folds(cfg, data, WorkerContext(), full, 2, seed=3)
    assert [m["epoch"] for m in full.metrics] == [1, 2]  # one report per epoch, for both folds
    for m in full.metrics:
        assert [f["fold"] for f in m["folds"]] == [1, 2] and {f["epoch"] for f in m["folds"]} == {m["epoch"]}
        assert m["val_accuracy"] == pytest.approx(statistics.fmean(f["val_accuracy"] for f in m["folds"]))
    assert full.metrics[0]["cv_digest"] == folds_digest(fold_indices(pool(data).y.numpy(), 2, 3))
    save_bundle(full.states[0], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv.json", "fold-1", "fold-2"]
    resumed = ListReporter(resume_from=load_bundle(tmp_path))
    fit_folds(cfg, data, WorkerContext(), resumed, 2, seed=3)
    assert [m["val_loss"] for m in resumed.metrics] == [m["val_loss"] for m in full.metrics[1:]]
    with pytest.raises(ConfigError, match="other folds"):  # another seed: other folds than the bundle's
        fit_folds(cfg, data, WorkerContext(), ListReporter(resume_from=load_bundle(tmp_path)), 2, seed=4)


@pytest.mark.parametrize("args, words", [
    (["--cv", "1"], "--cv: 1 must be a whole number >= 2"),
    (["--cv", "40"], "--cv: 40 folds but class"),
    (["--cv", "3", "--workers-per-trial", "2"], "--workers-per-trial: 2 with --cv 3"),
    (["--cv", "3", "--objectives", "val_accuracy:max,params:min"], "--objectives: not available with --cv 3"),
    (["--cv", "3", "--tensorboard"], "--mlflow/--tensorboard: not available with --cv"),
])
def test_bad_cv_searches_exit_2_before_ray_starts(tmp_path, capsys, args, words, no_ray_before):
    import ray

    code = main(["tune", "--space", "digits_cnn", "--storage", str(tmp_path), "--name", "cv", "--trials", "2",
                 "--set", "data.limit=100", *args])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err
    assert not ray.is_initialized()


def test_a_streamed_set_and_a_resume_with_other_folds_are_refused_before_ray(tiny_parquet, tmp_path, capsys,
                                                                             no_ray_before):
    import ray

    import raysweep

    code = main(["tune", "--space", "digits_cnn", "--storage", str(tmp_path / "runs"), "--name", "cv", "--cv", "3",
                 "--set", "data.name=parquet", "--set", f"data.root={tiny_parquet}", "--set", "data.streaming=true"])
    err = capsys.readouterr().err
    assert code == 2 and "--cv: this data set streams" in err and "data.streaming=false" in err, err
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True, mode=0o700)
    (run / "cv.json").write_text(json.dumps({"folds": 2, "seed": 0, "data": {}, "digest": "x"}))
    (run / "tuner.pkl").write_text("")  # Tune.can_restore's marker
    base = ["tune", "--space", "digits_cnn", "--storage", str(tmp_path / "runs"), "--name", "old", "--resume", *LIMIT]
    assert main([*base, "--cv", "3"]) == 2
    assert "--cv 3:" in (err := capsys.readouterr().err) and "with --cv 2, --seed 0" in err, err
    assert main(base) == 2
    assert "was searched with --cv 2; resume it the same way" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--cv: 1 must be"):
        raysweep.tune("digits_cnn", storage=str(tmp_path), name="api", cv=1)
    assert not ray.is_initialized()


def test_the_tables_hold_a_mean_row_and_fold_rows_and_a_resumed_callback_reads_the_means(tmp_path):
    """No Ray: the search's callback fed two cross-validated epochs of one trial, then a new
    callback over the same storage (as a resumed search makes) rebuilds the trial's row."""
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from cluster.tune_cv import mean_rows
    from cluster.tune_results import SearchResultsCallback
    from search_spaces.space import load_space

    space = load_space("digits_cnn")
    trial = SimpleNamespace(trial_id="t1", config={})
    callback = SearchResultsCallback(str(tmp_path), "s", space, max_epochs=2, cv=2)
    for epoch, accs in ((1, (0.5, 0.7)), (2, (0.9, 0.6))):
        folds = [{**_fold(epoch, a, 1 - a), "fold": i} for i, a in enumerate(accs, 1)]
        result = {**fold_summary(folds), "folds": folds, "cv_digest": "d1", "stop_reason": ""}
        callback.on_trial_result(0, [], trial, result)
    callback.on_trial_complete(0, [], trial)
    epochs = pq.read_table(tmp_path / "s" / "epochs.parquet")
    assert epochs.num_rows == 6 and epochs.column("fold").to_pylist() == [None, 1, 2, None, 1, 2]
    assert mean_rows(epochs).column("val_accuracy").to_pylist() == pytest.approx([0.6, 0.75])
    row = pq.read_table(tmp_path / "s" / "trials.parquet").to_pylist()[0]
    assert row["best_epoch"] == 2 and row["best_val_accuracy"] == pytest.approx(0.75)
    assert row["best_val_accuracy_std"] == pytest.approx(statistics.stdev([0.9, 0.6]))
    assert row["final_val_loss_std"] == pytest.approx(statistics.stdev([0.1, 0.4])) and row["cv_digest"] == "d1"
    assert row["best_val_loss"] == pytest.approx(0.25) and row["checkpoint"] is None
    again = SearchResultsCallback(str(tmp_path), "s", space, max_epochs=2, cv=2)
    assert again.row_of("t1") is None and again.store  # loads the tables
    assert again.row_of("t1") == row
