"""`raysweep tune`: a hyperparameter search, its tables, plots and best model."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field, replace

import pyarrow as pa

from cluster.cli import (EXIT_FAILED, EXIT_OK, add_common, add_config, add_price, add_tracking, command,
                         non_negative_int, positive_float, positive_int, tracking_options)
from cluster.connect import capacity, check_fits, connect
from cluster.cost import Budget, BudgetStopper, Prices, Reserved, describe, parse_prices, total
from cluster.guard import check_run_target, safe_name_part
from cluster.plots import importance, learning_curves, optimisation_history, pareto_front
from cluster.report_cmd import LiveReport, try_write_report
from cluster.store import ResultsStore
from cluster.tracking import SearchTracking, TrackingOptions, open_tracker, search_params, track_search_end
from cluster.train_cmd import check_placement, evaluate_on_test
from cluster.tune_cv import check_cv_request, cv_record, keep_cv_plan, mean_rows
from cluster.tune_results import (BUDGET_STOPPED, COMPLETED, EARLY_STOPPED, PARETO, STOP_FILE, STOPPED,
                                  SearchResultsCallback, front_of)
from search_spaces.objectives import COST, OBJECTIVES, objective_column
from search_spaces.samplers import choose
from search_spaces.space import SearchSpace, load_space
from search_spaces.stop_rules import parse_duration_s
from search_spaces.tuner import (FIRST_POINTS, SEARCHERS, SCHEDULERS, SearchConfig, build_tuner, check_restorable,
                                 concurrency, default_scheduler)
from trainers.config import load_run_values
from trainers.configpaths import check_paths
from trainers.configtools import ConfigError, merge
from trainers.streaming import DECODE_CPUS, StreamPlan, load_for_training
from trainers.distributed import Placement
from ray.train import Checkpoint
from ray.tune.stopper import CombinedStopper

GOOD = (COMPLETED, EARLY_STOPPED, BUDGET_STOPPED, STOPPED)


@dataclass(frozen=True)
class TuneRequest:
    space: SearchSpace
    user: dict  # what the user set (--config/--set), over the space's fixed keys
    search: SearchConfig
    storage: str
    name: str
    address: str | None = None
    resume: bool = False  # continue the search at <storage>/<name>; without it that name must be new
    prices: Prices | None = None  # fills the cost columns and totals; needed by a cost budget
    tracking: TrackingOptions = field(default_factory=TrackingOptions)  # MLflow / TensorBoard (cluster.tracking)


def _arguments(p):
    p.add_argument("--space", required=True, help="a shipped space (digits_cnn, cifar_fast, cifar_resnet18, "
                   "transfer_resnet50) or a YAML file")
    add_config(p)
    add_common(p)
    d = SearchConfig()
    p.add_argument("--trials", type=positive_int, default=d.trials)
    p.add_argument("--max-epochs", type=positive_int, default=d.max_epochs)
    p.add_argument("--workers-per-trial", type=positive_int, default=1)
    p.add_argument("--cpus-per-worker", type=positive_float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="GPUs for the workers")
    p.add_argument("--gpus-per-worker", type=positive_float, default=1.0, help="fractions share a GPU, e.g. 0.5")
    p.add_argument("--concurrent", type=positive_int, help="trials at once (default: as many as the cluster fits)")
    p.add_argument("--searcher", choices=SEARCHERS, default=d.searcher,
                   help="Optuna sampler: tpe, gp, qmc (Sobol), random, nsga2, or auto (default: gp for 10-100 trials "
                   "over continuous/int dimensions, else tpe); optuna is a deprecated name of tpe")
    p.add_argument("--first-point", choices=FIRST_POINTS, default=d.first_point, help="the space's default: values as "
                   "the first trial: auto (tpe and gp start there), default (every searcher), none")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="asha (the default) or none (the default with --objectives, "
                   "which refuses asha)")
    p.add_argument("--objectives", metavar="NAME:max|min,...", help="2 or 3 objectives for a Pareto front, the first a "
                   f"validation metric, e.g. val_accuracy:max,latency_ms:min; known: {', '.join(OBJECTIVES.names())} "
                   "(cost needs --price)")
    p.add_argument("--grace-period", type=positive_int, default=d.grace_period, help="ASHA: epochs before a trial can stop")
    p.add_argument("--reduction-factor", type=int, default=d.reduction_factor, help="ASHA: keep 1/r at each rung")
    p.add_argument("--seed", type=int, default=d.seed, help="the sampler's seed, and with --cv the folds'")
    p.add_argument("--cv", type=int, metavar="K", help="each trial's objective is the mean over K stratified folds of "
                   "the training images, trained epoch by epoch together (K >= 2; one worker per trial; the test "
                   "split stays untouched; no model is kept: train best_config.yaml with train --cv K --cv-refit)")
    p.add_argument("--trial-retries", type=non_negative_int, default=d.trial_max_failures,
                   help="restarts of a trial that raised (from its last checkpoint) before it counts as failed")
    add_price(p)
    p.add_argument("--budget-gpu-hours", type=positive_float, help="stop the search once its trials reserved this many "
                   "GPU-hours (GPUs x wall time): no new trial, the running ones stopped")
    p.add_argument("--budget-cpu-hours", type=positive_float, help="the same for CPU-hours")
    p.add_argument("--budget-cost", type=positive_float, help="the same for cost (needs --price)")
    p.add_argument("--target", metavar="METRIC=VALUE", help="end the search once a trial reaches this, e.g. "
                   "val_accuracy=0.95 (val_loss: at or below)")
    p.add_argument("--time-budget", type=_duration, metavar="30m", help="start no trial after this much wall time "
                   "and stop the running ones at it (s, m or h)")
    add_tracking(p)


def _duration(text: str) -> float:
    try:
        return parse_duration_s(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.problems[0].removeprefix("--time-budget: ")) from None


@command("tune", "search hyperparameters with Ray Tune + Optuna (TPE, GP, QMC) and ASHA")(_arguments)
def _tune(args) -> int:
    space = load_space(args.space)
    user = load_run_values(args.config, args.overrides)
    placement = Placement(workers=args.workers_per_trial, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                          gpus_per_worker=args.gpus_per_worker)
    search = SearchConfig(trials=args.trials, max_epochs=args.max_epochs, searcher=args.searcher,
                          scheduler=args.scheduler or default_scheduler(args.objectives),
                          grace_period=min(args.grace_period, args.max_epochs),
                          reduction_factor=args.reduction_factor, concurrent=args.concurrent, seed=args.seed,
                          placement=placement, trial_max_failures=args.trial_retries,
                          budget_gpu_hours=args.budget_gpu_hours, budget_cpu_hours=args.budget_cpu_hours,
                          budget_cost=args.budget_cost, target=args.target,
                          time_budget_s=args.time_budget, objectives=args.objectives, cv=args.cv,
                          first_point=args.first_point).validate()
    prices = parse_prices(args.price)
    if args.resume and args.name is None:
        raise ConfigError(["--resume: name the search to continue with --name NAME"])
    name = (f"tune-{safe_name_part(space.name)}-{time.strftime('%Y%m%d-%H%M%S')}" if args.name is None
            else args.name)  # "" is refused, not defaulted
    req = TuneRequest(space, user, search, args.storage, name, args.address, resume=args.resume, prices=prices,
                      tracking=tracking_options(args))
    best = run(req)
    return EXIT_OK if best.get("status") == "ok" else EXIT_FAILED


def base_config(req: TuneRequest) -> dict:
    """The user's settings with the epoch budget (--max-epochs) that every trial shares."""
    return merge(req.user, {"train": {"epochs": req.search.max_epochs}})


