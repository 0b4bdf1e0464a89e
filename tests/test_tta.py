"""Test-time augmentation (``trainers.tta``): plain functions on tiny networks, no Ray."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainers.checkpoints import evaluate_state, model_from_state
from trainers.config import TrainRunConfig
from trainers.configtools import ConfigError
from trainers.data import Split
from trainers.tta import TTA, TTANet


def _conv_net(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, classes)).eval()


def _fixed_size_net(classes: int = 4) -> nn.Module:
    """Takes exactly 3x8x8 images (a Linear on the flattened pixels)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes)).eval()


def test_the_docstring_example_runs_and_holds():
    import doctest

    from trainers import tta

    result = doctest.testmod(tta, raise_on_error=False)
    assert result.attempted >= 4 and result.failed == 0, result


def test_the_levels_are_registered_by_name():
    assert TTA.names() == ["flip", "flip_translate", "none"]
    with pytest.raises(KeyError, match="known: flip, flip_translate, none"):
        TTA["mirror"]


@torch.no_grad()
def test_flip_of_a_mirror_symmetric_image_equals_the_plain_logits():
    net = _conv_net()
    half = torch.randn(5, 3, 8, 4)
    symmetric = torch.cat([half, half.flip(3)], dim=3)
    assert torch.allclose(TTA["flip"](net, symmetric), TTA["none"](net, symmetric), atol=1e-6)
    x = torch.randn(5, 3, 8, 8)  # an ordinary image: the mirror adds something
    assert not torch.allclose(TTA["flip"](net, x), TTA["none"](net, x), atol=1e-4)
    assert torch.allclose(TTA["flip"](net, x), (net(x) + net(x.flip(3))) / 2, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_flip_translate_keeps_the_shape_a_fixed_size_network_needs(fmt):
    net = _fixed_size_net()
    x = torch.randn(6, 3, 8, 8).contiguous(memory_format=fmt)
    out = TTA["flip_translate"](net, x)
    assert out.shape == (6, 4) and out.dtype == torch.float32
    # airbench's weights: the mirrored pair 1/2, each moved pair (reflection fill) 1/4.
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    pair = lambda z: (net(z) + net(z.flip(3))) / 2
    expected = pair(x) / 2 + pair(padded[..., :8, :8]) / 4 + pair(padded[..., 2:, 2:]) / 4
    assert torch.allclose(out, expected, atol=1e-5)
    constant = torch.full((2, 3, 8, 8), 0.3)  # every copy is the image itself
    assert torch.allclose(TTA["flip_translate"](net, constant), net(constant), atol=1e-5)


@torch.no_grad()
def test_under_bf16_autocast_the_mean_is_float32_and_near_fp32():
    net, x = _conv_net(), torch.randn(8, 3, 8, 8)
    reference = TTA["flip_translate"](net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16  # autocast is really on
        out = TTA["flip_translate"](net, x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out, reference, atol=0.05, rtol=0.05)


def test_an_unknown_level_is_a_config_error_naming_train_tta():
    with pytest.raises(ConfigError) as e:
        TrainRunConfig.from_dict({"train": {"tta": "mirror"}})
    assert any(p.startswith("train.tta: 'mirror'") and "flip_translate" in p for p in e.value.problems)
    assert TrainRunConfig.from_dict({"train": {"tta": "flip"}}).train.tta == "flip"
    assert TrainRunConfig().train.tta == "none"


def _state(tta: str) -> dict:
    cfg = TrainRunConfig.from_dict({"model": {"name": "simple_cnn"}, "train": {"tta": tta, "precision": "fp32"}})
    from trainers.models import build_model

    torch.manual_seed(0)
    net = build_model(cfg.model, 3, 8, 4)
    meta = {"config": cfg.to_dict(), "classes": list("abcd"), "mean": [0.5] * 3, "std": [0.25] * 3,
            "image_shape": [3, 8, 8]}
    return {"model": net.state_dict(), "meta": meta, "epoch": 1}


@torch.no_grad()
def test_evaluate_state_scores_with_the_checkpoints_tta():
    """What lands in summary.json / best.json: the averaged logits' argmax and loss."""
    gen = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 4, (64,), generator=gen))
    state = _state("flip_translate")
    model, _, _ = model_from_state(state)
    logits = TTA["flip_translate"](model.net, model.prepare(split.x))
    expected = float((logits.argmax(1) == split.y).float().mean())
    loss = float(nn.functional.cross_entropy(logits, split.y))
    scores = evaluate_state(state, split)
    assert scores["test_accuracy"] == pytest.approx(expected)
    assert scores["test_loss"] == pytest.approx(loss, rel=1e-5)
    plain = evaluate_state(state, split, tta="none")
    assert plain["test_loss"] != pytest.approx(loss, rel=1e-5)  # the level was really applied
    assert isinstance(TTANet(model.net, "flip").inner, nn.Module)


def test_the_printed_summary_names_a_tta_level():
    from types import SimpleNamespace

    from cluster.train_cmd import format_summary

    summary = {"status": "completed", **{f"test_{k}": 0.9 for k in ("accuracy", "precision", "recall", "f1")},
               "cpu_seconds": 1, "gpu_seconds": 0}
    store = SimpleNamespace(uri="runs/x")
    assert "(test-time augmentation flip)" in format_summary({**summary, "config": {"train": {"tta": "flip"}}}, store)
    assert "test-time" not in format_summary({**summary, "config": {"train": {"tta": "none"}}}, store)
