"""Per-image decoding and resizing, shared by the in-memory loaders, Ray Data's decode
tasks, ``raysweep predict`` and exported models' callers: one definition of what a run's
images looked like, stored in its checkpoints (``meta["preprocess"]``)."""

from __future__ import annotations

import torch

RESIZE_RATIO = 0.875  # torchvision's ImageNet evaluation: Resize(size / 0.875), CenterCrop(size)
TRAIN_CROPS = ("random_resized", "random")


def to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (c, H, W) with c in 1..4 -> (channels, H, W): grey repeated, alpha dropped."""
    c = img.shape[0]
    if c == channels:
        return img
    if channels == 1:
        return img[:3].float().mean(0, keepdim=True).round().to(torch.uint8) if c >= 3 else img[:1]
    return img[:1].expand(3, -1, -1).contiguous() if c <= 2 else img[:3]


def resize(img: torch.Tensor, size: tuple[int, int], train_crop: str | None = None) -> torch.Tensor:
    """torchvision's ImageNet convention. Evaluation (``train_crop`` None): scale so the
    image covers ``size / 0.875``, then take the centre crop. Training: ``random_resized``
    (RandomResizedCrop: scale 0.08-1, ratio 3/4-4/3), or ``random`` (the evaluation
    scale, then a random crop)."""
    from torchvision.transforms import v2

    size = (int(size[0]), int(size[1]))
    if train_crop == "random_resized":
        return v2.RandomResizedCrop(size, antialias=True)(img)
    h, w = img.shape[-2:]
    scale = max(size[0] / RESIZE_RATIO / h, size[1] / RESIZE_RATIO / w)
    img = v2.functional.resize(img, [max(size[0], round(h * scale)), max(size[1], round(w * scale))], antialias=True)
    if train_crop == "random":
        return v2.RandomCrop(size)(img)
    return v2.functional.center_crop(img, list(size))


def preprocess_meta(resize_hw: tuple[int, int] | None, channels: int) -> dict:
    """What a checkpoint records so that predict and export feed images exactly as evaluation did."""
    return {"resize": list(resize_hw) if resize_hw else None, "resize_ratio": RESIZE_RATIO, "channels": channels}
