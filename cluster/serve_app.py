"""`raysweep serve`'s Ray Serve boundary: the replica, deploying it, its status, stopping it.

The replica holds a ``Predictor`` of ``cluster/predict_cmd.py``, the object `raysweep
predict` runs in its Ray Data actors, with the same decoder (``decode_rows``), precision
and test-time augmentation, so one image gets the same answer from both. Requests are
batched on the replica (``@serve.batch``). The HTTP side (routes, body limit, multipart,
answers, errors) is plain functions in ``cluster/serve_http.py``; the CLI is
``cluster/serve_cmd.py``, which imports this module (and Ray Serve, ~2 s) only when serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
from ray import serve

from cluster.predict_cmd import Predictor
from cluster.predict_inputs import load_checkpoint
from cluster.serve_http import (APP_NAME, HttpError, ServeOptions, answer, error_body, image_errors, internal_error,
                                metadata, model_card, parse_top_k, prediction, read_body, route, split_images)
from trainers.inference import InferenceError
from trainers.predict_readers import NO_LABEL, decode_rows, evaluation_spec

__all__ = ["Served", "deploy", "resolve", "status", "stop"]


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class ImageClassifier:
    """The replica: ``POST /predict``, ``GET /healthz``, ``GET /metadata`` (``serve_http.ROUTES``)."""

    def __init__(self, state: dict, card: dict, options: dict, precision: str | None, tta: str | None):
        self.opts = ServeOptions(**options)
        meta = state["meta"]
        spec = evaluation_spec(meta["image_shape"], (meta.get("preprocess") or {}).get("resize"))
        self.classes = [str(c) for c in meta["classes"]]
        self.predictor = Predictor.from_state(  # all classes ranked: ?top_k= cuts per request
            state, [(decode_rows, {"spec": spec})], "cuda" if self.opts.gpu else "cpu", len(self.classes),
            precision, max(1, int(self.opts.cpus_per_replica)), self.opts.max_batch, tta)
        self.card = card
        self.meta = metadata(state, card, self.predictor.tta, self.predictor.precision)
        self.infer.set_max_batch_size(self.opts.max_batch)
        self.infer.set_batch_wait_timeout_s(self.opts.batch_wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # set from the options in __init__
    async def infer(self, images: list[tuple[str, bytes]]) -> list[dict]:
        """A batch of single images (from one or many requests) through the predictor."""
        n = len(images)
        batch = {"id": _objects([name for name, _ in images]), "label": np.full(n, NO_LABEL, dtype=np.int64),
                 "bytes": _objects([blob for _, blob in images]), "error": _objects([""] * n)}
        out = await asyncio.to_thread(self.predictor, batch)  # the event loop keeps taking requests
        return [{key: out[key][i] for key in ("error", "pred_index", "topk_index", "topk_probs")} for i in range(n)]

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        try:
            handler = getattr(self, "_" + route(request.method, request.url.path))
            return JSONResponse(await handler(request))
        except HttpError as e:
            return JSONResponse(error_body(e), status_code=e.status)
        except Exception as e:  # the 500 boundary: logged with the id the client gets
            status, body = internal_error(e, f"{request.method} {request.url.path}")
            return JSONResponse(body, status_code=status)

    async def _healthz(self, request) -> dict:
        return {"status": "ok", "model": self.card["id"]}

    async def _metadata(self, request) -> dict:
        return self.meta

    async def _predict(self, request) -> dict:
        k = parse_top_k(request.query_params.get("top_k"), self.opts.top_k, len(self.classes))
        body = await read_body(request.stream(), request.headers.get("content-length"), self.opts.max_body_bytes)
        images = split_images(request.headers.get("content-type"), body)
        results = await asyncio.gather(*(self.infer(image) for image in images))
        names = [name for name, _ in images]
        image_errors(names, [str(r["error"]) for r in results])
        return answer([prediction(name, r["pred_index"], r["topk_index"], r["topk_probs"], k, self.classes)
                       for name, r in zip(names, results)], self.card)


# -- the driver side ---------------------------------------------------------------------


def resolve(checkpoint: str, trial: str | None = None) -> tuple[dict, str, str]:
    """(weights-only state, checkpoint location, how found), as `raysweep predict` finds it
    (``load_checkpoint``); ``trial``: that trial of the tune experiment ``checkpoint``."""
    if trial is None:
        return load_checkpoint(checkpoint)
    from cluster.tune_results import trial_checkpoint  # the same rule as predict's and export's --trial
    from trainers.configtools import ConfigError

    try:
        path = trial_checkpoint(str(checkpoint), trial)
    except ConfigError as e:
        raise InferenceError("; ".join(e.problems)) from None
    state, where, _ = load_checkpoint(path)
    state["meta"] = {**state["meta"], "trial_id": trial}
    return state, where, f"trial {trial} of the tune experiment"


@dataclass
class Served:
    """A running deployment: ``url`` to send requests to, ``handle`` (a Serve
    ``DeploymentHandle``: ``handle.remote(request)`` from Python), ``model`` (id and origin)."""

    url: str
    handle: object
    model: dict
    options: ServeOptions


def _check_resources(opts: ServeOptions) -> None:
    import ray

    from cluster.connect import ClusterError

    total = ray.cluster_resources()
    replicas = opts.autoscale[0] if opts.autoscale else opts.replicas
    if opts.gpu and total.get("GPU", 0) < 1:
        raise ClusterError("--gpu: the cluster has no GPU; drop --gpu to serve on CPUs")
    if replicas * opts.cpus_per_replica > total.get("CPU", 0):
        raise ClusterError(f"{replicas} replica(s) x {opts.cpus_per_replica:g} CPU need more than the cluster's "
                           f"{total.get('CPU', 0):g} CPUs; lower --replicas (or the --autoscale minimum)")


def deploy(checkpoint: str, trial: str | None = None, options: ServeOptions = ServeOptions(),
           address: str | None = None, precision: str | None = None, tta: str | None = None) -> Served:
    """Start (or replace) the ``raysweep`` Serve application; returns once it answers."""
    from cluster.connect import connect, resolve_address
    from trainers.configtools import ConfigError

    if problems := options.problems():
        raise ConfigError(problems)
    if not resolve_address(address):
        _check_port_free(options.host, options.port)  # else the health check could reach whatever holds it
    state, where, how = resolve(checkpoint, trial)  # all refusals come before Ray starts
    card = model_card(state, where, how, trial)
    connect(address, dashboard=False)
    _check_resources(options)
    # Serve's HTTP proxy on the head only, on the host and port asked; gRPC stays off (no servicers).
    serve.start(proxy_location="HeadOnly", http_options={"host": options.host, "port": options.port},
                grpc_options={"grpc_servicer_functions": []})
    app = serve.deployment(ImageClassifier, name="classifier", max_ongoing_requests=2 * options.max_batch,
                           ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": int(options.gpu)},
                           **options.scaling())
    handle = serve.run(app.bind(state, card, dataclasses.asdict(options), precision, tta), name=APP_NAME,
                       route_prefix="/", blocking=False)
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    url = f"http://{f'[{host}]' if ':' in host else host}:{options.port}"
    _wait_healthy(url)
    return Served(url, handle, card, options)


def _check_port_free(host: str, port: int) -> None:
    import socket

    from cluster.connect import ClusterError

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise ClusterError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                           "pick another --port, or stop what holds it") from None


def _wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    """The proxy may start listening a moment after the application is RUNNING."""
    from cluster.connect import ClusterError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ClusterError(f"{url}/healthz did not answer within {timeout_s:g} s ({e}); the application "
                                   "is deployed: see `raysweep serve status` and Serve's logs") from None
        time.sleep(0.2)


def status() -> dict | None:
    """The application's status and its replicas by state; None when it is not running."""
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return None
    return {"status": str(app.status.value if hasattr(app.status, "value") else app.status), "message": app.message,
            "deployments": {name: {"status": str(getattr(d.status, "value", d.status)),
                                   "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
                            for name, d in app.deployments.items()}}


def stop() -> bool:
    """Delete the application; False when there was none."""
    if APP_NAME not in serve.status().applications:
        return False
    serve.delete(APP_NAME)
    return True


def shutdown(embedded: bool) -> None:
    """Delete the application; on a Ray this process started, Serve and Ray too."""
    import ray

    stop()
    if embedded:
        serve.shutdown()
        ray.shutdown()
