"""Turning plain dicts (YAML, ``--set`` overrides, Ray configs) into validated dataclasses.

Every problem is collected, not raised one at a time, so a user sees all of them at once:
``ConfigError.problems`` is a list of ``"field: message"`` strings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import re
import reprlib
import zipfile
from pathlib import Path
import types
import typing
from contextlib import contextmanager
from typing import Any, Iterable, Mapping


# How much of a user's value an error repeats. A config can hold a megabyte in one value
# (and a YAML bomb, before aliases were refused, gigabytes); echoing it back buries the
# message that says what to fix.
SHOWN_CHARS = 80
PROBLEM_CHARS = 800  # long enough for a message with its fix (the auth one is ~550)


def _bounded_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 3, 6, 6, 6, 6
    short.maxstring = short.maxother = SHOWN_CHARS
    return short


_BOUNDED = _bounded_repr()


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters with ``…`` where longer. A container is
    shown through a bounded ``reprlib`` (a few items, a few levels), so a value that YAML
    aliases blew up to millions of items costs nothing to show."""
    try:
        text = repr(value) if isinstance(value, (str, bytes, int, float, bool, type(None))) else _BOUNDED.repr(value)
    except ValueError:  # an int past Python's 4300-digit limit for str()
        text = f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else "<a value>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _capped(problem: str, limit: int = PROBLEM_CHARS) -> str:
    """A problem line of at most ``limit`` characters: its start (the field) and end (the
    fix) are kept, the middle (a long value that a message built elsewhere repeated) cut."""
    if len(problem) <= limit:
        return problem
    head = limit * 2 // 5
    return f"{problem[:head]}…{problem[len(problem) - (limit - head - 1):]}"


class ConfigError(ValueError):
    """One or more invalid settings; ``problems`` names each field, value and fix."""

    HEADER = "invalid configuration"

    def __init__(self, problems: Iterable[str]):
        self.problems = [_capped(str(p)) for p in problems]
        super().__init__(f"{self.HEADER}:\n" + "\n".join(f"  - {p}" for p in self.problems))


# Where a library built from source tells where it raised: torchvision's
# "decode_png, /__w/vision/.../decode_png.cpp:62, Internal error.", c10's "Exception raised
# from f at /pytorch/c10/...:12 (most recent call first): frame #0 ...". Users need the
# reason, not the build machine's paths.
_SOURCE_AT = re.compile(r"\b\w+, /[^\s,]+\.(?:c|cc|cpp|cu|h|hpp):\d+, ")
_RAISED_FROM = re.compile(r"\s*Exception raised from .*", re.DOTALL)
_SOURCE_PATH = re.compile(r"\s*\(?/\S+\.(?:c|cc|cpp|cu|h|hpp):\d+\)?")


def clean_error(text: str) -> str:
    """An error's text without library build paths and C++ stack frames; the reason kept."""
    text = _RAISED_FROM.sub("", _SOURCE_AT.sub("", str(text)))
    return _SOURCE_PATH.sub("", text).strip()


# What reading and parsing a file can raise: the OS (OSError), parsers of text, JSON,
# Parquet and zip (ValueError: UnicodeDecodeError, JSONDecodeError, ArrowInvalid),
# torch.load on a cut file (RuntimeError from its zip reader, EOFError when empty) and
# pickle (UnpicklingError).
FILE_ERRORS = (OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile)


class FileReadError(ConfigError):
    """A file raysweep reads is missing, unreadable or not what it should be (exit 2)."""

    HEADER = "a file cannot be used"


