"""What every benchmark shares: modes, alternating timing, the machine's description, the
readable table and the one-line JSON result.

A comparison always runs both sides in one process run, alternating (A B B A A B ...)
after a warm-up, and reports medians and their ratio: absolute times from different runs
(or different machines) are never compared.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MODES = ("full", "quick", "smoke")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    """One benchmark's outcome. ``value`` is the headline figure (e.g. a ratio) judged
    against ``target`` (``met`` is None when the benchmark could not judge, e.g. no GPU)."""

    name: str
    value: float | None
    target: Any
    met: bool | None
    unit: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def spread(xs) -> str:
    """min-max of a sample, for the table: shows the noise next to the median."""
    xs = list(xs)
    return f"{min(xs):.3g}-{max(xs):.3g}" if xs else "-"


def alternate(sides: dict[str, Callable[[], float | None]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call each side ``warmup`` times (discarded), then ``reps`` rounds in A B / B A order.

    A side returns the seconds it measured itself, or None to be timed whole here.
    """

    def once(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start if out is None else out

    names = list(sides)
    for _ in range(warmup):
        for name in names:
            once(sides[name])
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(once(sides[name]))
    return samples


@contextlib.contextmanager
def env_var(name: str, value: str):
    """``name`` set to ``value`` for a block (an A/B side), then put back as it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def set_threads(n: int | None = None) -> int:
    """The same intra-op thread count for every side (Ray sets a worker's to its CPUs)."""
    import torch

    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "gpu": gpu,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "platform": platform.platform(), "loadavg_start": loadavg(),
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "ray", "optuna", "numpy", "pyarrow"):
        with contextlib.suppress(ImportError):
            out[mod] = __import__(mod).__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainers", "cluster", "search_spaces",
                                "benchmarks"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        out["raysweep_commit"] = head + ("+dirty" if dirty else "")
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return "-" if v is None else str(v)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def record(result: Result, mode: str, started: float, info: dict) -> dict:
    """The JSON object: headline, verdict, detailed figures, machine, versions, date."""
    argv = " ".join(["python -m benchmarks", result.name] + ([f"--{mode}"] if mode != "full" else []))
    return {
        "name": result.name, "value": result.value, "target": result.target, "met": result.met,
        "unit": result.unit, "mode": mode, "command": argv,
        "table": {"headers": result.headers, "rows": result.rows},
        "details": result.details, "notes": result.notes,
        "machine": {**info, "loadavg_end": loadavg()}, "versions": versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
    }


def render(result: Result, rec: dict) -> str:
    verdict = {True: "MET", False: "MISSED", None: "not judged"}[result.met]
    value = "-" if result.value is None else f"{result.value:.4g}"
    head = f"== {result.name} ({rec['mode']}): {value} {result.unit}; target {result.target}: {verdict}"
    parts = [head]
    if result.rows:
        parts.append(table(result.headers, result.rows))
    parts += [f"note: {n}" for n in result.notes]
    m = rec["machine"]
    parts.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_cpu_capability']}, "
                 f"load {m['loadavg_start']} -> {m['loadavg_end']}; {rec['wall_seconds']} s")
    return "\n".join(parts)


