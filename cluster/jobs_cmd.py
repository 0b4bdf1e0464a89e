"""`raysweep submit`, `raysweep jobs` and `raysweep head`: work on a Ray cluster as jobs.

A job ships this project as its ``working_dir`` (what ``.rayignore`` and
``WORKING_DIR_EXCLUDES`` leave out stays home: runs, data, virtual environments, caches,
secrets, .git) and runs the same CLI there: ``python -m cluster.cli train ...``, so the
cluster needs Ray and the dependencies but not raysweep installed. Results go where
``--storage`` says (a path every node and this machine share, or a ``pyarrow.fs`` URI such
as ``s3://bucket/runs``), so ``raysweep results`` reads them from here.

The job server is the dashboard's address: ``--address``, then ``RAY_API_SERVER_ADDRESS``,
then ``RAY_ADDRESS`` (Ray's own order), then ``http://127.0.0.1:8265``. Every request
carries the token of ``cluster.auth``; a refused token, a missing job or an address where
nothing answers ends in a one-paragraph error that names the fix, in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import secrets
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cluster.auth import Token, find_token, refused_message
from cluster.cli import EXIT_BAD_REQUEST, EXIT_FAILED, EXIT_OK, command, non_negative_int
from cluster.connect import ClusterError, _check_reachable
from cluster.guard import check_name
from trainers.configtools import ConfigError, shown

DEFAULT_JOB_ADDRESS = "http://127.0.0.1:8265"
SUBMITTABLE = ("train", "tune")  # subcommands that make sense as a job
LOG_TAIL_LINES = 30
AGENT_WAIT_S = 90.0  # a just-started head accepts jobs once its job agent is up
# After this long without an answer from the job server, waiting gives up (exit 2, said why).
LOST_CONTACT_S = 120.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

# Left out of the working_dir upload (gitignore syntax, relative to it). `.rayignore`
# holds the same lines so that `ray job submit --working-dir .` leaves them out too.
WORKING_DIR_EXCLUDES = (
    ".git/", "/runs/", "/data/", "/benchmarks/results/",        # history, results and bulky data
    ".venv/", "venv/", "/env/", ".conda/", "*.egg-info/", "/build/", "/dist/", "/.whl/", "/.gl/",
    "__pycache__/", "*.pyc", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".ipynb_checkpoints/",
    ".env", ".env.*", "*.pem", "*.key", "*auth_token*", ".ray/", ".aws/", ".ssh/",  # secrets
)


def job_address(address: str | None) -> str:
    """The job server's URL: --address, $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, the local default."""
    chosen = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
              or DEFAULT_JOB_ADDRESS).strip().rstrip("/")
    if chosen.startswith("ray://") or chosen == "auto":
        raise ClusterError(f"job address {chosen!r}: jobs go to the dashboard's address, e.g. "
                           f"{DEFAULT_JOB_ADDRESS} (reach a remote one with `ray dashboard cluster.yaml`)")
    return chosen if "://" in chosen else f"http://{chosen}"


def is_loopback(address: str) -> bool:
    """Whether a URL's host is this machine only (127.0.0.0/8, ::1, localhost)."""
    return is_loopback_host(urlparse(address).hostname or "")


