"""Connecting to Ray: an embedded local Ray by default, or a running cluster.

The address comes from ``--address``, then ``RAY_ADDRESS``, then the embedded default.
A local Ray binds its dashboard and job server to 127.0.0.1 and keeps token
authentication on (Ray's default); raysweep never turns it off.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import ray

from cluster.auth import secure_token_file
from trainers import ray_private
from trainers.configtools import shown
from trainers.distributed import Placement
from trainers.memory import malloc_env
from trainers.yamlfile import load_yaml_file


class ClusterError(RuntimeError):
    """The cluster cannot do what was asked; the message says what would."""


def resolve_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``host:port``."""
    if address == "auto":
        return
    host, port = address_parts(address)
    if not port:
        return
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(
            f"--address {address}: nothing answers there ({e}); start the cluster (ray start --head) "
            "or fix the address / RAY_ADDRESS"
        ) from None


def address_parts(address: str) -> tuple[str, int | None]:
    """``(host, port or None)`` of a Ray or job-server address; one that names no host, or a
    port out of range, is refused (``ray://``, ``127.0.0.1:99999``, ``http://[::1``)."""
    try:
        parsed = urlparse(address.strip() if "://" in address else f"tcp://{address.strip()}")
        host, port = parsed.hostname, parsed.port
    except ValueError as e:  # urllib: "Port out of range 0-65535", "Invalid IPv6 URL"
        raise ClusterError(f"--address {shown(address)}: not a valid address ({e}); give HOST:PORT, e.g. "
                           "127.0.0.1:6379 (a job server: http://HOST:8265)") from None
    if not host:
        raise ClusterError(f"--address {shown(address)}: names no host; give HOST:PORT, e.g. 127.0.0.1:6379 "
                           "(a job server: http://HOST:8265)")
    return host, port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_dashboard_address() -> int:
    """A free dashboard port for an embedded Ray about to start, exported (before the start,
    so that every Ray process inherits it) as ``RAY_API_SERVER_ADDRESS``.

    Ray Train's PlacementGroupCleaner asks the state API whether a run's controller is
    alive, and with no address that API guesses the cluster: the last ``ray start`` one, or
    any GCS process on the machine. With a second Ray on the machine (another search, a
    ``ray start`` head) it asked the wrong one or raised "Found multiple active Ray
    instances", so the placement group of a 2-worker trial that ASHA stopped was never
    removed and the search waited forever on its CPUs (seen here twice)."""
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return port


def forget_dashboard_address() -> None:
    """After the embedded Ray shuts down: the address names a dashboard that is gone."""
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def job_runtime_env() -> dict | None:
    """What every Ray worker of this job starts with: glibc settings that let a training
    thread reuse its freed activations (``trainers.memory``; read only as a process starts,
    so they cannot be set from inside Ray Train's training thread). Ray merges this with a
    submitted job's own runtime environment, variable by variable."""
    env_vars = malloc_env()
    return {"env_vars": env_vars} if env_vars else None


# What every process of an embedded Ray starts with (it inherits this process's environment;
# Ray Train also hands RAY_TRAIN_* on to its controller). A value already set wins. Only for
# a Ray we start: a running cluster keeps its own settings.
EMBEDDED_RAY_ENV = {
    # Ray Train starts one more actor per run to watch for node drain (cloud preemption),
    # which never happens to an embedded single-machine Ray. Like every idle Python Ray
    # process it wakes ~100 times a second (Ray's 10 ms signal check) and costs ~0.7-1% of
    # a core, which a 2-thread training step on 2 cores pays for in wall time.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray's own metrics (Prometheus export through the dashboard agent) and event-loop
    # statistics: nothing reads them on an embedded Ray. With 3 idle actors, Ray's processes
    # used 4.2-5.1% of a core with these off vs 5.6-6.1% with Ray's defaults (2026-11-30,
    # two 30 s runs each).
    "RAY_enable_metrics_collection": "0",
    "RAY_metrics_report_interval_ms": "60000",
    "RAY_event_stats": "0",
    "RAY_io_context_event_loop_lag_collection_interval_ms": "60000",
    # Ray's log monitor (which forwards workers' output to the driver) globs the log
    # directory for new files every 0.1 s while it holds fewer than this many; at 0 it does
    # so every 0.5 s, and still reads the files it knows every 0.1 s: 0.4-0.55% of a core
    # instead of 0.7-1.15% (idle, 2026-11-30, two 20 s runs each).
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
}


def _set_embedded_ray_env() -> None:
    """Before starting an embedded Ray: ``EMBEDDED_RAY_ENV``, a user's own values winning."""
    for key, value in EMBEDDED_RAY_ENV.items():
        os.environ.setdefault(key, value)


