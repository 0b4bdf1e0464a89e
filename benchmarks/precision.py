"""precision: training throughput (images/s) and achieved GFLOP/s of each model in fp32
and in bf16 autocast, both channels_last (raysweep's default), plus fp32 in the plain
contiguous layout for reference. FLOPs of one training step (forward + backward) are
counted with ``torch.utils.flop_counter.FlopCounterMode``.

The headline is fast_cifar's bf16 / fp32 speed ratio; the target is that
``train.precision=auto`` picks the faster of the two for every model on this machine
(bf16 only where the CPU has it natively: AVX-512 BF16 / AMX; emulated bf16 is slow).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from benchmarks.common import Result, alternate, median, set_threads, spread

VARIANTS = {  # name -> (precision, channels_last)
    "fp32 channels_last": ("fp32", True),
    "bf16 channels_last": ("bf16", True),
    "fp32 contiguous": ("fp32", False),
}

SIZES = {  # model -> batch; steps per timed sample; alternating reps (emulated bf16 can take ~20 s a step)
    "full": dict(models={"simple_cnn": 128, "fast_cifar": 128, "resnet18": 32, "resnet50": 16}, steps=1, reps=3,
                 image_size=32),
    "quick": dict(models={"simple_cnn": 64, "fast_cifar": 64, "resnet18": 16, "resnet50": 8}, steps=1, reps=2,
                  image_size=32),
    "smoke": dict(models={"simple_cnn": 8, "fast_cifar": 4}, steps=1, reps=1, image_size=16),
}


def _step_fn(name: str, batch: int, image_size: int, precision: str, channels_last: bool):
    from trainers.config import ModelConfig
    from trainers.models import build_model

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = build_model(ModelConfig(name=name), 3, image_size, 10).to(memory_format=fmt).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def run(mode: str = "full") -> Result:
    from trainers.loop import resolve_precision

    size = SIZES[mode]
    threads = set_threads()
    auto = resolve_precision("auto", torch.device("cpu"))
    rows, per_model = [], {}
    t0 = time.perf_counter()
    for name, batch in size["models"].items():
        steps = {v: _step_fn(name, batch, size["image_size"], *VARIANTS[v]) for v in VARIANTS}
        flops = count_flops(steps["fp32 contiguous"])  # also a warm-up step for that variant

        def timed(step):
            def side():
                start = time.perf_counter()
                for _ in range(size["steps"]):
                    step()
                return (time.perf_counter() - start) / size["steps"]
            return side

        samples = alternate({v: timed(s) for v, s in steps.items()}, reps=size["reps"], warmup=1)
        ips = {v: batch / median(s) for v, s in samples.items()}
        gflops = {v: flops / median(s) / 1e9 for v, s in samples.items()}
        bf16_ratio = ips["bf16 channels_last"] / ips["fp32 channels_last"]
        faster = "bf16" if bf16_ratio > 1 else "fp32"
        per_model[name] = {"batch": batch, "gflop_per_image_step": flops / batch / 1e9, "images_per_second": ips,
                           "gflops_per_second": gflops, "step_seconds": samples, "bf16_over_fp32": bf16_ratio,
                           "channels_last_over_contiguous_fp32": ips["fp32 channels_last"] / ips["fp32 contiguous"],
                           "faster": faster}
        for v in VARIANTS:
            rows.append([name, batch, v, ips[v], gflops[v], median(samples[v]), spread(samples[v]),
                         ips[v] / ips["fp32 channels_last"]])
    head = per_model.get("fast_cifar") or next(iter(per_model.values()))
    agree = [m for m, r in per_model.items() if r["faster"] == auto]
    return Result(
        name="precision", value=head["bf16_over_fp32"],
        target=f"train.precision=auto ({auto} here) is the faster precision for every model",
        met=len(agree) == len(per_model),
        unit="x (fast_cifar bf16 / fp32 training images/s, channels_last)",
        headers=["model", "batch", "variant", "images/s", "GFLOP/s", "step s", "spread s", "x fp32 CL"],
        rows=rows,
        notes=[f"training steps (forward, backward, SGD) on random 3x{size['image_size']}^2 batches; {threads} "
               f"threads; 1 warm-up then {size['reps']} alternating samples of {size['steps']} step(s), medians",
               "GFLOP per image per training step (FlopCounterMode, fwd+bwd): " + ", ".join(
                   f"{m} {r['gflop_per_image_step']:.3g}" for m, r in per_model.items()),
               f"auto resolves to {auto}; faster per model: " + ", ".join(
                   f"{m} {r['faster']} ({r['bf16_over_fp32']:.2f}x)" for m, r in per_model.items())],
        details={"auto": auto, "models": per_model, "threads": threads,
                 "seconds_total": time.perf_counter() - t0},
    )
