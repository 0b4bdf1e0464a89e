"""Search spaces: YAML files naming what Tune explores, validated before anything starts.

A space file::

    name: digits_cnn
    metric: val_accuracy          # what the searcher and ASHA optimise (mode follows)
    fixed:                        # train-config keys every trial shares
      model.name: simple_cnn
      train.epochs: 8
    params:                       # one entry per searched train-config key
      optim.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2, default: 2.0e-3}
      optim.name: {type: categorical, choices: [adam, momentum], default: adam}
      optim.momentum: {type: uniform, low: 0.8, high: 0.99, when: {optim.name: [momentum, sgd]}}
      optim.l1: {type: loguniform_or_zero, low: 1.0e-6, high: 1.0e-3, default: 0}

Distributions: ``uniform``, ``loguniform``, ``int``, ``categorical`` and
``loguniform_or_zero`` (a coin for "off", then log-uniform). ``when`` makes a dimension
conditional on categorical ones (Optuna's define-by-run). ``default`` values form the
first point the searcher tries.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainers.config import EARLY_STOP_METRICS, TrainRunConfig
from trainers.configtools import ConfigError, merge, set_path, shown, user_path
from trainers.registry import Registry
from trainers.yamlfile import load_yaml_file

SPACES_DIR = Path(__file__).parent
DISTRIBUTIONS: Registry = Registry("distribution")
OFF = "off"  # the categorical switch of loguniform_or_zero


@dataclass(frozen=True)
class Dimension:
    key: str  # "section.field" of TrainRunConfig
    type: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    default: Any = None
    when: dict[str, tuple] = field(default_factory=dict)

    def problems(self) -> list[str]:
        where = f"params.{self.key}"
        out = []
        if self.type not in DISTRIBUTIONS:
            return [f"{where}.type: {self.type!r} is not a known distribution; choose one of: "
                    f"{', '.join(DISTRIBUTIONS.names())}"]
        if self.type == "categorical":
            if not self.choices:
                out.append(f"{where}.choices: empty; list at least one value")
            elif self.default is not None and self.default not in self.choices:
                out.append(f"{where}.default: {self.default!r} is not one of the choices {list(self.choices)}")
            return out
        if self.low is None or self.high is None:
            return [f"{where}: {self.type} needs low and high"]
        if self.low > self.high:
            out.append(f"{where}: low {self.low!r} > high {self.high!r}; swap them")
        if self.type.startswith("loguniform") and self.low <= 0:
            out.append(f"{where}.low: {self.low!r} must be > 0 on a log scale (use loguniform_or_zero to allow 0)")
        if self.default is not None and not (self.low <= self.default <= self.high):
            if not (self.type == "loguniform_or_zero" and self.default == 0):
                out.append(f"{where}.default: {self.default!r} lies outside [{self.low}, {self.high}]")
        return out

    def extremes(self) -> tuple:
        """The values a search can reach at its edges: every choice, or low and high (and
        0, the "off" of loguniform_or_zero)."""
        if self.type == "categorical":
            return self.choices
        if self.type == "int":
            return int(self.low), int(self.high)
        return (0.0, self.low, self.high) if self.type == "loguniform_or_zero" else (self.low, self.high)

    def suggest(self, trial) -> Any:
        return DISTRIBUTIONS[self.type](self, trial)

    def active(self, chosen: dict[str, Any]) -> bool:
        return all(chosen.get(k) in allowed for k, allowed in self.when.items())


@DISTRIBUTIONS.register("uniform")
def _uniform(d: Dimension, trial):
    return trial.suggest_float(d.key, d.low, d.high)


@DISTRIBUTIONS.register("loguniform")
def _loguniform(d: Dimension, trial):
    return trial.suggest_float(d.key, d.low, d.high, log=True)


@DISTRIBUTIONS.register("int")
def _int(d: Dimension, trial):
    return trial.suggest_int(d.key, int(d.low), int(d.high))


@DISTRIBUTIONS.register("categorical")
def _categorical(d: Dimension, trial):
    return trial.suggest_categorical(d.key, list(d.choices))


@DISTRIBUTIONS.register("loguniform_or_zero")
def _loguniform_or_zero(d: Dimension, trial):
    if trial.suggest_categorical(f"{d.key}.{OFF}", [True, False]):
        return 0.0
    return trial.suggest_float(d.key, d.low, d.high, log=True)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    dimensions: tuple[Dimension, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    metric: str = "val_accuracy"
    description: str = ""

    @property
    def mode(self) -> str:
        return EARLY_STOP_METRICS[self.metric]

    def define_by_run(self) -> Callable:
        """Optuna define-by-run function (picklable: Tune saves the searcher with it)."""
        return _DefineByRun(self.dimensions)

    def default_point(self) -> dict[str, Any]:
        """The dimensions' defaults, in Optuna's parameter names (inactive ones left out)."""
        point: dict[str, Any] = {}
        chosen: dict[str, Any] = {}
        for d in self.dimensions:
            if d.default is None or not d.active(chosen):
                continue
            chosen[d.key] = d.default
            if d.type == "loguniform_or_zero":
                point[f"{d.key}.{OFF}"] = d.default == 0
                if d.default != 0:
                    point[d.key] = float(d.default)
            else:
                point[d.key] = d.default
        return point

    def value_configs(self, user: dict) -> list[TrainRunConfig]:
        """The config at every bound and choice of every dimension (the others at their
        defaults, conditions met), each built through the config's own validation, so a
        value the config refuses (lr 200, an unknown optimizer) is refused before the
        search, not as a failed trial. Raises ``ConfigError`` listing every such value."""
        base, configs, problems = self.default_point(), [], []
        for d in self.dimensions:
            for value in d.extremes():
                point = {**base, **{k: allowed[0] for k, allowed in d.when.items()}, **_as_params(d, value)}
                try:
                    configs.append(self.trial_config(user, point))
                except ConfigError as e:
                    problems += [f"params.{d.key}: the value {shown(value)} gives {p}" for p in e.problems]
        if problems:
            raise ConfigError(dict.fromkeys(problems))
        return configs

    def trial_config(self, user: dict, params: dict[str, Any]) -> TrainRunConfig:
        """One trial's validated config: defaults, then the space's fixed keys, then what the
        user set (``--config``/``--set``, as a nested dict, so ``--set data.root=...`` beats a
        space's ``fixed: data.root``), then the trial's sampled values."""
        values: dict = {}
        for key, value in self.fixed.items():
            set_path(values, key.split("."), value)
        values = merge(values, user)
        for key, value in params_to_keys(params).items():
            set_path(values, key.split("."), value)
        return TrainRunConfig.from_dict(values)


@dataclass(frozen=True)
class _DefineByRun:
    dimensions: tuple[Dimension, ...]

    def __call__(self, trial) -> None:
        """Suggest every active dimension, in file order (conditions look back)."""
        chosen: dict[str, Any] = {}
        for d in self.dimensions:
            if d.active(chosen):
                chosen[d.key] = d.suggest(trial)


def _as_params(d: Dimension, value: Any) -> dict[str, Any]:
    """``value`` of ``d`` in Optuna's parameter names (``loguniform_or_zero`` has a switch)."""
    if d.type != "loguniform_or_zero":
        return {d.key: value}
    return {f"{d.key}.{OFF}": True} if value == 0 else {f"{d.key}.{OFF}": False, d.key: value}


def params_to_keys(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's flat params -> train-config keys (``loguniform_or_zero`` switches resolved)."""
    out = {}
    for key, value in params.items():
        if key.endswith(f".{OFF}"):
            if value:
                out[key[: -len(OFF) - 1]] = 0.0
        else:
            out[key] = value
    return out


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{model: {name: x}}`` and ``{"model.name": x}`` both become ``{"model.name": x}``."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def _target_problem(key: str, where: str) -> str | None:
    """A key must name a value of the train config (``section.field[.subfield]``)."""
    cls = TrainRunConfig
    for part in key.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            known = ", ".join(sorted(hints)) or "(none: it is a value)"
            return f"{where}: {key!r} is not a train-config key; {part!r} is unknown there (known: {known})"
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        return f"{where}: {key!r} is a section, not a value; name one of its keys"
    return None


def parse_space(raw: Any, source: str) -> SearchSpace:
    """Validate a space's dict; every problem at once in a ``ConfigError``."""
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a mapping with name, params, fixed"])
    problems = [f"{source}: unknown key {k!r}; known: description, fixed, metric, name, params"
                for k in raw if k not in ("name", "description", "fixed", "metric", "params")]
    metric = raw.get("metric", "val_accuracy")
    if not isinstance(metric, str) or metric not in EARLY_STOP_METRICS:
        problems.append(f"{source}: metric {shown(metric)} is not one of {', '.join(EARLY_STOP_METRICS)}")
        metric = "val_accuracy"
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        problems.append(f"{source}: fixed must be a mapping of train-config keys to values, got {shown(fixed)}")
        fixed = {}
    fixed = _flatten(fixed)
    problems += [p for k in fixed if (p := _target_problem(k, f"{source}: fixed.{k}"))]
    dims = []
    params = raw.get("params") or {}
    if not isinstance(params, dict) or not params:
        problems.append(f"{source}: params is empty; give at least one dimension")
        params = {}
    for key, spec in params.items():
        where = f"{source}: params.{key}"
        if not isinstance(key, str):
            problems.append(f"{where}: a dimension's key must be a train-config key such as optim.lr, "
                            f"not {shown(key)}")
            continue
        if (p := _target_problem(key, where)):
            problems.append(p)
        if key.startswith("data."):
            problems.append(f"{where}: data settings cannot be searched: the data is loaded once, before the "
                            f"search, so every trial would train on the same data; set it under fixed: or with "
                            f"--set {key}=VALUE")
        if not isinstance(spec, dict):
            problems.append(f"{where}: expected a mapping with type, low/high or choices")
            continue
        unknown = set(spec) - {"type", "low", "high", "choices", "default", "when"}
        if unknown:
            problems.append(f"{where}: unknown field(s) {sorted(unknown)}")
        when, when_problems = _conditions(spec.get("when"), dims, where)
        numbers = {f: _num(spec.get(f), f"{where}.{f}", problems) for f in ("low", "high")}
        default = spec.get("default")
        if spec.get("type") != "categorical":
            default = _num(default, f"{where}.default", problems)
        choices = spec.get("choices") or ()
        if not isinstance(choices, (list, tuple)):
            problems.append(f"{where}.choices: expected a list, got {shown(choices)}")
            choices = ()
        problems += when_problems
        bad_number = any(numbers[f] is None and spec.get(f) is not None for f in numbers)
        if when_problems or bad_number:
            continue  # a bad number or condition is reported once, not again by the checks below
        dim = Dimension(key=key, type=str(spec.get("type", "")), choices=tuple(choices), default=default,
                        when=when, **numbers)
        problems += [f"{source}: {p}" for p in dim.problems()]
        dims.append(dim)
    if problems:
        raise ConfigError(problems)
    space = SearchSpace(name=str(raw.get("name", Path(source).stem)), dimensions=tuple(dims), fixed=fixed,
                        metric=metric, description=str(raw.get("description", "")))
    _check_default_config(space, source)
    return space


def _num(v, where: str, problems: list[str]):
    """A space's bound or default as a finite number (YAML reads ``1e-3`` as a string);
    anything else is a problem naming the field, and None."""
    if v is None:
        return None
    number = None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        number = v
    elif isinstance(v, str):
        try:
            number = float(v)
        except ValueError:
            pass
    try:
        finite = number is not None and math.isfinite(number)
    except OverflowError:  # an int of hundreds of digits
        finite = False
    if not finite:
        problems.append(f"{where}: {shown(v)} is not a finite number; give one, e.g. 0.001")
        return None
    return number


def _conditions(raw, before: list[Dimension], where: str) -> tuple[dict[str, tuple], list[str]]:
    """A ``when:`` mapping, checked: each condition names a categorical dimension listed
    before this one (Optuna samples in file order, so a later one is never there yet and
    the dimension would silently never be sampled) and values among that one's choices."""
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        return {}, [f"{where}.when: expected a mapping like {{optim.name: [momentum]}}, got {shown(raw)}"]
    earlier = {d.key: d for d in before}
    when, problems = {}, []
    for cond, values in raw.items():
        allowed = tuple(values if isinstance(values, list) else [values])
        parent = earlier.get(cond)
        if parent is None or parent.type != "categorical":
            problems.append(f"{where}.when: {cond!r} must be a categorical dimension listed before it "
                            f"(earlier categorical ones: {', '.join(d.key for d in before if d.type == 'categorical') or 'none'})")
        elif not allowed:
            problems.append(f"{where}.when: {cond}: [] names no value, so this condition can never hold; list one "
                            f"or more of {list(parent.choices)}")
        elif (stray := [v for v in allowed if v not in parent.choices]):
            problems.append(f"{where}.when: {cond}: {shown(stray)} are not among its choices {list(parent.choices)}, "
                            "so this condition can never hold")
        when[cond] = allowed
    return when, problems


def _check_default_config(space: SearchSpace, source: str) -> None:
    """The fixed keys and the default point must make a valid train config, and so must
    every bound and choice (``SearchSpace.value_configs``)."""
    try:
        space.trial_config({}, space.default_point())
    except ConfigError as e:
        raise ConfigError([f"{source}: with its defaults: {p}" for p in e.problems]) from None
    try:
        space.value_configs({})
    except ConfigError as e:
        raise ConfigError([f"{source}: {p}" for p in e.problems]) from None


def shipped_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(name_or_path: str) -> SearchSpace:
    """A shipped space by name (``digits_cnn``) or a user's YAML file by path."""
    path = user_path(name_or_path, "--space")
    if not path.is_file():
        if name_or_path not in shipped_spaces():
            raise ConfigError([f"--space: {name_or_path!r} is neither a file nor a shipped space; "
                               f"shipped: {', '.join(shipped_spaces())}"])
        path = SPACES_DIR / f"{name_or_path}.yaml"
    return parse_space(load_yaml_file(path, "--space"), str(path))
