"""Objectives of a multi-objective search (``--objectives val_accuracy:max,latency_ms:min``)
and its Pareto front.

Each objective is looked up by name in ``OBJECTIVES``: how it is measured and its default
direction. Every value is one a trial *reports* to Tune with each epoch, so Optuna's
multi-objective samplers see it through Ray's ``OptunaSearch`` (``metric`` and ``mode`` as
lists):

- ``val_accuracy``, ``val_f1``, ``val_loss``: the loop's validation metrics (``reported``).
- ``latency_ms``, ``params``, ``flops``: measured once per trial on its own network, on
  the device that trains it (``trainers.model_measures``; ``model``).
- ``cost``: the trial's own reserved resources x its seconds so far x ``--price``
  (``cost``); the driver's ``cost`` column uses the same rate over the driver's wall time.

A trial's point is its values at one epoch: the best by the *first* objective, which must
be a validation metric (it also picks the trial's checkpoint, so a point on the front is
a model one can load).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

from trainers.config import EARLY_STOP_METRICS
from trainers.configtools import ConfigError
from trainers.registry import Registry

REPORTED, MODEL, COST = "reported", "model", "cost"  # how an objective's value comes to be
MODES = ("max", "min")
COUNT = (2, 3)  # objectives at once: a front of more is hard to read and to sample well
EXAMPLE = "e.g. --objectives val_accuracy:max,latency_ms:min"


@dataclass(frozen=True)
class Objective:
    mode: str  # the default direction
    kind: str  # REPORTED, MODEL or COST
    how: str  # how it is measured, for --help and docs/tune.md


OBJECTIVES: Registry = Registry("objective")
for _metric, _mode in EARLY_STOP_METRICS.items():
    OBJECTIVES.register(_metric)(Objective(_mode, REPORTED, f"the loop's {_metric} at the trial's chosen epoch"))
OBJECTIVES.register("latency_ms")(Objective("min", MODEL, "milliseconds per forward pass of one image, on the "
                                            "trial's device: median of 10 after 3 warm-ups"))
OBJECTIVES.register("params")(Objective("min", MODEL, "trainable parameters of the network"))
OBJECTIVES.register("flops")(Objective("min", MODEL, "forward FLOPs per image (torch's FlopCounterMode)"))
OBJECTIVES.register("cost")(Objective("min", COST, "the trial's reserved resources x its seconds so far x --price"))


@dataclass(frozen=True)
class Goal:
    """One objective of a search, with its direction."""

    name: str
    mode: str

    @property
    def kind(self) -> str:
        return OBJECTIVES[self.name].kind

    def __str__(self) -> str:
        return f"{self.name}:{self.mode}"


def parse_objectives(value: str | Sequence | None, flag: str = "--objectives") -> tuple[Goal, ...]:
    """``"val_accuracy:max,params:min"`` (or a list of such items) -> Goals; ``NAME`` alone
    takes the objective's default direction. None or empty: no objectives (a single-metric
    search). Every problem is reported at once, naming ``flag``."""
    if value is None or value == "" or value == ():
        return ()
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p).strip() for p in value]
    problems, goals = [], []
    for item in items:
        name, sep, mode = (part.strip() for part in item.partition(":"))
        if name not in OBJECTIVES:
            problems.append(f"{flag}: unknown objective {name!r} in {item!r}; known: {', '.join(OBJECTIVES.names())}")
        elif sep and mode not in MODES:
            problems.append(f"{flag}: {item!r}: direction {mode!r} is not max or min; {EXAMPLE}")
        elif sep and OBJECTIVES[name].kind == REPORTED and mode != OBJECTIVES[name].mode:
            problems.append(f"{flag}: {item!r}: {name} is always {OBJECTIVES[name].mode}imised (checkpoints and "
                            f"early stopping rank it so); write {name}:{OBJECTIVES[name].mode}")
        elif name in [g.name for g in goals]:
            problems.append(f"{flag}: {name} given twice; each objective once, {EXAMPLE}")
        else:
            goals.append(Goal(name, mode if sep else OBJECTIVES[name].mode))
    if not problems:
        problems += _shape_problems(goals, flag)
    if problems:
        raise ConfigError(problems)
    return tuple(goals)


def _shape_problems(goals: list[Goal], flag: str) -> list[str]:
    out = []
    if len(goals) not in COUNT:
        out.append(f"{flag}: {len(goals)} objective(s) given; give {COUNT[0]} or {COUNT[-1]}, {EXAMPLE} "
                   "(for one, leave --objectives out: the space's metric is the objective)")
    if goals and goals[0].kind != REPORTED:
        metrics = ", ".join(n for n in OBJECTIVES.names() if OBJECTIVES[n].kind == REPORTED)
        out.append(f"{flag}: the first objective ({goals[0].name}) must be a validation metric ({metrics}): "
                   f"it picks each trial's epoch and checkpoint; put e.g. val_accuracy:max first")
    return out


def objective_column(name: str) -> str:
    """The ``trials.parquet`` column of an objective's value (what Optuna was told)."""
    return f"objective_{name}"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    better = False
    for x, y, mode in zip(a, b, modes):
        gain = x - y if mode == "max" else y - x
        if gain < 0:
            return False
        better = better or gain > 0
    return better


