"""search: random search against TPE and GP, each with and without ASHA, on an equal budget
of training epochs, over several seeds: the best validation accuracy against epochs spent,
and the fraction of random search's budget each strategy needs to reach random search's
final best. Target: the best strategy needs <= 1/3 of random's budget on every problem.

Fair start: every search runs with ``--first-point none`` (``SearchConfig.first_point``), so
no strategy starts at the space's hand-set default (for ``cifar_fast`` a tuned recipe) that
random search would never see; each begins from its own seeded draws. The record says so
(``details.first_point``).

Every search is a real `raysweep tune` (``cluster.tune_cmd.run``), one trial at a time
(so "epochs spent" is an exact order, and the model-based samplers see every finished
trial), each trial one worker with all CPUs. Strategies without ASHA run ``trials`` trials
of ``max_epochs`` epochs (the budget B = trials x max_epochs); with ASHA (grace 1 epoch,
reduction factor 3) they run more trials, as many as it takes to spend B, and their curve is
cut at B. Per problem and strategy the table gives the median fraction, best at B/3 and at
B (medians over seeds), and the spread over seeds (min-max).

A full run takes many hours on 2 cores. With ``$RAYSWEEP_BENCH_SEARCH_CACHE`` naming a
directory, each finished search is kept there under a key that holds the commit, and a
rerun of the same committed, clean tree reuses it: the run can stop and continue. The
record counts the searches kept from earlier sittings. The figures count epochs, not
seconds, so a busy machine slows the run but does not move them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import Result, local_ray, median, set_threads, spread, versions

TARGET = 1 / 3
STRATEGIES = {  # name -> (searcher, scheduler)
    "random": ("random", "none"),
    "tpe": ("tpe", "none"),
    "gp": ("gp", "none"),
    "tpe+asha": ("tpe", "asha"),
    "gp+asha": ("gp", "asha"),
}
CACHE_ENV = "RAYSWEEP_BENCH_SEARCH_CACHE"
FIRST_POINT = "none"  # the same start for every strategy: none gets the space's default point

ASHA_TRIALS = 4  # x the others' trials: enough to spend the same budget (ASHA stops most early)

SIZES = {
    "full": dict(seeds=5, problems={
        "digits": dict(space="digits_cnn", trials=24, epochs=9, data={"name": "digits"}),
        "cifar10_subset": dict(space="cifar_fast", trials=24, epochs=8, data={"limit": 2000}),
    }),
    "quick": dict(seeds=3, problems={"digits": dict(space="digits_cnn", trials=12, epochs=6, data={"name": "digits"})}),
    # The smoke run checks the script: random (the reference) and one model-based strategy with ASHA.
    "smoke": dict(seeds=1, strategies=("random", "gp+asha"), problems={
        "digits": dict(space="digits_cnn", trials=1, epochs=2, asha_trials=2, data={"name": "digits", "limit": 200})}),
}


def _user(problem: dict) -> dict:
    """What a user would --set: for CIFAR-10, where the benchmark copy lives."""
    from benchmarks.cifar10 import data_root
    from search_spaces.space import load_space

    data = dict(problem["data"])
    if load_space(problem["space"]).fixed.get("data.name") == "parquet":
        data.setdefault("root", str(data_root()))
    return {"data": data}


def _run_name(problem: str, strategy: str, counter) -> str:
    """A run name is one safe path component: no '+' from the strategy's name."""
    return f"{problem}-{strategy.replace('+', '_')}-{next(counter)}"


def one_search(problem: dict, strategy: str, seed: int, cpus: int, storage: str, name: str) -> list[dict]:
    """Runs one search; returns its epochs in the order they were spent: trial, epoch, value."""
    import pyarrow.parquet as pq

    from cluster import tune_cmd
    from search_spaces.space import load_space
    from search_spaces.tuner import SearchConfig
    from trainers.distributed import Placement

    searcher, scheduler = STRATEGIES[strategy]
    trials = problem["trials"]
    if scheduler == "asha":
        trials = problem.get("asha_trials", trials * ASHA_TRIALS)
    space = load_space(problem["space"])
    search = SearchConfig(trials=trials, max_epochs=problem["epochs"], searcher=searcher, scheduler=scheduler,
                          grace_period=1, reduction_factor=3, concurrent=1, seed=seed, first_point=FIRST_POINT,
                          placement=Placement(workers=1, cpus_per_worker=float(cpus))).validate()
    tune_cmd.run(tune_cmd.TuneRequest(space, _user(problem), search, storage, name))
    # Tune ends a search on Ctrl-C without raising, and a trial may fail: a search that did not
    # run all its trials to their end is not a result (nor something to keep in the cache).
    ended = [t["status"] for t in pq.read_table(Path(storage) / name / "trials.parquet").to_pylist()]
    if len(ended) != trials or set(ended) - {"completed", "early_stopped"}:
        raise RuntimeError(f"search {name}: {len(ended)} of {trials} trials ended, statuses {sorted(set(ended))}")
    rows = pq.read_table(Path(storage) / name / "epochs.parquet").to_pylist()
    rows.sort(key=lambda r: (r["trial_id"], r["epoch"]))  # Tune numbers trials in the order it starts them
    return [{"trial": r["trial_id"], "epoch": r["epoch"], "value": r[space.metric]} for r in rows]


