"""Optuna samplers by name (``--searcher``), and the choice ``auto`` makes from the space and
the trial budget. Every one is Optuna's own and runs offline (OptunaHub's would download
code at run time); GP needs torch and scipy, both installed with raysweep.

- ``tpe``: multivariate TPE with ``group=True``, so conditional dimensions (``when:``, and
  the value of a ``loguniform_or_zero`` once its switch is on) are modelled in their group.
- ``gp``: Optuna's native ``GPSampler``. It handles categorical dimensions; a dimension
  absent from some trials (a conditional one) it cannot model, so it draws those at random
  (Optuna's independent sampler) and models the rest; ``choose`` says which.
- ``qmc``: scrambled Sobol (``QMCSampler``) over the dimensions of the first trial; the
  same random fall-back for conditional ones.
- ``random``: ``RandomSampler``.
- ``nsga2``: ``NSGAIISampler``, the evolutionary multi-objective one; its first
  generation (50 trials) is random, so it pays off at hundreds of trials.
- ``auto``: ``gp`` for 10-100 trials over a space of only continuous and int dimensions
  (Optuna's guidance for GP), else ``tpe``; the same with several objectives.

Several objectives (``search_spaces.objectives``): in Optuna 5.0 every sampler here takes
them (checked in site-packages/optuna: TPE as MOTPE, GP with log expected hypervolume
improvement, NSGA-II, and QMC and random, which ignore the values); a sampler registered
with ``multi_objective=False`` is refused for such a search (``SearchConfig``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import optuna

from search_spaces.space import SearchSpace
from trainers.registry import Registry

AUTO = "auto"
ALIASES = {"optuna": "tpe"}  # deprecated name -> what it means now
GP_TRIALS = (10, 100)  # Optuna's docs recommend GP in this range, TPE above it


@dataclass(frozen=True)
class Sampler:
    build: Callable[[int], optuna.samplers.BaseSampler]  # seed -> a fresh sampler
    first_point: bool  # start at the space's defaults (model-based samplers learn from it)
    models_conditionals: bool  # False: dimensions absent from some trials are drawn at random
    multi_objective: bool = True  # takes a study of several directions (Optuna 5.0: all of these)


SAMPLERS: Registry = Registry("searcher")


def _quiet(build: Callable) -> Callable:
    """Optuna marks QMC and TPE's multivariate/group as experimental; chosen on purpose,
    so their warnings would only be noise in every search's output."""
    def quietly(seed: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return build(seed)

    return quietly


SAMPLERS.register("tpe")(Sampler(_quiet(lambda seed: optuna.samplers.TPESampler(
    seed=seed, multivariate=True, group=True)), first_point=True, models_conditionals=True))
SAMPLERS.register("gp")(Sampler(lambda seed: optuna.samplers.GPSampler(
    seed=seed, warn_independent_sampling=False), first_point=True, models_conditionals=False))
SAMPLERS.register("qmc")(Sampler(_quiet(lambda seed: optuna.samplers.QMCSampler(
    qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False)),
    first_point=False, models_conditionals=False))
SAMPLERS.register("random")(Sampler(lambda seed: optuna.samplers.RandomSampler(seed=seed),
                                    first_point=False, models_conditionals=False))

SAMPLERS.register("nsga2")(Sampler(lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
                                   first_point=False, models_conditionals=False))

SEARCHERS = (AUTO, *SAMPLERS.names(), *ALIASES)
# ``--first-point``: the space's default point as the first trial for the samplers that
# learn from it (auto: tpe and gp), for every sampler (default: a comparison starts alike), or none.
FIRST_POINTS = ("auto", "default", "none")


def starts_at_default(first_point: str, sampler: str) -> bool:
    return first_point == "default" or (first_point == "auto" and SAMPLERS[sampler].first_point)


def conditional_dims(space: SearchSpace) -> list[str]:
    """Dimensions that some trials do not sample: ``when:`` ones, and the value of a
    ``loguniform_or_zero`` (absent when its switch says off)."""
    return [d.key for d in space.dimensions if d.when or d.type == "loguniform_or_zero"]


def categorical_dims(space: SearchSpace) -> list[str]:
    return [d.key for d in space.dimensions if d.type in ("categorical", "loguniform_or_zero")]


@dataclass(frozen=True)
class Choice:
    name: str  # a SAMPLERS name
    notes: tuple[str, ...] = ()  # what to tell the user: auto's reason, a deprecation, a fall-back


def choose(searcher: str, space: SearchSpace, trials: int, objectives: int = 1) -> Choice:
    """The sampler ``searcher`` means for this space and budget (and number of
    ``objectives``), with what to print about it. ``searcher`` must be one of
    ``SEARCHERS`` (``SearchConfig`` checks, also that it takes several objectives)."""
    notes = []
    if searcher in ALIASES:
        notes.append(f"--searcher {searcher} is deprecated and means {ALIASES[searcher]} now; "
                     f"say --searcher {ALIASES[searcher]}")
        searcher = ALIASES[searcher]
    if searcher == AUTO:
        searcher, why = _auto(space, trials)
        many = f" for {objectives} objectives" if objectives > 1 else ""
        notes.append(f"--searcher auto chose {searcher}{many}: {why}")
    if (conditional := conditional_dims(space)) and not SAMPLERS[searcher].models_conditionals:
        notes.append(f"{searcher} cannot model dimensions absent from some trials ({', '.join(conditional)}): "
                     "it draws them at random and models the others; tpe models them")
    return Choice(searcher, tuple(notes))


def _auto(space: SearchSpace, trials: int) -> tuple[str, str]:
    low, high = GP_TRIALS
    if not low <= trials <= high:
        return "tpe", f"{trials} trials lie outside {low}-{high}, where Optuna recommends GP"
    if odd := list(dict.fromkeys(categorical_dims(space) + conditional_dims(space))):
        return "tpe", f"categorical or conditional dimensions ({', '.join(odd)}), which TPE models"
    return "gp", f"{trials} trials (GP's range is {low}-{high}) and only continuous or int dimensions"


def build_sampler(choice: Choice, seed: int) -> optuna.samplers.BaseSampler:
    return SAMPLERS[choice.name].build(seed)