def is_loopback_host(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Jobs:
    """Ray's ``JobSubmissionClient`` whose failures become ``ClusterError``s that say what to do."""

    def __init__(self, address: str | None):
        self.address = job_address(address)
        _check_reachable(self.address)  # a socket with a timeout: seconds, not a hang
        self.token: Token = find_token()
        from ray.job_submission import JobSubmissionClient

        with self.explained():
            self.client = JobSubmissionClient(self.address, headers=self.token.headers())

    @contextmanager
    def explained(self, job_id: str | None = None):
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as e:
            raise ClusterError(refused_message(self.address, e, self.token)) from None
        except (ConnectionError, requests.exceptions.RequestException) as e:
            raise ClusterError(
                f"{self.address}: no Ray job server answers there ({type(e).__name__}); the job address is the "
                f"dashboard's (http://HEAD:8265, not the GCS port 6379); check --address / RAY_ADDRESS") from None
        except RuntimeError as e:
            if "Version check returned 404" in str(e):
                raise ClusterError(
                    f"{self.address} answers but is not a Ray job server (HTTP 404 on /api/version); the job "
                    "address is the Ray dashboard's (http://HEAD:8265); check --address / RAY_ADDRESS") from None
            if job_id and ("404" in str(e) or "does not exist" in str(e)):
                raise ClusterError(f"no job {job_id!r} at {self.address}; `raysweep jobs list` shows its jobs") from None
            raise

    def info(self, job_id: str):
        with self.explained(job_id):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        with self.explained(job_id):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, out=None) -> bool:
        """Print the job's logs as they come, until it ends: True. False when the stream
        broke first (a proxy without WebSockets, a dropped connection, a restarted
        dashboard), said on stderr: the job may well still be running."""
        import aiohttp

        out = out or sys.stdout

        async def tail():
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        with self.explained(job_id):
            try:
                asyncio.run(tail())
                return True
            except (RuntimeError, OSError, asyncio.TimeoutError, aiohttp.ClientError) as e:
                if isinstance(e, RuntimeError) and ("does not exist" in str(e) or "404" in str(e)):
                    raise  # no such job: explained() says so
                reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
                print(f"raysweep: the log stream of job {job_id} broke ({reason})", file=sys.stderr, flush=True)
                return False

    def wait(self, job_id: str, timeout_s: float | None = None):
        """Poll until the job is terminal (or the timeout passes); returns its info. A
        server that stops answering is asked again for up to ``LOST_CONTACT_S``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        answered = time.monotonic()
        while True:
            try:
                info = self.info(job_id)
                answered = time.monotonic()
            except ClusterError as e:
                if time.monotonic() - answered > LOST_CONTACT_S or "no job" in str(e):
                    raise
                time.sleep(2.0)
                continue
            if status_name(info) in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return info
            time.sleep(0.5)


def status_name(info) -> str:
    return getattr(info.status, "value", str(info.status))


def log_tail(logs: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(logs.rstrip("\n").splitlines()[-lines:])


# --------------------------------------------------------------------------- submit

@dataclass(frozen=True)
class JobSpec:
    """Everything a submission sends, decided before anything is sent."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict
    results: str  # <storage>/<name>, where the job writes its tables


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _drop_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    return kept


def _name_problem(name: str) -> str | None:
    try:
        check_name(name)
    except ConfigError as e:
        return e.problems[0]
    return None