def _cache_file(problem: dict, strategy: str, seed: int, cpus: int) -> Path | None:
    """Where a finished search is kept when ``$RAYSWEEP_BENCH_SEARCH_CACHE`` names a directory,
    so that a full run too long for one sitting continues where it stopped. The key holds
    the commit and the library versions (only searches of this same committed, clean tree
    and environment are reused) and the CPUs (a trial's thread count)."""
    directory, found = os.environ.get(CACHE_ENV), versions()
    commit = found.get("raysweep_commit") or ""
    if not directory or not commit or commit.endswith("+dirty"):
        return None
    key = json.dumps({"problem": problem, "strategy": STRATEGIES[strategy], "seed": seed, "versions": found,
                      "cpus": cpus, "first_point": FIRST_POINT, "asha_trials": ASHA_TRIALS}, sort_keys=True)
    return Path(directory) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _search_or_cached(problem: dict, strategy: str, seed: int, cpus: int, storage: str, name: str,
                      reused: list) -> list[dict]:
    path = _cache_file(problem, strategy, seed, cpus)
    if path is not None and path.exists():
        reused.append(path.name)
        return json.loads(path.read_text())
    epochs = one_search(problem, strategy, seed, cpus, storage, name)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(epochs))
        path.with_suffix(".tmp").replace(path)
    return epochs


def best_so_far(epochs: list[dict], budget: int) -> list[float]:
    out, best = [], -math.inf
    for row in epochs[:budget]:
        if row["value"] is not None and math.isfinite(row["value"]):
            best = max(best, row["value"])
        out.append(best)
    return out


def epochs_to_reach(curve: list[float], value: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v >= value - 1e-12), None)


def _med_fraction(xs) -> float:
    """A search that never reached the mark counts as needing more than all."""
    return median([math.inf if x is None else x for x in xs])


def _search_all(size: dict, strategies: tuple[str, ...], storage: str, reused: list) -> tuple[dict, dict]:
    """Every problem x seed x strategy; the strategies' order rotates with the seed."""
    import ray

    curves: dict[str, dict[str, list[list[float]]]] = {}
    fractions: dict[str, dict[str, list[float | None]]] = {}
    counter = iter(range(10_000))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    for pname, problem in size["problems"].items():
        budget = problem["trials"] * problem["epochs"]
        curves[pname] = {s: [] for s in strategies}
        fractions[pname] = {s: [] for s in strategies}
        for seed in range(size["seeds"]):
            shift = seed % len(strategies)
            order = strategies[shift:] + strategies[:shift]
            got = {s: best_so_far(_search_or_cached(problem, s, seed, cpus, storage, _run_name(pname, s, counter),
                                                    reused), budget) for s in order}
            target = got["random"][-1]
            for s, curve in got.items():
                curves[pname][s].append(curve)
                reached = epochs_to_reach(curve, target)
                fractions[pname][s].append(None if reached is None else reached / budget)
    return curves, fractions


def run(mode: str = "full") -> Result:
    size = SIZES[mode]
    strategies = tuple(size.get("strategies", STRATEGIES))
    threads = set_threads()
    storage = tempfile.mkdtemp(prefix="raysweep-bench-search-")
    reused: list[str] = []
    try:
        with local_ray(threads):
            curves, fractions = _search_all(size, strategies, storage, reused)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    rows = []
    for pname, by_s in curves.items():
        budget = size["problems"][pname]["trials"] * size["problems"][pname]["epochs"]
        for s, cs in by_s.items():
            third = [c[min(len(c), max(1, budget // 3)) - 1] for c in cs if c]
            final = [c[-1] for c in cs if c]
            rows.append([pname, s, budget, _med_fraction(fractions[pname][s]),
                         " ".join("-" if f is None else f"{f:.2f}" for f in fractions[pname][s]),
                         median(third), median(final), spread(final)])
    worst = {s: max(_med_fraction(fractions[p][s]) for p in fractions) for s in strategies if s != "random"}
    best = min(worst, key=worst.get) if worst else None
    value = worst.get(best)
    return Result(
        name="search", value=value,
        target=f"best strategy <= {TARGET:.3g} of random search's epochs to reach its final best, on every problem",
        met=value is not None and value <= TARGET,
        unit=f"fraction of random's budget the best strategy ({best}) needs (median over seeds; worst problem)",
        headers=["problem", "strategy", "budget epochs", "fraction to random's best", "per seed",
                 "best @ 1/3 budget", "best @ budget", "best @ budget spread"],
        rows=rows,
        notes=[f"{size['seeds']} seed(s); problems: " + "; ".join(
                   f"{p}: space {q['space']}, {q['trials']} trials x {q['epochs']} epochs (with ASHA: up to "
                   f"{q.get('asha_trials', q['trials'] * ASHA_TRIALS)} trials, cut at the budget)"
                   for p, q in size["problems"].items()),
               f"first point: {FIRST_POINT} for every strategy (tune --first-point {FIRST_POINT}): no search starts "
               "at the space's default point",
               "one trial at a time, 1 worker with all CPUs; '-' = never reached random search's final best; "
               "medians and spreads over seeds" + ("; quick: digits only" if mode == "quick" else ""),
               f"{len(reused)} of the searches were kept from an earlier sitting of this same commit "
               f"(${CACHE_ENV})" if reused else "every search ran in this sitting"],
        details={"curves": curves, "fractions": fractions, "threads": threads, "first_point": FIRST_POINT,
                 "searches_kept_from_earlier_sittings": len(reused),
                 "worst_problem_fraction": worst, "best_strategy": best,
                 "problems": size["problems"], "seeds": size["seeds"]},
    )
