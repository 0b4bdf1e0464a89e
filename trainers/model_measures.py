"""What a network costs to run, for a multi-objective search (``search_spaces.objectives``):
trainable parameters, forward FLOPs per image, and latency on a device.

Latency is one image (batch 1, what a served request sees) through the network in eval
mode under the precision the run evaluates in, on the device given: the median of
``repeats`` timed passes after ``warmup`` untimed ones (the first passes pay for kernel
selection and allocation). Weights do not change a dense network's time, so a trial
measures its network once, before its first epoch, and every report carries the values.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

WARMUP, REPEATS = 3, 10
LATENCY_BATCH = 1


def count_params(net: nn.Module) -> int:
    """Trainable parameters (a frozen backbone's are not counted: they are not searched)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def forward_flops(net: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass per image of ``x`` (N, C, H, W), as torch's public
    ``FlopCounterMode`` counts them: matrix multiplies and convolutions, 2 per multiply-add
    (element-wise ops, pooling and normalisation are not counted)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    return counter.get_total_flops() / x.shape[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(forward: Callable[[], object], device: torch.device, warmup: int = WARMUP,
               repeats: int = REPEATS) -> float:
    """The median milliseconds of ``forward()`` over ``repeats`` timed calls after ``warmup``."""
    with torch.inference_mode():
        for _ in range(warmup):
            forward()
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            _sync(device)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def measure_model(names, model, image_shape, device: torch.device, autocast) -> dict[str, float]:
    """``names``' values (of latency_ms, params, flops) for ``model`` (``trainers.loop.Model``:
    network + normalisation) on ``device``; ``autocast``: a fresh context per call (the
    run's evaluation precision). Other names are ignored (they are not properties of a net)."""
    net, out = model.net, {}
    was_training = net.training
    net.eval()
    x = torch.zeros((LATENCY_BATCH, *image_shape), dtype=torch.uint8, device=device)
    if "params" in names:
        out["params"] = float(count_params(net))
    if "flops" in names:
        out["flops"] = forward_flops(net, model.prepare(x))
    if "latency_ms" in names:
        def forward():
            with autocast():
                return net(model.prepare(x))

        out["latency_ms"] = latency_ms(forward, device)
    net.train(was_training)
    return out
