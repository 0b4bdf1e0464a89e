"""The search's tables, fed by a Tune callback in the driver process.

``trials.parquet`` (one row per trial) and ``epochs.parquet`` (one row per trial per
epoch) are rewritten atomically as results arrive, so a crash at any moment leaves
readable tables holding every finished trial. A resumed search reloads them: rows are
keyed by trial id (and epoch), so nothing is counted twice.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pyarrow as pa
from ray import tune

from cluster.cost import USAGE_KEYS, Prices, Reserved, total, usage
from cluster.store import ResultsStore
from cluster.tables import EPOCHS_SCHEMA, EpochLog
from cluster.tune_cv import CV_PLAN, FOLD, FoldEpochLog, no_model, cv_epochs_schema, trial_columns, trials_fields
from search_spaces.objectives import Goal, objective_column, pareto_mask
from search_spaces.space import SearchSpace
from search_spaces.stop_rules import STOPPED
from search_spaces.tuner import CHECKPOINT_PATH_KEY
from trainers.distributed import checkpoint_uri
from trainers.config import EARLY_STOP_METRICS
from trainers.configtools import ConfigError, clean_error, records_of
from trainers.loop import STOP_DIVERGED, STOP_EARLY

COMPLETED, EARLY_STOPPED, DIVERGED, FAILED, RUNNING = "completed", "early_stopped", "diverged", "failed", "running"
LOST = "lost"  # started before a crash, after Tune's last snapshot: a resumed search never continues it
BUDGET_STOPPED = "budget_stopped"  # running when the search's budget ran out (cluster.cost.BudgetStopper)
FINAL = (COMPLETED, EARLY_STOPPED, DIVERGED, FAILED, LOST, BUDGET_STOPPED, STOPPED)  # STOPPED: by a stop rule
STOP_FILE = "stop.json"  # why a stopper ended the search, for best.json (the stopper may be a resumed copy)
SUMMARY_METRICS = ("val_accuracy", "val_loss", "val_f1")  # best_<m>: its best over the epochs (min for a loss)
FRONT_STATUSES = (COMPLETED, EARLY_STOPPED, BUDGET_STOPPED, STOPPED)  # trials with a result: the front is among them
PARETO = "pareto"


def param_column(key: str) -> str:
    """``optim.lr`` -> ``optim_lr`` (plain names read well in SQL)."""
    return key.replace(".", "_")


def _param_type(dim) -> pa.DataType:
    if dim.type == "int":
        return pa.int64()
    if dim.type != "categorical":
        return pa.float64()
    kinds = {type(c) for c in dim.choices}
    if kinds == {bool}:
        return pa.bool_()
    if kinds <= {int} and bool not in kinds:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def trials_schema(space: SearchSpace, goals: tuple[Goal, ...] = (), cv: int | None = None) -> pa.Schema:
    """``goals``: a multi-objective search's, each with its ``objective_<name>`` column
    (the value Optuna was told) and a ``pareto`` column (on the front); ``cv``: a
    cross-validated search's std columns (``cluster.tune_cv``)."""
    fields = [pa.field("trial_id", pa.string()), pa.field("status", pa.string())]
    fields += [pa.field(param_column(d.key), _param_type(d)) for d in space.dimensions]
    fields += [pa.field("epochs_run", pa.int32()), pa.field("best_epoch", pa.int32())]
    for m in SUMMARY_METRICS:
        fields += [pa.field(f"best_{m}", pa.float64()), pa.field(f"final_{m}", pa.float64())]
    fields += [pa.field("wall_seconds", pa.float64())]
    fields += [pa.field(k, pa.float64()) for k in USAGE_KEYS]  # reserved resources x wall_seconds; cost: priced
    fields += [pa.field("checkpoint", pa.string()), pa.field("error", pa.string())]
    if goals:
        fields += [pa.field(objective_column(g.name), pa.float64()) for g in goals] + [pa.field(PARETO, pa.bool_())]
    return pa.schema(fields + (trials_fields(SUMMARY_METRICS) if cv else []))


def front_of(rows: list[dict], goals: tuple[Goal, ...], param_columns) -> list[dict]:
    """best.json's front: each trial on it (``rows`` from ``with_front``) with its objective
    values, parameters and checkpoint, best first by the first objective."""
    sign = -1 if goals[0].mode == "max" else 1
    front = sorted((r for r in rows if r.get(PARETO)), key=lambda r: sign * r[objective_column(goals[0].name)])
    return [{"trial_id": r["trial_id"], "values": {g.name: r[objective_column(g.name)] for g in goals},
             "params": {k: r[k] for k in param_columns if k in r}, "checkpoint": r["checkpoint"]} for r in front]


