"""`python -m benchmarks NAME|all [--quick | --smoke] [--out DIR]`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import BENCHMARKS, run_benchmark
from benchmarks.common import REPO, table


def run_all(mode: str, out: str | None) -> int:
    """Each benchmark in its own process (its own Ray, threads and memory); then a summary."""
    records, failed = [], []
    for name in BENCHMARKS:
        cmd = [sys.executable, "-m", "benchmarks", name] + ([f"--{mode}"] if mode != "full" else [])
        cmd += ["--out", out] if out else []
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.rstrip("\n").splitlines()
        print("\n".join(lines[:-1]), flush=True)
        try:
            rec = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            rec = None
        if proc.returncode or rec is None:  # a crash after its JSON line fails it too
            failed.append(name)
            print(f"{name}: failed (exit {proc.returncode})", flush=True)
        else:
            records.append(rec)
    rows = [[r["name"], r["value"], r["unit"], r["target"], r["met"]] for r in records]
    rows += [[name, None, "failed", None, None] for name in failed]
    print("\n== all benchmarks\n" + table(["benchmark", "value", "unit", "target", "met"], rows), flush=True)
    print(json.dumps({"name": "all", "mode": mode, "results": [
        {k: r[k] for k in ("name", "value", "target", "met", "unit")} for r in records], "failed": failed}))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("name", choices=BENCHMARKS + ("all",))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions (minutes)")
    g.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): checks that the script runs")
    p.add_argument("--out", help="where NAME.json goes (default benchmarks/results; smoke: not written)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.name == "all":
        return run_all(mode, args.out)
    kwargs = {"out_dir": Path(args.out)} if args.out else {}
    rec = run_benchmark(args.name, mode, **kwargs)
    return 0 if rec else 1  # a missed target is a result, not an error


if __name__ == "__main__":
    sys.exit(main())
