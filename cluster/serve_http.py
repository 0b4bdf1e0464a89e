"""`raysweep serve`'s HTTP side as plain functions (no Ray): options and their checks,
routes, request bodies (size limit, raw bytes or multipart), answers and errors.

``cluster/serve_cmd.py`` is the thin Ray Serve boundary that calls these; tests call them
directly. Nothing from a client is unpickled: a body is image bytes (decoded by
``trainers.data.decode_image``, PNG or JPEG) or ``multipart/form-data`` of such parts,
parsed with the standard library's MIME parser.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import PurePosixPath
from typing import AsyncIterator

MAX_BODY_BYTES = 8 * 2**20  # a few large JPEGs; raise with --max-body-mb
LOOPBACK = ("127.0.0.1", "localhost", "::1")
APP_NAME = "raysweep"
log = logging.getLogger("ray.serve")


class HttpError(Exception):
    """An answer other than 200: ``status`` and the reason the client reads."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


MAX_BODY_LIMIT = 1024 * 2**20  # what --max-body-mb may raise the limit to


@dataclass(frozen=True)
class ServeOptions:
    """How the application is deployed (``raysweep serve``'s flags)."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, instead of ``replicas``
    gpu: bool = False
    max_batch: int = 32
    batch_wait_s: float = 0.005  # how long a replica waits to fill a batch
    max_body_bytes: int = MAX_BODY_BYTES
    top_k: int = 5  # the default of ?top_k=
    cpus_per_replica: float = 1.0

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.port <= 65535:
            out.append(f"--port: {self.port} is not a TCP port (0-65535)")
        if self.replicas < 1:
            out.append(f"--replicas: {self.replicas} must be >= 1")
        if self.autoscale and not 0 <= self.autoscale[0] <= self.autoscale[1] or self.autoscale == (0, 0):
            out.append(f"--autoscale: {self.autoscale[0]}:{self.autoscale[1]} needs 0 <= MIN <= MAX and MAX >= 1")
        if self.max_batch < 1:
            out.append(f"--max-batch: {self.max_batch} must be >= 1")
        if not 1 <= self.max_body_bytes <= MAX_BODY_LIMIT:
            out.append(f"--max-body-mb: {self.max_body_bytes / 2**20:g} must be > 0 and at most "
                       f"{MAX_BODY_LIMIT // 2**20} (a request body is held in memory)")
        if not self.host or "\0" in self.host or not self.host.isprintable():
            out.append(f"--host: {self.host!r} is not a host name or address; e.g. 127.0.0.1")
        if self.top_k < 1:
            out.append(f"--top-k: {self.top_k} must be >= 1")
        return out

    def warnings(self) -> list[str]:
        if self.host in LOOPBACK:
            return []
        return [f"--host {self.host}: the endpoint is reachable from other machines, with no authentication; "
                "put it behind a proxy that authenticates, or keep the default 127.0.0.1"]

    def scaling(self) -> dict:
        """``serve.deployment`` keywords: a fixed count or an autoscaling range."""
        if self.autoscale:
            low, high = self.autoscale
            return {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                           "initial_replicas": max(low, 1), "target_ongoing_requests": self.max_batch}}
        return {"num_replicas": self.replicas}


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (min, max); ``ValueError`` naming the form."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise ValueError(f"--autoscale: {text!r} is not MIN:MAX (e.g. 1:4)") from None


# -- requests ----------------------------------------------------------------------------


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The request body, or 413 as soon as it (or its ``Content-Length``) passes ``limit``
    bytes, so that an oversized upload is not held in memory."""
    too_big = HttpError(413, f"request body over {limit} bytes (the server's limit; send fewer or smaller images)")
    if declared and declared.strip().isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def split_images(content_type: str | None, body: bytes) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) per image: a ``multipart/form-data`` body gives one per part,
    named by its filename (else its field name); any other body is one image named
    ``image``, whatever its Content-Type (``curl --data-binary`` sends a form type). Nothing
    is decoded here: the decoder refuses what is not an image (400)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        return _multipart(content_type, body)
    if not body:
        raise HttpError(400, "empty body: POST one PNG/JPEG image, or several as multipart/form-data")
    return [("image", body)]


