"""serve: `raysweep serve` (Ray Serve, HTTP on loopback, batched on the replica) against
the same model exported by `raysweep export` (TorchScript) and called in-process.

Closed-loop clients (threads, each with one keep-alive HTTP connection, bounded by a
request count and a time limit) send single-image PNG requests at concurrency 1, 8 and
32; the in-process side calls the exported model on uint8 batches of the same sizes. Both
sides run the network in fp32 with the same torch thread count (one replica of 1 CPU);
the served side also decodes each PNG and crosses the HTTP proxy. The model is untrained
(seeded weights): serving cost does not depend on what the weights learned.

Targets: at concurrency 32, throughput >= 0.5x the in-process model's at batch 32; p50
latency at concurrency 1 <= 2x the in-process single-image latency + 5 ms.
"""

from __future__ import annotations

import http.client
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Result, local_ray, set_threads

CONCURRENCY = (1, 8, 32)
THROUGHPUT_RATIO, P50_FACTOR, P50_SLACK_MS = 0.5, 2.0, 5.0
SIZES = {  # the model, image shape; per concurrency level: at most this many requests / seconds
    "full": dict(model="resnet18", shape=(3, 32, 32), requests=2000, seconds=20.0, calls=200),
    "quick": dict(model="resnet18", shape=(3, 32, 32), requests=600, seconds=8.0, calls=60),
    "smoke": dict(model="simple_cnn", shape=(1, 8, 8), requests=40, seconds=2.0, calls=10),
}
THREADS = 1  # the replica's torch threads (1 CPU), and the in-process side's


def checkpoint(model: str, shape: tuple[int, int, int], directory: Path) -> dict:
    """A raysweep checkpoint of an untrained ``model`` (fp32 inference), saved in ``directory``."""
    from trainers.checkpoints import save_state
    from trainers.config import TrainRunConfig
    from trainers.models import build_model
    from trainers.preprocess import preprocess_meta

    cfg = TrainRunConfig.from_dict({"model": {"name": model}, "train": {"precision": "fp32"}})
    torch.manual_seed(0)
    net = build_model(cfg.model, shape[0], shape[1], 10)
    meta = {"config": cfg.to_dict(), "classes": [str(i) for i in range(10)], "mean": [0.5] * shape[0],
            "std": [0.25] * shape[0], "image_shape": list(shape), "preprocess": preprocess_meta(None, shape[0])}
    state = {"model": net.state_dict(), "meta": meta, "epoch": 1}
    save_state(state, directory)
    return state


def in_process(path: Path, shape, calls: int) -> dict[int, dict]:
    """The exported file called in this process: latency of one call per batch size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated, still loads it
        module = torch.jit.load(str(path))
    out = {}
    for batch in CONCURRENCY:
        x = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8)
        for _ in range(3):
            module(x)  # warm-up (TorchScript profiles its first calls)
        lat = []
        for _ in range(calls):
            start = time.perf_counter()
            module(x)
            lat.append(time.perf_counter() - start)
        out[batch] = _summary(lat, sum(lat), batch * len(lat))
    return out


def _summary(latencies: list[float], seconds: float, images: int) -> dict:
    ms = np.asarray(latencies) * 1e3
    return {"images_per_second": images / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": len(latencies)}


def closed_loop(host: str, port: int, body: bytes, concurrency: int, requests: int, seconds: float) -> dict:
    """``concurrency`` clients, each sending its next request when the last is answered."""
    lat, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds
    budget = iter(range(requests))

    def client():
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while time.perf_counter() < deadline and next(budget, None) is not None:
            start = time.perf_counter()
            conn.request("POST", "/predict", body, {"Content-Type": "image/png"})
            response = conn.getresponse()
            response.read()
            with lock:
                (lat if response.status == 200 else errors).append(time.perf_counter() - start)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = _summary(lat, time.perf_counter() - start, len(lat))
    out["errors"] = len(errors)
    return out


def served(root: Path, state: dict, size: dict) -> dict[int, dict]:
    import raysweep
    from cluster.connect import free_port
    from torchvision.io import encode_png

    png = bytes(encode_png(torch.randint(0, 256, tuple(size["shape"]), dtype=torch.uint8)).numpy())
    with local_ray(2, timing=False, dashboard=False):
        from ray import serve

        try:
            s = raysweep.serve(root, port=free_port(), max_batch=max(CONCURRENCY), cpus_per_replica=THREADS,
                               batch_wait_s=0.002)
            host, port = s.url.removeprefix("http://").rsplit(":", 1)
            closed_loop(host, int(port), png, 4, 40, 5.0)  # warm-up
            return {c: closed_loop(host, int(port), png, c, size["requests"], size["seconds"]) for c in CONCURRENCY}
        finally:
            serve.shutdown()


def run(mode: str) -> Result:
    from trainers.inference import export_torchscript

    size = SIZES[mode]
    shape = tuple(size["shape"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state = checkpoint(size["model"], shape, root)
        set_threads(THREADS)
        local = in_process(export_torchscript(state, root / "model.pt"), shape, size["calls"])
        remote = served(root, state, size)
    ratio = remote[32]["images_per_second"] / local[32]["images_per_second"]
    p50_limit = P50_FACTOR * local[1]["p50_ms"] + P50_SLACK_MS
    met_throughput, met_p50 = ratio >= THROUGHPUT_RATIO, remote[1]["p50_ms"] <= p50_limit
    rows = []
    for c in CONCURRENCY:
        rows.append([f"serve c={c}", remote[c]["images_per_second"], remote[c]["p50_ms"], remote[c]["p99_ms"],
                     remote[c]["requests"], remote[c]["errors"]])
        rows.append([f"in-process batch {c}", local[c]["images_per_second"], local[c]["p50_ms"], local[c]["p99_ms"],
                     local[c]["requests"], 0])
    return Result(
        name="serve", value=ratio,
        target=f"c=32 throughput >= {THROUGHPUT_RATIO}x in-process; c=1 p50 <= {P50_FACTOR:g}x in-process + "
               f"{P50_SLACK_MS:g} ms",
        met=met_throughput and met_p50, unit="x in-process throughput at concurrency 32",
        headers=["side", "images/s", "p50 ms", "p99 ms", "requests", "errors"], rows=rows,
        notes=[f"{size['model']} {'x'.join(map(str, shape))}, untrained, fp32, {THREADS} torch thread(s) both sides; "
               f"one replica, --max-batch 32; closed loop, <= {size['requests']} requests or {size['seconds']:g} s per level",
               f"throughput ratio at c=32: {ratio:.2f} (target >= {THROUGHPUT_RATIO}): "
               f"{'met' if met_throughput else 'missed'}",
               f"p50 at c=1: {remote[1]['p50_ms']:.2f} ms vs limit {p50_limit:.2f} ms: {'met' if met_p50 else 'missed'}",
               "clients are threads of the benchmark's process, on the same cores as the replica"],
        details={"served": remote, "in_process": local, "throughput_met": met_throughput, "p50_met": met_p50,
                 "p50_limit_ms": p50_limit, "model": size["model"], "shape": list(shape)},
    )