def with_front(rows: list[dict], goals: tuple[Goal, ...]) -> list[dict]:
    """``rows`` with ``pareto`` set: non-dominated among the trials that ended with a
    result (``FRONT_STATUSES``), by each goal's direction; others False."""
    done = [r for r in rows if r["status"] in FRONT_STATUSES]
    mask = pareto_mask([[r.get(objective_column(g.name)) for g in goals] for r in done], [g.mode for g in goals])
    on_front = {id(r) for r, on in zip(done, mask) if on}
    return [{**r, PARETO: id(r) in on_front} for r in rows]


@dataclass
class TrialRecord:
    trial_id: str
    params: dict
    started: float = field(default_factory=time.time)
    status: str = RUNNING
    epochs: dict = field(default_factory=dict)  # epoch -> metrics
    checkpoints: dict = field(default_factory=dict)  # epoch -> path
    error: str | None = None
    wall_seconds: float | None = None
    objectives: dict = field(default_factory=dict)  # as trials.parquet held them (a resumed search's finished trials)

    def best_epoch(self, metric: str, mode: str) -> int | None:
        """The best epoch; of equal scores the latest, whose checkpoint Tune keeps."""
        finite = {e: m for e, m in self.epochs.items() if _finite(m.get(metric))}
        if not finite:
            return None
        pick = max if mode == "max" else min
        return pick(sorted(finite, reverse=True), key=lambda e: finite[e][metric])

    def best_checkpoint(self, metric: str, mode: str) -> str | None:
        """The checkpoint of the best checkpointed epoch; of equal scores, the latest epoch's.
        Tune keeps ``num_to_keep`` checkpoints and ranks equal scores by age, deleting the
        older: the earliest of tied epochs (common on a small validation set) may be gone."""
        scored = {e: p for e, p in self.checkpoints.items() if _finite(self.epochs.get(e, {}).get(metric))}
        if not scored:
            return None
        pick = max if mode == "max" else min
        return scored[pick(sorted(scored, reverse=True), key=lambda e: self.epochs[e][metric])]

    def best_value(self, metric: str) -> float | None:
        """``metric``'s own best over the epochs, in its own direction: the best val_loss of a
        search that ranks by val_accuracy may come from another epoch than ``best_epoch``."""
        values = [m[metric] for m in self.epochs.values() if _finite(m.get(metric))]
        pick = max if EARLY_STOP_METRICS[metric] == "max" else min
        return pick(values) if values else None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def trial_params(space: SearchSpace, config: dict) -> dict:
    """Sampled values by train-config key; a loguniform_or_zero switched off reads 0."""
    from search_spaces.space import params_to_keys

    keys = params_to_keys(config)
    return {d.key: keys.get(d.key) for d in space.dimensions}


