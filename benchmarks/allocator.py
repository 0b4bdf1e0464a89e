"""What ``trainers.memory.keep_freed_memory`` is worth: training-step seconds and minor page
faults of one model, with glibc's default malloc and with raysweep's setting.

Each measurement is a fresh process (``python -m benchmarks.allocator MODEL BATCH SIZE
STEPS keep|default``), because a process's malloc settings cannot be taken back; the two
kinds alternate. Used by the ``overhead`` benchmark, whose two sides both run with the
setting (so its ratio is Ray's cost alone); this shows what the setting adds on top.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import REPO, alternate, median, minor_faults


def probe(model: str, batch: int, size: int, steps: int, keep: bool) -> dict:
    """In this process: ``steps`` SGD steps (after 2 warm-ups) on random channels_last data."""
    import torch

    from trainers.config import ModelConfig
    from trainers.memory import keep_freed_memory
    from trainers.models import build_model

    kept = keep_freed_memory() if keep else False
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    fmt = torch.channels_last
    net = build_model(ModelConfig(name=model), 3, size, 10).to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    seconds, faults = [], []
    for _ in range(steps):
        f0, t0 = minor_faults(), time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
    return {"kept": kept, "step_seconds": statistics.median(seconds), "faults_per_step": statistics.median(faults)}


def compare(model: str, batch: int, size: int, steps: int, rounds: int) -> dict:
    """Fresh processes, default and kept alternating; medians of their step medians."""
    runs: dict[str, list[dict]] = {"default": [], "keep": []}

    def side(kind):
        def once():
            out = subprocess.run([sys.executable, "-m", "benchmarks.allocator", model, str(batch), str(size),
                                  str(steps), kind], cwd=REPO, capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            return 0.0
        return once

    alternate({"default": side("default"), "keep": side("keep")}, reps=rounds, warmup=0)
    step = {k: median(r["step_seconds"] for r in v) for k, v in runs.items()}
    faults = {k: median(r["faults_per_step"] for r in v) for k, v in runs.items()}
    return {"model": model, "batch": batch, "step_seconds": step, "faults_per_step": faults,
            "speedup": step["default"] / step["keep"], "applied": all(r["kept"] for r in runs["keep"]), "runs": runs}


if __name__ == "__main__":
    name, batch_, size_, steps_, kind_ = sys.argv[1:6]
    print(json.dumps(probe(name, int(batch_), int(size_), int(steps_), kind_ == "keep")))