def with_objectives(req: TuneRequest) -> TuneRequest:
    """A multi-objective search ranks each trial's epochs (and keeps its checkpoints) by its
    first objective, a validation metric, in place of the space's ``metric``. A ``cost``
    objective needs prices: refused without them."""
    goals = req.search.goals
    if any(g.kind == COST for g in goals) and req.prices is None:
        raise ConfigError(["--objectives cost: a trial's cost needs prices to count it; add --price "
                           "gpu_hour=1.2,cpu_hour=0.05 (the API's prices=...)"])
    return replace(req, space=replace(req.space, metric=goals[0].name)) if goals else req


def run(req: TuneRequest) -> dict:
    """Run (or resume) the search; returns what best.json holds."""
    req = with_objectives(req)
    base = base_config(req)
    check_placement(req.search.placement, "--workers-per-trial")
    budget = Budget.of(req.search)
    if problems := budget.problems(req.prices, req.search.placement.use_gpu):
        raise ConfigError(problems)
    probe = req.space.trial_config(base, req.space.default_point())  # config errors before Ray starts
    check_paths([probe, *req.space.value_configs(base)])  # every bound and choice, with the user's settings
    check_cv_request(req)
    store = check_run_target(req.storage, req.name, req.resume, "tune")
    if req.resume:
        check_restorable(store.uri)
    tracker = open_tracker(req.tracking, store.uri, store.local_path(""), req.name)
    data = load_for_training(probe)
    keep_cv_plan(store, req, data, probe.to_dict()["data"])  # --cv: K against the classes, the same folds on resume
    reserve = DECODE_CPUS if isinstance(data, StreamPlan) else 0.0  # a streamed set's decode tasks
    connect(req.address)
    resources = capacity()
    concurrent = concurrency(req.search, {**resources, "CPU": resources.get("CPU", 0.0) - reserve})
    check_fits(req.search.placement, concurrent=1, driver_cpus=req.search.driver_cpus, reserve_cpus=reserve)
    local_dir = store.local_path("")
    search = _sampler_chosen(req) if not req.resume else req.search  # a resumed search keeps its own
    print(f"raysweep tune: {req.name}: space {req.space.name}, {req.search.trials} trials x up to "
          f"{req.search.max_epochs} epochs" + (f" x {req.search.cv} folds" if req.search.cv else "")
          + f", {req.search.placement.workers} worker(s) per trial, {concurrent} at once, "
          f"{search.searcher} + {req.search.scheduler}; results in {store.uri}", flush=True)
    reserved = Reserved.of(req.search.placement, req.search.driver_cpus)
    callback = SearchResultsCallback(store.storage, req.name, req.space, req.search.max_epochs, reserved, req.prices,
                                     report=LiveReport(req.space.metric, req.space.mode), goals=req.search.goals,
                                     cv=req.search.cv)
    callbacks = [callback, SearchTracking(tracker, callback, req.space, base)] if tracker else [callback]
    stoppers = [s for s in (BudgetStopper(budget, callback) if budget.any else None,
                            req.search.stop_rules(callback)) if s is not None]
    tuner = build_tuner(req.space, base, data, search, store.storage, req.name, callbacks, concurrent,
                        local_dir.rstrip("/") if local_dir else None, resume=req.resume,
                        progress_reporter=live_view(req.space, sort=not stoppers, goals=req.search.goals),
                        stopper=CombinedStopper(*stoppers) if stoppers else None,
                        cost_per_s=req.prices.cost(reserved.cpus, reserved.gpus) if req.prices else None)
    tracker.open("", req.name, search_params(req.space, base, search), {"raysweep.kind": "tune"})
    best = {"status": "failed"}
    try:
        tuner.fit()
        best = finish(req, store, data)
    finally:  # every run closed, with what the tables hold, even when the search raised
        track_search_end(tracker, store, req.space, base, best)
    return best