class SearchResultsCallback(tune.Callback):
    """Writes the search's tables and prints a line as each trial ends. It is also the
    search's ledger: what its trials used so far (``spent``), which ``BudgetStopper`` reads."""

    reserved = Reserved(cpus=0.0)  # class defaults: a search pickled before these existed resumes
    prices: Prices | None = None
    report = None
    goals: tuple[Goal, ...] = ()
    cv: int | None = None

    def __init__(self, storage: str, name: str, space: SearchSpace, max_epochs: int,
                 reserved: Reserved | None = None, prices: Prices | None = None, report=None,
                 goals: tuple[Goal, ...] = (), cv: int | None = None):
        """``reserved``: what each trial holds (``Reserved.of(placement, driver_cpus)``);
        ``prices``: to fill the ``cost`` column; ``report(store)``: redraws the report as each
        trial ends (``cluster.report_cmd.LiveReport``); ``goals``: a multi-objective search's;
        ``cv``: a cross-validated search's K (fold rows and std columns, ``cluster.tune_cv``)."""
        self.storage, self.name, self.space, self.max_epochs = storage, name, space, max_epochs
        self.reserved, self.prices, self.report = reserved or Reserved(cpus=0.0), prices, report
        self.goals, self.cv = tuple(goals), cv
        self._store: ResultsStore | None = None

    def __getstate__(self):  # Tune pickles callbacks into its experiment state
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")} | {"_store": None}

    # --- state -------------------------------------------------------------
    @property
    def store(self) -> ResultsStore:
        if self._store is None:
            self._store = ResultsStore(self.storage, self.name)
            self._records: dict[str, TrialRecord] = {}
            existing = self._store.read_table("epochs.parquet")
            self._epochs = FoldEpochLog(cv_epochs_schema(), existing) if self.cv else EpochLog(EPOCHS_SCHEMA, existing)
            self._schema = trials_schema(self.space, self.goals, self.cv)
            for row in (t.to_pylist() if (t := self._store.read_table("trials.parquet")) else []):
                self._records[row["trial_id"]] = self._record_from_row(row)
        return self._store

    def _record_from_row(self, row: dict) -> TrialRecord:
        rec = TrialRecord(row["trial_id"], {d.key: row.get(param_column(d.key)) for d in self.space.dimensions},
                          status=row["status"], error=row.get("error"), wall_seconds=row.get("wall_seconds"))
        rec.started = time.time() - (row.get("wall_seconds") or 0.0)
        rec.objectives = {g.name: row.get(objective_column(g.name)) for g in self.goals}
        for epoch_row in self._epochs.rows.values():
            if epoch_row["trial_id"] == rec.trial_id and epoch_row.get(FOLD) is None:  # not a fold's own row
                rec.epochs[epoch_row["epoch"]] = epoch_row
        if row.get("checkpoint") and row.get("best_epoch"):
            rec.checkpoints[row["best_epoch"]] = row["checkpoint"]
        return rec

    def _record(self, trial) -> TrialRecord:
        _ = self.store
        if trial.trial_id not in self._records:
            self._records[trial.trial_id] = TrialRecord(trial.trial_id, trial_params(self.space, trial.config))
        return self._records[trial.trial_id]

    # --- Tune hooks ----------------------------------------------------------
    def on_step_begin(self, iteration, trials, **info):
        if not getattr(self, "_checked_lost", False):  # the first step of this driver process
            self._checked_lost = True
            self._mark_lost(trials)

    def _mark_lost(self, trials) -> None:
        """Tune resumes from its experiment snapshot, taken at most every 10 s: a trial that
        started after it is unknown to the resumed search, which samples a new one instead.
        Such a trial left unfinished would read "running" for ever."""
        _ = self.store
        known = {t.trial_id for t in trials}
        lost = [r for r in self._records.values() if r.status == RUNNING and r.trial_id not in known]
        for rec in lost:
            rec.status, rec.error = LOST, "started after Tune's last snapshot before the driver died; not resumed"
        if lost:
            self._write_trials()

    def on_trial_start(self, iteration, trials, trial, **info):
        rec = self._record(trial)
        if rec.status in FINAL:  # a resumed search re-opens trials whose end Tune had not saved
            return
        rec.status = RUNNING
        self._write_trials()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rec = self._record(trial)
        epoch = int(result["epoch"])
        rec.epochs[epoch] = dict(result)
        if result.get(CHECKPOINT_PATH_KEY):  # a multi-worker trial's Train checkpoint
            rec.checkpoints[epoch] = result[CHECKPOINT_PATH_KEY]
        if self.cv:
            self._epochs.add_result(result, trial.trial_id)
        else:
            self._epochs.add({**result, "trial_id": trial.trial_id})
        self.store.write_table("epochs.parquet", self._epochs.table())

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        epoch = (trial.last_result or {}).get("epoch")
        if epoch is not None and not self.cv:  # a --cv trial's checkpoint is its folds, no model (tune_cv.NO_MODEL)
            self._record(trial).checkpoints[int(epoch)] = checkpoint_uri(checkpoint)

    def on_trial_complete(self, iteration, trials, trial, **info):
        rec = self._record(trial)
        if rec.status in FINAL:
            return
        last = rec.epochs[max(rec.epochs)] if rec.epochs else {}
        if last.get("stop_reason") == STOP_DIVERGED:
            rec.status, rec.error = DIVERGED, last.get("message")
        elif last.get("stop_reason") == STOP_EARLY or (rec.epochs and max(rec.epochs) < self.max_epochs):
            rec.status = EARLY_STOPPED  # its own patience, or ASHA
        else:
            rec.status = COMPLETED
        self._finish(rec)

    def on_trial_error(self, iteration, trials, trial, **info):
        rec = self._record(trial)
        if rec.status in FINAL:
            return
        rec.status = FAILED
        error = trial.get_error() or "error (no trace stored)"
        rec.error = _last_line(str(error))
        self._finish(rec)

    # --- the ledger ----------------------------------------------------------------
    def spent(self) -> dict:
        """``cpu_seconds``, ``gpu_seconds``, ``cost`` of every trial: finished ones over their
        wall time, running ones so far (a resumed search counts the trials of before)."""
        _ = self.store
        now = time.time()
        rows = [usage(self.reserved, r.wall_seconds if r.status != RUNNING else now - r.started, self.prices)
                for r in self._records.values()]
        return total(rows)

    def budget_spent(self, reason: str, status: str = BUDGET_STOPPED) -> None:
        """Tune stops every running trial now (``Stopper.stop_all``) without calling
        ``on_trial_complete``: they end here, at the moment the budget (or a stop rule,
        ``status`` ``stopped``) ended the search."""
        print(f"raysweep tune: {reason}; no new trials, stopping the running ones", flush=True)
        _, now = self.store, time.time()
        self.store.write_json(STOP_FILE, {"stop_reason": reason})
        for rec in [r for r in self._records.values() if r.status == RUNNING]:
            rec.status = status
            self._finish(rec, now)

    # --- writing -----------------------------------------------------------------
    def _finish(self, rec: TrialRecord, now: float | None = None) -> None:
        rec.wall_seconds = (now or time.time()) - rec.started
        self._write_trials()
        print(self.describe(rec), flush=True)
        if self.report is not None:
            self.report(self.store)

    def describe(self, rec: TrialRecord) -> str:
        m = self.space.metric
        best = rec.best_epoch(m, self.space.mode)
        score = f"best {m} {rec.epochs[best][m]:.4f} (epoch {best})" if best else "no finite result"
        if best and self.cv:
            score += f" ± {rec.epochs[best].get(f'{m}_std') or 0:.4f} over {self.cv} folds"
        params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in rec.params.items())
        reason = f"  [{rec.error}]" if rec.error else ""
        row = self._row(rec) if self.goals else {}
        values = "".join(f"  {g.name} {_short(row[objective_column(g.name)])}" for g in self.goals[1:]
                         if row.get(objective_column(g.name)) is not None)
        return f"trial {rec.trial_id} {rec.status:<14} epochs {len(rec.epochs):>2}  {score}{values}  {params}{reason}"

    def row_of(self, trial_id: str) -> dict | None:
        """A trial's row of ``trials.parquet`` as it stands (what the trackers log)."""
        rec = self._records.get(trial_id) if self._store is not None else None
        return self._row(rec) if rec else None

    def _write_trials(self) -> None:
        rows = [self._row(r) for r in self._records.values()]
        rows = with_front(rows, self.goals) if self.goals else rows
        columns = {f.name: [row.get(f.name) for row in rows] for f in self._schema}
        self.store.write_table("trials.parquet", pa.table(columns, schema=self._schema))

    def _row(self, rec: TrialRecord) -> dict:
        m, mode = self.space.metric, self.space.mode
        best = rec.best_epoch(m, mode)
        final = rec.epochs[max(rec.epochs)] if rec.epochs else {}
        row = {"trial_id": rec.trial_id, "status": rec.status, "epochs_run": len(rec.epochs),
               "best_epoch": best, "wall_seconds": rec.wall_seconds, "error": rec.error,
               "checkpoint": rec.best_checkpoint(m, mode), **usage(self.reserved, rec.wall_seconds, self.prices)}
        row.update({param_column(k): _cast(v) for k, v in rec.params.items()})
        for name in SUMMARY_METRICS:
            row[f"best_{name}"] = rec.best_value(name)
            row[f"final_{name}"] = final.get(name)
        at_best = rec.epochs.get(best, {}) if best is not None else {}
        for g in self.goals:  # the trial's point: its values at its best epoch (what Optuna was told)
            row[objective_column(g.name)] = at_best.get(g.name, rec.objectives.get(g.name))
        return row | (trial_columns(rec, SUMMARY_METRICS) if self.cv else {})


