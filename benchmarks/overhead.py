"""overhead: steady-state epoch time of `raysweep train` (1 worker) against a plain PyTorch
loop: same model, data, batch size, precision, seed and thread count. Target: ratio <= 1.05
for Ray's public path (``RAYSWEEP_RAY_PRIVATE=0``, ``trainers.ray_private``). Where this Ray
has raysweep's private parts on, a third side runs them and its ratios are recorded beside
the headline: against the plain loop (``details.private_ratio``) and against the public
path (``details.private_vs_public``, the figure that says whether they still earn their
place: docs/internals.md asks >= 3% less epoch time).

Each round runs one `raysweep train` per raysweep side (the real path:
``cluster.train_cmd.run``, Ray Train worker, results store, checkpoint every epoch, test
evaluation at the end) and the plain loop (``benchmarks.plain``), in A B C / C B A order
(public, plain, private), so the plain loop always runs between. Epoch 1 of every run is the warm-up
and left out. raysweep's epochs are timed inside the worker (``worker_timing``): from one
epoch's first batch to the next's, so evaluation, metrics, checkpoint and report all count;
the plain loop's epoch is its training pass plus its evaluation pass.

The plain loop runs with no Ray on the machine, as a user's plain loop would: each
raysweep round starts its embedded Ray before the run and stops it after (neither is
timed), so the ratio includes what Ray's own processes (GCS, raylet, dashboard, agents,
idle workers) take from training while it runs. Until 2026-11-29 16:46 the plain loop ran
beside an idle Ray, which hid that cost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

import ray
import torch

from benchmarks import allocator, plain
from benchmarks.common import (Result, alternate, cpu_between, env_var, local_ray, median, minor_faults,
                               proc_cpu, set_threads, spread)
from benchmarks.worker_timing import EventReader, epoch_times
from trainers import ray_private

TARGET = 1.05  # the public path's; the private path's ratio is recorded, not judged

SIZES = {  # the recipe of examples/cifar10_fast.yaml on synthetic CIFAR-shaped data
    "full": dict(num_samples=6000, image_size=32, epochs=5, rounds=3, overrides=[], allocator=(3, 2)),
    "quick": dict(num_samples=3000, image_size=32, epochs=3, rounds=2, overrides=[], allocator=(2, 1)),
    "smoke": dict(num_samples=300, image_size=16, epochs=2, rounds=1,
                  overrides=["model.name=simple_cnn", "train.batch_size=64"], allocator=(2, 1)),
}


def raysweep_run(cfg, data, threads: int, storage: str, name: str) -> dict:
    """One `raysweep train` with one worker; its epochs as timed inside the worker."""
    from cluster import train_cmd
    from trainers.distributed import Placement

    reader = EventReader()
    t0 = time.time()
    summary = train_cmd.run(train_cmd.TrainRequest(cfg, Placement(workers=1, cpus_per_worker=threads), storage, name),
                            data=data)
    t_end = time.time()
    if summary.get("status") != "completed":
        raise RuntimeError(f"raysweep train {name} ended {summary.get('status')}: {summary.get('error')}")
    timing = epoch_times(reader.read())
    if timing["epoch_seconds"]:
        source = "in-worker"
    else:  # no timing hook in this Ray (one started elsewhere): history's per-epoch figures
        import pyarrow.parquet as pq

        hist = pq.read_table(os.path.join(storage, name, "history.parquet")).to_pylist()
        timing = {"epoch_seconds": [r["epoch_seconds"] for r in hist], "first_batch_t": None, "last_report_t": None,
                  "train_seconds": [len(data.train) / r["images_per_second"] for r in hist], "threads": [], "pids": [],
                  "background_cpu": [], "page_faults": []}
        source = "history.parquet epoch_seconds (no in-worker timing)"
    return {**timing, "source": source, "wall_seconds": t_end - t0,
            "startup_seconds": timing["first_batch_t"] - t0 if timing["first_batch_t"] else None,
            "teardown_seconds": t_end - timing["last_report_t"] if timing["last_report_t"] else None}


@contextlib.contextmanager
def _plain_epochs_watched(background: list, page_faults: list):
    """While it lasts, each ``plain.Plain.epoch`` appends the CPU seconds that Ray's processes
    used during it and this process's minor page faults (as ``worker_timing`` does for
    raysweep's epochs)."""
    original = plain.Plain.epoch

    def epoch(self):
        before, faults = proc_cpu(), minor_faults()
        out = original(self)
        background.append(cpu_between(before, proc_cpu(), os.getpid(), {os.getpid()}))
        page_faults.append(minor_faults() - faults)
        return out

    plain.Plain.epoch = epoch
    try:
        yield
    finally:
        plain.Plain.epoch = original


