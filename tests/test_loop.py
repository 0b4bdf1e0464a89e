"""The plain training loop, without Ray."""

from trainers.config import TrainRunConfig
from trainers.data import load_data
from trainers.loop import ListReporter, WorkerContext, fit


def _cfg(**sections):
    return TrainRunConfig.from_dict(sections)


def test_fast_cifar_and_resnet18_learn_on_parquet_data(tiny_parquet):
    # Two epochs: resnet18 went 0.35 -> 0.61, fast_cifar 0.40 -> 0.74 here (4 epochs cost 2x, 130 CPU-s).
    for model in ("fast_cifar", "resnet18"):
        cfg = _cfg(data={"name": "parquet", "root": str(tiny_parquet)}, model={"name": model},
                   train={"epochs": 2, "batch_size": 32},
                   augment={"flip": 0.5, "crop_padding": 1})
        rep = ListReporter()
        fit(cfg, load_data(cfg.data), WorkerContext(), rep)
        acc = [m["train_accuracy"] for m in rep.metrics]
        assert acc[-1] > acc[0] + 0.15, (model, acc)


def test_divergence_names_epoch_step_and_learning_rate():
    cfg = _cfg(train={"epochs": 5})
    # Poison the data: with a NaN mean every normalised pixel, and so the first loss, is NaN.
    data = load_data(cfg.data)
    data.mean = (float("nan"),)
    rep = ListReporter()
    last = fit(cfg, data, WorkerContext(), rep)
    assert last["stop_reason"] == "diverged" and len(rep.metrics) == 1
    assert "epoch 1 at step 0" in last["message"] and "learning rate 0.002" in last["message"]
    assert rep.states == []  # nothing non-finite is checkpointed


def test_early_stopping_after_patience_epochs_without_gain():
    cfg = _cfg(train={"epochs": 30, "early_stopping": {"metric": "val_accuracy", "patience": 2, "min_delta": 0.5}})
    rep = ListReporter()
    last = fit(cfg, load_data(cfg.data), WorkerContext(), rep)
    assert last["stop_reason"] == "early_stopped" and len(rep.metrics) == 3  # 1 best + 2 without gain
    # Resuming from a state: tests/test_recipe.py (with Lookahead, whose state rides along).
