"""Losses looked up by name: each maps ``(logits (N, K), labels (N,), cfg)`` to a scalar."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.config import LossConfig
from trainers.registry import Registry

LOSSES: Registry = Registry("loss")


def _smoothed_one_hot(labels: torch.Tensor, k: int, smoothing: float) -> torch.Tensor:
    target = F.one_hot(labels, k).float()
    return target * (1 - smoothing) + smoothing / k


@LOSSES.register("cross_entropy")
def cross_entropy(logits, labels, cfg: LossConfig):
    return F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)


@LOSSES.register("bce")
def one_vs_rest_bce(logits, labels, cfg: LossConfig):
    """One binary problem per class; the score is still the arg-max logit."""
    target = _smoothed_one_hot(labels, logits.shape[1], cfg.label_smoothing)
    return F.binary_cross_entropy_with_logits(logits.float(), target)


@LOSSES.register("mse")
def softmax_mse(logits, labels, cfg: LossConfig):
    target = _smoothed_one_hot(labels, logits.shape[1], cfg.label_smoothing)
    return F.mse_loss(logits.float().softmax(1), target)


def compute_loss(logits, labels, cfg: LossConfig):
    return LOSSES[cfg.name](logits, labels, cfg)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of absolute values of every trainable weight (biases and norms included)."""
    return sum(p.abs().sum() for p in model.parameters() if p.requires_grad)