def _sampler_chosen(req: TuneRequest):
    """``req.search`` with ``auto`` (or a deprecated name) resolved, saying why once."""
    choice = choose(req.search.searcher, req.space, req.search.trials, max(1, len(req.search.goals)))
    for note in choice.notes:
        print(f"raysweep tune: {note}", flush=True)
    return replace(req.search, searcher=choice.name)


def live_view(space: SearchSpace, sort: bool = True, goals=()):
    """Tune's compact trial table (the classic reporter), refreshed every 15 s. ``sort``: by
    the metric; not with a budget or stop rule: Ray 2.60's reporter fails sorting a trial that
    a stopper (``Stopper.stop_all``) stopped before its first result (no metric, TypeError)."""
    from ray.tune import CLIReporter

    # The newer output engine prints a box per result; the table reads better.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    metrics = {"epoch": "epoch", space.metric: space.metric, "val_loss": "val_loss", **{g.name: g.name for g in goals}}
    always = [d for d in space.dimensions if not d.when and d.type != "loguniform_or_zero"]  # in every config
    params = {d.key: d.key.split(".")[-1] for d in always[:6]}
    return CLIReporter(metric_columns=metrics, parameter_columns=params, max_report_frequency=15,
                       sort_by_metric=sort, metric=space.metric, mode=space.mode)


