"""Image classifiers looked up by name. Every builder takes ``(cfg, channels, image_size,
num_classes)`` and returns an ``nn.Module`` mapping normalised float ``(N, C, H, W)`` to
logits ``(N, num_classes)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.config import ModelConfig
from trainers.registry import Registry
from trainers.transfer import ModelError, freeze_backbone, load_backbone, read_pretrained  # noqa: F401 (ModelError: re-exported)

MODELS: Registry = Registry("model")


# The head of each model: the key prefix of the layers that map features to classes. A
# transfer replaces it when the class count differs; freeze_backbone trains only it.
HEADS = {"simple_cnn": "11.", "resnet18": "fc.", "resnet50": "1.fc.", "fast_cifar": "head.", "fast_cifar95": "head."}
# Where a plain .pth in torchvision's own layout sits in our network (resnet50: after _Resize).
TORCHVISION_PREFIX = {"resnet50": "1."}


def build_model(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The named network; with ``cfg.pretrained`` its backbone (and its head, when the class
    counts agree) loaded from there, and with ``cfg.freeze_backbone`` only its head trained
    (``trainers.transfer``)."""
    if cfg.pretrained == "imagenet" and cfg.name != "resnet50":
        raise ModelError(f"model.pretrained: 'imagenet' weights exist here for resnet50 only, not {cfg.name}; "
                         "give a raysweep checkpoint of this model, or set model.name=resnet50")
    net = MODELS[cfg.name](cfg, channels, image_size, num_classes)
    if cfg.pretrained:
        source = read_pretrained(cfg.pretrained)
        prefix = TORCHVISION_PREFIX.get(cfg.name, "") if source.model_name is None else ""
        if prefix and any(k in net.state_dict() for k in source.weights):  # already our own layout
            prefix = ""
        load_backbone(net, source, cfg.name, HEADS[cfg.name], prefix)
    if cfg.freeze_backbone:
        freeze_backbone(net, HEADS[cfg.name])
    return net


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
    """ResNet-50 backbone with a new head: global average pool -> dense 1024 -> ReLU ->
    dropout -> dense classes. ImageNet weights (``pretrained: imagenet`` or torchvision's
    .pth) fit images of 1 or 3 channels."""
    from torchvision.models import resnet50 as tv_resnet50

    net = tv_resnet50(weights=None)
    if channels not in (1, 3):
        net.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    net.fc = nn.Sequential(
        nn.Linear(2048, 1024), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout), nn.Linear(1024, num_classes)
    )
    return nn.Sequential(_Resize(cfg.input_size or image_size, channels), net)


class _BatchNorm(nn.BatchNorm2d):
    """airbench's BatchNorm: a fixed unit scale (only the shift learns) and fast-moving
    running statistics (momentum 0.4 in PyTorch's convention), eps tiny."""

    def __init__(self, width: int):
        super().__init__(width, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class _Conv(nn.Conv2d):
    """3x3 'same' conv whose first ``in_channels`` filters start as the identity (Dirac)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1, bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


def _conv_group(c_in: int, c_out: int) -> list[nn.Module]:
    return [_Conv(c_in, c_out), nn.MaxPool2d(2), _BatchNorm(c_out), nn.GELU(),
            _Conv(c_out, c_out), _BatchNorm(c_out), nn.GELU()]


class FastCifarNet(nn.Module):
    """airbench94's network (the CIFAR-10 speed records, Jordan 2024): a frozen 2x2
    patch-whitening stem (``init_from_data``), three conv groups at widths 64/256/256,
    global max pool and a bias-free linear head scaled by 1/9."""

    def __init__(self, channels: int, num_classes: int, widths=(64, 256, 256), dropout=0.0):
        super().__init__()
        stem = 2 * channels * 4  # +/- each eigenvector of the 2x2 patch covariance
        self.whiten = nn.Conv2d(channels, stem, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        blocks, c_in = [nn.GELU()], stem
        for w in widths:
            blocks += _conv_group(c_in, w)
            c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        # airbench scales this head's weights to unit std; with a mean loss that made early
        # logits too large here (test accuracy 0.25 vs 0.44 after 48 steps on 4096 images).
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.scale = 1 / 9

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten 2x2 patches of ``x`` (normalised training images, N C H W):
        the patch covariance's eigenvectors scaled by 1/sqrt(eigenvalue), with their negatives."""
        c, (h, w) = x.shape[1], self.whiten.kernel_size
        patches = x.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        eigenvalues, eigenvectors = eigenvalues.flip(0).float(), eigenvectors.T.flip(0).float()
        filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).reshape(-1, c, h, w)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x):
        x = self.blocks(self.whiten(x))
        x = torch.amax(x, dim=(2, 3))
        return self.head(self.dropout(x)) * self.scale


@MODELS.register("fast_cifar")
def fast_cifar(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    widths = tuple(w * cfg.width for w in (64, 256, 256))
    return FastCifarNet(channels, num_classes, widths, cfg.dropout)


@MODELS.register("fast_cifar95")
def fast_cifar95(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    """airbench95's widths (128/384/384): about 2.5x fast_cifar's compute per image, for
    more accuracy in the same number of epochs."""
    widths = tuple(w * cfg.width for w in (128, 384, 384))
    return FastCifarNet(channels, num_classes, widths, cfg.dropout)