def _multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise HttpError(400, "multipart/form-data body without a boundary or parts")
    images = []
    for i, part in enumerate(message.iter_parts()):
        name = part.get_filename() or part.get_param("name", header="content-disposition") or f"part{i}"
        data = part.get_payload(decode=True) or b""
        images.append((PurePosixPath(str(name)).name or f"part{i}", data))
    if not images:
        raise HttpError(400, "multipart/form-data body with no parts: add one file per image (curl -F a=@1.png -F b=@2.png)")
    return images


def parse_top_k(value: str | None, default: int, classes: int) -> int:
    if value is None:
        return min(default, classes)
    if not value.isdigit() or int(value) < 1:
        raise HttpError(400, f"top_k={value!r}: give a whole number >= 1")
    return min(int(value), classes)


# -- answers -----------------------------------------------------------------------------


def image_errors(names: list[str], errors: list[str]) -> None:
    """400 naming every image that could not be decoded or does not fit the model."""
    bad = [f"{n}: {e}" if not e.startswith(n) else e for n, e in zip(names, errors) if e]
    if bad:
        raise HttpError(400, "; ".join(bad))


def prediction(name: str, pred_index: int, top_index, top_probs, k: int, classes: list[str]) -> dict:
    """One image's answer from the model's outputs (``Predictor``'s columns)."""
    return {"image": name, "pred_index": int(pred_index), "pred_class": classes[int(pred_index)],
            "top_k": [{"class": classes[int(i)], "index": int(i), "probability": round(float(p), 6)}
                      for i, p in zip(top_index[:k], top_probs[:k])]}


def answer(predictions: list[dict], model: dict) -> dict:
    """One image: its prediction at the top level; several: a list. ``model`` names the
    weights and the run or trial they came from (``model_card``)."""
    if len(predictions) == 1:
        return {**predictions[0], "model": model}
    return {"predictions": predictions, "model": model}


def model_card(state: dict, where: str, how: str, trial: str | None = None) -> dict:
    """The model's id (its network name and a digest of its weights: two deployments answer
    with the same id exactly when they hold the same weights) and where it came from."""
    digest = hashlib.sha256()
    for key in sorted(state["model"]):
        tensor = state["model"][key]
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    meta = state["meta"]
    name = (meta["config"].get("model") or {}).get("name", "model")
    path = PurePosixPath(where.split("://", 1)[-1])
    run = path.parent.name if path.name.startswith("checkpoint_") or path.name == "state.pt" else path.name
    if path.name == "state.pt":
        run = path.parent.parent.name
    return {"id": f"{name}-{digest.hexdigest()[:12]}", "checkpoint": where, "source": how, "run": run,
            "trial": trial or meta.get("trial_id")}


def metadata(state: dict, card: dict, tta: str, precision: str) -> dict:
    """``GET /metadata``: what a client needs to send good images and read the answers."""
    meta = state["meta"]
    return {"model": card, "classes": [str(c) for c in meta["classes"]], "image_shape": list(meta["image_shape"]),
            "input": "PNG or JPEG, " + ("any size (resized as training did)" if (meta.get("preprocess") or {})
                                        .get("resize") else "exactly the training size"),
            "preprocess": meta.get("preprocess"), "mean": meta["mean"], "std": meta["std"],
            "tta": tta, "precision": precision, "config": meta["config"]}


def error_body(err: HttpError) -> dict:
    return {"error": err.reason, "status": err.status}


def internal_error(exc: BaseException, where: str) -> tuple[int, dict]:
    """500 with an id the client can quote; the same id and the traceback go to the replica's log."""
    error_id = uuid.uuid4().hex[:12]
    log.error("raysweep serve: error id %s in %s: %s", error_id, where, exc, exc_info=exc)
    return 500, {"error": f"internal error in the model server ({type(exc).__name__}); "
                          f"quote error id {error_id}: the server's log has the details",
                 "status": 500, "error_id": error_id}


ROUTES = {("GET", "/healthz"): "healthz", ("GET", "/metadata"): "metadata", ("POST", "/predict"): "predict"}


def route(method: str, path: str) -> str:
    """The handler's name for ``method path``; 404 for an unknown path, 405 for a known
    path with the wrong method."""
    path = "/" + path.strip("/")
    if (method, path) in ROUTES:
        return ROUTES[(method, path)]
    allowed = [m for m, p in ROUTES if p == path]
    if allowed:
        raise HttpError(405, f"{method} {path}: use {' or '.join(allowed)}")
    raise HttpError(404, f"no route {path}; the routes are: " + ", ".join(f"{m} {p}" for m, p in ROUTES))