def finish(req: TuneRequest, store: ResultsStore, data) -> dict:
    """Leaderboard, plots, and the best trial's checkpoint on the test split -> best.json."""
    trials, epochs = store.read_table("trials.parquet"), store.read_table("epochs.parquet")
    metric, mode = req.space.metric, req.space.mode
    rows = trials.to_pylist() if trials is not None else []
    good = [r for r in rows if r["status"] in GOOD and r.get(f"best_{metric}") is not None]
    _draw(req, store, trials, epochs, good, metric, mode)
    spent = spending(req, rows, (store.read_json(STOP_FILE) or {}).get("stop_reason"))
    if not good:
        reasons = sorted({f"{r['status']}: {r.get('error') or '?'}" for r in rows}) or ["no trial started"]
        best = {"status": "failed", "trials": len(rows), "reasons": reasons, **spent}
        store.write_json("best.json", best)
        report = _final_report(req, store)
        print(f"raysweep tune: no trial succeeded ({len(rows)} trials):\n  " + "\n  ".join(reasons), flush=True)
        print(f"search ended: {best['stop_reason']}" + (f"\nreport      {report}" if report else "")
              + f"\nnext        raysweep results {store.uri}", flush=True)
        return best
    sign = 1 if mode == "max" else -1
    top = max(good, key=lambda r: sign * r[f"best_{metric}"])
    best = {"status": "ok", "trial_id": top["trial_id"], "metric": metric, "mode": mode,
            "params": {k: top[k] for k in trials.column_names if k in _param_columns(req.space)},
            "config": req.space.trial_config(base_config(req), _params_of(req.space, top)).to_dict(),
            "best_epoch": top["best_epoch"], "checkpoint": top["checkpoint"],
            **{k: top[k] for k in top if k.startswith(("best_val", "final_val"))}, **spent, **_front(req, rows)}
    if req.search.cv:
        best.update(cv_record(req, store, best["config"]))
    if top["checkpoint"]:
        best.update(evaluate_on_test(Checkpoint(top["checkpoint"]), data, req.search.placement.use_gpu,
                                     confusion=True))
    store.write_json("best.json", best)
    report = _final_report(req, store)
    print(leaderboard(rows, metric, mode), flush=True)
    print(f"best trial {top['trial_id']}: {metric} {top[f'best_{metric}']:.4f} at epoch {top['best_epoch']}; "
          + "  ".join(f"{k.removeprefix('test_')} {best[k]:.4f}" for k in
                      ("test_accuracy", "test_precision", "test_recall", "test_f1") if k in best), flush=True)
    if req.search.cv:  # no fold model is judged on the test split (as train --cv without --cv-refit)
        print(f"cv          {req.search.cv}-fold means; test not evaluated: {best['no_checkpoint_reason']}", flush=True)
    if "front" in best:
        print(f"pareto front: {len(best['front'])} of {len(good)} finished trials "
              f"({', '.join(map(str, req.search.goals))}): {' '.join(t['trial_id'] for t in best['front'])}; "
              "pareto.png, best.json's front", flush=True)
    # The last lines: why it ended, then where to look (the report, and the one command)
    print(f"search ended: {best['stop_reason']}", flush=True)
    print(f"results in {store.uri}/ (trials.parquet, epochs.parquet, best.json, *.png, report.html)\n"
          + (f"report      {report}\n" if report else "") +
          f"next        raysweep results {store.uri}", flush=True)
    return best


def _front(req: TuneRequest, rows: list[dict]) -> dict:
    """best.json's objectives and Pareto front, for a multi-objective search."""
    goals = req.search.goals
    if not goals:
        return {}
    return {"objectives": [{"name": g.name, "mode": g.mode} for g in goals],
            "front": front_of(rows, goals, sorted(_param_columns(req.space)))}


