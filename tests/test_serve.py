"""`raysweep serve`: the plain HTTP functions without Ray, then ONE real Serve application on
loopback for the module (Serve's start-up is the slow part), fed real digits PNGs and
compared with `raysweep predict` on the same files."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torchvision.io import encode_png

from cluster.serve_http import (HttpError, ServeOptions, internal_error, parse_autoscale, parse_top_k, read_body,
                                route, split_images)

REPO = Path(__file__).resolve().parent.parent
BODY_LIMIT = 64 * 1024  # the fixture's --max-body-mb, small so that 413 costs little to trigger


# -- plain functions ---------------------------------------------------------------------


def _multipart(parts: dict[str, bytes], boundary: str = "b0undary") -> tuple[str, bytes]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"; filename="{n}"\r\n'
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for n, data in parts.items())
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def test_bodies_split_into_images_raw_or_multipart():
    assert split_images("application/x-www-form-urlencoded", b"\x89PNG..") == [("image", b"\x89PNG..")]  # curl -d
    content_type, body = _multipart({"a.png": b"\x89PNG\r\n\x00one", "b.png": b"two--\r\n"})
    assert split_images(content_type, body) == [("a.png", b"\x89PNG\r\n\x00one"), ("b.png", b"two--\r\n")]
    for content_type, body in (("image/png", b""), ("multipart/form-data; boundary=x", b"--x--\r\n")):
        with pytest.raises(HttpError) as e:
            split_images(content_type, body)
        assert e.value.status == 400


def test_body_limit_refuses_by_header_or_while_reading():
    async def chunks(n):
        for _ in range(n):
            yield b"x" * 1000

    assert len(asyncio.run(read_body(chunks(3), "3000", 3000))) == 3000
    for declared, n in (("3001", 0), (None, 4)):  # a lying or absent Content-Length does not help
        with pytest.raises(HttpError) as e:
            asyncio.run(read_body(chunks(n), declared, 3000))
        assert e.value.status == 413 and "3000 bytes" in e.value.reason


def test_routes_top_k_and_options():
    assert route("POST", "/predict/") == "predict" and route("GET", "/healthz") == "healthz"
    for method, path, status in (("GET", "/predict", 405), ("GET", "/admin", 404), ("POST", "/", 404)):
        with pytest.raises(HttpError) as e:
            route(method, path)
        assert e.value.status == status
    assert parse_top_k(None, 5, 3) == 3 and parse_top_k("2", 5, 10) == 2
    with pytest.raises(HttpError, match="top_k='0'"):
        parse_top_k("0", 5, 10)
    assert parse_autoscale("1:4") == (1, 4)
    with pytest.raises(ValueError, match="MIN:MAX"):
        parse_autoscale("4")
    assert ServeOptions().warnings() == [] and "reachable from other machines" in ServeOptions(host="0.0.0.0").warnings()[0]
    assert ServeOptions(autoscale=(3, 1), max_batch=0, port=70000).problems() == [
        "--port: 70000 is not a TCP port (0-65535)", "--autoscale: 3:1 needs 0 <= MIN <= MAX and MAX >= 1",
        "--max-batch: 0 must be >= 1"]


def test_an_internal_error_gets_an_id_that_the_log_has(caplog):
    serve_log = logging.getLogger("ray.serve")  # once Serve has run, it stops propagating to the root
    serve_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.ERROR, logger="ray.serve"):
            status, body = internal_error(RuntimeError("boom"), "POST /predict")
    finally:
        serve_log.removeHandler(caplog.handler)
    assert status == 500 and len(body["error_id"]) == 12 and body["error_id"] in body["error"]
    assert "boom" not in body["error"]  # the details stay in the log
    assert any(body["error_id"] in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)


def test_cli_refuses_before_starting_anything(tmp_path, capsys, no_ray_before):
    from cluster.cli import main

    for argv, said in ((["serve"], "--checkpoint PATH|EXPERIMENT is required"),
                       (["serve", "--checkpoint", str(tmp_path), "--autoscale", "4"], "--autoscale: '4' is not MIN:MAX"),
                       (["serve", "--checkpoint", str(tmp_path), "--autoscale", "0:0"], "MAX >= 1"),
                       (["serve", "--checkpoint", str(tmp_path / "nothing")], "no such file or directory")):
        assert main(argv) == 2
        assert said in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()


def test_a_port_in_use_is_refused_before_ray_starts(tmp_path, no_ray_before):
    import socket

    import ray

    from cluster.connect import ClusterError
    from cluster.serve_app import deploy

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ClusterError, match=f"--host 127.0.0.1 --port {port}: cannot listen there"):
            deploy(str(tmp_path), options=ServeOptions(port=port))
    assert not ray.is_initialized()


def test_trial_that_is_not_in_the_experiment_is_refused(tmp_path):
    from cluster.serve_app import resolve
    from trainers.inference import InferenceError

    with pytest.raises(InferenceError, match="no trials.parquet"):
        resolve(str(tmp_path), "t1")


# -- one Serve application ---------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits run saved as `raysweep train` leaves it, trained in-process (no Ray Train:
    the cheapest real checkpoint), with its test images written as PNG files."""
    from trainers.checkpoints import save_state
    from trainers.config import TrainRunConfig
    from trainers.data import load_data
    from trainers.loop import ListReporter, WorkerContext, fit

    cfg = TrainRunConfig.from_dict({"train": {"epochs": 2}})
    data = load_data(cfg.data)
    rep = ListReporter()
    fit(cfg, data, WorkerContext(), rep)
    root = tmp_path_factory.mktemp("serve")
    save_state(rep.states[-1], root / "run" / "checkpoint_000001")
    (root / "run" / "summary.json").write_text(json.dumps({"status": "completed",
                                                          "checkpoint": str(root / "run" / "checkpoint_000001")}))
    images = root / "images"
    images.mkdir()
    for i in range(24):
        (images / f"{i:02d}.png").write_bytes(bytes(encode_png(data.test.x[i]).numpy()))
    return root / "run", images