def pareto_mask(points: Sequence[Sequence[float | None]], modes: Sequence[str]) -> list[bool]:
    """Which points no other point dominates. A point with a missing or non-finite value is
    never on the front (and dominates nothing); equal points are all on it or all off it.
    O(n^2) comparisons: a search has hundreds of trials at most."""
    usable = [all(_finite(v) for v in p) and len(p) == len(modes) for p in points]
    candidates = [p for p, ok in zip(points, usable) if ok]
    return [ok and not any(dominates(q, p, modes) for q in candidates) for p, ok in zip(points, usable)]


def objective_problems(search) -> list[str]:
    """What a ``search_spaces.tuner.SearchConfig`` with ``objectives`` cannot do. A front is
    not one number: what needs one (ASHA, --target) is refused, not applied to one
    objective in silence."""
    from search_spaces.samplers import SAMPLERS

    try:
        goals = parse_objectives(search.objectives)
    except ConfigError as e:
        return e.problems
    if not goals:
        return []
    given = f"--objectives {','.join(map(str, goals))}"
    out = []
    if search.scheduler == "asha":
        out.append(f"--scheduler: asha stops trials by one metric and cannot rank a Pareto front ({given}); "
                   "use --scheduler none (the default with --objectives)")
    if search.target is not None:
        out.append(f"--target: {search.target} ends the search on one metric, while {given} looks for a "
                   "trade-off front; drop --target (or --objectives)")
    if search.searcher in SAMPLERS and not SAMPLERS[search.searcher].multi_objective:
        capable = ", ".join(n for n in SAMPLERS.names() if SAMPLERS[n].multi_objective)
        out.append(f"--searcher: {search.searcher} cannot optimise several objectives ({given}); use auto or one "
                   f"of {capable}")
    p = search.placement
    if "latency_ms" in [g.name for g in goals] and p.workers > 1 and p.use_gpu:
        out.append(f"--objectives latency_ms: a trial of {p.workers} workers measures its network in its own "
                   "process, which holds no GPU; use --workers-per-trial 1 with --gpu to time it on the GPU")
    return out


def default_scheduler(objectives) -> str:
    """ASHA for one metric; none for several objectives (ASHA would rank by one of them)."""
    return "none" if parse_objectives(objectives) else "asha"


@dataclass(frozen=True)
class TrialObjectives:
    """What a trial adds to each report for a multi-objective search: its network's measures
    (``trainers.model_measures``) and, with prices, its ``cost`` so far: ``cost_per_s`` (its
    reserved resources' price per second, the rate the driver's ``cost`` column uses) x the
    seconds since the trial's function (re)started. Picklable: a multi-worker trial's reports
    pass through Ray Train's controller actor (``QueueReportToTune``)."""

    measures: dict = field(default_factory=dict)
    cost_per_s: float | None = None
    started: float = field(default_factory=time.time)

    def __call__(self) -> dict:
        out = dict(self.measures)
        if self.cost_per_s is not None:
            out["cost"] = self.cost_per_s * (time.time() - self.started)
        return out


def trial_objectives(goals: tuple[Goal, ...], cfg, data, device, cost_per_s: float | None,
                     started: float) -> TrialObjectives:
    """Measure the trial's network once, on ``device``, as ``fit`` builds it."""
    from trainers.loop import autocast_for, build_worker_model, resolve_precision
    from trainers.model_measures import measure_model

    names = {g.name for g in goals if g.kind == MODEL}
    measures = {}
    if names:
        model = build_worker_model(cfg, data, device)
        precision = resolve_precision(cfg.train.precision, device)
        measures = measure_model(names, model, data.shape, device, lambda: autocast_for(precision, device))
    wants_cost = any(g.kind == COST for g in goals)
    return TrialObjectives(measures, cost_per_s if wants_cost else None, started)
