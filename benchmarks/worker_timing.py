"""Timing inside Ray workers, without touching ``trainers``.

``runtime_env()`` gives the ``ray.init`` runtime environment whose setup hook (``install``,
run once in every worker process as it starts) wraps ``trainers.loop.train_one_epoch`` and
the reporters' ``report`` so that each call appends a line to a JSON-lines file:
``{"event": "train_start" | "train_end" | "report_end", "t": time.time(), "pid", "threads"}``,
the training events with ``"cpu"``: every process's CPU seconds so far (``common.proc_cpu``),
and ``"minflt"``: the worker's minor page faults so far.
The file lives on this machine (benchmarks run on one machine; ``time.time()`` is one
clock for every process on it), so the driver can read when a worker's first batch began
and how long each epoch took, report and checkpoint included.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from pathlib import Path

ENV = "RAYSWEEP_BENCH_TIMING"
HOOK = "benchmarks.worker_timing.install"


def runtime_env() -> dict:
    """A fresh events file, named in this process's environment (which a local Ray's
    processes inherit) and the hook that fills it."""
    fd, path = tempfile.mkstemp(prefix="raysweep-bench-", suffix=".jsonl")
    os.close(fd)
    os.environ[ENV] = path
    return {"worker_process_setup_hook": HOOK}


def events_file() -> Path | None:
    path = os.environ.get(ENV)
    return Path(path) if path else None


def _log(event: str, cpu: bool = False, **extra) -> None:
    import torch

    path = os.environ.get(ENV)
    if not path:
        return
    t = time.time()
    if cpu:  # every process's CPU seconds (benchmarks.common.proc_cpu): who ran during the epoch.
        # ~10 ms; kept out of the training span (train_end's t is taken before it, train_start's
        # after it); it falls inside the epoch span, and epoch_times subtracts it (probe_s).
        from benchmarks.common import minor_faults, proc_cpu

        extra["cpu"] = proc_cpu()
        extra["minflt"] = minor_faults()
        extra["probe_s"] = time.time() - t  # the plain loop's epochs carry no such probe: epoch_times takes it out
        if event == "train_start":
            t = time.time()
    line = json.dumps({"event": event, "t": t, "pid": os.getpid(), "threads": torch.get_num_threads(), **extra})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:  # one write() per line: appends from several processes stay whole
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _wrap(owner, name: str, before: str | None, after: str, epoch_arg: bool = False, cpu: bool = False) -> None:
    original = getattr(owner, name)
    if getattr(original, "_bench_timed", False):
        return

    @functools.wraps(original)
    def timed(*args, **kwargs):
        if before:
            _log(before, cpu)
        out = original(*args, **kwargs)
        extra = {}
        if epoch_arg:  # report(self, metrics, state)
            metrics = args[1] if len(args) > 1 else kwargs.get("metrics", {})
            extra = {"epoch": metrics.get("epoch")}
        _log(after, cpu, **extra)
        return out

    timed._bench_timed = True
    setattr(owner, name, timed)


def install() -> None:
    """The worker setup hook. ``fit`` looks ``train_one_epoch`` up in its module at call
    time, so replacing the module attribute is enough."""
    if not os.environ.get(ENV):
        return
    import trainers.distributed
    import trainers.loop

    _wrap(trainers.loop, "train_one_epoch", "train_start", "train_end", cpu=True)
    _wrap(trainers.distributed.RayTrainReporter, "report", None, "report_end", epoch_arg=True)
    try:  # a one-worker Tune trial reports straight to Tune
        import search_spaces.tuner

        _wrap(search_spaces.tuner.TuneReporter, "report", None, "report_end", epoch_arg=True)
    except ImportError:
        pass


class EventReader:
    """Reads the events appended since it was made (one reader per measured run)."""

    def __init__(self):
        self.path = events_file()
        self.offset = self.path.stat().st_size if self.path and self.path.exists() else 0

    def read(self) -> list[dict]:
        if not self.path or not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            return [json.loads(line) for line in f if line.strip()]


def epoch_times(events: list[dict]) -> dict:
    """Per epoch of one worker's run: training seconds and wall seconds from one epoch's
    start to the next (training, evaluation, metrics, checkpoint and report), the last one
    ending when its report returned, less the time of this module's own CPU probes."""
    starts = [e["t"] for e in events if e["event"] == "train_start"]
    ends = [e["t"] for e in events if e["event"] == "train_end"]
    reports = [e["t"] for e in events if e["event"] == "report_end"]
    n = min(len(starts), len(ends), len(reports))
    # The probes at train_end i and at train_start i + 1 (taken before its t) fall in epoch i's span.
    probes = {name: [e.get("probe_s", 0.0) for e in events if e["event"] == name]
              for name in ("train_start", "train_end")}
    walls = ([starts[i + 1] - starts[i] - probes["train_end"][i] - probes["train_start"][i + 1] for i in range(n - 1)]
             + ([reports[n - 1] - starts[n - 1] - probes["train_end"][n - 1]] if n else []))
    pids = sorted({e["pid"] for e in events})
    cpu = [e.get("cpu") for e in events if e["event"] in ("train_start", "train_end")]
    faults = [e.get("minflt") for e in events if e["event"] in ("train_start", "train_end")]
    page_faults = ([faults[2 * i + 1] - faults[2 * i] for i in range(n)]
                   if len(pids) == 1 and len(faults) >= 2 * n and None not in faults[:2 * n] else [])
    background = []  # per epoch: CPU seconds of Ray's other processes while this worker trained
    if len(pids) == 1 and len(cpu) >= 2 * n and all(cpu[:2 * n]):
        from benchmarks.common import cpu_between

        background = [cpu_between(cpu[2 * i], cpu[2 * i + 1], os.getpid(), set(pids)) for i in range(n)]
    return {"first_batch_t": starts[0] if starts else None, "last_report_t": reports[n - 1] if n else None,
            "train_seconds": [ends[i] - starts[i] for i in range(n)], "epoch_seconds": walls,
            "threads": sorted({e["threads"] for e in events}), "pids": pids, "background_cpu": background,
            "page_faults": page_faults}