@pytest.fixture(scope="module")
def served(ray_local, run):
    import raysweep
    from cluster.connect import free_port
    from cluster.serve_app import shutdown

    s = raysweep.serve(run[0], port=free_port(), max_batch=8, max_body_bytes=BODY_LIMIT)  # the Python API
    yield s
    shutdown(embedded=False)
    from ray import serve

    serve.shutdown()


def _call(url: str, data: bytes | None = None, content_type: str = "image/png", tries: int = 1):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data is not None else {})
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == tries - 1:
                return e.code, json.loads(e.read() or b"{}")
        except OSError:  # connection reset while a replica dies
            if attempt == tries - 1:
                return None, {}
        time.sleep(0.2)


def test_trial_picks_that_trials_checkpoint_or_says_why_not(run, tmp_path):
    import pyarrow as pa

    from cluster.serve_app import resolve
    from cluster.serve_http import model_card
    from trainers.inference import InferenceError

    checkpoint = str(run[0] / "checkpoint_000001")
    pq.write_table(pa.table({"trial_id": ["a1", "b2"], "status": ["completed", "failed"],
                             "checkpoint": [checkpoint, None]}), tmp_path / "trials.parquet")
    state, where, how = resolve(str(tmp_path), "a1")
    assert where == checkpoint and how == "trial a1 of the tune experiment"
    assert model_card(state, where, how, "a1")["trial"] == "a1" and model_card(state, where, how)["run"] == "run"
    with pytest.raises(InferenceError, match="'b2' \\(failed\\) has no checkpoint in .*; trials with a checkpoint: a1"):
        resolve(str(tmp_path), "b2")
    with pytest.raises(InferenceError, match="'zz' is not a trial of .*; trials with a checkpoint: a1"):
        resolve(str(tmp_path), "zz")


def test_answers_match_raysweep_predict_on_the_same_files(served, run, tmp_path, capsys):
    from cluster.cli import main

    run_dir, images = run
    files = sorted(images.glob("*.png"))
    content_type, body = _multipart({f.name: f.read_bytes() for f in files})
    status, answer = _call(f"{served.url}/predict?top_k=3", body, content_type)
    assert status == 200 and len(answer["predictions"]) == len(files)
    assert answer["model"]["id"] == served.model["id"] and answer["model"]["run"] == "run"
    by_serve = {p["image"]: p["pred_class"] for p in answer["predictions"]}
    assert all(len(p["top_k"]) == 3 and p["top_k"][0]["class"] == p["pred_class"] for p in answer["predictions"])
    status, one = _call(f"{served.url}/predict", files[0].read_bytes())  # raw bytes: one image
    assert status == 200 and one["pred_class"] == by_serve[files[0].name] and len(one["top_k"]) == 5

    assert main(["predict", "--checkpoint", str(run_dir), "--data", f"imagefolder:{images}",
                 "--out", str(tmp_path / "p.parquet")]) == 0
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    by_predict = {Path(r["id"]).name: r["pred_class"] for r in rows}
    assert by_predict == by_serve
    assert len(set(by_serve.values())) > 3  # a trained model, not one answer for all


