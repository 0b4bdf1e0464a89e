"""What the losses, optimisers, schedules and fp16 training promise (trainers/losses.py,
trainers/optim.py, trainers/loop.py), checked against hand-computed values; and the
docstring examples of trainers/inference.py, run."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from trainers import inference
from trainers.config import LossConfig, ModelConfig, OptimConfig, TrainRunConfig
from trainers.data import load_data
from trainers.loop import ListReporter, WorkerContext, build_worker_model, fit, train_one_epoch
from trainers.losses import LOSSES, compute_loss, l1_penalty
from trainers.models import build_model
from trainers.optim import OPTIMIZERS, SCHEDULES, build_optimizer

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
LABELS = torch.tensor([0, 2])


def test_the_inference_docstring_examples_run_and_hold():
    result = doctest.testmod(inference, raise_on_error=False)
    assert result.attempted >= 3 and result.failed == 0, result


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_losses_match_their_formulas_with_label_smoothing(smoothing):
    k = LOGITS.shape[1]
    target = F.one_hot(LABELS, k).float() * (1 - smoothing) + smoothing / k  # e.g. 0.1: 0.933 / 0.033
    cfg = lambda name: LossConfig(name=name, label_smoothing=smoothing)  # noqa: E731
    expected = {
        "cross_entropy": -(target * LOGITS.log_softmax(1)).sum(1).mean(),
        "bce": -(target * F.logsigmoid(LOGITS) + (1 - target) * F.logsigmoid(-LOGITS)).mean(),
        "mse": ((LOGITS.softmax(1) - target) ** 2).mean(),
    }
    assert sorted(expected) == LOSSES.names()
    for name, value in expected.items():
        got = compute_loss(LOGITS, LABELS, cfg(name))
        assert got.shape == () and got.item() == pytest.approx(value.item(), rel=1e-6), name
        # fp16 logits (autocast) are scored in fp32.
        assert compute_loss(LOGITS.half(), LABELS, cfg(name)).dtype == torch.float32


def test_l1_penalty_sums_trainable_weights_only():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(-0.5)
    net[0].weight.requires_grad_(False)
    assert l1_penalty(net).item() == pytest.approx(0.5 * (2 + 2 + 1))  # 2nd weight, both biases


def test_every_optimiser_gets_the_configured_rate_and_decay_and_skips_frozen_weights():
    net = build_model(ModelConfig(freeze_backbone=True), 1, 8, 3)  # only the head trains
    head = {id(p) for p in net[11].parameters()}
    for name in OPTIMIZERS.names():
        opt, _ = build_optimizer(net, OptimConfig(name=name, lr=0.03, weight_decay=0.01), 10, 1)
        (group,) = opt.param_groups
        assert group["lr"] == pytest.approx(0.03) and group["weight_decay"] == 0.01, name
        assert {id(p) for p in group["params"]} == head, name
    momentum = lambda **kw: build_optimizer(net, OptimConfig(name="momentum", nesterov=True, **kw), 1, 1)[0]  # noqa: E731
    assert momentum(momentum=0.9).param_groups[0]["nesterov"]
    assert not momentum(momentum=0.0).param_groups[0]["nesterov"]  # torch refuses nesterov without momentum
    assert type(build_optimizer(net, OptimConfig(name="adamw"), 1, 1)[0]) is torch.optim.AdamW  # decoupled decay


def test_schedules_warm_up_then_decay_to_their_endpoints():
    total, warmup = 100, 10
    for name in SCHEDULES.names():
        f = SCHEDULES[name]
        values = [f(s, total, warmup) for s in range(total)]
        assert max(values) == pytest.approx(1.0), name  # the configured rate is the peak
        assert values.index(max(values)) == warmup - (name != "triangle"), name
        assert all(a <= b for a, b in zip(values[:warmup], values[1:warmup])), name  # rising warm-up
        assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:])), name  # then never rising
    assert SCHEDULES["constant"](0, total, warmup) == pytest.approx(0.1) and SCHEDULES["constant"](0, total, 0) == 1
    assert SCHEDULES["cosine"](total, total, warmup) == pytest.approx(0.0, abs=1e-12)
    assert SCHEDULES["cosine"](55, total, warmup) == pytest.approx(0.5)  # half way through the decay
    assert SCHEDULES["onecycle"](total, total, warmup) == 0.0
    assert SCHEDULES["onecycle"](29, total, 0) == 1.0  # no warm-up set: the peak at 30%
    assert SCHEDULES["triangle"](total - 1, total, warmup) == pytest.approx(0.07)


def test_the_scheduler_steps_per_batch_and_warmup_epochs_count_in_steps():
    net = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(net, OptimConfig(lr=0.1, schedule="cosine", warmup_epochs=0.5), 10, 3)
    rates = []
    for _ in range(30):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(0.1 / 5) and rates[4] == pytest.approx(0.1)  # 0.5 epoch = 5 steps
    assert rates[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 24 / 25)))


def test_fp16_on_cpu_trains_with_a_grad_scaler_that_skips_overflowing_steps():
    cfg = TrainRunConfig.from_dict({"data": {"limit": 256}, "train": {"epochs": 2, "precision": "fp16"}})
    data = load_data(cfg.data)
    rep = ListReporter()
    fit(cfg, data, WorkerContext(), rep)
    losses = [m["train_loss"] for m in rep.metrics]
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0], losses
    assert rep.metrics[-1]["val_accuracy"] > 0.5, rep.metrics

    # What the scaler is for: a scale so large that the fp16 gradients overflow. The step is
    # skipped (weights unchanged, still finite) and the scale is cut, as GradScaler promises.
    cpu = torch.device("cpu")
    model = build_worker_model(cfg, data, cpu)
    opt, sched = build_optimizer(model.net, cfg.optim, 1, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    batch = [(data.train.x[:32], data.train.y[:32], None)]
    train_one_epoch(model, batch, cfg, opt, sched, torch.Generator().manual_seed(0), "fp16", cpu, scaler)
    assert scaler.get_scale() < 2.0**60
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())
