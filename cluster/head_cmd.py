"""`raysweep head`: a local Ray head for jobs, in the foreground, with token authentication
on and the dashboard and job server on loopback unless told otherwise."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

from cluster.auth import AUTH_MODE_ENV, ensure_token
from cluster.cli import command, non_negative_int
from cluster.jobs_cmd import is_loopback_host
from trainers.configtools import ConfigError

@dataclass(frozen=True)
class HeadOptions:
    """A local Ray head for jobs: token auth on, dashboard and job server on loopback by default."""

    port: int = 6379
    dashboard_port: int = 8265
    dashboard_host: str = "127.0.0.1"
    num_cpus: int | None = None
    num_gpus: int | None = None
    temp_dir: str | None = None
    extra: tuple[str, ...] = ()  # more `ray start` arguments, as given

    @property
    def exposed(self) -> bool:
        return not is_loopback_host(self.dashboard_host)


def ray_executable() -> str:
    """Ray's CLI from raysweep's own environment (a virtual environment need not be on PATH)."""
    return shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"


def head_command(opts: HeadOptions) -> tuple[list[str], dict[str, str]]:
    """``ray start --head --block ...`` and its environment (RAY_AUTH_MODE=token, always)."""
    mode = os.environ.get(AUTH_MODE_ENV, "token")
    if mode.lower() != "token":
        raise ConfigError([f"${AUTH_MODE_ENV}={mode}: raysweep starts clusters with token authentication only; "
                           f"unset {AUTH_MODE_ENV} (or set it to token)"])
    argv = [ray_executable(), "start", "--head", "--block", f"--port={opts.port}", "--include-dashboard=true",
            f"--dashboard-host={opts.dashboard_host}", f"--dashboard-port={opts.dashboard_port}"]
    if opts.num_cpus is not None:
        argv.append(f"--num-cpus={opts.num_cpus}")
    if opts.num_gpus is not None:
        argv.append(f"--num-gpus={opts.num_gpus}")
    if opts.temp_dir:
        argv.append(f"--temp-dir={opts.temp_dir}")
    return argv + list(opts.extra), {**os.environ, AUTH_MODE_ENV: "token"}


def exposure_warning(opts: HeadOptions) -> str:
    return (f"WARNING: --dashboard-host {opts.dashboard_host} exposes the dashboard and the job server on port "
            f"{opts.dashboard_port} beyond this machine: whoever reaches it with the token runs any code here. "
            "Keep the token secret and the port firewalled; prefer 127.0.0.1 and an SSH tunnel "
            f"(ssh -L {opts.dashboard_port}:127.0.0.1:{opts.dashboard_port} HOST).")


def _head_arguments(p: argparse.ArgumentParser) -> None:
    d = HeadOptions()
    p.add_argument("--port", type=int, default=d.port, help="the GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=d.dashboard_port, help="dashboard + job server (8265)")
    p.add_argument("--dashboard-host", default=d.dashboard_host,
                   help="bind address of the dashboard and job server (default 127.0.0.1; anything else "
                        "exposes them, with a warning)")
    p.add_argument("--num-cpus", type=non_negative_int)
    p.add_argument("--num-gpus", type=non_negative_int)
    p.add_argument("--temp-dir")
    p.add_argument("extra", nargs=argparse.REMAINDER, metavar="-- RAY_START_ARGS",
                   help="further `ray start` arguments")


@command("head", "run a local Ray head for jobs in the foreground (token auth on, loopback); Ctrl-C stops it")(
    _head_arguments)
def _head(args) -> int:
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    opts = HeadOptions(args.port, args.dashboard_port, args.dashboard_host, args.num_cpus, args.num_gpus,
                       args.temp_dir, tuple(extra))
    argv, env = head_command(opts)
    token_path = ensure_token()
    if opts.exposed:
        print(exposure_warning(opts), file=sys.stderr, flush=True)
    print(f"raysweep head: {shlex.join(argv)}\n  token  {token_path} (mode 0600)\n"
          f"  jobs   raysweep submit --address http://{'127.0.0.1' if not opts.exposed else opts.dashboard_host}"
          f":{opts.dashboard_port} -- train ...", flush=True)
    process = subprocess.Popen(argv, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:  # the head got the same SIGINT: it drains and stops
        return process.wait()
