"""Test-time augmentation (``train.tta``): score each image as the mean of the network's
logits over a few mirrored and moved copies of it.

Used by the final test evaluation (``summary.json``, ``best.json``), ``raysweep predict``
and ``raysweep export``; never by the per-epoch validation, so which checkpoint is picked
does not depend on it. Each function takes the network and a normalised float batch
``(N, C, H, W)`` and returns logits ``(N, K)``; copies keep the input's size and memory
layout, so networks with a fixed input size take them. The logits of each copy are cast to
float32 before they are averaged, so under bf16/fp16 autocast the mean is taken in fp32.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
>>> x = torch.ones(5, 3, 4, 4)  # a constant image: every copy is the image itself
>>> torch.allclose(TTA["flip_translate"](net, x), TTA["none"](net, x), atol=1e-6)
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainers.registry import Registry

TTA: Registry[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = Registry("test-time augmentation")


@TTA.register("none")
def plain(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network's own logits, in its own dtype: validation's numbers, unchanged."""
    return net(x)


@TTA.register("flip")
def mirror(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The image and its horizontal mirror, averaged."""
    return 0.5 * net(x).float() + 0.5 * net(x.flip(3)).float()


@TTA.register("flip_translate")
def mirror_translate(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """airbench's test-time augmentation: the mirrored pair (weight 1/2), averaged with the
    mirrored pairs of the image moved one pixel up-left and one pixel down-right (1/4 each),
    the uncovered edge filled by reflection (padding by 1, then cropping back to H x W)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1,) * 4, mode="reflect")
    moved = [padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]]
    return 0.5 * mirror(net, x) + 0.25 * sum(mirror(net, m) for m in moved)  # slices keep x's layout


class TTANet(nn.Module):
    """``net`` whose forward is ``TTA[level]``: one module to evaluate or to trace for export.
    The network sits in ``inner``, not ``module``, so DDP unwrapping never skips the TTA."""

    def __init__(self, net: nn.Module, level: str):
        super().__init__()
        self.inner, self.level, self._fn = net, level, TTA[level]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self.inner, x)
