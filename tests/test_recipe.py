"""The airbench pieces of the fast CIFAR recipe: whitening stem, triangular schedule,
faster BatchNorm shifts and Lookahead (with resume)."""

import pytest
import torch
import torch.nn.functional as F

from trainers.config import ModelConfig, OptimConfig, TrainRunConfig
from trainers.data import load_data
from trainers.loop import ListReporter, WorkerContext, fit
from trainers.models import build_model
from trainers.optim import SCHEDULES, Lookahead, build_optimizer


def _correlated_images(n=200, size=12):
    """Smooth, channel-mixed images: their 2x2 patches are far from white."""
    gen = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.randn(n, 3, size + 2, size + 2, generator=gen), 3, stride=1)
    return x + 0.5 * x.mean(1, keepdim=True)


def test_whitening_stem_decorrelates_patches_and_stays_frozen():
    net = build_model(ModelConfig(name="fast_cifar"), 3, 32, 10)
    x = _correlated_images()
    net.init_from_data(x)
    half = net.whiten.weight[:12]  # the other 12 filters are their negatives
    assert torch.equal(net.whiten.weight[12:], -half)
    out = F.conv2d(x, half).permute(0, 2, 3, 1).reshape(-1, 12)
    cov = out.T @ out / len(out)
    raw = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    raw_cov = raw.T @ raw / len(raw)
    off = lambda c: (c - torch.diag(torch.diag(c))).abs().max() / torch.diag(c).mean()
    assert off(raw_cov) > 0.5 and off(cov) < 0.02  # correlated before, white after
    assert torch.allclose(torch.diag(cov)[:6], torch.ones(6), atol=0.05)  # the strong directions: unit variance
    assert not net.whiten.weight.requires_grad


def test_triangle_schedule_rises_from_a_fifth_and_ends_at_seven_hundredths():
    tri = SCHEDULES["triangle"]
    values = [tri(s, 100, 0) for s in range(100)]
    assert values[0] == pytest.approx(0.2) and max(values) == pytest.approx(1.0)
    assert values.index(max(values)) == 23 and values[-1] == pytest.approx(0.07, abs=0.01)


def test_norm_biases_get_a_larger_rate_and_smaller_decay():
    net = build_model(ModelConfig(name="fast_cifar"), 3, 32, 10)
    opt, _ = build_optimizer(net, OptimConfig(name="momentum", lr=0.1, weight_decay=0.01, norm_bias_lr_scale=64), 10, 1)
    rest, biases = opt.param_groups
    assert biases["lr"] == pytest.approx(6.4) and biases["weight_decay"] == pytest.approx(0.01 / 64)
    bn_biases = {id(m.bias) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in biases["params"]} == bn_biases and not bn_biases & {id(p) for p in rest["params"]}
    assert len(build_optimizer(net, OptimConfig(name="momentum"), 10, 1)[0].param_groups) == 1


def test_lookahead_pulls_weights_towards_the_slow_copy_and_finish_lands_on_it():
    net = torch.nn.Linear(2, 1)
    la = Lookahead(net, every=1, total_steps=1)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    la.after_step()  # progress 1: decay 0.95**5 towards the start
    assert torch.allclose(net.weight, start + (1 - 0.95**5), atol=1e-6)
    with torch.no_grad():
        net.weight.add_(5.0)
    la.finish()
    assert torch.allclose(net.weight, start + (1 - 0.95**5), atol=1e-6)


def test_a_run_with_lookahead_resumes_to_the_same_result():
    cfg = TrainRunConfig.from_dict({
        "optim": {"name": "momentum", "lr": 0.05, "lookahead_every": 2, "norm_bias_lr_scale": 8,
                  "schedule": "triangle"},
        "train": {"epochs": 4}})
    data = load_data(cfg.data)
    full = ListReporter()
    fit(cfg, data, WorkerContext(), full)
    assert "lookahead" in full.states[1]  # states are copies: this one is as epoch 2 left it
    resumed = ListReporter(resume_from=full.states[1])
    fit(cfg, data, WorkerContext(), resumed)
    assert [m["epoch"] for m in resumed.metrics] == [3, 4]
    assert resumed.metrics[-1]["val_loss"] == pytest.approx(full.metrics[-1]["val_loss"], rel=0, abs=0)
