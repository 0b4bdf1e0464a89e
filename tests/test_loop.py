"""The plain training loop, without Ray."""

import threading

import pytest
import torch

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


def test_train_loss_is_the_data_loss_like_val_loss_and_the_l1_penalty_is_apart():
    """With a rate too small to move the weights, an L1 run's train_loss is the plain run's;
    the penalty is reported on its own, as l1 * sum|w|."""
    from trainers.losses import l1_penalty
    from trainers.models import build_model

    runs = {}
    for l1 in (0.0, 0.01):
        cfg = _cfg(optim={"name": "sgd", "lr": 1e-9, "l1": l1}, train={"epochs": 1, "precision": "fp32"})
        rep = ListReporter()
        fit(cfg, load_data(cfg.data), WorkerContext(), rep)
        runs[l1] = rep
    plain, penalised = runs[0.0].metrics[0], runs[0.01].metrics[0]
    assert abs(penalised["train_loss"] - plain["train_loss"]) < 1e-4 * plain["train_loss"], (penalised, plain)
    net = build_model(_cfg().model, 1, 8, 10)
    net.load_state_dict(runs[0.01].states[0]["model"])
    assert abs(penalised["train_penalty"] - 0.01 * float(l1_penalty(net).detach())) < 1e-3 * penalised["train_penalty"]
    assert plain["train_penalty"] == 0.0


def test_checkpoints_before_the_last_epoch_hold_lookahead_slow_weights_and_lr_is_the_epochs_first():
    """A run stopped early (ASHA, patience, a cut) ends on its last checkpoint: that must be
    the slow weights, not only at the scheduled last epoch. Resuming goes on from the fast."""
    import math

    from trainers.optim import SCHEDULES

    cfg = _cfg(optim={"name": "momentum", "lr": 0.05, "lookahead_every": 7, "schedule": "triangle"},
               train={"epochs": 2, "precision": "fp32"})
    data = load_data(cfg.data)
    steps = math.ceil(len(data.train) / cfg.train.batch_size)
    assert steps % 7, "the epoch must not end on a Lookahead sync, or fast == slow there"
    rep = ListReporter()
    fit(cfg, data, WorkerContext(), rep)
    for state in rep.states[:1]:  # epoch 1 of 2
        slow = state["lookahead"]["slow"]
        assert all(torch.equal(state["model"][k], v) for k, v in slow.items()), state["epoch"]
        assert any(not torch.equal(state["lookahead"]["fast"][k], v) for k, v in slow.items())
    resumed = ListReporter(resume_from=rep.states[0])
    fit(cfg, data, WorkerContext(), resumed)
    assert [m["val_loss"] for m in resumed.metrics] == [m["val_loss"] for m in rep.metrics[1:]]
    for m in rep.metrics:  # docs/train.md: `lr` is the rate at the epoch's first step
        first_step = (m["epoch"] - 1) * steps
        assert m["lr"] == pytest.approx(0.05 * SCHEDULES["triangle"](first_step, steps * 2, 0))


def test_a_long_epoch_prints_its_progress(capsys):
    from trainers.loop import with_progress

    batches = [(torch.zeros(4, 1, 2, 2), torch.zeros(4), None) for _ in range(3)]
    assert list(with_progress(iter(batches), epoch=2, steps=3, every_s=0.0)) == batches  # passed through
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[2] for line in lines] == ["step 1/~3 (33%)", "step 2/~3 (67%)", "step 3/~3 (100%)"]
    assert all(line.startswith("epoch   2") and line.endswith("img/s on this worker") for line in lines)
    list(with_progress(iter(batches), epoch=2, steps=3))  # the default: nothing within a minute
    assert capsys.readouterr().out == ""


class NoticeAt(threading.Event):
    """A preemption notice that comes at the ``at``-th step boundary, as a SIGTERM would
    (trainers.preemption sets a real Event; this one is set by counting boundaries)."""

    def __init__(self, at: int):
        super().__init__()
        self.boundaries, self.at = 0, at

    def is_set(self) -> bool:
        self.boundaries += 1
        if self.boundaries >= self.at:
            self.set()
        return super().is_set()


def test_a_run_stopped_mid_epoch_resumes_at_the_next_batch_as_if_never_stopped():
    """Preempted at step 2 of epoch 2, then resumed with a position checkpoint after every step:
    the same batches, augmentations and dropout masks as one straight run, so the same weights,
    and each epoch reported once."""
    from trainers.position import POSITION_KEY, PREEMPTED_KEY

    base = {"data": {"limit": 160}, "model": {"dropout": 0.2}, "augment": {"flip": 0.5, "crop_padding": 1},
            "optim": {"lookahead_every": 3}, "train": {"epochs": 2, "batch_size": 32, "precision": "fp32"}}
    cfg = _cfg(**base)
    data = load_data(cfg.data)
    steps = -(-int(len(data.train)) // cfg.train.batch_size)
    straight = ListReporter()
    fit(cfg, data, WorkerContext(), straight)
    stopped = ListReporter()
    last = fit(cfg, data, WorkerContext(preemption=NoticeAt(steps + 2)), stopped)
    assert last == {"epoch": 2, POSITION_KEY: 2, PREEMPTED_KEY: True}
    assert [m["epoch"] for m in stopped.metrics if POSITION_KEY not in m] == [1]
    position = stopped.states[-1]["position"]
    assert (position["epoch"], position["step"], stopped.states[-1]["epoch"]) == (2, 2, 1)
    every_step = _cfg(**base | {"train": base["train"] | {"checkpoint_every_minutes": 1e-9}})
    resumed = ListReporter(resume_from=stopped.states[-1])
    fit(every_step, data, WorkerContext(), resumed)
    epochs = [m for m in resumed.metrics if POSITION_KEY not in m]
    assert [m["epoch"] for m in epochs] == [2]
    positions = [(m["epoch"], m[POSITION_KEY]) for m in resumed.metrics if POSITION_KEY in m]
    assert positions == [(2, step) for step in range(3, steps + 1)]
    final, expected = resumed.states[-1], straight.states[-1]
    assert final["epoch"] == expected["epoch"] == 2
    assert all(torch.equal(final["model"][k], v) for k, v in expected["model"].items())
    for mine, theirs in zip(epochs, straight.metrics[1:]):  # the resumed epoch's sums include the first 2 steps
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-9)
        assert mine["train_accuracy"] == theirs["train_accuracy"] and mine["val_loss"] == theirs["val_loss"]
