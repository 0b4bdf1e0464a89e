"""A search: OptunaSearch (``search_spaces.samplers``) + ASHA over one space, one Tune trial per train run.

A one-worker trial runs the training loop inside the Tune function itself (no
``TorchTrainer``: its start-up would cost more than a small trial's training). A trial of
several workers starts Ray's ``TorchTrainer``, whose controller actor queues each report
to the trial (``QueueReportToTune``). Results reach the caller through Tune
callbacks it hands down.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from search_spaces.objectives import (Goal, TrialObjectives, default_scheduler, objective_problems,  # noqa: F401
                                      parse_objectives, trial_objectives)
from search_spaces.cv_trial import cv_search_problems, fit_folds, load_bundle, save_bundle
from search_spaces.samplers import FIRST_POINTS, SEARCHERS, build_sampler, choose, starts_at_default
from search_spaces.space import SearchSpace
from search_spaces.stop_rules import StopRules, parse_target
from trainers.checkpoints import load_state, save_state
from trainers import ray_private
from trainers.config import EPOCHS_MAX, SEED_MAX
from trainers.configtools import ConfigError, shown, type_problems
from trainers.data import ImageData
from trainers.distributed import Placement, checkpoint_uri, run_training, times_fitting
from trainers.loop import STOP_DIVERGED, StreamedInputs, WorkerContext, fit
from trainers.streaming import StreamPlan, build_dataset

SCHEDULERS = ("asha", "none")
CHECKPOINT_PATH_KEY = "checkpoint_path"
DRIVER_MEMORY_BYTES = 64 * 2**20  # a trial's process: Tune's function, or Ray Train's controller


@dataclass(frozen=True)
class SearchConfig:
    """How a search runs; validated before any Ray process starts."""

    trials: int = 12
    max_epochs: int = 8
    searcher: str = "auto"  # search_spaces.samplers: tpe, gp, qmc, random, or auto (from space and trials)
    scheduler: str = "asha"
    grace_period: int = 2
    reduction_factor: int = 3
    concurrent: int | None = None  # default: as many as the cluster fits
    seed: int = 0
    placement: Placement = field(default_factory=Placement)
    trial_max_failures: int = 1
    # Stop the search once its trials have used this much (reserved resources x wall time;
    # cost needs prices): no new trial, the running ones stopped (cluster.cost.BudgetStopper).
    budget_gpu_hours: float | None = None
    budget_cpu_hours: float | None = None
    budget_cost: float | None = None
    # Stop rules (search_spaces.stop_rules): "METRIC=VALUE" reached by a trial; wall seconds.
    target: str | None = None
    time_budget_s: float | None = None
    # Several objectives (search_spaces.objectives): "val_accuracy:max,latency_ms:min" or a list of such items.
    objectives: str | tuple | list | None = None
    # K-fold cross-validation in each trial (search_spaces.cv_trial): folds seeded by ``seed``.
    cv: int | None = None
    # The space's default point as the first trial: "auto" (the samplers that learn from it,
    # tpe and gp), "default" (every searcher: comparisons start equal) or "none".
    first_point: str = "auto"

    def problems(self) -> list[str]:
        if wrong := self.type_problems():
            return wrong  # the checks below compare numbers
        out = []
        if self.trials < 1:
            out.append(f"--trials: {self.trials} must be >= 1")
        if not 0 <= self.seed <= SEED_MAX:
            out.append(f"--seed: {shown(self.seed)} must lie in 0..{SEED_MAX} (what Optuna's samplers take)")
        if not 1 <= self.max_epochs <= EPOCHS_MAX:
            out.append(f"--max-epochs: {self.max_epochs} must lie in 1..{EPOCHS_MAX} (the bound of train.epochs)")
        if self.searcher not in SEARCHERS:
            out.append(f"--searcher: {self.searcher!r} is not one of {', '.join(SEARCHERS)}")
        if self.scheduler not in SCHEDULERS:
            out.append(f"--scheduler: {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.grace_period < 1 or self.grace_period > self.max_epochs:
            out.append(f"--grace-period: {self.grace_period} must lie in 1..--max-epochs ({self.max_epochs})")
        if self.reduction_factor < 2:
            out.append(f"--reduction-factor: {self.reduction_factor} must be >= 2")
        if self.trial_max_failures < 0:
            out.append(f"--trial-retries: {self.trial_max_failures} must be >= 0")
        if self.first_point not in FIRST_POINTS:
            out.append(f"--first-point: {self.first_point!r} is not one of {', '.join(FIRST_POINTS)}")
        if self.concurrent is not None and self.concurrent < 1:
            out.append(f"--concurrent: {self.concurrent} must be >= 1")
        if self.placement.workers < 1:
            out.append(f"--workers-per-trial: {self.placement.workers} must be >= 1")
        if self.placement.cpus_per_worker <= 0:
            out.append(f"--cpus-per-worker: {self.placement.cpus_per_worker} must be > 0")
        if self.placement.use_gpu and not 0 < self.placement.gpus_per_worker <= 1:
            out.append(f"--gpus-per-worker: {self.placement.gpus_per_worker} must lie in (0, 1]")
        for flag, value in (("--budget-gpu-hours", self.budget_gpu_hours),
                            ("--budget-cpu-hours", self.budget_cpu_hours), ("--budget-cost", self.budget_cost)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                out.append(f"{flag}: {value!r} must be a finite number > 0 (or left out: no budget)")
        out += self._stop_rule_problems()
        out += objective_problems(self)
        return out + cv_search_problems(self)

    def type_problems(self) -> list[str]:
        """The API passes values as given (the CLI's argparse has typed them already)."""
        objectives = self.objectives
        if not (objectives is None or isinstance(objectives, str) or (
                isinstance(objectives, (list, tuple)) and all(isinstance(o, str) for o in objectives))):
            return [f"--objectives (objectives=): {shown(objectives)} must be text such as "
                    "'val_accuracy:max,params:min' or a list of such items"]
        return type_problems(self, whole={"trials": "--trials", "max_epochs": "--max-epochs", "seed": "--seed",
                                          "grace_period": "--grace-period", "reduction_factor": "--reduction-factor",
                                          "trial_max_failures": "--trial-retries", "concurrent": "--concurrent",
                                          "cv": "--cv"},
                             text={"searcher": "--searcher", "scheduler": "--scheduler",
                                   "first_point": "--first-point"}, optional=("concurrent", "cv"))

    @property
    def goals(self) -> tuple[Goal, ...]:
        """The parsed objectives; () for a single-metric search."""
        return parse_objectives(self.objectives)

    def _stop_rule_problems(self) -> list[str]:
        out = []
        if self.target is not None:
            try:
                parse_target(self.target)
            except ConfigError as e:
                out += e.problems
        t = self.time_budget_s
        number = isinstance(t, (int, float)) and not isinstance(t, bool)
        if t is not None and not (number and math.isfinite(t) and t > 0):
            out.append(f"--time-budget: {t!r} must be a duration > 0, e.g. 30m (the API's time_budget_s: seconds)")
        return out

    def stop_rules(self, ledger=None) -> StopRules | None:
        """The stopper of ``target`` and ``time_budget_s``; None when neither is set."""
        if self.target is None and self.time_budget_s is None:
            return None
        target = parse_target(self.target) if self.target is not None else None
        return StopRules(target, self.time_budget_s, ledger)

    def validate(self) -> "SearchConfig":
        if problems := self.problems():
            raise ConfigError(problems)
        return self

    @property
    def driver_cpus(self) -> float:
        """A one-worker trial trains inside its Tune function (which holds the worker's
        resources); a multi-worker trial's function only waits on its TorchTrainer, whose
        workers hold theirs, so the function takes no CPU of its own."""
        return 0.0


class TuneReporter:
    """Reports of a one-worker trial go straight to Tune, with checkpoints (and the trial's
    objective values, ``extra``, in each)."""

    save, load = staticmethod(save_state), staticmethod(load_state)  # the checkpoint's form

    def __init__(self, extra: TrialObjectives | None = None):
        self.extra = extra

    def restore(self) -> dict | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return self.load(directory)

    def report(self, metrics: dict, state: dict | None) -> None:
        if self.extra is not None:
            metrics = {**metrics, **self.extra()}
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            self.save(state, directory)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


class TuneFoldsReporter(TuneReporter):
    """A cross-validated trial's reports: its bundle of fold states is the checkpoint."""

    save, load = staticmethod(save_bundle), staticmethod(load_bundle)


def run_trial(params: dict, *, space: SearchSpace, base: dict, data: ImageData | StreamPlan, placement: Placement,
              train_storage: str, goals: tuple[Goal, ...] = (), cost_per_s: float | None = None,
              cv: int | None = None, cv_seed: int = 0) -> None:
    """One Tune trial: the sampled ``params`` applied to ``base`` make one train run.
    ``data``: an in-memory set, or the plan of a streamed one (``trainers.streaming``);
    ``goals``: a multi-objective search's objectives, whose values each report carries;
    ``cv``: K folds of ``data`` (seeded by ``cv_seed``) advancing together (``cv_trial``)."""
    started = time.time()
    cfg = space.trial_config(base, params)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch
    if placement.workers == 1:
        use_gpu = placement.use_gpu and torch.cuda.is_available()
        ctx = WorkerContext(device=torch.device("cuda" if use_gpu else "cpu"))
        extra = trial_objectives(goals, cfg, data, ctx.device, cost_per_s, started) if goals else None
        if cv:
            fit_folds(cfg, data, ctx, TuneFoldsReporter(), cv, cv_seed)
            return
        inputs = None
        if isinstance(data, StreamPlan):  # this trial reads the datasets itself, batch by batch
            inputs = StreamedInputs(data, build_dataset(data, "train"), build_dataset(data, "val"), ctx, cfg)
        fit(cfg, data, ctx, TuneReporter(extra), inputs)
        return
    trial_id = tune.get_context().get_trial_id()
    # Measured here, on CPU: this process holds no GPU (SearchConfig refuses latency_ms with --gpu then).
    extra = trial_objectives(goals, cfg, data, torch.device("cpu"), cost_per_s, started) if goals else None
    run_training(cfg, data if isinstance(data, StreamPlan) else ray.put(data), placement, train_storage,
                 name=f"trial_{trial_id}", callbacks=[QueueReportToTune(extra)], in_trial=True)


class QueueReportToTune(TuneReportCallback):
    """Ray's ``TuneReportCallback`` (its controller actor queues rank 0's metrics to the
    trial), with the checkpoint's path as a full URI: Ray's gives ``checkpoint.path``,
    which lacks the scheme on remote storage. (Until 2026-11-30 the trial hosted Ray
    Train's controller in its own thread, through private parts: no gain was measured,
    docs/internals.md.) ``extra``: the trial's objective values, added to each report."""

    def __init__(self, extra: TrialObjectives | None = None):
        super().__init__()
        self.extra = extra

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        report = dict(metrics[0])
        if self.extra is not None:
            report.update(self.extra())
        if checkpoint:
            report[CHECKPOINT_PATH_KEY] = checkpoint_uri(checkpoint)
        super().after_report(run_context, [report], None)


class GuardedOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna each trial's *best* value, and FAIL for trials that
    errored or diverged (Ray's own tells COMPLETE whenever a metric exists), so the sampler
    never learns from them as if they were results. With several objectives (``metric`` and
    ``mode`` lists, Ray's public multi-objective path) it tells the values of the trial's best
    epoch by the first objective (of equal ones the latest, as the tables pick), all finite."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._best: dict[str, float | list[float]] = {}
        self._diverged: set[str] = set()

    def _open_in_study(self, trial_id: str) -> bool:
        """False for trials the study already finished: after a resume, Tune re-runs
        trials whose end it had not yet saved, but the journal has them complete."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return False
        states = {t.number: t.state for t in self._ot_study.get_trials(deepcopy=False)}
        return states.get(ot_trial.number) == optuna.trial.TrialState.RUNNING

    def on_trial_result(self, trial_id: str, result: dict):
        if result.get("stop_reason") == STOP_DIVERGED:
            self._diverged.add(trial_id)
            return
        if self._keep_best(trial_id, result) and not isinstance(self.metric, list):  # Optuna: no steps for several
            super().on_trial_result(trial_id, result)

    def _keep_best(self, trial_id: str, result: dict) -> bool:
        """Whether ``result`` holds a value to learn from (the trial's best kept)."""
        several = isinstance(self.metric, list)
        names, modes = (self.metric, self.mode) if several else ([self.metric], [self.mode])
        values = [result.get(m) for m in names]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) \
                or not self._open_in_study(trial_id):
            return False
        sign = 1 if modes[0] == "max" else -1
        kept = self._best.get(trial_id)
        first = kept[0] if several and kept is not None else kept
        if kept is None or sign * (values[0] - first) > 0 or (several and values[0] == first):
            self._best[trial_id] = values if several else values[0]
        return True

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if not self._open_in_study(trial_id):
            return
        failed = error or trial_id in self._diverged or (result or {}).get("stop_reason") == STOP_DIVERGED
        if result and not failed:  # a result a stopper ended the trial on never reached on_trial_result
            self._keep_best(trial_id, result)
        ot_trial = self._ot_trials[trial_id]
        if failed or trial_id not in self._best:
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
        else:
            self._ot_study.tell(ot_trial, self._best[trial_id], state=optuna.trial.TrialState.COMPLETE)
        self._completed_trials.add(trial_id)


def optuna_storage(experiment_dir: str | None):
    """A journal file in the experiment directory (local storage), so optuna-dashboard can
    open the study and a resumed search continues it; in memory for remote storage."""
    if experiment_dir is None:
        return None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(experiment_dir).mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(Path(experiment_dir) / "optuna.journal")))


def build_searcher(space: SearchSpace, search: SearchConfig, study_name: str, experiment_dir: str | None):
    """``search.searcher``'s sampler (``auto`` and aliases resolved; the caller prints why)."""
    choice = choose(search.searcher, space, search.trials, max(1, len(search.goals)))
    goals = search.goals
    metric, mode = ([g.name for g in goals], [g.mode for g in goals]) if goals else (space.metric, space.mode)
    return GuardedOptunaSearch(
        space=space.define_by_run(), metric=metric, mode=mode, sampler=build_sampler(choice, search.seed),
        points_to_evaluate=[space.default_point()] if starts_at_default(search.first_point, choice.name) else None,
        study_name=study_name, storage=optuna_storage(experiment_dir),
    )


def build_scheduler(space: SearchSpace, search: SearchConfig):
    if search.scheduler == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", metric=space.metric, mode=space.mode, max_t=search.max_epochs,
                         grace_period=search.grace_period, reduction_factor=search.reduction_factor)


