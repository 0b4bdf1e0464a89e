"""trial_overhead: what a search trial costs beyond its training, for trials of 1 and of 2
workers, `raysweep tune` side by side with the plain pattern of Ray's docs (a Tune
function trial that builds a ``TorchTrainer`` and forwards its reports with
``TuneReportCallback``). Targets: <= 3 s per 1-worker trial; for 2-worker trials <= 0.5x
the plain pattern's overhead, measured in the same run.

A trial's overhead = its wall time (Tune's ``on_trial_start`` to ``on_trial_complete``, as
``trials.parquet`` records it) minus the sum of its epochs' ``epoch_seconds`` (training
and evaluation, timed inside the worker). Both sides train the same thing (digits,
``simple_cnn``, the ``digits_cnn`` space's defaults for the plain pattern, random points
of that space for raysweep) with the same worker loop (``trainers``), 1 CPU per worker,
no early stopping, as many trials at once as the CPUs fit (the plain pattern's function
is given no CPU of its own, as raysweep's multi-worker trials are, so that the same
number of trials run at once). Searches alternate: raysweep then plain, then the other
way round.

Both sides share the embedded Ray's settings (loopback, no preemption watcher). The plain
pattern's TorchTrainer keeps Ray Train's defaults, as a user of the documented pattern
gets them; raysweep's 2-worker trials use ``trainers.distributed.run_training`` (Ray's
``TorchTrainer`` too, with ``RAY_TRAIN_ENV``: 0.2 s controller poll instead of 2 s, no
metrics callbacks).

The embedded Ray runs without the in-worker timing hook (``worker_timing``): it would
import torch and ``trainers`` in every Ray process that starts (controllers, cleaners,
queues), which is start-up cost of the harness, not of either side.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from ray.tune import Callback

from benchmarks.common import Result, alternate, local_ray, median, set_threads, spread

TARGET_1W_SECONDS, TARGET_2W_RATIO = 3.0, 0.5

SIZES = {
    "full": dict(trials=6, epochs=3, rounds=2, workers=(1, 2), limit=None),
    "quick": dict(trials=4, epochs=2, rounds=1, workers=(1, 2), limit=None),
    "smoke": dict(trials=1, epochs=1, rounds=1, workers=(1,), limit=200),  # 2 workers: the same code
}


class TrialTimer(Callback):
    """A Tune callback: each trial's wall seconds and its epochs' ``epoch_seconds``."""

    def __init__(self):
        self.started, self.wall, self.epochs = {}, {}, {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.epochs.setdefault(trial.trial_id, []).append(float(result.get("epoch_seconds", 0.0)))

    def _end(self, trial):
        self.wall[trial.trial_id] = time.time() - self.started[trial.trial_id]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial)


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


def plain_search(run_cfg: dict, data, workers: int, trials: int, concurrent: int, storage: str, name: str) -> dict:
    from ray import tune

    from search_spaces.tuner import DRIVER_MEMORY_BYTES

    timer = TrialTimer()
    fn = tune.with_resources(tune.with_parameters(plain_pattern_trial, data=data),
                             {"cpu": 0, "memory": DRIVER_MEMORY_BYTES})
    start = time.time()
    tune.Tuner(
        fn,
        param_space={"run": run_cfg, "workers": workers, "storage": storage},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[timer], verbose=0),
    ).fit()
    wall = time.time() - start
    ids = sorted(timer.wall)
    return {"trial_wall": [timer.wall[i] for i in ids], "trial_train": [sum(timer.epochs.get(i, [])) for i in ids],
            "search_wall": wall}


def raysweep_search(workers: int, trials: int, epochs: int, limit, storage: str, name: str, seed: int) -> dict:
    import pyarrow.parquet as pq

    from cluster import tune_cmd
    from search_spaces.space import load_space
    from search_spaces.tuner import SearchConfig
    from trainers.distributed import Placement

    user = {"data": {"name": "digits", "limit": limit}}  # as --set would give them
    search = SearchConfig(trials=trials, max_epochs=epochs, searcher="random", scheduler="none", grace_period=1,
                          seed=seed, placement=Placement(workers=workers, cpus_per_worker=1.0)).validate()
    req = tune_cmd.TuneRequest(load_space("digits_cnn"), user, search, storage, name)
    start = time.time()
    tune_cmd.run(req)
    wall = time.time() - start
    rows = pq.read_table(Path(storage) / name / "trials.parquet").to_pylist()
    epochs_t = pq.read_table(Path(storage) / name / "epochs.parquet").to_pylist()
    train = {r["trial_id"]: 0.0 for r in rows}
    for e in epochs_t:
        train[e["trial_id"]] += e["epoch_seconds"]
    rows.sort(key=lambda r: r["trial_id"])
    bad = [r for r in rows if r["status"] not in ("completed", "early_stopped")]
    if bad:
        raise RuntimeError(f"raysweep tune {name}: trials failed: {[(r['trial_id'], r['error']) for r in bad]}")
    return {"trial_wall": [r["wall_seconds"] for r in rows], "trial_train": [train[r["trial_id"]] for r in rows],
            "search_wall": wall}


def run(mode: str = "full") -> Result:
    import ray

    from search_spaces.space import load_space
    from trainers.data import load_data

    size = SIZES[mode]
    threads = set_threads()
    storage = tempfile.mkdtemp(prefix="raysweep-bench-trials-")
    space = load_space("digits_cnn")
    base = {"data": {"name": "digits", "limit": size["limit"]}, "train": {"epochs": size["epochs"]}}
    run_cfg = space.trial_config(base, space.default_point())
    out: dict[str, list[dict]] = {}
    counter = iter(range(1000))
    slots: dict[int, int] = {}  # trials at once, by workers per trial
    try:
        with local_ray(threads, timing=False):
            cpus = int(ray.cluster_resources().get("CPU", 1))
            data = load_data(run_cfg.data)
            sides = {}
            for w in size["workers"]:
                concurrent = slots[w] = max(1, cpus // w)
                out[f"raysweep {w}w"], out[f"plain {w}w"] = [], []

                def ours(w=w):
                    out[f"raysweep {w}w"].append(raysweep_search(
                        w, size["trials"], size["epochs"], size["limit"], storage, f"ours-{w}w-{next(counter)}",
                        seed=len(out[f"raysweep {w}w"])))
                    return 0.0

                def theirs(w=w, concurrent=concurrent):
                    out[f"plain {w}w"].append(plain_search(run_cfg.to_dict(), data, w, size["trials"], concurrent,
                                                           storage, f"plain-{w}w-{next(counter)}"))
                    return 0.0

                sides[f"raysweep {w}w"], sides[f"plain {w}w"] = ours, theirs
            alternate(sides, reps=size["rounds"], warmup=0)
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    overhead = {k: [wall - train for r in runs for wall, train in zip(r["trial_wall"], r["trial_train"])]
                for k, runs in out.items()}
    med = {k: median(v) for k, v in overhead.items()}
    # What the search as a whole spent per trial beyond training: its wall time x the trial
    # slots it had, less the training, over the trials (start-ups that overlap others'
    # training count once here, in full in a trial's own wall time).
    slot_overhead = {k: median((r["search_wall"] * slots[int(k.split()[-1][:-1])] - sum(r["trial_train"]))
                               / len(r["trial_train"]) for r in runs) for k, runs in out.items()}
    rows = []
    for k, runs in out.items():
        walls = [x for r in runs for x in r["trial_wall"]]
        trains = [x for r in runs for x in r["trial_train"]]
        rows.append([k, len(walls), median(walls), median(trains), med[k], spread(overhead[k]),
                     median(r["search_wall"] for r in runs), slot_overhead[k]])
    one = med.get("raysweep 1w")
    ratio2 = med["raysweep 2w"] / med["plain 2w"] if med.get("plain 2w") else None
    for w in size["workers"]:
        rows.append([f"ratio raysweep / plain, {w}w", None, None, None, med[f"raysweep {w}w"] / med[f"plain {w}w"],
                     None, None, slot_overhead[f"raysweep {w}w"] / slot_overhead[f"plain {w}w"]])
    subset = f" (first {size['limit']} training images)" if size["limit"] else ""
    met = one is not None and one <= TARGET_1W_SECONDS and ratio2 is not None and ratio2 <= TARGET_2W_RATIO
    return Result(
        name="trial_overhead", value=one,
        target=f"<= {TARGET_1W_SECONDS:g} s per 1-worker trial; 2-worker trials <= {TARGET_2W_RATIO}x the plain "
               "pattern's overhead",
        met=met, unit="s overhead per 1-worker raysweep trial (median)",
        headers=["search", "trials", "trial wall s", "train s", "overhead s", "overhead spread", "search wall s",
                 "search overhead s/trial"],
        rows=rows,
        notes=[f"digits{subset}, simple_cnn, "
               f"{size['epochs']} epoch(s) per trial, {size['trials']} trials per search x {size['rounds']} "
               f"round(s), no early stopping, 1 CPU per worker on {threads} CPUs",
               f"2-worker overhead ratio raysweep / plain: "
               f"{'-' if ratio2 is None else f'{ratio2:.2f}'} (target <= {TARGET_2W_RATIO})",
               "overhead = trial wall (Tune on_trial_start -> on_trial_complete) - sum of epoch_seconds; "
               "search overhead / trial = (search wall x trial slots - all epoch_seconds) / trials"],
        details={"overhead_seconds": overhead, "median_overhead_seconds": med, "ratio_2w": ratio2, "runs": out,
                 "search_overhead_per_trial": slot_overhead, "trial_slots": slots,
                 "threads": threads},
    )
