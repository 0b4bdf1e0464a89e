"""The `raysweep` command line. Each subcommand registers its arguments and its runner.

Exit codes: 0 success; 1 the work ran and failed (failed or diverged training, failed
job); 2 the request was refused before anything ran (bad config, data or resources).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from trainers.configtools import ConfigError, capped_lines, clean_error

EXIT_OK, EXIT_FAILED, EXIT_BAD_REQUEST = 0, 1, 2
UNEXPECTED_CHARS = 300  # of an unexpected error's reason

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help: str):
    def register(add_arguments: Callable):
        def with_runner(run: Callable):
            COMMANDS[name] = (help, add_arguments, run)
            return run

        return with_runner

    return register


def _number(kind, low: float, low_open: bool):
    """An argparse ``type``: a finite ``kind`` (int/float) above ``low``; anything else is a
    usage error (exit 2) before any work, e.g. ``--cpus-per-worker 0`` (which Ray would take)
    or ``-1`` (which crashed Ray's raylet), or ``nan``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value) or (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text!r} must be a number {'>' if low_open else '>='} {low}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int, positive_float = _number(int, 0, True), _number(float, 0.0, True)
non_negative_int = _number(int, 0, False)


def add_common(p: argparse.ArgumentParser, storage: bool = True) -> None:
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    if storage:
        p.add_argument("--storage", default="./runs", help="local directory or pyarrow.fs URI (default ./runs)")
        p.add_argument("--name", help="run name, one path component (default: a timestamped name); "
                       "an existing name is refused unless --resume")
        p.add_argument("--resume", action="store_true",
                       help="continue the run --name NAME (loads its saved state: resume only from trusted storage)")


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file whose sections mirror the config (data, model, optim, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key; repeatable")


def add_price(p: argparse.ArgumentParser) -> None:
    p.add_argument("--price", metavar="gpu_hour=X,cpu_hour=Y|FILE.yaml", help="prices per reserved GPU/CPU hour (any "
                   "currency; a key left out costs 0), or a cluster.yaml/RayCluster file with prices per node type "
                   "(the dearest is charged; docs/tune.md): fills the cost column and totals")


def add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mlflow", nargs="?", const="", metavar="URI", help="log runs to MLflow (a tracking URI such as "
                   "http://host:5000 or sqlite:///mlflow.db; none: MLflow's default store); needs raysweep[mlflow]")
    p.add_argument("--tensorboard", nargs="?", const="", metavar="DIR", help="write TensorBoard event files (default "
                   "<storage>/<name>/tensorboard; DIR: DIR/<name>); needs raysweep[tensorboard]")


def tracking_options(args):
    from cluster.tracking import TrackingOptions

    return TrackingOptions(mlflow=args.mlflow, tensorboard=args.tensorboard)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p)
    add_common(p)
    p.add_argument("--workers", type=positive_int, default=2, help="data-parallel workers (default 2)")
    p.add_argument("--cpus-per-worker", type=positive_float, default=1.0, help="CPUs each worker takes (> 0)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl); refused where there is none")
    p.add_argument("--cv", type=int, metavar="K", help="stratified K-fold cross-validation over the training images "
                   "(K >= 2; each fold a Ray Train run; the test split stays untouched)")
    p.add_argument("--cv-refit", action="store_true", help="with --cv: then train one model on all training images "
                   "for the folds' mean best epoch count and evaluate it on the test split")
    add_price(p)
    add_tracking(p)


@command("train", "train one model data-parallel on Ray Train")(_train_arguments)
def _train(args) -> int:
    from cluster import train_cmd
    from cluster.cost import parse_prices
    from trainers.config import load_run_config
    from trainers.distributed import Placement

    cfg = load_run_config(args.config, args.overrides)
    if args.workers < 1:
        raise ConfigError([f"--workers: {args.workers} must be >= 1"])
    placement = Placement(workers=args.workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker)
    if args.resume and args.name is None:
        raise ConfigError(["--resume: name the run to continue with --name NAME"])
    name = train_cmd.default_name(cfg) if args.name is None else args.name  # "" is refused, not defaulted
    req = train_cmd.TrainRequest(cfg, placement, args.storage, name, args.address, resume=args.resume,
                                 prices=parse_prices(args.price), tracking=tracking_options(args))
    if args.cv_refit and args.cv is None:
        raise ConfigError(["--cv-refit: refits after cross-validation; add --cv K (e.g. --cv 5)"])
    if args.cv is not None:
        from cluster import cv_cmd

        summary = cv_cmd.run_cv(req, args.cv, refit=args.cv_refit)
    else:
        summary = train_cmd.run(req)
    return EXIT_OK if summary["status"] in (train_cmd.COMPLETED, train_cmd.EARLY_STOPPED) else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    _import_commands()
    parser = argparse.ArgumentParser(prog="raysweep", description="Distributed training and tuning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _import_commands() -> None:
    """The modules whose ``@command`` decorators register the other subcommands."""
    from cluster import (convert_cmd, head_cmd, jobs_cmd, predict_cmd, report_cmd, results_cmd,  # noqa: F401
                         serve_cmd, tune_cmd)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # What raysweep (and the local Ray it starts) writes is not writable by group or others:
    # run directories hold state that a resume loads (cluster/guard.py).
    os.umask(os.umask(0o022) | 0o022)
    args = build_parser().parse_args(argv)
    run = COMMANDS[args.command][2]
    from cluster.connect import ClusterError
    from trainers.checkpoints import CheckpointError
    from trainers.data import DataError

    try:
        return run(args)
    except (ConfigError, DataError, ClusterError, CheckpointError) as e:  # refused: said why, no traceback
        print(f"raysweep {args.command}: {capped_lines(clean_error(str(e)))}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    except Exception as e:  # noqa: BLE001 - the last net: an input not checked yet, or a bug
        print(f"raysweep {args.command}: {unexpected(e)}", file=sys.stderr)
        return EXIT_FAILED


def unexpected(error: Exception) -> str:
    """One line for an error no check caught: its type and reason (capped, build paths
    dropped), with the traceback kept in a private file (``$RAYSWEEP_TRACEBACK=1`` prints
    it instead), so a user sees what went wrong and can report it without a wall of frames."""
    import tempfile
    import traceback

    frames = "".join(traceback.format_exception(error))
    reason = clean_error(f"{type(error).__name__}: {error}").replace("\n", " ")
    reason = reason if len(reason) <= UNEXPECTED_CHARS else reason[: UNEXPECTED_CHARS - 1] + "…"
    if os.environ.get("RAYSWEEP_TRACEBACK") == "1":
        return f"{reason}\n{frames}"
    try:
        fd, path = tempfile.mkstemp(prefix="raysweep-traceback-", suffix=".txt")  # mode 0600
        with os.fdopen(fd, "w") as out:
            out.write(frames)
        where = f"the traceback is in {path}"
    except OSError:
        where = "set RAYSWEEP_TRACEBACK=1 to see the traceback"
    return (f"unexpected error: {reason} (an input raysweep does not check yet, or a bug; {where}; "
            "please report it)")


if __name__ == "__main__":
    # Run as `python -m cluster.cli`: subcommands register into the importable module,
    # not into this __main__ copy of it.
    from cluster.cli import main as cli_main

    sys.exit(cli_main())