def concurrency(search: SearchConfig, resources: dict[str, float]) -> int:
    """Trials that fit at once in ``resources`` (what the cluster has or can grow to):
    each takes its function's CPUs plus its workers' CPUs (and GPUs)."""
    p = search.placement
    fits = times_fitting(resources.get("CPU", 0.0), search.driver_cpus + p.workers * p.cpus_per_worker)
    if p.use_gpu:
        fits = min(fits, times_fitting(resources.get("GPU", 0.0), p.workers * p.gpus_per_worker))
    return max(1, min(search.trials, search.concurrent or fits))


def trainable(space: SearchSpace, base: dict, data: ImageData, search: SearchConfig, experiment_uri: str,
              cost_per_s: float | None = None):
    p = search.placement
    fn = tune.with_parameters(run_trial, space=space, base=base, data=data, placement=p,
                              train_storage=experiment_uri, goals=search.goals, cost_per_s=cost_per_s,
                              cv=search.cv, cv_seed=search.seed)
    if p.workers == 1:
        resources = {"cpu": p.cpus_per_worker, "gpu": p.gpus_per_worker if p.use_gpu else 0}
    else:
        # Tune refuses an all-zero request; a little memory stands in for "no CPU".
        resources = {"cpu": search.driver_cpus, "memory": DRIVER_MEMORY_BYTES}
    return tune.with_resources(fn, resources)


