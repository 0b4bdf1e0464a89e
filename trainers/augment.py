"""Batch-wise augmentation on tensors, on the training device: no per-image Python.

Every function takes a float batch ``(N, C, H, W)`` and a ``torch.Generator`` on the same
device and returns a batch of the same shape; with its setting at 0 it returns the input
unchanged (the same tensor object).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainers.config import AugmentConfig


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) * (high - low) + low


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` pixels and take a random crop of the original size."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=gen)
    rows = (torch.arange(h, device=x.device) + dy)[:, :, None]  # (N, H, 1)
    cols = (torch.arange(w, device=x.device) + dx)[:, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous(memory_format=_fmt(x))


def random_flip(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability ``prob``."""
    if prob <= 0:
        return x
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < prob
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_affine(x: torch.Tensor, degrees: float, shift: float, gen: torch.Generator) -> torch.Tensor:
    """Rotate by U(-degrees, degrees) and shift by U(-shift, shift) of the width and height,
    as one bilinear resample; uncovered pixels become 0 (the mean, after normalisation)."""
    if degrees <= 0 and shift <= 0:
        return x
    n = x.shape[0]
    angle = _uniform(n, -degrees, degrees, gen, x.device) * (math.pi / 180)
    tx = _uniform(n, -2 * shift, 2 * shift, gen, x.device)  # grid coordinates span 2 units
    ty = _uniform(n, -2 * shift, 2 * shift, gen, x.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Apply every augmentation that ``cfg`` turns on: crop, flip, then rotation and shift."""
    x = random_crop(x, cfg.crop_padding, gen)
    x = random_flip(x, cfg.flip, gen)
    return random_affine(x, cfg.rotation, cfg.shift, gen)


def _fmt(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 else torch.contiguous_format
