"""`raysweep serve` (a checkpoint as an HTTP endpoint on Ray Serve), `serve status`, `serve stop`.

The CLI only: the replica and the deployment are ``cluster/serve_app.py``, imported when
a command needs Ray Serve (importing it takes ~2 s), the HTTP side ``cluster/serve_http.py``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from cluster.cli import EXIT_BAD_REQUEST, EXIT_OK, command, positive_float, positive_int
from cluster.predict_cmd import PRECISIONS, _tta_argument
from cluster.serve_http import APP_NAME, ServeOptions, parse_autoscale
from trainers.inference import InferenceError


# -- CLI --------------------------------------------------------------------------------


def _serve_arguments(p) -> None:
    p.add_argument("action", nargs="?", choices=("status", "stop"),
                   help="status / stop: the application on the Ray that --address (or RAY_ADDRESS) names: a "
                        "cluster's, or the address a foreground `raysweep serve` on the embedded Ray prints "
                        "(Ctrl-C in its terminal stops that one too)")
    p.add_argument("--checkpoint", metavar="PATH|EXPERIMENT", help="what to serve, found as `raysweep predict` "
                   "finds it: a checkpoint dir or state.pt, a train run dir or a tune experiment dir (its best trial)")
    p.add_argument("--trial", metavar="ID", help="with a tune experiment: serve this trial's checkpoint, not the best")
    p.add_argument("--host", default="127.0.0.1", help="where the HTTP proxy listens (default 127.0.0.1; "
                   "0.0.0.0 exposes the endpoint, unauthenticated, to the network)")
    p.add_argument("--port", type=int, default=8000)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=positive_int, default=1, help="model replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="let Serve scale replicas between MIN and MAX")
    p.add_argument("--cpus-per-replica", type=positive_float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="one GPU per replica; refused where there is none")
    p.add_argument("--max-batch", type=positive_int, default=32, help="most images one replica runs at once")
    p.add_argument("--max-body-mb", type=positive_float, default=8.0, help="largest request body (default 8 MB; 413 above)")
    p.add_argument("--top-k", type=positive_int, default=5, help="classes in each answer unless ?top_k= says")
    p.add_argument("--precision", choices=PRECISIONS, help="autocast precision (default: the checkpoint's train.precision)")
    _tta_argument(p)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")


def options_from(args) -> ServeOptions:
    return ServeOptions(host=args.host, port=args.port, replicas=args.replicas,
                        autoscale=parse_autoscale(args.autoscale) if args.autoscale else None, gpu=args.gpu,
                        max_batch=args.max_batch, max_body_bytes=int(min(args.max_body_mb, 2**30) * 2**20),
                        top_k=args.top_k,
                        cpus_per_replica=args.cpus_per_replica)


def _manage(args) -> int:
    from cluster.connect import ClusterError, connect, resolve_address
    from cluster.serve_app import status, stop

    if not resolve_address(args.address):
        raise ClusterError(f"serve {args.action}: give --address (or RAY_ADDRESS) of the Ray serving the model: the "
                           "cluster's, or the one a foreground `raysweep serve` printed on its `manage` line")
    connect(args.address, dashboard=False)
    if args.action == "status":
        found = status()
        print(f"raysweep serve: {APP_NAME}: " + ("not running" if found is None else str(found)), flush=True)
        return EXIT_OK if found else EXIT_BAD_REQUEST
    stopped = stop()
    print(f"raysweep serve: {APP_NAME}: " + ("stopped" if stopped else "was not running"), flush=True)
    return EXIT_OK if stopped else EXIT_BAD_REQUEST


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _foreground(embedded: bool) -> int:
    """Block until Ctrl-C or SIGTERM (or `serve stop` from elsewhere), then shut down cleanly."""
    from cluster.serve_app import shutdown, status

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    why = "stopped"
    try:
        while status() is not None:  # `raysweep serve stop` deletes it from another process
            time.sleep(1.0)
        why = "the application was deleted (raysweep serve stop)"
    except _Stop as e:
        why = f"{e}: shutting down"
    print(f"raysweep serve: {why}", flush=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
    shutdown(embedded)
    print("raysweep serve: stopped", flush=True)
    return EXIT_OK


@command("serve", "serve a checkpoint over HTTP on Ray Serve (POST /predict); `serve status`, `serve stop`")(_serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    import ray

    from cluster.connect import resolve_address

    if args.action:
        return _manage(args)
    if not args.checkpoint:
        print("raysweep serve: --checkpoint PATH|EXPERIMENT is required to deploy", file=sys.stderr)
        return EXIT_BAD_REQUEST
    try:
        opts = options_from(args)
    except ValueError as e:
        print(f"raysweep serve: {e}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    for warning in opts.warnings():
        print(f"raysweep serve: warning: {warning}", file=sys.stderr, flush=True)
    from cluster.serve_app import deploy

    try:
        served = deploy(args.checkpoint, args.trial, opts, args.address, args.precision, args.tta)
    except InferenceError as e:
        print(f"raysweep serve: {e}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    print(f"raysweep serve: model {served.model['id']} from {served.model['source']}: {served.model['checkpoint']}\n"
          f"url         {served.url}/predict  (also /healthz, /metadata)\n"
          f"try         curl --data-binary @image.png {served.url}/predict\n"
          f"manage      raysweep serve status|stop --address {ray.get_runtime_context().gcs_address}\n"
          f"ready       Ctrl-C stops it", flush=True)
    return _foreground(embedded=not resolve_address(args.address))