def reuse_trial_actors(search: SearchConfig) -> bool:
    """One-worker trials run in the same Ray actor one after another: a new actor per trial
    is a process start and a torch import, ~2x a digits trial's whole cost on 2 cores
    (measured: 20 s vs 8 s a trial). Tune stops a one-worker trial while its thread waits in
    ``tune.report``, so the thread ends at once and the actor is free for the next one.
    Multi-worker trials keep a fresh actor each: their thread waits inside
    ``TorchTrainer.fit``, which an early stop cannot end within Tune's 2 s reset timeout,
    and killing the actor is what gives the stopped trial's workers back."""
    return search.placement.workers == 1


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def check_restorable(experiment_uri: str) -> None:
    """``--resume`` of a directory that holds no Tune search (e.g. a train run's) is refused
    rather than silently starting a new search there."""
    if not tune.Tuner.can_restore(experiment_uri):
        raise ConfigError([f"--resume: {experiment_uri} holds no Tune search to resume (no experiment state); "
                           "check --name, or drop --resume and choose a new --name"])


def build_tuner(space: SearchSpace, base: dict, data: ImageData, search: SearchConfig, storage: str, name: str,
                callbacks: list[Any], concurrent: int, experiment_dir: str | None, resume: bool,
                progress_reporter=None, stopper=None, cost_per_s: float | None = None) -> tune.Tuner:
    """A new Tuner, or with ``resume`` the search at ``<storage>/<name>`` restored (Tune unpickles
    its state from there: resume only from storage that only trusted users can write; the
    callbacks and the ``stopper``, a ``ray.tune.Stopper`` such as a budget, come from there too).
    ``cost_per_s``: a trial's price per second, for a ``cost`` objective."""
    experiment_uri = f"{storage.rstrip('/')}/{name}"
    fn = trainable(space, base, data, search, experiment_uri, cost_per_s)
    if resume:
        check_restorable(experiment_uri)
        ray_private.forgive_deleted_checkpoints()
        return tune.Tuner.restore(experiment_uri, trainable=fn, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    return tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(space, search, name, experiment_dir),
            scheduler=build_scheduler(space, search),
            num_samples=search.trials,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=trial_dirname,
            reuse_actors=reuse_trial_actors(search),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=callbacks,
            stop=stopper,
            failure_config=tune.FailureConfig(max_failures=search.trial_max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=space.metric, checkpoint_score_order=space.mode),
            progress_reporter=progress_reporter,
            verbose=1,
        ),
    )