def plain_run(data, recipe, epochs: int) -> dict:
    t0 = time.time()
    background: list[dict] = []
    page_faults: list[int] = []
    with _plain_epochs_watched(background, page_faults):
        out = plain.run(data, recipe, epochs)
    rows = out["epochs"]
    return {"epoch_seconds": [r["epoch_seconds"] for r in rows], "train_seconds": [r["train_seconds"] for r in rows],
            "startup_seconds": out["startup_seconds"], "wall_seconds": time.time() - t0,
            "threads": [torch.get_num_threads()], "background_cpu": background,
            "page_faults": page_faults}


def faults_per_epoch(runs: list[dict]) -> float:
    """Median minor page faults of the training process per steady epoch, in thousands."""
    return median(f / 1000 for r in runs for f in (r.get("page_faults") or [])[1:])


def background_share(runs: list[dict], key: str) -> list[float]:
    """Per steady epoch: ``key`` ("ray" or "others") CPU seconds per training second, in %
    of one core."""
    return [100 * b[key] / t for r in runs for b, t in list(zip(r.get("background_cpu") or [], r["train_seconds"]))[1:]
            if t > 0]


def run(mode: str = "full") -> Result:
    size = SIZES[mode]
    threads = set_threads()
    from cluster import train_cmd
    from trainers.data import load_data
    from trainers.loop import resolve_precision

    data_cfg = {"name": "synthetic", "num_samples": size["num_samples"], "image_size": size["image_size"],
                "channels": 3, "num_classes": 10, "root": None}
    cfg = plain.example_config([f"data.{k}={'null' if v is None else v}" for k, v in data_cfg.items()]
                               + [f"train.epochs={size['epochs']}"] + size["overrides"])
    precision = resolve_precision(cfg.train.precision, torch.device("cpu"))  # auto: what raysweep picks here
    recipe = plain.Recipe.from_config(cfg, precision)
    data = load_data(cfg.data)
    storage = tempfile.mkdtemp(prefix="raysweep-bench-overhead-")
    private_too = ray_private.enabled()  # before any side sets the variable
    runs: dict[str, list[dict]] = {"raysweep": [], "plain": []} | ({"private": []} if private_too else {})
    counter = iter(range(1000))
    ray_inits: list[float] = []

    def raysweep_side(side: str, private: bool):
        def run_side():
            t_ray = time.time()
            # Read by the process that starts Ray. Ray lives for this side only (see the
            # docstring), started as `raysweep train` starts it.
            with env_var(ray_private.ENV, "1" if private else "0"), \
                    local_ray(threads, dashboard=train_cmd.EMBEDDED_DASHBOARD) as started:
                if started:
                    ray_inits.append(time.time() - t_ray)
                runs[side].append(raysweep_run(cfg, data, threads, storage, f"overhead-{next(counter)}"))
            return 0.0
        return run_side

    def side_plain():
        runs["plain"].append(plain_run(data, recipe, size["epochs"]))
        return 0.0

    try:
        sides = {"raysweep": raysweep_side("raysweep", private=False), "plain": side_plain}
        if private_too:
            sides["private"] = raysweep_side("private", private=True)
        alternate(sides, reps=size["rounds"], warmup=0)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    steps, rounds = size["allocator"]
    alloc = allocator.compare(recipe.model, recipe.batch_size, size["image_size"], steps, rounds)

    def steady(side, key):  # every run's epochs after the first
        return [s for r in runs[side] for s in r[key][1:]]

    ep = {s: steady(s, "epoch_seconds") for s in runs}
    tr = {s: steady(s, "train_seconds") for s in runs}
    ratio = median(ep["raysweep"]) / median(ep["plain"])
    train_ratio = median(tr["raysweep"]) / median(tr["plain"])
    per_round = [median(a["epoch_seconds"][1:]) / median(b["epoch_seconds"][1:])
                 for a, b in zip(runs["raysweep"], runs["plain"])]
    n_train = len(data.train)
    rows = []
    labels = {"raysweep": "raysweep train, 1 worker, public Ray path", "plain": "plain PyTorch loop",
              "private": "raysweep train, 1 worker, private Ray parts on"}
    for side in runs:
        label = labels[side]
        rows.append([label, median(r["startup_seconds"] for r in runs[side] if r["startup_seconds"] is not None),
                     median(ep[side]), spread(ep[side]), median(tr[side]),
                     median(ep[side]) - median(tr[side]), n_train / median(tr[side]),
                     faults_per_epoch(runs[side]), median(background_share(runs[side], "ray")),
                     median(background_share(runs[side], "others"))])
    rows.append(["ratio raysweep public / plain", None, ratio, spread(per_round), train_ratio, None, None, None, None,
                 None])
    private_ratio = private_vs_public = None
    if private_too:
        private_ratio = median(ep["private"]) / median(ep["plain"])
        private_vs_public = median(ep["private"]) / median(ep["raysweep"])
        per_round_private = [median(a["epoch_seconds"][1:]) / median(b["epoch_seconds"][1:])
                             for a, b in zip(runs["private"], runs["raysweep"])]
        rows.append(["ratio raysweep private / plain", None, private_ratio, None,
                     median(tr["private"]) / median(tr["plain"]), None, None, None, None, None])
        rows.append(["ratio private / public", None, private_vs_public, spread(per_round_private),
                     median(tr["private"]) / median(tr["raysweep"]), None, None, None, None, None])
    epoch2 = next((r for r in runs["raysweep"] if len(r.get("background_cpu") or []) > 1), None)
    worker_threads = sorted({t for r in runs["raysweep"] for t in r["threads"]})
    notes = [f"{recipe.model}, {precision}, batch {recipe.batch_size}, {n_train} synthetic 3x{size['image_size']}^2 "
             f"training images, {size['epochs']} epochs x {size['rounds']} rounds (epoch 1 of each run left out), "
             f"{threads} threads on both sides (worker threads seen: {worker_threads})",
             f"raysweep epochs timed: {runs['raysweep'][0]['source']}; 'rest' = evaluation (+ metrics, checkpoint, "
             "report for raysweep)",
             "startup: seconds from the call to the first batch (Ray already running; raysweep: Ray Train "
             f"controller + worker + process group + data; plain: model + optimiser). ray.init: "
             f"{f'{median(ray_inits):.1f} s (median)' if ray_inits else '- (a Ray was already running)'}",
             "the plain loop runs with no Ray on the machine (as a user's would): raysweep's rounds start and stop "
             "their embedded Ray around each run (untimed)" if ray_inits else
             "a Ray started elsewhere ran beside both sides",
             "spread of the ratio row: per-round ratios",
             "public path: RAYSWEEP_RAY_PRIVATE=0 (Ray's own TorchTrainer), the headline; " + (
                 f"private parts on (trainers.ray_private): {private_ratio:.3f} of plain, {private_vs_public:.3f} of "
                 "public, recorded, not judged"
                 if private_too else f"no private side: they are off on Ray {ray.__version__}"),
             f"malloc: both sides run with raysweep's malloc settings (trainers.memory: Ray's workers get them "
             f"from the job's runtime environment, the plain loop from keep_freed_memory), so the ratio is Ray's "
             f"cost alone. What it is worth, fresh processes alternating, "
             f"{alloc['model']} batch {alloc['batch']}: training step {alloc['step_seconds']['default']:.3g} s "
             f"with glibc's default malloc ({alloc['faults_per_step']['default'] / 1000:.0f}k minor page faults "
             f"per step) vs {alloc['step_seconds']['keep']:.3g} s with it "
             f"({alloc['faults_per_step']['keep'] / 1000:.0f}k): {alloc['speedup']:.3f}x faster",
             "ray %core / others %core: CPU of Ray's processes (all but the training process) / of other work on "
             "the machine while an epoch trained, % of one core (medians). On 2 cores the 2 training threads meet at "
             "barriers, so a core-second taken by anything else costs about a second of wall time"
             + ("; busiest Ray processes in raysweep's epoch 2: " + ", ".join(
                 f"{name} {100 * cpu_s / epoch2['train_seconds'][1]:.1f}%"
                 for name, _, cpu_s in epoch2["background_cpu"][1]["top"][:6]) if epoch2 else "")]
    return Result(
        name="overhead", value=ratio, target=f"<= {TARGET}", met=ratio <= TARGET,
        unit="x (raysweep epoch, public Ray path / plain epoch, medians)",
        headers=["side", "startup s", "epoch s", "epoch spread", "train s", "rest s", "train img/s", "faults k/epoch",
                 "ray %core",
                 "others %core"],
        rows=rows, notes=notes,
        details={"ratio": ratio, "private_ratio": private_ratio, "private_vs_public": private_vs_public,
                 "train_ratio": train_ratio,
                 "per_round_ratio": per_round, "threads": threads,
                 "precision": precision, "recipe": recipe.to_dict(), "config": cfg.to_dict(), "train_images": n_train,
                 "ray_init_seconds": ray_inits, "runs": runs, "allocator": alloc,
                 "startup_seconds": {s: [r["startup_seconds"] for r in runs[s]] for s in runs}},
    )
