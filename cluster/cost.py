"""What a run or a search costs, and budgets that stop a search.

Usage is what a run *reserved* times its wall time: ``cpu_seconds`` = CPUs held x seconds,
``gpu_seconds`` likewise (a 0.25-GPU trial counts a quarter). That is what a cloud bill
charges for: a reserved GPU costs the same whether the step keeps it busy or not. Prices
(``--price gpu_hour=1.2,cpu_hour=0.05``, any currency) turn usage into ``cost``; without
them ``cost`` is empty. ``--price FILE.yaml`` reads prices per node type from a cluster.yaml
or a KubeRay RayCluster/RayJob and charges every run the dearest node type's prices, an
upper bound: which node type a trial ran on is not traced (yet).

A budget (``--budget-gpu-hours``, ``--budget-cpu-hours``, ``--budget-cost``) is checked by
``BudgetStopper``, a Ray Tune ``Stopper``: Tune asks ``stop_all`` at every step of its loop,
and once it says yes Tune starts no new trial and stops the running ones, as its own time
budget (``TimeoutStopper``) does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Mapping

import yaml
from ray.tune.stopper import Stopper

from trainers.configtools import ConfigError, FileReadError, shown
from trainers.yamlfile import (CONSTRUCTOR_ERRORS, MAX_YAML_BYTES, UniqueKeyLoader, check_regular,
                               constructor_problem)

PRICE_EXAMPLE = "gpu_hour=1.2,cpu_hour=0.05"
USAGE_KEYS = ("cpu_seconds", "gpu_seconds", "cost")


@dataclass(frozen=True)
class Prices:
    """Per hour of one reserved CPU or GPU; a price left out costs 0."""

    gpu_hour: float = 0.0
    cpu_hour: float = 0.0

    def cost(self, cpu_seconds: float, gpu_seconds: float) -> float:
        return (cpu_seconds * self.cpu_hour + gpu_seconds * self.gpu_hour) / 3600.0


PRICE_KEYS = tuple(f.name for f in fields(Prices))


def parse_prices(value: str | Mapping | Prices | None, flag: str = "--price") -> Prices | None:
    """``"gpu_hour=1.2,cpu_hour=0.05"`` (the CLI's form) or ``{"gpu_hour": 1.2}`` -> Prices;
    None stays None (no prices: no cost). Every problem is reported at once, naming ``flag``."""
    if value is None or isinstance(value, Prices):
        return value
    if isinstance(value, str) and value.strip().lower().endswith((".yaml", ".yml")):
        return upper_bound(node_type_prices(value.strip(), flag))
    problems: list[str] = []
    pairs = _pairs(value, flag, problems)
    prices: dict[str, float] = {}
    for key, raw in pairs:
        if key not in PRICE_KEYS:
            problems.append(f"{flag}: unknown price {key!r}; known: {', '.join(PRICE_KEYS)} (e.g. {PRICE_EXAMPLE})")
        elif key in prices:
            problems.append(f"{flag}: {key} given twice")
        elif (number := _price(raw)) is None:
            problems.append(f"{flag}: {key}={raw!r} must be a finite number >= 0, e.g. {PRICE_EXAMPLE}")
        else:
            prices[key] = number
    if not pairs and not problems:
        problems.append(f"{flag}: no price given; e.g. {PRICE_EXAMPLE}")
    if problems:
        raise ConfigError(problems)
    return Prices(**prices)


def _pairs(value, flag: str, problems: list[str]) -> list[tuple[str, object]]:
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    if not isinstance(value, str):
        problems.append(f"{flag}: {value!r} is neither KEY=VALUE[,KEY=VALUE] text nor a mapping; e.g. {PRICE_EXAMPLE}")
        return []
    pairs = []
    for item in (part.strip() for part in value.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"{flag}: {item!r} is not KEY=VALUE; e.g. {PRICE_EXAMPLE}")
            continue
        pairs.append((key.strip(), raw.strip()))
    return pairs


def _price(raw) -> float | None:
    if isinstance(raw, bool):
        return None
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


# price -> the key that states it on a node type: a cluster.yaml node type's ``labels`` (the
# only free-form field Ray's schema allows there; Ray also puts them on the node) or a KubeRay
# group's ``template.metadata.annotations``. Both take strings only: ``"1.2"``.
PRICE_LABELS = {"gpu_hour": "raysweep.io/gpu-hour-price", "cpu_hour": "raysweep.io/cpu-hour-price"}
KUBERAY_HEAD_GROUP = "headgroup"  # the node group KubeRay names the head (its ray.io/node-group label)


def node_type_prices(path: str, flag: str = "--price") -> dict[str, Prices]:
    """Each node type that states a price in the cluster file at ``path`` -> its Prices. All
    problems are reported at once, naming the file, the node type, the key and the value."""
    where = f"{flag} {path}"
    types = _node_types(_documents(path, flag), where)
    problems: list[str] = []
    table: dict[str, Prices] = {}
    for name, fields_ in types.items():
        stated = {key: fields_[label] for key, label in PRICE_LABELS.items() if label in fields_}
        prices = {key: n for key, raw in stated.items() if (n := _label_price(raw)) is not None}
        problems += [f"{where}: node type {shown(name)}: {PRICE_LABELS[key]}: {shown(raw)} must be a finite number "
                     '>= 0 written as a string, e.g. "1.2"' for key, raw in stated.items() if key not in prices]
        if stated:
            table[name] = Prices(**prices)
    if not table and not problems:
        problems.append(f"{where}: no node type states a price; give one {' or '.join(PRICE_LABELS.values())} "
                        "(cluster.yaml: available_node_types.TYPE.labels; KubeRay: the group's "
                        "template.metadata.annotations), e.g. \"1.2\"")
    if problems:
        raise ConfigError(problems)
    return table


def upper_bound(table: Mapping[str, Prices]) -> Prices:
    """The dearest price of each resource over the node types: no run can cost more."""
    return Prices(**{key: max(getattr(p, key) for p in table.values()) for key in PRICE_KEYS})


def _label_price(raw) -> float | None:
    return _price(raw) if isinstance(raw, str) else None


def _documents(path: str, flag: str) -> list:
    """The YAML documents of ``path`` (a KubeRay file may hold several)."""
    check_regular(path, f"{flag} {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
        text = raw[:MAX_YAML_BYTES].decode("utf-8")
    except FileNotFoundError:
        raise FileReadError([f"{flag}: no file at {path!r}; give a cluster.yaml or KubeRay RayCluster file, "
                             f"or prices as {PRICE_EXAMPLE}"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise FileReadError([f"{flag} {path}: cannot be read as a YAML file ({e})"]) from None
    if len(raw) > MAX_YAML_BYTES:
        raise FileReadError([f"{flag} {path}: larger than {MAX_YAML_BYTES} bytes; give the cluster file"])
    try:
        # SafeLoader, aliases allowed: KubeRay files share blocks with them (k8s/raycluster.yaml
        # does). An alias is a reference, not a copy, and only a few keys are read here.
        return [d for d in yaml.load_all(text, Loader=UniqueKeyLoader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError([f"{flag} {path}{where}: not valid YAML ({problem})"]) from None
    except RecursionError:
        raise ConfigError([f"{flag} {path}: YAML nested too deeply; give the cluster file"]) from None
    except CONSTRUCTOR_ERRORS as e:
        raise ConfigError([f"{flag} {path}: not valid YAML ({constructor_problem(e)})"]) from None


def _launcher_types(doc: Mapping) -> dict[str, Mapping] | None:
    types = doc.get("available_node_types")
    return {str(k): _mapping(v, "labels") for k, v in types.items()} if isinstance(types, Mapping) else None


def _kuberay_types(doc: Mapping) -> dict[str, Mapping] | None:
    if doc.get("kind") not in ("RayCluster", "RayJob"):
        return None
    spec = _mapping(doc, "spec")
    spec = _mapping(spec, "rayClusterSpec") if doc["kind"] == "RayJob" else spec
    groups = {KUBERAY_HEAD_GROUP: spec.get("headGroupSpec")}
    workers = spec.get("workerGroupSpecs")
    groups |= {str(g.get("groupName")): g for g in (workers if isinstance(workers, list) else [])
               if isinstance(g, Mapping)}
    return {str(k): _mapping(_mapping(_mapping(g, "template"), "metadata"), "annotations")
            for k, g in groups.items() if isinstance(g, Mapping)}


CLUSTER_FILES = (_launcher_types, _kuberay_types)  # each reads its kind of file's node types, or None


def _node_types(docs: list, where: str) -> dict[str, Mapping]:
    """Node type -> where its prices are written, from the first document that is a cluster."""
    for doc in (d for d in docs if isinstance(d, Mapping)):
        for read in CLUSTER_FILES:
            if (types := read(doc)) is not None:
                return types
    raise ConfigError([f"{where}: neither a cluster.yaml (available_node_types) nor a KubeRay RayCluster or RayJob; "
                       f"give one of those, or prices as {PRICE_EXAMPLE}"])


def _mapping(node, key: str) -> Mapping:
    value = node.get(key) if isinstance(node, Mapping) else None
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class Reserved:
    """What one run (or trial) holds from the cluster while it runs."""

    cpus: float
    gpus: float = 0.0

    @classmethod
    def of(cls, placement, driver_cpus: float = 0.0) -> "Reserved":
        """A ``trainers.distributed.Placement``'s workers, plus the CPUs its driver reserves
        (Ray Train's controller takes none; a Tune trial's function: ``SearchConfig.driver_cpus``)."""
        gpus = placement.workers * placement.gpus_per_worker if placement.use_gpu else 0.0
        return cls(cpus=placement.workers * placement.cpus_per_worker + driver_cpus, gpus=gpus)


def usage(reserved: Reserved, wall_seconds: float | None, prices: Prices | None) -> dict:
    """``cpu_seconds``, ``gpu_seconds`` and ``cost`` (None without prices) of ``wall_seconds``
    held; all None when the wall time is unknown."""
    if wall_seconds is None:
        return dict.fromkeys(USAGE_KEYS)
    cpu, gpu = reserved.cpus * wall_seconds, reserved.gpus * wall_seconds
    return {"cpu_seconds": cpu, "gpu_seconds": gpu, "cost": prices.cost(cpu, gpu) if prices else None}


def total(rows: Iterable[Mapping]) -> dict:
    """The sum of each usage column over ``rows`` (missing values skipped); ``cost`` stays
    None when no row has one."""
    rows = list(rows)
    out = {k: sum(r.get(k) or 0.0 for r in rows) for k in ("cpu_seconds", "gpu_seconds")}
    costs = [r["cost"] for r in rows if r.get("cost") is not None]
    out["cost"] = sum(costs) if costs else None
    return out


def describe(spent: Mapping) -> str:
    """``0.0123 CPU-hours, 0 GPU-hours, cost 0.000615``."""
    hours = {k: (spent.get(f"{k}_seconds") or 0) / 3600 for k in ("cpu", "gpu")}
    text = f"{hours['cpu']:.4g} CPU-hours, {hours['gpu']:.4g} GPU-hours"
    return text + (f", cost {spent['cost']:.4g}" if spent.get("cost") is not None else "")


# budget field -> (its flag, its unit, what it measures in a usage dict)
BUDGETS: dict[str, tuple[str, str, Callable[[Mapping], float]]] = {
    "gpu_hours": ("--budget-gpu-hours", "GPU-hours", lambda u: (u.get("gpu_seconds") or 0.0) / 3600),
    "cpu_hours": ("--budget-cpu-hours", "CPU-hours", lambda u: (u.get("cpu_seconds") or 0.0) / 3600),
    "cost": ("--budget-cost", "cost", lambda u: u.get("cost") or 0.0),
}


@dataclass(frozen=True)
class Budget:
    """Limits on a search's total usage; None: no limit."""

    gpu_hours: float | None = None
    cpu_hours: float | None = None
    cost: float | None = None

    @classmethod
    def of(cls, search) -> "Budget":
        """The budget fields of a ``search_spaces.tuner.SearchConfig``."""
        return cls(**{name: getattr(search, f"budget_{name}") for name in BUDGETS})

    @property
    def any(self) -> bool:
        return any(getattr(self, name) is not None for name in BUDGETS)

    def problems(self, prices: Prices | None, use_gpu: bool) -> list[str]:
        """Budgets that could never stop the search."""
        out = []
        if self.cost is not None and prices is None:
            out.append(f"--budget-cost: {self.cost} needs prices to count against; add --price {PRICE_EXAMPLE}")
        if self.gpu_hours is not None and not use_gpu:
            out.append(f"--budget-gpu-hours: {self.gpu_hours} never stops a search whose trials take no GPU; "
                       "add --gpu, or use --budget-cpu-hours")
        return out

    def exceeded(self, spent: Mapping) -> str | None:
        """Why the search must stop (the first limit reached), or None."""
        for name, (flag, unit, measure) in BUDGETS.items():
            limit = getattr(self, name)
            if limit is not None and measure(spent) >= limit:
                return f"{unit} budget spent: {measure(spent):.4g} of {limit:g} ({flag})"
        return None


class BudgetStopper(Stopper):
    """Stops the whole search once ``ledger.spent()`` (finished trials plus the running ones
    so far) reaches the budget, and tells the ledger (``ledger.budget_spent(reason)``) so it
    records the running trials as stopped by it. Tune pickles this with its experiment
    (``tuner.pkl``) together with the ledger, a callback of the same run."""

    def __init__(self, budget: Budget, ledger):
        self.budget, self.ledger = budget, ledger
        self.reason: str | None = None

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.reason is not None  # a result that raced the stop ends its trial too

    def stop_all(self) -> bool:
        if self.reason is None and (reason := self.budget.exceeded(self.ledger.spent())):
            self.reason = reason
            self.ledger.budget_spent(reason)
        return self.reason is not None
