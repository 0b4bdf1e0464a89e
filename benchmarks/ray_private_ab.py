"""ray_private A/B: raysweep with its private Ray parts on (``trainers/ray_private.py``)
against Ray's public path (``RAYSWEEP_RAY_PRIVATE=0``), side by side in one run, A B / B A.

- ``train``: one `raysweep train` with 1 worker on synthetic CIFAR-shaped data, the
  overhead benchmark's recipe and timing (``overhead.raysweep_run``): steady epoch seconds.
- ``tune``: a search of 2-worker trials (``trial_overhead.raysweep_search``): each trial's
  overhead (wall - epochs) and the search's overhead per trial.

Each side starts its own embedded Ray with the variable set, so the trials' actors (which
read it) see it too. Keep = a gain >= 3% of epoch time or >= 1 s per trial (docs/internals.md).

    python -m benchmarks.ray_private_ab [--quick] [--only train|tune]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile

from benchmarks import overhead, plain, trial_overhead
from benchmarks.common import alternate, env_var, loadavg, local_ray, median, set_threads, spread
from trainers.ray_private import ENV

SIZES = {"full": dict(num_samples=6000, epochs=5, rounds=2, trials=4, trial_epochs=2),
         "quick": dict(num_samples=3000, epochs=3, rounds=1, trials=4, trial_epochs=2)}


def _side(private: bool, fn):
    def run():
        with env_var(ENV, "1" if private else "0"):
            return fn()
    return run


def train_ab(size: dict, threads: int, storage: str) -> dict:
    from cluster import train_cmd
    from trainers.data import load_data

    cfg = plain.example_config(["data.name=synthetic", f"data.num_samples={size['num_samples']}",
                                "data.image_size=32", "data.channels=3", "data.num_classes=10",
                                f"train.epochs={size['epochs']}"])
    data = load_data(cfg.data)
    runs = {"private": [], "public": []}

    def one(key):
        with local_ray(threads, dashboard=train_cmd.EMBEDDED_DASHBOARD):
            runs[key].append(overhead.raysweep_run(cfg, data, threads, storage, f"{key}-{len(runs[key])}"))
        return 0.0

    alternate({k: _side(k == "private", lambda k=k: one(k)) for k in runs}, reps=size["rounds"], warmup=0)
    epochs = {k: [s for r in rs for s in r["epoch_seconds"][1:]] for k, rs in runs.items()}
    walls = {k: [r["wall_seconds"] for r in rs] for k, rs in runs.items()}
    return {"epoch_s": {k: median(v) for k, v in epochs.items()}, "epoch_spread": {k: spread(v) for k, v in epochs.items()},
            "wall_s": {k: median(v) for k, v in walls.items()},
            "private_gain_pct": 100 * (1 - median(epochs["private"]) / median(epochs["public"]))}


def tune_ab(size: dict, threads: int, storage: str) -> dict:
    runs = {"private": [], "public": []}

    def one(key):
        with local_ray(threads, timing=False):
            runs[key].append(trial_overhead.raysweep_search(2, size["trials"], size["trial_epochs"], None, storage,
                                                            f"{key}-{len(runs[key])}", seed=len(runs[key])))
        return 0.0

    alternate({k: _side(k == "private", lambda k=k: one(k)) for k in runs}, reps=size["rounds"], warmup=0)
    per_trial = {k: [w - t for r in rs for w, t in zip(r["trial_wall"], r["trial_train"])] for k, rs in runs.items()}
    slots = max(1, threads // 2)
    search = {k: median((r["search_wall"] * slots - sum(r["trial_train"])) / len(r["trial_train"]) for r in rs)
              for k, rs in runs.items()}
    return {"trial_overhead_s": {k: median(v) for k, v in per_trial.items()},
            "trial_overhead_spread": {k: spread(v) for k, v in per_trial.items()},
            "search_overhead_s_per_trial": search,
            "private_gain_s_per_trial": search["public"] - search["private"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=("train", "tune"))
    args = p.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    threads = set_threads()
    storage = tempfile.mkdtemp(prefix="raysweep-bench-private-")
    out = {"mode": "quick" if args.quick else "full", "threads": threads, "load_before": loadavg()}
    try:
        if args.only in (None, "train"):
            out["train"] = train_ab(size, threads, storage)
        if args.only in (None, "tune"):
            out["tune"] = tune_ab(size, threads, storage)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    out["load_after"] = loadavg()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