def test_health_metadata_and_each_error_code(served, run):
    assert _call(f"{served.url}/healthz") == (200, {"status": "ok", "model": served.model["id"]})
    status, meta = _call(f"{served.url}/metadata")
    assert status == 200 and meta["classes"] == [str(i) for i in range(10)] and meta["image_shape"] == [1, 8, 8]
    assert meta["config"]["model"]["name"] == "simple_cnn" and meta["preprocess"]["resize"] is None

    status, body = _call(f"{served.url}/predict", b"\x89PNG not really")
    assert status == 400 and "not a readable image" in body["error"]
    big = bytes(encode_png(torch.zeros((1, 16, 16), dtype=torch.uint8)).numpy())
    status, body = _call(f"{served.url}/predict", big)
    assert status == 400 and "image is 1x16x16 (CxHxW) but the model takes 1x8x8" in body["error"]
    assert _call(f"{served.url}/nothing-here")[0] == 404
    assert _call(f"{served.url}/predict")[0] == 405  # GET
    status, body = _call(f"{served.url}/predict", b"\0" * (BODY_LIMIT + 1))
    assert status == 413 and str(BODY_LIMIT) in body["error"]


def _listeners(pids: set[int]) -> set[str]:
    """Local addresses of the TCP listeners owned by ``pids`` (``ss``, as tests/test_loopback.py)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines() if any(f"pid={p}," in line for p in pids)}


def test_the_http_proxy_listens_on_loopback_only(served):
    from ray.util.state import list_actors

    proxies = list_actors(filters=[("class_name", "=", "ProxyActor"), ("state", "=", "ALIVE")])
    assert proxies
    seen = _listeners({p.pid for p in proxies})
    port = served.url.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}" in seen, seen
    assert all(addr.startswith(("127.", "[::1]", "[::ffff:127.")) for addr in seen), seen  # and no gRPC port (off)


def test_a_replica_killed_mid_traffic_is_replaced_and_no_request_is_lost(served, run):
    import ray
    from ray.util.state import list_actors

    png = sorted(run[1].glob("*.png"))[0].read_bytes()
    outcomes, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            outcomes.append(_call(f"{served.url}/predict", png, tries=5)[0])

    def replicas():
        return list_actors(filters=[("class_name", "=", "ServeReplica:raysweep:classifier"), ("state", "=", "ALIVE")])

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(1.0)
    [victim] = replicas()
    ray.kill(ray.get_actor(victim.name, namespace=victim.ray_namespace), no_restart=True)
    deadline = time.monotonic() + 60
    while not [r for r in replicas() if r.actor_id != victim.actor_id] and time.monotonic() < deadline:
        time.sleep(0.5)
    before = len(outcomes)
    while len(outcomes) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    thread.join(60)
    assert [r.actor_id for r in replicas()] != [victim.actor_id]
    assert outcomes and all(s is not None for s in outcomes), outcomes  # each got an answer or an HTTP error
    assert all(s == 200 or s >= 500 for s in outcomes) and outcomes[-3:] == [200, 200, 200], outcomes


def test_status_and_stop_by_address_end_the_foreground_server(served, capsys, monkeypatch):
    """`serve status` / `serve stop` reach a Ray by its address, as they reach a cluster (stop
    from another process); the foreground loop then sees its application gone and exits 0."""
    import ray

    from cluster.cli import main
    from cluster.serve_app import status
    from cluster.serve_cmd import _foreground

    address = ray.get_runtime_context().gcs_address
    capsys.readouterr()
    assert main(["serve", "status", "--address", address]) == 0
    assert "'status': 'RUNNING'" in capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    stopper = threading.Thread(target=lambda: subprocess.run(
        [sys.executable, "-m", "cluster", "serve", "stop", "--address", address], env=env, timeout=120))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stopper.start()
    try:
        assert _foreground(embedded=False) == 0
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    stopper.join()
    assert status() is None and "the application was deleted" in capsys.readouterr().out
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", "stop"]) == 2
    assert "give --address" in capsys.readouterr().err