def _cast(v):
    return str(v) if isinstance(v, str) else v


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _last_line(text: str) -> str:
    """A failed trial's reason for its table cell: the traceback's last line, without
    library build paths."""
    lines = [line for line in clean_error(text).strip().splitlines() if line.strip()]
    return lines[-1][-500:] if lines else text


def trial_checkpoint(experiment: str, trial_id: str) -> str:
    """``--checkpoint EXPERIMENT --trial ID``: that trial's checkpoint (its best epoch's, as
    ``trials.parquet`` holds it), e.g. any trial of a Pareto front. Refused with the known
    ids (the front's first) when the trial or its checkpoint is missing."""
    from cluster.results_cmd import split_experiment

    store = ResultsStore(*split_experiment(experiment))
    with records_of(store.uri):
        return _trial_checkpoint(store, experiment, trial_id)


def _trial_checkpoint(store: ResultsStore, experiment: str, trial_id: str) -> str:
    from cluster.results_cmd import front_first

    table = store.read_table("trials.parquet")
    if table is None:
        raise ConfigError([f"--trial: {experiment} holds no trials.parquet (not a tune experiment); drop --trial "
                           "or point --checkpoint at a search"])
    rows = front_first(table.to_pylist())
    row = next((r for r in rows if r["trial_id"] == trial_id), None)
    if row is not None and store.exists(CV_PLAN):
        raise ConfigError([f"--trial {trial_id}: " + no_model(store.read_json(CV_PLAN)["folds"], store.uri)])
    if row is None or not row.get("checkpoint"):
        known = ", ".join(r["trial_id"] for r in rows if r.get("checkpoint"))
        why = "is not a trial of" if row is None else f"({row['status']}) has no checkpoint in"
        raise ConfigError([f"--trial: {trial_id!r} {why} {store.uri}; trials with a checkpoint: {known or 'none'}"])
    return row["checkpoint"]
