"""Image classifiers looked up by name. Every builder takes ``(cfg, channels, image_size,
num_classes)`` and returns an ``nn.Module`` mapping normalised float ``(N, C, H, W)`` to
logits ``(N, num_classes)``."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainers.config import ModelConfig
from trainers.registry import Registry

MODELS: Registry = Registry("model")


class ModelError(ValueError):
    pass


def build_model(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    return MODELS[cfg.name](cfg, channels, image_size, num_classes)


@MODELS.register("simple_cnn")
def simple_cnn(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The classic conv-relu-pool x2 -> dense -> dense network, sized for any input."""
    w = 32 * cfg.width
    pooled = max(1, image_size // 4)
    return nn.Sequential(
        nn.Conv2d(channels, w, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2) if image_size >= 2 else nn.Identity(),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2) if image_size >= 4 else nn.Identity(),
        nn.AdaptiveAvgPool2d(pooled),  # a no-op for sizes divisible by 4
        nn.Flatten(),
        nn.Linear(2 * w * pooled * pooled, 128 * cfg.width),
        nn.ReLU(inplace=True),
        nn.Dropout(cfg.dropout),
        nn.Linear(128 * cfg.width, num_classes),
    )


@MODELS.register("resnet18")
def resnet18(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(512, num_classes))
    return net


def _imagenet_weights(spec: str) -> Path:
    """A local file, or torchvision's ResNet-50 file already in the torch hub cache."""
    if spec != "imagenet":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelError(f"model.pretrained: no weights file at {spec!r}; give a local .pth path")
        return path
    from torchvision.models import ResNet50_Weights

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for weights in ResNet50_Weights:
        path = cache / Path(weights.url).name
        if path.is_file():
            return path
    raise ModelError(
        f"model.pretrained: 'imagenet' weights are not in the torch cache ({cache}); raysweep never "
        "downloads them: fetch once with torchvision.models.resnet50(weights='DEFAULT') or give a .pth path"
    )


class _Resize(nn.Module):
    """Resize inside the model, so checkpoints and exports keep the training image size."""

    def __init__(self, size: int, channels: int):
        super().__init__()
        self.size, self.repeat = size, 3 // channels if channels in (1, 3) else 1

    def forward(self, x):
        if self.repeat > 1:  # grey images feed an RGB backbone
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


@MODELS.register("resnet50")
def resnet50(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    """ResNet-50 backbone (optionally ImageNet-pretrained, optionally frozen) with a new
    head: global average pool -> dense 1024 -> ReLU -> dropout -> dense classes."""
    from torchvision.models import resnet50 as tv_resnet50

    net = tv_resnet50(weights=None)
    if cfg.pretrained:
        state = torch.load(_imagenet_weights(cfg.pretrained), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    if channels not in (1, 3):
        net.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    if cfg.freeze_backbone:
        for p in net.parameters():
            p.requires_grad_(False)
    net.fc = nn.Sequential(
        nn.Linear(2048, 1024), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout), nn.Linear(1024, num_classes)
    )
    return nn.Sequential(_Resize(cfg.input_size or image_size, channels), net)


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class FastCifarNet(nn.Module):
    """In the spirit of airbench (the CIFAR-10 speed records): a 2x2 patch conv stem, three
    blocks of conv-pool-bn-gelu-conv-bn-gelu at widths 64/256/256, global max pool, and a
    bias-free linear head scaled down so early logits stay small."""

    def __init__(self, channels: int, num_classes: int, widths=(64, 256, 256), dropout=0.0):
        super().__init__()
        stem = 2 * channels * 4
        self.stem = nn.Sequential(nn.Conv2d(channels, stem, 2, padding=0, bias=True), nn.GELU())
        blocks, c_in = [], stem
        for w in widths:
            blocks += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.GELU()]
            blocks += _conv_bn(w, w)
            c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.scale = 1 / 9

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.amax(x, dim=(2, 3))
        return self.head(self.dropout(x)) * self.scale


@MODELS.register("fast_cifar")
def fast_cifar(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    widths = tuple(w * cfg.width for w in (64, 256, 256))
    return FastCifarNet(channels, num_classes, widths, cfg.dropout)