def job_spec(inner: list[str], name: str | None = None, working_dir: str | None = None,
             local_cluster: bool = True) -> JobSpec:
    """Check the arguments of the command to run (as this CLI parses them) and build the job."""
    from cluster.cli import build_parser
    from cluster.store import resolve_storage

    inner = inner[1:] if inner[:1] == ["--"] else list(inner)
    if not inner:
        raise ConfigError(["the command to run: give it after --, e.g. raysweep submit -- train --workers 2"])
    if inner[0] not in SUBMITTABLE:
        raise ConfigError([f"the command to run: {inner[0]!r} is not one of {', '.join(SUBMITTABLE)}"])
    try:
        parsed = build_parser().parse_args(inner)
    except SystemExit:
        raise ConfigError([f"the {inner[0]} arguments after --: see argparse's message above"]) from None
    problems = []
    if parsed.address:
        problems.append("--address after --: a job runs on the cluster it was sent to; give --address to submit")
    for given in (name, parsed.name):  # refused here: the job would only refuse it later, on the cluster
        if given is not None and (p := _name_problem(given)):
            problems.append(p)
    if name and parsed.name and name != parsed.name:
        problems.append(f"--name: {shown(name)} (submit) and {shown(parsed.name)} (after --) differ; give one")
    if parsed.resume and name is None and parsed.name is None:
        problems.append("--resume: name the run to continue with --name NAME")
    root = Path(working_dir).expanduser().resolve() if working_dir else project_root()
    if not (root / "cluster" / "cli.py").is_file():
        problems.append(f"--working-dir: {root} holds no cluster/cli.py; give a raysweep checkout")
    if problems:
        raise ConfigError(problems)

    command_name = inner[0]
    name = name or parsed.name or f"{command_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = resolve_storage(parsed.storage)  # local paths become absolute: the job's cwd is a copy
    if "://" not in storage and not local_cluster:
        print(f"raysweep submit: results go to {storage} on the cluster's nodes; read them from here only if "
              "that path is shared (NFS) — else use --storage s3://bucket/runs (any pyarrow.fs URI)", file=sys.stderr)
    args = _drop_option(_drop_option(inner, "--storage"), "--name") + ["--storage", storage, "--name", name]
    results = f"{storage.rstrip('/')}/{name}"
    return JobSpec(
        submission_id=f"raysweep-{name}-{secrets.token_hex(3)}",
        entrypoint=shlex.join(["python", "-m", "cluster.cli", *args]),
        runtime_env={"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES),
                     "env_vars": {"PYTHONUNBUFFERED": "1"}},
        metadata={"raysweep_command": command_name, "raysweep_name": name, "raysweep_results": results},
        results=results,
    )