def _final_report(req: TuneRequest, store: ResultsStore) -> str | None:
    """report.html as the search ended (no more reloading); where it is, None if it failed (warned)."""
    return try_write_report(store, False, req.space.metric, req.space.mode)


def spending(req: TuneRequest, rows: list[dict], recorded: str | None = None) -> dict:
    """The search's totals over its trials, and why it ended: the reason a stopper
    ``recorded``, a budget it exceeded (printed too), or its trials all ran."""
    spent = total(rows)
    line = f"used {describe(spent)} over {len(rows)} trials"
    if reason := recorded or Budget.of(req.search).exceeded(spent):
        line += f"; stopped: {reason}"
    print(line, flush=True)
    spent["stop_reason"] = reason or f"all {req.search.trials} trials ran (--trials)"
    return spent


def _param_columns(space: SearchSpace) -> set[str]:
    from cluster.tune_results import param_column

    return {param_column(d.key) for d in space.dimensions}


def _params_of(space: SearchSpace, row: dict) -> dict:
    from cluster.tune_results import param_column

    return {d.key: row[param_column(d.key)] for d in space.dimensions if row.get(param_column(d.key)) is not None}


def leaderboard(rows: list[dict], metric: str, mode: str, top: int = 10) -> str:
    sign = 1 if mode == "max" else -1
    ranked = sorted(rows, key=lambda r: -sign * (r.get(f"best_{metric}") or (-1e18 * sign)))
    lines = [f"{'trial':<12} {'status':<14} {'epochs':>6} {('best ' + metric):>18}"]
    for r in ranked[:top]:
        value = r.get(f"best_{metric}")
        lines.append(f"{r['trial_id']:<12} {r['status']:<14} {r['epochs_run']:>6} "
                     f"{(f'{value:.4f}' if value is not None else '-'):>18}")
    return "\n".join(lines)


def _draw(req, store, trials, epochs, good, metric, mode) -> None:
    if trials is None or epochs is None or not epochs.num_rows:
        return
    store.write_bytes("optimisation_history.png", optimisation_history(trials, metric, mode))
    sign = 1 if mode == "max" else -1
    best_id = max(good, key=lambda r: sign * r[f"best_{metric}"])["trial_id"] if good else None
    store.write_bytes("learning_curves.png", learning_curves(mean_rows(epochs), metric, best_id))
    scores = _importances(req.space, trials, metric, mode)
    if scores:
        store.write_bytes("importance.png", importance(scores))
    if goals := req.search.goals:
        columns = [objective_column(g.name) for g in goals]
        done = [r for r in trials.to_pylist() if r["status"] in GOOD and all(r.get(c) is not None for c in columns)]
        if done:
            store.write_bytes("pareto.png", pareto_front([[r[c] for c in columns] for r in done],
                                                         [bool(r[PARETO]) for r in done],
                                                         [g.name for g in goals], [g.mode for g in goals]))


def _importances(space: SearchSpace, trials: pa.Table, metric: str, mode: str) -> dict[str, float]:
    """Optuna's fANOVA importance over the finished trials (needs at least two)."""
    import optuna

    from cluster.tune_results import param_column

    rows = [r for r in trials.to_pylist() if r["status"] in GOOD and r.get(f"best_{metric}") is not None]
    dims = [d for d in space.dimensions if all(r.get(param_column(d.key)) is not None for r in rows)]
    if len(rows) < 2 or not dims:
        return {}
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    dists = {d.key: _distribution(d) for d in dims}
    for r in rows:
        params = {d.key: r[param_column(d.key)] for d in dims}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=r[f"best_{metric}"]))
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # e.g. every trial had the same values
        return {}


def _distribution(d):
    import optuna

    if d.type == "categorical":
        return optuna.distributions.CategoricalDistribution(list(d.choices))
    if d.type == "int":
        return optuna.distributions.IntDistribution(int(d.low), int(d.high))
    if d.type == "loguniform_or_zero":  # 0 is a value here, so no log scale
        return optuna.distributions.FloatDistribution(0.0, d.high)
    return optuna.distributions.FloatDistribution(d.low, d.high, log=d.type.startswith("loguniform"))
