"""The one way raysweep reads YAML: safe tags only, no anchors or aliases, bounded size.

Aliases are what make a "billion laughs" file: 511 bytes whose aliases expand, under a
real key, into gigabytes (memory grew ~100 MB/s until the process was killed). No
raysweep file needs them, so any anchor (``&a``) or alias (``*a``, and so ``<<: *a``) is
refused where the parser meets it, before anything is expanded. Files are read up to
``MAX_YAML_BYTES``; a config or a search space is a few kilobytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trainers.configtools import ConfigError, FileReadError, file_problem, shown

MAX_YAML_BYTES = 1 << 20  # 1 MiB


class _AliasFound(yaml.YAMLError):
    def __init__(self, mark, what: str):
        super().__init__(what)
        self.mark, self.what = mark, what


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses a key given twice in one mapping (it would silently
    keep the last: a setting written twice is a mistake the user should see)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {shown(key)} is given twice in one mapping", key_node.start_mark)
            except TypeError:  # an unhashable key: SafeConstructor says so itself
                continue
            seen.add(key)
        return super().construct_mapping(node, deep)


class NoAliasLoader(UniqueKeyLoader):
    """The loader of raysweep's own files: unique keys, and a raise at the first anchor or alias event."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _AliasFound(event.start_mark, f"alias *{event.anchor}")
        if getattr(event, "anchor", None):
            raise _AliasFound(event.start_mark, f"anchor &{event.anchor}")
        return super().compose_node(parent, index)


def load_yaml_text(text: str, source: str) -> Any:
    """Parse ``text`` (from ``source``: a file or ``--set key``, named in errors)."""
    try:
        return yaml.load(text, Loader=NoAliasLoader)
    except _AliasFound as e:
        raise ConfigError([f"{source}, line {e.mark.line + 1}: YAML anchors and aliases are not allowed "
                           f"(found {e.what}); write the value out in full"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: YAML nested too deeply; flatten it"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError([f"{source}{where}: not valid YAML ({problem})"]) from None
    except CONSTRUCTOR_ERRORS as e:  # a well-formed value its tag cannot build, e.g. 2001-13-45 or !!int x
        raise ConfigError([f"{source}: not valid YAML ({constructor_problem(e)})"]) from None


# What PyYAML's constructors raise, outside its own YAMLError, for a scalar whose tag or
# shape says one type and whose text another: a date 2001-13-45 (ValueError), ``!!int x``
# (ValueError), ``!!timestamp x`` (AttributeError), a huge exponent (OverflowError).
CONSTRUCTOR_ERRORS = (ValueError, TypeError, AttributeError, OverflowError)


def constructor_problem(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= 120 else text[:119] + "…"


def check_regular(path: str | Path, source: str) -> None:
    """A FIFO or a device would block the read or never end; a directory is left to open(),
    whose error names it."""
    if "\0" in str(path):
        raise FileReadError([f"{source!r}: a path cannot hold a NUL byte"])
    if not str(path).strip():  # Path("") is ".", so it would not name a file at all
        raise FileReadError([f"{source.strip()}: an empty path; give a YAML file, or leave the option out"])
    p = Path(path)
    if p.exists() and not p.is_file() and not p.is_dir():
        raise FileReadError([f"{source}: not a regular file (a FIFO, socket or device); give a YAML file"])


def load_yaml_file(path: str | Path, option: str) -> Any:
    """Read and parse one YAML file; ``option`` (``--config``, ``--space``, ...) names it in errors."""
    source = f"{option} {path}" if option else str(path)
    check_regular(path, source)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise FileReadError([f"{option}: no file at {str(path)!r}; check the path"]) from None
    except OSError as e:
        raise FileReadError([file_problem(path, e, option)]) from None
    if len(raw) > MAX_YAML_BYTES:
        raise FileReadError([f"{source}: larger than {MAX_YAML_BYTES} bytes; a raysweep YAML file is a few "
                             "kilobytes, so give the right file"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileReadError([f"{source}: not UTF-8 text (byte {e.start}); give a YAML file"]) from None
    return load_yaml_text(text, source)
