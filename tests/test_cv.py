"""Cross-validation folds (search_spaces/cv.py): plain functions, no Ray."""

import numpy as np
import pytest
import torch

from search_spaces.cv import cv_problems, fold_data, fold_indices, refit_data
from trainers.configtools import ConfigError
from trainers.data import ImageData, Split

LABELS = np.array([0] * 10 + [1] * 7 + [2] * 5)


def test_folds_are_disjoint_cover_every_index_and_are_stratified():
    folds = fold_indices(LABELS, 3, seed=1)
    together = np.concatenate(folds)
    assert sorted(together.tolist()) == list(range(len(LABELS)))  # disjoint and covering
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for cls in range(3):
        per_fold = [int((LABELS[f] == cls).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and min(per_fold) >= 1, (cls, per_fold)


def test_folds_are_a_pure_function_of_seed_and_labels():
    assert all(np.array_equal(a, b) for a, b in zip(fold_indices(LABELS, 4, 7), fold_indices(LABELS, 4, 7)))
    assert not all(np.array_equal(a, b) for a, b in zip(fold_indices(LABELS, 4, 7), fold_indices(LABELS, 4, 8)))


@pytest.mark.parametrize("k, words", [(1, ">= 2"), (0, ">= 2"), (2.5, "whole number"), (True, "whole number"),
                                      (6, "class 2 has only 5")])
def test_bad_fold_counts_are_refused_naming_flag_value_and_fix(k, words):
    problems = cv_problems(k, LABELS)
    assert len(problems) == 1 and problems[0].startswith("--cv:") and words in problems[0], problems
    with pytest.raises(ConfigError, match="--cv"):
        fold_indices(LABELS, k, 0)
    assert cv_problems(5, LABELS) == []


def test_fold_data_keeps_the_test_split_and_validates_on_unseen_images():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (30, 1, 4, 4), dtype=torch.uint8, generator=gen)
    y = torch.arange(30) % 3
    test = Split(x[:6], y[:6])
    data = ImageData(Split(x[6:24], y[6:24]), Split(x[24:], y[24:]), test, ["a", "b", "c"], (0.5,), (0.2,))
    folds = fold_data(data, 3, seed=0)
    assert len(folds) == 3 and all(f.test is test for f in folds)
    val_ids = [set(map(tuple, f.val.x.flatten(1).tolist())) for f in folds]
    for f, ids in zip(folds, val_ids):
        assert len(f.train) + len(f.val) == 24  # train + val of the run, never its test
        assert not ids & set(map(tuple, f.train.x.flatten(1).tolist()))
    assert sum(len(v) for v in val_ids) == 24
    refit = refit_data(data)
    assert len(refit.train) == 24 and refit.test is test


def test_fold_rows_take_the_best_epoch_by_the_checkpoint_metric_and_the_last_one():
    from cluster.cv_cmd import fold_metrics, mean_std

    history = [{"epoch": e, "val_loss": loss, "val_accuracy": acc} for e, loss, acc in
               [(1, 0.9, 0.5), (2, 0.4, 0.8), (3, 0.5, 0.8)]]
    row = fold_metrics(history, "val_accuracy", "max")
    assert row["best_epoch"] == 2 and row["best_val_loss"] == 0.4 and row["final_val_loss"] == 0.5
    assert fold_metrics(history, "val_loss", "min")["best_epoch"] == 2
    rows = [{"fold": 1, "status": "completed", "best_val_accuracy": 0.8},
            {"fold": 2, "status": "completed", "best_val_accuracy": 0.6},
            {"fold": 3, "status": "failed", "best_val_accuracy": 0.0}]  # a failed fold is left out
    stats = mean_std(rows)
    assert stats["mean"] == {"best_val_accuracy": pytest.approx(0.7)}
    assert stats["std"]["best_val_accuracy"] == pytest.approx(0.1414213, rel=1e-5)  # sample std (n-1)


@pytest.mark.parametrize("args, words", [
    (["--cv", "1"], "--cv: 1 must be a whole number >= 2"),
    (["--cv", "200"], "--cv: 200 folds but class"),
    (["--cv-refit"], "--cv-refit: refits after cross-validation; add --cv K"),
    (["--cv", "3", "--tensorboard"], "--mlflow/--tensorboard: not available with --cv"),
])
def test_bad_cv_requests_exit_2_before_ray_starts(tmp_path, capsys, args, words, no_ray_before):
    import ray

    from cluster.cli import main

    assert main(["train", "--storage", str(tmp_path), "--name", "cv", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert not ray.is_initialized() and not (tmp_path / "cv").exists()


def test_cv_refuses_a_streamed_set_whose_val_split_is_fixed(tiny_parquet, tmp_path, capsys):
    from cluster.cli import main

    code = main(["train", "--storage", str(tmp_path / "runs"), "--name", "cv", "--cv", "3", "--set",
                 "data.name=parquet", "--set", f"data.root={tiny_parquet}", "--set", "data.streaming=true"])
    err = capsys.readouterr().err
    assert code == 2 and "--cv: this data set streams" in err and "data.streaming=false" in err, err


def test_the_python_api_refuses_bad_cv_arguments_before_ray(tmp_path, no_ray_before):
    import ray

    import raysweep

    with pytest.raises(ConfigError, match="cv_refit: refits after cross-validation"):
        raysweep.train(cv_refit=True, storage=str(tmp_path), name="api")
    with pytest.raises(ConfigError, match="--cv: 1 must be"):
        raysweep.train(cv=1, storage=str(tmp_path), name="api")
    assert not ray.is_initialized()


def test_a_resume_with_other_folds_is_refused_before_ray(tmp_path, capsys, no_ray_before):
    import json

    import ray

    from cluster.cli import main
    from trainers.config import TrainRunConfig

    run = tmp_path / "cv"
    run.mkdir(mode=0o700)
    plan = {"folds": 3, "data_seed": 0, "data": TrainRunConfig.from_dict({}).to_dict()["data"]}
    (run / "cv.json").write_text(json.dumps(plan))
    assert main(["train", "--storage", str(tmp_path), "--name", "cv", "--resume", "--cv", "4"]) == 2
    err = capsys.readouterr().err
    assert "--cv 4:" in err and "was cross-validated with --cv 3" in err and "Traceback" not in err, err
    assert main(["train", "--storage", str(tmp_path), "--name", "cv", "--resume", "--cv", "3",
                 "--set", "data.seed=1"]) == 2
    assert "data.seed 0" in capsys.readouterr().err and not ray.is_initialized()