def _submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"the job server (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
                   f"else {DEFAULT_JOB_ADDRESS})")
    p.add_argument("--name", help="the run's name: results land in <storage>/<name> (default: the name after --, "
                   "else <command>-<time>)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    p.add_argument("--working-dir", help="the project shipped to the cluster (default: this raysweep checkout)")
    p.add_argument("inner", nargs=argparse.REMAINDER, metavar="-- train|tune ARGS",
                   help="the raysweep command the job runs")


def submit(jobs: Jobs, spec: JobSpec) -> str:
    """Submit, waiting (up to AGENT_WAIT_S) for a just-started head's job agent."""
    deadline = time.monotonic() + AGENT_WAIT_S
    told = False
    while True:
        try:
            with jobs.explained():
                return jobs.client.submit_job(entrypoint=spec.entrypoint, submission_id=spec.submission_id,
                                              runtime_env=spec.runtime_env, metadata=spec.metadata)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise ClusterError(f"{jobs.address}: the job was not accepted: {e}") from None
            if not told:
                print("raysweep submit: the cluster's job agent is starting; waiting for it", file=sys.stderr, flush=True)
                told = True
            time.sleep(1.0)


@command("submit", "run `train` or `tune` as a job on a Ray cluster (raysweep submit -- train ...)")(_submit_arguments)
def _submit(args) -> int:
    address = job_address(args.address)
    spec = job_spec(args.inner, args.name, args.working_dir, local_cluster=is_loopback(address))
    jobs = Jobs(address)
    job_id = submit(jobs, spec)
    print(f"submitted   {job_id}\n"
          f"address     {jobs.address}\n"
          f"entrypoint  {spec.entrypoint}\n"
          f"results     {spec.results}\n"
          f"follow      raysweep jobs logs {job_id} --follow  (stop: raysweep jobs stop {job_id})", flush=True)
    if args.no_wait:
        return EXIT_OK
    try:
        if not jobs.follow(job_id):
            print(f"raysweep submit: waiting for job {job_id} to end, however long it runs, to exit with its "
                  f"outcome (Ctrl-C stops waiting, not the job; raysweep jobs status {job_id} shows it)",
                  file=sys.stderr, flush=True)
        return report_outcome(jobs, job_id, spec.results)
    except KeyboardInterrupt:
        print(f"\nraysweep submit: stopped following; job {job_id} keeps running "
              f"(raysweep jobs stop {job_id} stops it)", file=sys.stderr)
        return 130


def report_outcome(jobs: Jobs, job_id: str, results: str | None) -> int:
    """Wait for the job's end (no deadline: a job runs as long as it needs) and report it;
    the exit code is the job's own where it is one of raysweep's (1 failed, 2 refused)."""
    info = jobs.wait(job_id)
    status = status_name(info)
    if status == "SUCCEEDED":
        print(f"job         {job_id} SUCCEEDED" + (f"\nresults     raysweep results {results}" if results else ""))
        return EXIT_OK
    print(f"raysweep: job {job_id} {status}: {info.message or ''}".rstrip()
          + f"\n--- last {LOG_TAIL_LINES} lines of its logs ---\n{log_tail(jobs.logs(job_id))}", file=sys.stderr)
    code = getattr(info, "driver_exit_code", None)
    return code if code in (EXIT_FAILED, EXIT_BAD_REQUEST) else EXIT_FAILED


# --------------------------------------------------------------------------- jobs

def _jobs_arguments(p: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help=f"the job server (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
                        f"else {DEFAULT_JOB_ADDRESS})")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", parents=[common], help="the cluster's submitted jobs, oldest first")
    sub.add_parser("status", parents=[common], help="one job's status; exit 1 if it failed or was stopped"
                   ).add_argument("job_id")
    logs = sub.add_parser("logs", parents=[common], help="a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--tail", type=non_negative_int, default=0, help="only the last N lines")
    sub.add_parser("stop", parents=[common], help="stop a job (its processes are terminated)").add_argument("job_id")


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration(info) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    return f"{(end - info.start_time) / 1000:.0f}s"


@command("jobs", "list, inspect, follow or stop the jobs on a Ray cluster")(_jobs_arguments)
def _jobs(args) -> int:
    jobs = Jobs(args.address)
    if args.action == "list":
        with jobs.explained():
            listed = [j for j in jobs.client.list_jobs() if j.submission_id]
        listed.sort(key=lambda j: j.start_time or 0)
        rows = [("SUBMISSION ID", "STATUS", "STARTED", "TOOK", "RESULTS / ENTRYPOINT")]
        rows += [(j.submission_id, status_name(j), _when(j.start_time), _duration(j),
                  (j.metadata or {}).get("raysweep_results") or j.entrypoint[:70]) for j in listed]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        if not listed:
            print(f"(no submitted jobs at {jobs.address})")
        return EXIT_OK
    job_id = args.job_id
    if args.action == "status":
        info = jobs.info(job_id)
        meta = info.metadata or {}
        print(f"job         {job_id}\nstatus      {status_name(info)}\nmessage     {info.message or ''}\n"
              f"started     {_when(info.start_time)}\nended       {_when(info.end_time)}\n"
              f"entrypoint  {info.entrypoint}"
              + (f"\nexit code   {info.driver_exit_code}" if info.driver_exit_code is not None else "")
              + (f"\nresults     {meta['raysweep_results']}" if meta.get("raysweep_results") else ""))
        return EXIT_FAILED if status_name(info) in ("FAILED", "STOPPED") else EXIT_OK
    if args.action == "logs":
        if args.follow:
            try:
                if not jobs.follow(job_id):  # the stream broke before the job ended: not followed to its end
                    print(f"raysweep jobs: raysweep jobs status {job_id} tells how the job stands", file=sys.stderr)
                    return EXIT_FAILED
            except KeyboardInterrupt:
                return 130
            return EXIT_OK
        logs = jobs.logs(job_id)
        print(log_tail(logs, args.tail) if args.tail else logs.rstrip("\n"))
        return EXIT_OK
    # stop
    with jobs.explained(job_id):
        asked = jobs.client.stop_job(job_id)
    info = jobs.wait(job_id, timeout_s=30)
    print(f"job         {job_id} {status_name(info)}"
          + ("" if asked else " (it had already ended)"))
    return EXIT_OK if status_name(info) in TERMINAL else EXIT_FAILED
