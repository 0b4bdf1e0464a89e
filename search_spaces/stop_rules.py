"""Rules that end a search before its trials are spent: a target value of a metric
(``--target val_accuracy=0.95``) and a wall-clock budget (``--time-budget 30m``).

``StopRules`` is a Ray Tune ``Stopper`` (the design of ``cluster.cost.BudgetStopper``):
Tune asks ``stop_all`` at every step of its loop; once it says yes, Tune starts no new
trial and stops the running ones, and the rules tell the search's ledger (a callback of the
same run, ``ledger.budget_spent(reason, status)``) so that it records them as stopped.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from ray.tune.stopper import Stopper

from trainers.config import EARLY_STOP_METRICS
from trainers.configtools import ConfigError

STOPPED = "stopped"  # the status of a trial that a stop rule ended
UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([smh]?)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    metric: str
    value: float

    @property
    def mode(self) -> str:
        return EARLY_STOP_METRICS[self.metric]

    def reached(self, result: dict) -> bool:
        got = result.get(self.metric)
        if not isinstance(got, (int, float)) or not math.isfinite(got):
            return False
        return got >= self.value if self.mode == "max" else got <= self.value

    def __str__(self) -> str:
        return f"{self.metric} {'>=' if self.mode == 'max' else '<='} {self.value:g}"


def parse_target(text: str, flag: str = "--target") -> Target:
    """``"val_accuracy=0.95"`` -> Target; the direction is the metric's own (max for
    accuracy and F1, min for val_loss). A bad one raises ``ConfigError`` naming ``flag``."""
    metric, sep, raw = str(text).partition("=")
    metric = metric.strip()
    example = f"e.g. {flag} val_accuracy=0.95"
    if not sep or not metric:
        raise ConfigError([f"{flag}: {text!r} is not METRIC=VALUE; {example}"])
    problems = []
    if metric not in EARLY_STOP_METRICS:
        problems.append(f"{flag}: unknown metric {metric!r} in {text!r}; known: {', '.join(EARLY_STOP_METRICS)}")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        problems.append(f"{flag}: {raw.strip()!r} in {text!r} is not a finite number; {example}")
    if problems:
        raise ConfigError(problems)
    return Target(metric, value)


def parse_duration_s(text: str, flag: str = "--time-budget") -> float:
    """``"90"``/``"90s"``, ``"30m"``, ``"1.5h"`` -> seconds (> 0). A bad one raises
    ``ConfigError`` naming ``flag``."""
    match = _DURATION.fullmatch(str(text))
    seconds = float(match[1]) * UNITS_S[(match[2] or "s").lower()] if match else math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError([f"{flag}: {text!r} is not a duration > 0; give a number with s, m or h, e.g. 30m"])
    return seconds


class StopRules(Stopper):
    """Ends the search when a trial reports ``target`` or after ``time_budget_s`` of the
    search's wall time. Like Tune's ``TimeoutStopper``, the clock starts at Tune's first
    check and a resumed search (Tune restores this from ``tuner.pkl``) gets what was left
    of the budget, not counting the time the driver was down."""

    def __init__(self, target: Target | None = None, time_budget_s: float | None = None, ledger=None,
                 clock=time.monotonic):
        self.target, self.left_s, self.ledger, self.clock = target, time_budget_s, ledger, clock
        self.budget_s = time_budget_s
        self.reason: str | None = None
        self._told = False  # the ledger knows
        self._last: float | None = None

    def __getstate__(self):
        return {**self.__dict__, "_last": None, "clock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, clock=time.monotonic)

    def __call__(self, trial_id: str, result: dict) -> bool:
        if self.reason is None and self.target is not None and self.target.reached(result):
            self.reason = f"target {self.target} reached by trial {trial_id} (--target)"
        return self.reason is not None  # a result that raced the stop ends its trial too

    def stop_all(self) -> bool:
        self._spend_time()
        if self.reason is not None and not self._told:
            self._told = True
            if self.ledger is not None:
                self.ledger.budget_spent(self.reason, STOPPED)
        return self.reason is not None

    def _spend_time(self) -> None:
        if self.left_s is None:
            return
        now = self.clock()
        if self._last is not None:
            self.left_s -= now - self._last
        self._last = now
        if self.left_s <= 0 and self.reason is None:
            self.reason = f"time budget of {self.budget_s:g} s spent (--time-budget)"
