"""raysweep's benchmarks: `python -m benchmarks NAME [--quick | --smoke]` or `make bench`.

Every benchmark is a module here with ``run(mode) -> Result``; ``run_benchmark`` times it,
prints its table and its JSON line, and writes ``results/NAME[.mode].json``.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from benchmarks.common import MODES, RESULTS_DIR, emit, machine

# In the order `all` runs them: cheap and self-contained first.
BENCHMARKS = ("augment", "precision", "overhead", "cifar10", "trial_overhead", "search", "cv", "data_scale", "gpu",
              "serve")

_DEFAULT = object()


def run_benchmark(name: str, mode: str = "full", out_dir: Path | None | object = _DEFAULT, **options) -> dict:
    """Run one benchmark in this process; returns its JSON record (also printed last).

    ``out_dir`` defaults to ``benchmarks/results`` for full and quick runs and to nowhere
    for smoke runs (they check the scripts, not the machine).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if out_dir is _DEFAULT:
        out_dir = None if mode == "smoke" else RESULTS_DIR
    started, info = time.time(), machine()
    module = importlib.import_module(f"benchmarks.{name}")
    result = module.run(mode, **options)
    return emit(result, mode, started, info, out_dir)
