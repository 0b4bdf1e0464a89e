"""``export_torchscript`` for the models with their own tricks: fast_cifar (whitening stem
set from data, scaled head) and resnet50 (resize inside the model, frozen BatchNorm), at
small image sizes and with no weights downloaded. The export must give what the
checkpoint's own network gives."""

from __future__ import annotations

import json

import pytest
import torch

from trainers.config import TrainRunConfig
from trainers.inference import classifier_from_state, export_torchscript
from trainers.models import build_model
from trainers.preprocess import preprocess_meta

CLASSES = ["cat", "dog", "emu"]


def _state(model: dict, shape=(3, 16, 16)) -> dict:
    """A checkpoint as ``fit`` writes it, of an untrained network (weights seeded)."""
    cfg = TrainRunConfig.from_dict({"model": model})
    torch.manual_seed(0)
    net = build_model(cfg.model, shape[0], shape[1], len(CLASSES))
    if hasattr(net, "init_from_data"):
        net.init_from_data(torch.randn(64, *shape))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    meta = {"config": cfg.to_dict(), "classes": CLASSES, "mean": mean, "std": std, "image_shape": list(shape),
            "preprocess": preprocess_meta(None, shape[0])}
    return {"model": net.state_dict(), "meta": meta, "epoch": 1}


@pytest.mark.parametrize("model", [{"name": "fast_cifar"},
                                   {"name": "resnet50", "input_size": 32, "freeze_backbone": True}],
                         ids=["fast_cifar", "resnet50"])
def test_export_gives_the_checkpoints_probabilities(model, tmp_path):
    state = _state(model)
    path = export_torchscript(state, tmp_path / "model.pt")
    extra = {"classes.json": "", "meta.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["classes.json"]) == CLASSES and module.classes == CLASSES
    assert json.loads(extra["meta.json"])["config"]["model"]["name"] == model["name"]
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    clf, _ = classifier_from_state(state)
    expected = clf.probabilities(x)
    probs = module(x)
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4))
    assert torch.allclose(probs, expected, atol=1e-5), (probs, expected)
    with pytest.raises(Exception, match="expected images of shape"):
        module(torch.zeros((1, 3, 8, 8), dtype=torch.uint8))


@pytest.mark.parametrize("level", ["flip", "flip_translate"])
def test_export_with_tta_gives_predicts_probabilities_with_the_same_tta(level, tmp_path):
    """``export --tta`` traces the same ``trainers.tta`` function ``predict --tta`` runs."""
    from trainers.inference import predict

    state = _state({"name": "simple_cnn"})
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    clf, _ = classifier_from_state(state)
    _, idx, top = predict(clf, x, len(CLASSES), "fp32", level)
    expected = torch.zeros(6, len(CLASSES)).scatter_(1, idx, top)
    extra = {"meta.json": ""}
    module = torch.jit.load(str(export_torchscript(state, tmp_path / "m.pt", tta=level)), _extra_files=extra)
    assert json.loads(extra["meta.json"])["tta"] == level
    assert torch.allclose(module(x), expected, atol=1e-5)
    assert not torch.allclose(clf.probabilities(x), expected, atol=1e-4)  # the TTA changed something
