"""Contract test per registered model: forward and backward on a tiny batch, no NaN."""

import pytest
import torch

from trainers.config import ModelConfig
from trainers.models import HEADS, MODELS, ModelError, build_model

SHAPES = {"simple_cnn": (1, 8), "resnet18": (3, 16), "resnet50": (3, 32), "fast_cifar": (3, 32),
          "fast_cifar95": (3, 32)}


def test_every_registered_model_has_a_contract_shape_and_a_head():
    assert sorted(SHAPES) == MODELS.names() == sorted(HEADS)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_backward_finite(name):
    channels, size = SHAPES[name]
    torch.manual_seed(0)
    net = build_model(ModelConfig(name=name, dropout=0.1), channels, size, num_classes=5)
    x = torch.randn(4, channels, size, size)
    logits = net(x)
    assert logits.shape == (4, 5)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(logits).all()
    # What depends on the class count lies in the head, which transfer learning replaces.
    per_class = [k for k, v in net.state_dict().items() if v.shape[:1] == (5,)]
    assert per_class and all(k.startswith(HEADS[name]) for k in per_class), per_class


def test_simple_cnn_adapts_to_odd_sizes_and_channels():
    net = build_model(ModelConfig(), channels=4, image_size=13, num_classes=3)
    assert net(torch.randn(2, 4, 13, 13)).shape == (2, 3)


def test_resnet50_from_imagenet_weights_in_the_torch_cache_with_a_new_frozen_head(tmp_path, monkeypatch):
    from torchvision.models import ResNet50_Weights, resnet50

    # Where torchvision.models.resnet50(weights='DEFAULT') leaves its file (README, examples/).
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights = tmp_path / "checkpoints" / ResNet50_Weights.DEFAULT.url.rsplit("/", 1)[1]
    weights.parent.mkdir()
    torch.save(resnet50(weights=None).state_dict(), weights)
    net = build_model(ModelConfig(name="resnet50", pretrained="imagenet", freeze_backbone=True, input_size=64),
                      channels=1, image_size=16, num_classes=7)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".fc." in n for n in trainable)
    head = net[1].fc
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert head[0].out_features == 1024 and head[-1].out_features == 7
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    # The loaded backbone weights are the file's, not a fresh init.
    ref = torch.load(weights, weights_only=True)["conv1.weight"]
    assert torch.equal(net[1].conv1.weight, ref)


def test_resnet50_missing_weights_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelError, match="never downloads"):
        build_model(ModelConfig(name="resnet50", pretrained="imagenet"), 3, 32, 10)
    with pytest.raises(ModelError, match="no file or directory at"):
        build_model(ModelConfig(name="resnet50", pretrained=str(tmp_path / "nope.pth")), 3, 32, 10)