def embedded_ray_options(dashboard: bool = True, **overrides) -> dict:
    """``ray.init`` keywords for a Ray this process starts itself (the CLI's, the tests',
    the benchmarks'): loopback dashboard, quiet logs, the job's runtime environment; sets
    ``EMBEDDED_RAY_ENV`` (``_set_embedded_ray_env``) for the processes it will start.

    ``dashboard``: Ray Train's cleanup of stopped Tune trials needs the dashboard's state
    API. A single fit does not, and the dashboard's processes are not free: in one
    alternating run on 2 cores (2026-11-29), `raysweep train` epochs took 1.087x a plain
    loop's (no Ray) with it and 1.062x without it."""
    _set_embedded_ray_env()
    shown = {"dashboard_host": "127.0.0.1", "dashboard_port": pin_dashboard_address()} if dashboard else {}
    return {"include_dashboard": dashboard, **shown, "logging_level": logging.WARNING,
            "runtime_env": job_runtime_env(), **overrides}


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
            dashboard: bool = True) -> None:
    """Start or join Ray once per process; ``dashboard``: see ``embedded_ray_options``.

    A malformed address is refused even when this process already holds a Ray: otherwise
    ``--address ray://`` silently used whatever Ray was up."""
    address = resolve_address(address)
    if address and address != "auto":
        address_parts(address)
    if ray.is_initialized():
        return
    if address:
        _check_reachable(address)
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=job_runtime_env())
        return
    ray.init(**embedded_ray_options(dashboard=dashboard, num_cpus=num_cpus, num_gpus=num_gpus))
    secure_token_file()  # Ray writes a new token file with the umask's mode (0644 here)


def capacity() -> dict[str, float]:
    """The resources the cluster has, or can grow to: on an autoscaling cluster (cluster.yaml,
    GPU workers from 0) this counts the nodes the autoscaler may still add."""
    now = ray.cluster_resources()
    ceiling = autoscaler_ceiling()
    return {k: max(now.get(k, 0.0), ceiling.get(k, 0.0)) for k in set(now) | set(ceiling)}


def autoscaler_ceiling(bootstrap: Path | None = None) -> dict[str, float]:
    """Most resources the autoscaler may add: Ray's own figure where the GCS holds one (what Ray
    Train checks), else the cluster launcher's config on the head (resources x max_workers
    per node type); {} where nothing autoscales."""
    limits = ray_private.autoscaler_max_resources() if ray.is_initialized() else None
    if limits:
        return {k: float(v) for k, v in limits.items()}
    bootstrap = bootstrap or Path.home() / "ray_bootstrap_config.yaml"  # written by `ray up` on the head
    if not bootstrap.is_file():
        return {}
    total: dict[str, float] = {}
    for node_type in (load_yaml_file(bootstrap, "") or {}).get("available_node_types", {}).values():
        for key, value in (node_type.get("resources") or {}).items():
            total[key] = total.get(key, 0.0) + float(value) * node_type.get("max_workers", 0)
    return total


def check_fits(placement: Placement, concurrent: int = 1, driver_cpus: float = 0.0, reserve_cpus: float = 0.0) -> None:
    """Refuse at once what the cluster can never run, instead of waiting on Ray's 60 s timeout.
    ``reserve_cpus``: CPUs that must stay free beside the runs (a streamed set's decode tasks)."""
    total = capacity()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_cpus = concurrent * (driver_cpus + placement.workers * placement.cpus_per_worker) + reserve_cpus
    problems = []
    if need_cpus > cpus + 1e-9:
        problems.append(
            f"{concurrent} run(s) x ({placement.workers} workers x {placement.cpus_per_worker:g} CPU"
            f"{f' + {driver_cpus:g} driver CPU' if driver_cpus else ''})"
            f"{f' + {reserve_cpus:g} CPU for streaming decode tasks' if reserve_cpus else ''} needs {need_cpus:g} "
            f"CPUs but the cluster has {cpus:g}; lower --workers / --concurrent or give fewer CPUs per worker"
        )
    if placement.use_gpu:
        need_gpus = concurrent * placement.workers * placement.gpus_per_worker
        if gpus == 0:
            problems.append("--gpu: the cluster has no GPU; drop --gpu to train on CPUs")
        elif need_gpus > gpus + 1e-9:
            problems.append(
                f"--gpu: {need_gpus:g} GPUs needed ({placement.workers} workers x {placement.gpus_per_worker:g}) "
                f"but the cluster has {gpus:g}; lower --workers or use fractional GPUs per worker"
            )
    if problems:
        raise ClusterError("; ".join(problems))
