"""gpu: images/s and time to 94% test accuracy on CIFAR-10 with the fast network inside a
Ray Train worker on one GPU (`raysweep train --gpu`, precision auto = bf16 there).

Prepared for a GPU machine; where there is none it prints a "skipped: no GPU" result
with ``met: null``. On a GPU: the recipe of ``examples/cifar10_fast.yaml``, all 50,000
training images, the 10,000 test images scored after every epoch (as in `cifar10`),
up to ``EPOCHS`` epochs; time to 94% is the cumulative training seconds (timed inside
the worker) at the first epoch whose test accuracy reaches it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Result, local_ray

TARGET_ACCURACY = 0.94
SIZES = {"full": dict(epochs=30, train=None, test=None), "quick": dict(epochs=10, train=None, test=None),
         "smoke": dict(epochs=2, train=512, test=256)}


def skipped(mode: str) -> Result:
    return Result(name="gpu", value=None, target=f"time to {TARGET_ACCURACY:.0%} test accuracy, images/s", met=None,
                  unit="seconds to 94% (skipped: no GPU)",
                  notes=["skipped: no GPU (torch.cuda.is_available() is False, or Ray sees none); "
                         "run `python -m benchmarks gpu` on a GPU machine"],
                  details={"skipped": "no GPU", "mode": mode})


def run(mode: str = "full") -> Result:
    if not torch.cuda.is_available():
        return skipped(mode)
    import pyarrow.parquet as pq

    from benchmarks import cifar10, plain
    from benchmarks.worker_timing import EventReader, epoch_times
    from cluster import train_cmd
    from trainers.distributed import Placement

    size = SIZES[mode]
    tmp = Path(tempfile.mkdtemp(prefix="raysweep-bench-gpu-"))
    try:
        root = cifar10.tiny_parquet(tmp) if mode == "smoke" else cifar10.data_root()
        data, load_s = cifar10.load(root, size["train"], size["test"])
        cfg = plain.example_config([f"data.root={root}", f"train.epochs={size['epochs']}", "train.precision=auto"])
        with local_ray():
            import ray

            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus < 1:
                return skipped(mode)
            reader = EventReader()
            t0 = time.time()
            summary = train_cmd.run(train_cmd.TrainRequest(cfg, Placement(workers=1, use_gpu=True), str(tmp / "runs"),
                                                           "gpu"), data=data)
            timing = epoch_times(reader.read())
        hist = pq.read_table(tmp / "runs" / "gpu" / "history.parquet").to_pylist()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    train_s = timing["train_seconds"] or [len(data.train) / r["images_per_second"] for r in hist]
    cumulative, total = [], 0.0
    for s in train_s:
        total += s
        cumulative.append(total)
    acc = [r["val_accuracy"] for r in hist]
    reached = next((i for i, a in enumerate(acc) if a >= TARGET_ACCURACY), None)
    value = cumulative[reached] if reached is not None else None
    steady = train_s[1:] or train_s
    ips = len(data.train) / sorted(steady)[len(steady) // 2]
    rows = [[i + 1, cumulative[i], acc[i], len(data.train) / train_s[i]] for i in range(min(len(acc), len(train_s)))]
    return Result(
        name="gpu", value=value, target=f"time to {TARGET_ACCURACY:.0%} test accuracy", met=reached is not None,
        unit=f"seconds of training to {TARGET_ACCURACY:.0%} ({torch.cuda.get_device_name(0)})",
        headers=["epoch", "train s (cumulative)", "test acc", "images/s"], rows=rows,
        notes=[f"median images/s {ips:.0f}; startup to first batch "
               f"{(timing['first_batch_t'] - t0) if timing['first_batch_t'] else float('nan'):.1f} s; "
               f"status {summary.get('status')}; data load {load_s:.1f} s"],
        details={"images_per_second": ips, "accuracy": acc, "train_seconds": train_s, "epochs": size["epochs"],
                 "reached_epoch": None if reached is None else reached + 1, "gpus": gpus},
    )