def json_record(data: bytes | str, path: Any) -> dict:
    """A JSON record raysweep wrote (summary.json, best.json, cv.json, ...): always an object.
    Anything else was changed by hand or is not raysweep's, and every reader would trip on it."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise FileReadError([f"{path}: not a JSON object as raysweep writes it (found {type(value).__name__} "
                             f"{shown(value)}); the file was changed or is not raysweep's"])
    return value


def record_text(record: Mapping, key: str, path: Any) -> str | None:
    """``record[key]`` where it must be text (a checkpoint URI, a reason): None when absent."""
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    raise FileReadError([f"{path}: {key!r} is {shown(value)}, not text; the file was changed or is not raysweep's"])


def user_path(text: Any, field: str) -> Path:
    """A local path a user gave, ``~`` expanded, refused (naming ``field``) where no OS call
    could take it: a NUL byte, ``~user`` for a user this machine does not know, a name longer
    than file systems allow."""
    value = str(text)
    if "\0" in value:
        raise ConfigError([f"{field}: {shown(value)} holds a NUL byte; give a path"])
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # Path.expanduser: "Could not determine home directory."
        raise ConfigError([f"{field}: {shown(value)}: '~' names a user this machine does not know; give the "
                           "path in full"]) from None
    if any(len(part.encode()) > NAME_BYTES for part in path.parts) or len(str(path).encode()) > PATH_BYTES:
        raise ConfigError([f"{field}: {shown(value)} is longer than a path may be ({NAME_BYTES} bytes a name, "
                           f"{PATH_BYTES} in all)"])
    return path


NAME_BYTES, PATH_BYTES = 255, 4095  # Linux's NAME_MAX and PATH_MAX - 1


def out_file_problem(out: Any, option: str = "--out") -> str | None:
    """Why a file cannot be written at ``out`` (None: it can be tried): a directory there, or a
    file where one of its parent directories would have to be."""
    try:
        path = user_path(out, option)
    except ConfigError as e:
        return e.problems[0]
    if path.is_dir():
        return f"{option}: {str(path)!r} is a directory; give a file name in it"
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{option}: {str(parent)!r} is a file, so {str(path)!r} cannot be made under it"
            break
    return None


def type_problems(obj: Any, whole: Mapping[str, str], text: Mapping[str, str] = {},
                  optional: Iterable[str] = ()) -> list[str]:
    """Fields of ``obj`` (name -> the flag that sets it) that are not whole numbers / text, for
    settings a Python caller passes as given; ``optional`` ones may be None."""
    def wrong(name: str, ok) -> bool:
        value = getattr(obj, name)
        return not ok(value) and not (value is None and name in optional)

    is_whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    return ([f"{flag} ({name}=): {shown(getattr(obj, name))} must be a whole number"
             for name, flag in whole.items() if wrong(name, is_whole)]
            + [f"{flag} ({name}=): {shown(getattr(obj, name))} must be text"
               for name, flag in text.items() if wrong(name, lambda v: isinstance(v, str))])


def capped_lines(text: str) -> str:
    """Each line of an error message cut to ``PROBLEM_CHARS`` (a value repeated in full is cut)."""
    return "\n".join(_capped(line) for line in text.splitlines())


def file_problem(path: Any, error: BaseException, role: str = "") -> str:
    """``"ROLE PATH: cannot be read: REASON"`` for ``error`` raised while reading ``path``."""
    if isinstance(error, FileNotFoundError):
        reason = "no such file"
    elif isinstance(error, IsADirectoryError):
        reason = "is a directory, not a file"
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    elif isinstance(error, EOFError):
        reason = "empty or cut short"
    else:
        reason = f"{type(error).__name__}: {' '.join(clean_error(str(error)).split())[:200]}"
    return f"{role + ' ' if role else ''}{path}: cannot be read: {reason}"


@contextmanager
def reading(path: Any, role: str = ""):
    """The one error boundary around reading and parsing a file: whatever goes wrong
    becomes a ``FileReadError`` naming ``role`` (the option or table), the file and why."""
    try:
        yield
    except ConfigError:
        raise
    except FILE_ERRORS as e:
        raise FileReadError([file_problem(path, e, role)]) from None


@contextlib.contextmanager
def records_of(where: Any):
    """Around code that uses raysweep's own tables and records (``results``, ``report``): a
    field of a shape raysweep never writes (changed by hand, or another tool's file) becomes
    one ``FileReadError`` naming the run, not a traceback from deep inside the code using it."""
    try:
        yield
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        reason = clean_error(f"{type(e).__name__}: {e}").replace("\n", " ")[:200]
        raise FileReadError([f"{where}: its tables or records are not as raysweep writes them ({reason}); they "
                             "were changed, or are not raysweep's"]) from None


def _is_optional(hint) -> tuple[bool, Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return True, args[0]
    return False, hint


def _coerce(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    """Convert ``value`` to ``hint`` where that is unambiguous (YAML reads ``1e-3`` as a string)."""
    optional, hint = _is_optional(hint)
    if value is None:
        if optional:
            return None
        problems.append(f"{where}: null is not allowed; give a {getattr(hint, '__name__', hint)}")
        return None
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a mapping of keys, got {shown(value)}")
            return hint()
        return _build(hint, value, where, problems)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        number = _float_or_none(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:  # nan and inf slip through every range check (nan < x is False)
            problems.append(f"{where}: {shown(value)} is not a finite number; give a real value, e.g. 0.01")
            return None
    elif hint is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif typing.get_origin(hint) is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:  # Any
        return value
    name = getattr(hint, "__name__", str(hint))
    problems.append(f"{where}: {shown(value)} is not a valid {name}")
    return None


def _float_or_none(value: Any) -> float | None:
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value)
    except ValueError:
        return None
    except OverflowError:  # an int of 400 digits: as good as infinite, and refused as such
        return math.inf
    return None


def _build(cls, values: Mapping[str, Any], prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        name = key if isinstance(key, str) and key.isprintable() and len(key) <= SHOWN_CHARS else shown(key)
        where = f"{prefix}.{name}" if prefix else name
        if key not in fields:
            problems.append(f"{where}: unknown key; known keys here: {', '.join(sorted(fields))}")
            continue
        coerced = _coerce(value, hints[key], where, problems)
        if coerced is not None or value is None:
            kwargs[key] = coerced
    obj = cls(**kwargs)
    check = getattr(obj, "problems", None)
    if check is not None:
        problems.extend(f"{prefix}.{p}" if prefix else p for p in check())
    return obj


def from_dict(cls, values: Mapping[str, Any] | None, prefix: str = ""):
    """Build dataclass ``cls`` from nested ``values``; raise ``ConfigError`` listing every problem."""
    problems: list[str] = []
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError([f"{prefix or 'the config'}: expected a mapping of keys, got {shown(values)}"])
    obj = _build(cls, values or {}, prefix, problems)
    if problems:
        raise ConfigError(problems)
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.01"`` -> ``(["optim", "lr"], 0.01)``; values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError([f"--set {shown(text)}: expected section.key=value, e.g. optim.lr=0.01"])
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError([f"--set {shown(text)}: the key before '=' is empty"])
    from trainers.yamlfile import load_yaml_text  # imports this module

    return path, load_yaml_text(raw, f"--set {shown(key.strip())}") if raw.strip() else ""


def set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def merge(base: Mapping, update: Mapping) -> dict:
    """Deep-merge two nested dicts; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str) -> dict:
    """A ``--config`` file's sections (``trainers.yamlfile``: no aliases, bounded size)."""
    from trainers.yamlfile import load_yaml_file  # imports this module

    data = load_yaml_file(path, "--config") or {}
    if not isinstance(data, dict):
        raise ConfigError([f"--config {path}: expected a mapping of sections, got {type(data).__name__}"])
    return data


def choice_problem(field: str, value: str, known: Iterable[str], what: str) -> str | None:
    known = sorted(known)
    if value in known:
        return None
    return f"{field}: {shown(value)} is not a known {what}; choose one of: {', '.join(known)}"


def range_problem(field: str, value, low=None, high=None, low_open=False) -> str | None:
    if value is None:
        return None
    if low is not None and (value <= low if low_open else value < low):
        return f"{field}: {shown(value)} must be {'>' if low_open else '>='} {low}"
    if high is not None and value > high:
        return f"{field}: {shown(value)} must be <= {high}"
    return None
