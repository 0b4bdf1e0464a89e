"""The files a validated config names, checked on the driver before Ray starts.

A config is valid wherever it is built (a worker, a checkpoint's ``meta`` read back by
``predict``); whether its files can be read is a question for the machine that starts
the run, so it is asked here, separately, by ``train`` and ``tune``.
"""

from __future__ import annotations

from pathlib import Path

from trainers.config import TrainRunConfig
from trainers.configtools import FILE_ERRORS, ConfigError, file_problem, user_path

# Config fields that name a file on the driver's machine, and the values that are names,
# not paths. A missing file failed inside every worker, retried max_failures times (exit 1);
# checked here it is refused before Ray starts (exit 2).
PATH_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {("model", "pretrained"): ("imagenet",)}


def path_problems(cfg: TrainRunConfig) -> list[str]:
    """Why a file or directory the config names cannot be read here; [] when all can.
    URIs are left to their readers (they need credentials and a network)."""
    problems = []
    for (section, key), names in PATH_FIELDS.items():
        value = getattr(getattr(cfg, section), key)
        if value is None:
            continue
        path = user_path(value, f"{section}.{key}")
        try:
            if path.is_file():
                _load_weights(path)
            elif value in names or "://" in value or path.is_dir():
                problems += _pretrained_problems(value)  # 'imagenet', a URI, a run or checkpoint directory
            else:
                raise FileNotFoundError
        except FILE_ERRORS as e:
            problems.append(f"{file_problem(f'{section}.{key} {value!r}', e)}; give a readable local file"
                            + (f" or one of: {', '.join(names)}" if names else ""))
    return problems


def _pretrained_problems(spec: str) -> list[str]:
    """Read ``model.pretrained`` as the workers will (``trainers.transfer``): the torch
    cache for 'imagenet', the checkpoint a run or search directory records, a URI."""
    from trainers.data import DataError
    from trainers.transfer import ModelError, read_pretrained

    try:
        read_pretrained(spec)
    except (ModelError, DataError) as e:
        return [str(e)]
    return []


def _load_weights(path: Path) -> None:
    """Read a weights file the way the workers will (weights only), but memory-mapped, so a
    cut or foreign file is found here at little cost."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # Not a zip file (old format, or not weights at all): read it whole, as the workers will.
        torch.load(path, map_location="cpu", weights_only=True)


def check_paths(configs) -> None:
    """``ConfigError`` listing every unreadable file that any of ``configs`` names."""
    problems = list(dict.fromkeys(p for cfg in configs for p in path_problems(cfg)))
    if problems:
        raise ConfigError(problems)