def write_result(rec: dict, out_dir: Path | None) -> Path | None:
    """``NAME.json`` for full runs, ``NAME.quick.json`` / ``NAME.smoke.json`` otherwise;
    atomically, so an interrupted run leaves the last good file."""
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if rec["mode"] == "full" else f".{rec['mode']}"
    path = out_dir / f"{rec['name']}{suffix}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def proc_cpu() -> dict[int, tuple[int, float, str]]:
    """``{pid: (parent pid, CPU seconds used so far, name)}`` for every process, from
    ``/proc`` (empty where there is none). Two snapshots show who used the CPU in between:
    on 2 cores a training step runs 2 threads that meet at barriers, so any other runnable
    process stalls both of them, and its CPU seconds cost about as much wall time."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    with contextlib.suppress(OSError):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # gone since listdir
                continue
            name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            out[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, name)
    return out


def minor_faults() -> int:
    """This process's minor page faults so far (each one a fresh zeroed page from the kernel)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_between(before: dict, after: dict, root: int, exclude: set[int], top: int = 8) -> dict:
    """CPU seconds used between two ``proc_cpu`` snapshots (keys may be str, as after JSON):
    ``ray``: by ``root``'s descendants (an embedded Ray: GCS, raylet, dashboard, actors,
    workers) other than ``exclude`` (the training process); ``others``: by processes
    outside ``root``'s tree, ``root`` itself left out (other work on the machine: noise);
    ``top``: the busiest of the ``ray`` processes, ``[name, pid, seconds]``."""
    before = {int(k): v for k, v in before.items()}
    after = {int(k): v for k, v in after.items()}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in after.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    used = {pid: cpu - before[pid][1] if pid in before else cpu for pid, (_, cpu, _) in after.items()}
    ray_pids = tree - set(exclude)
    busiest = sorted(((after[p][2], p, round(used[p], 3)) for p in ray_pids if used[p] > 0), key=lambda r: -r[2])
    return {"ray": sum(used[p] for p in ray_pids),
            "others": sum(u for p, u in used.items() if p not in tree and p != root and p not in exclude),
            "top": [list(r) for r in busiest[:top]]}


def _port_busy(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@contextlib.contextmanager
def _free_agent_port():
    """``ray.init`` always gives its dashboard agent port 52365; when another local Ray on
    this machine holds it, the new raylet dies at start-up ("timed out during startup").
    Then let the agent take any free port, as ``ray.cluster_utils`` does."""
    from ray._private import parameter, ray_constants

    original = parameter.RayParams
    if not _port_busy(ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT):
        yield
        return

    class AnyAgentPort(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("dashboard_agent_listen_port", None)  # None: the node picks a free port
            super().__init__(*args, **kwargs)

    parameter.RayParams = AnyAgentPort
    try:
        yield
    finally:
        parameter.RayParams = original


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, timing: bool = True, dashboard: bool = True):
    """An embedded Ray set up as ``cluster.connect`` sets it up (loopback, dashboard as
    ``dashboard`` says, ``EMBEDDED_RAY_ENV``, the job's runtime environment), without
    forwarding workers' output (the JSON line must stay last), and with the in-worker
    timing hook (``worker_timing``) if ``timing``.
    Reuses a Ray that is already running (e.g. the tests' fixture) and then leaves it
    running; shuts down only what it started."""
    import ray

    if ray.is_initialized():
        yield False
        return
    from benchmarks import worker_timing
    from cluster.connect import embedded_ray_options, forget_dashboard_address, job_runtime_env

    runtime_env = {**(job_runtime_env() or {}), **(worker_timing.runtime_env() if timing else {})} or None
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray's worker processes inherit this environment: let them import ``benchmarks``
    # (the timing hook, benchmark-defined Tune functions) from this checkout.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(REPO) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in paths if p])
    for attempt in (1, 2):  # on a busy machine the raylet can miss Ray's 30 s registration window
        try:
            with _free_agent_port():
                ray.init(**embedded_ray_options(dashboard, num_cpus=num_cpus or os.cpu_count(),
                                                log_to_driver=False, runtime_env=runtime_env))
            break
        except Exception as e:  # Ray raises a bare Exception for this timeout
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            print(f"ray.init: {e}; retrying once", file=sys.stderr, flush=True)
    try:
        yield True
    finally:
        ray.shutdown()
        forget_dashboard_address()
        if timing and (path := os.environ.pop(worker_timing.ENV, None)):
            Path(path).unlink(missing_ok=True)


def emit(result: Result, mode: str, started: float, info: dict, out_dir: Path | None) -> dict:
    rec = record(result, mode, started, info)
    path = write_result(rec, out_dir)
    print(render(result, rec), flush=True)
    if path is not None:
        print(f"written: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)
    sys.stdout.write(json.dumps(rec, default=str) + "\n")
    sys.stdout.flush()
    return rec
