"""trial_overhead: what a search costs per trial beyond its training, as a user waits for
it, for trials of 1 and of 2 workers: `raysweep tune` side by side with the plain pattern
of Ray's docs (a Tune function trial that builds a ``TorchTrainer`` and forwards its
reports with ``TuneReportCallback``), in the same run.

Search overhead per trial = (search wall x trial slots - training seconds) / trials.
- The search wall is a whole command's: each side runs as its own process, from Python's
  start to its exit, so Ray's start-up, data loading and shutdown are included.
- Trial slots = the CPUs // workers per trial (1 CPU per worker): how many trials run at
  once on both sides.
- Training seconds = the sum of every epoch's ``epoch_seconds`` (training and evaluation,
  timed inside the worker) on that side.
Targets: <= 1.0 s per 1-worker trial at 12 trials; for 2-worker trials <= 0.5x the plain
pattern's figure.

Both sides train the same thing (digits, ``simple_cnn``; the ``digits_cnn`` space's
defaults for the plain pattern, random points of that space for raysweep), with the same
worker loop (``trainers``), no early stopping, and the same embedded Ray settings
(loopback, as ``cluster.connect`` starts it). The plain pattern's TorchTrainer keeps Ray
Train's defaults, as a user of the documented pattern gets them. Searches alternate:
raysweep then plain, then the other way round.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ray.tune import Callback

from benchmarks.common import REPO, Result, alternate, local_ray, median, set_threads, spread

TARGET_1W_SECONDS, TARGET_2W_RATIO = 1.0, 0.5

SIZES = {
    "full": dict(trials=12, epochs=3, rounds=2, workers=(1, 2), limit=None),
    "quick": dict(trials=12, epochs=1, rounds=1, workers=(1, 2), limit=600),
    "smoke": dict(trials=1, epochs=1, rounds=1, workers=(1,), limit=200),  # 2 workers: the same code
}
SEARCH_TIMEOUT_S = 1800


class EpochTimer(Callback):
    """A Tune callback: the ``epoch_seconds`` each trial reports, by trial."""

    def __init__(self):
        self.epochs: dict[str, list[float]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.epochs.setdefault(trial.trial_id, []).append(float(result.get("epoch_seconds", 0.0)))


def plain_pattern_trial(config: dict, data=None) -> None:
    """Ray's documented pattern: the trial function builds a TorchTrainer and fits it.
    (The data reach it as raysweep's trials get them: ``tune.with_parameters``, then one
    ``ray.put`` for the workers.)"""
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.distributed import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": config["run"], "data": ray.put(data)},
        scaling_config=ScalingConfig(num_workers=config["workers"], resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"train-{ray.tune.get_context().get_trial_id()}", storage_path=config["storage"],
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def plain_main(spec: dict) -> dict:
    """The plain side's whole process: start Ray, load the data, run the search."""
    import ray
    from ray import tune

    from search_spaces.space import load_space
    from search_spaces.tuner import DRIVER_MEMORY_BYTES
    from trainers.data import load_data

    space = load_space("digits_cnn")
    base = {"data": {"name": "digits", "limit": spec["limit"]}, "train": {"epochs": spec["epochs"]}}
    run_cfg = space.trial_config(base, space.default_point())
    timer = EpochTimer()
    with local_ray(set_threads(), timing=False):
        concurrent = max(1, int(ray.cluster_resources().get("CPU", 1)) // spec["workers"])
        data = load_data(run_cfg.data)
        fn = tune.with_resources(tune.with_parameters(plain_pattern_trial, data=data),
                                 {"cpu": 0, "memory": DRIVER_MEMORY_BYTES})
        tune.Tuner(
            fn, param_space={"run": run_cfg.to_dict(), "workers": spec["workers"], "storage": spec["storage"]},
            tune_config=tune.TuneConfig(num_samples=spec["trials"], max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=spec["name"], storage_path=spec["storage"], callbacks=[timer], verbose=0),
        ).fit()
    return {"trial_train": [sum(v) for v in timer.epochs.values()]}


def timed(cmd: list[str], log: Path) -> float:
    """Runs ``cmd`` as a user would (its own process) and returns its wall seconds."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)}
    start = time.time()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=SEARCH_TIMEOUT_S)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])}... exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return wall


def raysweep_search(workers: int, size: dict, storage: Path, name: str, seed: int) -> dict:
    """``raysweep tune`` as the README runs it (random points, no early stopping)."""
    import pyarrow.parquet as pq

    cmd = [sys.executable, "-m", "cluster", "tune", "--space", "digits_cnn", "--trials", str(size["trials"]),
           "--max-epochs", str(size["epochs"]), "--searcher", "random", "--scheduler", "none", "--seed", str(seed),
           "--workers-per-trial", str(workers), "--cpus-per-worker", "1", "--storage", str(storage), "--name", name]
    cmd += ["--set", f"data.limit={size['limit']}"] if size["limit"] else []
    wall = timed(cmd, storage / f"{name}.log")
    rows = pq.read_table(storage / name / "trials.parquet").to_pylist()
    bad = [r for r in rows if r["status"] not in ("completed", "early_stopped")]
    if bad:
        raise RuntimeError(f"raysweep tune {name}: trials failed: {[(r['trial_id'], r['error']) for r in bad]}")
    train = {r["trial_id"]: 0.0 for r in rows}
    for e in pq.read_table(storage / name / "epochs.parquet").to_pylist():
        train[e["trial_id"]] += e["epoch_seconds"]
    return {"trial_train": list(train.values()), "search_wall": wall}


def plain_search(workers: int, size: dict, storage: Path, name: str) -> dict:
    spec = {"workers": workers, "trials": size["trials"], "epochs": size["epochs"], "limit": size["limit"],
            "storage": str(storage), "name": name, "out": str(storage / f"{name}.json")}
    wall = timed([sys.executable, "-m", "benchmarks.trial_overhead", "plain", json.dumps(spec)],
                 storage / f"{name}.log")
    return {**json.loads(Path(spec["out"]).read_text()), "search_wall": wall}


def per_trial(run: dict, slots: int) -> float:
    """(search wall x trial slots - training seconds) / trials."""
    return (run["search_wall"] * slots - sum(run["trial_train"])) / len(run["trial_train"])


def run(mode: str = "full") -> Result:
    size = SIZES[mode]
    cpus = set_threads()
    storage = Path(tempfile.mkdtemp(prefix="raysweep-bench-trials-"))
    out: dict[str, list[dict]] = {}
    slots = {w: max(1, cpus // w) for w in size["workers"]}
    counter = iter(range(1000))
    try:
        sides = {}
        for w in size["workers"]:
            ours, theirs = out.setdefault(f"raysweep {w}w", []), out.setdefault(f"plain {w}w", [])
            sides[f"raysweep {w}w"] = lambda w=w, ours=ours: ours.append(
                raysweep_search(w, size, storage, f"ours-{w}w-{next(counter)}", seed=len(ours))) or 0.0
            sides[f"plain {w}w"] = lambda w=w, theirs=theirs: theirs.append(
                plain_search(w, size, storage, f"plain-{w}w-{next(counter)}")) or 0.0
        alternate(sides, reps=size["rounds"], warmup=0)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return result(out, slots, size, cpus)


def result(out: dict[str, list[dict]], slots: dict[int, int], size: dict, cpus: int) -> Result:
    workers_of = {k: int(k.split()[-1][:-1]) for k in out}
    overhead = {k: [per_trial(r, slots[workers_of[k]]) for r in runs] for k, runs in out.items()}
    med = {k: median(v) for k, v in overhead.items()}
    rows = [[k, len(runs[0]["trial_train"]), slots[workers_of[k]], median(r["search_wall"] for r in runs),
             median(sum(r["trial_train"]) for r in runs), med[k], spread(overhead[k])] for k, runs in out.items()]
    ratios = {w: med[f"raysweep {w}w"] / med[f"plain {w}w"] for w in size["workers"] if med[f"plain {w}w"] > 0}
    rows += [[f"ratio raysweep / plain, {w}w", None, None, None, None, r, None] for w, r in ratios.items()]
    one, ratio2 = med.get("raysweep 1w"), ratios.get(2)
    met = one is not None and one <= TARGET_1W_SECONDS and ratio2 is not None and ratio2 <= TARGET_2W_RATIO
    subset = f" (first {size['limit']} training images)" if size["limit"] else ""
    return Result(
        name="trial_overhead", value=one,
        target=f"<= {TARGET_1W_SECONDS:g} s per 1-worker trial; 2-worker trials <= {TARGET_2W_RATIO}x the plain "
               "pattern's figure",
        met=met, unit="s search overhead per 1-worker raysweep trial (median of searches)",
        headers=["search", "trials", "trial slots", "search wall s", "train s", "overhead s/trial", "spread"],
        rows=rows,
        notes=[f"digits{subset}, simple_cnn, {size['epochs']} epoch(s) per trial, {size['trials']} trials per "
               f"search x {size['rounds']} round(s), no early stopping, 1 CPU per worker on {cpus} CPUs",
               "overhead / trial = (search wall x trial slots - all epoch_seconds) / trials; the search wall is "
               "the whole command's, from process start to exit (Ray start-up and data loading included)",
               f"2-worker ratio raysweep / plain: {'-' if ratio2 is None else f'{ratio2:.2f}'} "
               f"(target <= {TARGET_2W_RATIO})"],
        details={"overhead_per_trial": overhead, "median_overhead_per_trial": med, "ratio_2w": ratio2, "runs": out,
                 "trial_slots": slots, "cpus": cpus},
    )


if __name__ == "__main__" and sys.argv[1:2] == ["plain"]:
    spec = json.loads(sys.argv[2])
    Path(spec["out"]).write_text(json.dumps(plain_main(spec)))
