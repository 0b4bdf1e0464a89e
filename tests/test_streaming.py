"""Streamed data sets (Ray Data): the readers and splits as plain functions, then real
`raysweep train` runs that stream a mixed-size image folder, and Parquet shards from a
real S3-protocol server on loopback."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from cluster.cli import main
from trainers.checkpoints import load_state
from trainers.config import DataConfig, TrainRunConfig
from trainers.data import DATASETS, DataError, load_data, write_parquet_images
from trainers.streaming import decode_batch, load_for_training, plan_stream, should_stream, split_band


def mixed_size_folder(root: Path, n: int = 400, seed: int = 0) -> Path:
    """A learnable 4-class image folder whose images are 18-40 px on each side, half PNG
    (some grey) and half JPEG."""
    split, _, classes = DATASETS["synthetic"](DataConfig(name="synthetic", num_samples=n, image_size=24,
                                                         num_classes=4, seed=seed))
    rng = random.Random(seed)
    for i, (img, y) in enumerate(zip(split.x, split.y)):
        size = (rng.randint(18, 40), rng.randint(18, 40))
        img = torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear")[0]
        img = img.round().clamp(0, 255).to(torch.uint8)
        if i % 7 == 0:
            img = img[:1]  # a grey image among colour ones
        folder = root / classes[y]
        folder.mkdir(parents=True, exist_ok=True)
        data = encode_png(img) if i % 2 else encode_jpeg(img, quality=95)
        (folder / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(data.numpy().tobytes())
    return root


def test_mixed_sizes_are_refused_without_image_size_naming_the_key(tmp_path):
    root = mixed_size_folder(tmp_path / "folder", n=40)
    with pytest.raises(DataError, match=r"data\.image_size"):
        load_data(DataConfig(name="imagefolder", root=str(root)))


def test_in_memory_path_resizes_mixed_sizes(tmp_path):
    root = mixed_size_folder(tmp_path / "folder", n=40)
    data = load_data(DataConfig(name="imagefolder", root=str(root), image_size=[12, 20]))
    assert data.shape == (3, 12, 20) and data.num_classes == 4
    assert len(data.train) + len(data.val) + len(data.test) == 40


def test_plan_splits_every_image_into_exactly_one_split(tmp_path):
    root = mixed_size_folder(tmp_path / "folder", n=200)
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=16, streaming=True, val_fraction=0.2,
                     test_fraction=0.25)
    plan = plan_stream(cfg)
    assert plan.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert plan.shape == (3, 16, 16) and plan.sample.dtype == torch.uint8
    blobs = sorted(root.rglob("*.*"))
    counts = {}
    for split in ("train", "val", "test"):
        source, spec = plan.sources[split]
        batch = {"bytes": [p.read_bytes() for p in blobs], "path": [str(p) for p in blobs]}
        out = decode_batch(batch, spec)
        assert out["image"].shape[1:] == (3, 16, 16) and out["image"].dtype == "uint8"
        assert set(out["label"].tolist()) <= {0, 1, 2, 3}
        counts[split] = len(out["label"])
    assert sum(counts.values()) == 200  # every image in one split, none twice
    assert 30 <= counts["test"] <= 70 and 15 <= counts["val"] <= 45  # about 25% and 15%
    # The split is fixed by the image's bytes and the seed: the same on every call.
    assert split_band(blobs[0].read_bytes(), 0) == split_band(blobs[0].read_bytes(), 0)


def test_label_of_each_file_is_its_class_folder(tmp_path):
    root = mixed_size_folder(tmp_path / "folder", n=24)
    plan = plan_stream(DataConfig(name="imagefolder", root=str(root), image_size=8, streaming=True))
    _, spec = plan.sources["train"]
    spec = type(spec)(**{**spec.__dict__, "band": (0.0, 1.0)})
    paths = sorted(root.rglob("*.*"))
    out = decode_batch({"bytes": [p.read_bytes() for p in paths], "path": [str(p) for p in paths]}, spec)
    assert out["label"].tolist() == [plan.classes.index(p.parent.name) for p in paths]


def test_streaming_auto_keeps_small_local_sets_in_memory_and_streams_uris(tmp_path):
    root = mixed_size_folder(tmp_path / "folder", n=20)
    small = TrainRunConfig.from_dict({"data": {"name": "imagefolder", "root": str(root), "image_size": 8}})
    assert not isinstance(load_for_training(small), type(plan_stream(small.data)))
    assert should_stream(DataConfig(name="parquet", root="s3://bucket/shards"))
    assert should_stream(DataConfig(name="parquet", root="x", streaming="auto"), decoded_bytes=2**40)
    assert not should_stream(DataConfig(name="digits", streaming="auto"), decoded_bytes=2**40)


def test_streamed_run_needs_no_alternate_flip(tmp_path):
    root = mixed_size_folder(tmp_path / "folder", n=20)
    cfg = TrainRunConfig.from_dict({"data": {"name": "imagefolder", "root": str(root), "image_size": 8,
                                             "streaming": True}, "augment": {"flip": 0.5, "alternate_flip": True}})
    with pytest.raises(DataError, match="alternate_flip"):
        load_for_training(cfg)


def test_train_streams_a_mixed_size_folder_with_two_workers(tmp_path, capsys):
    """The whole path: Ray Data decodes and resizes in tasks, each of 2 DDP workers gets its
    shard, validation covers both, the best checkpoint is tested on a streamed test split
    and records the preprocessing."""
    root = mixed_size_folder(tmp_path / "folder", n=480)
    code = main(["train", "--workers", "2", "--cpus-per-worker", "0.5", "--storage", str(tmp_path / "runs"),
                 "--name", "stream", "--set", "data.name=imagefolder", "--set", f"data.root={root}",
                 "--set", "data.image_size=16", "--set", "data.streaming=true", "--set", "data.train_crop=random",
                 "--set", "train.epochs=3", "--set", "optim.lr=0.003"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "streaming ~" in out and "through Ray Data" in out
    summary = json.loads((tmp_path / "runs" / "stream" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test_accuracy"] > 0.5  # 4 classes: chance is 0.25
    history = pq.read_table(tmp_path / "runs" / "stream" / "history.parquet").to_pylist()
    assert [row["epoch"] for row in history] == [1, 2, 3]
    state = load_state(summary["checkpoint"])
    assert state["meta"]["preprocess"]["resize"] == [16, 16]
    assert state["meta"]["image_shape"] == [3, 16, 16]

    # predict applies the run's resizing to images of any size; export bakes it in.
    run = str(tmp_path / "runs" / "stream")
    out = tmp_path / "pred.parquet"
    assert main(["predict", "--checkpoint", run, "--data", f"imagefolder:{root}", "--out", str(out),
                 "--actors", "1"]) == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 480 and all(r["error"] == "" or r["error"] is None for r in rows)
    assert sum(r["pred_index"] == r["label"] for r in rows) / len(rows) > 0.5
    exported = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", run, "--out", str(exported)]) == 0
    module = torch.jit.load(str(exported))
    for size in ((20, 33), (40, 18)):  # any size goes in, the model sees 16 x 16
        assert module(torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)).shape == (2, 4)
    # The export's resize matches predict's (preprocess.resize) to within rounding.
    from trainers.preprocess import resize
    img = torch.randint(0, 256, (3, 29, 37), dtype=torch.uint8)
    ours = resize(img, (16, 16)).int()
    theirs = module._resized(img[None])[0].int()
    assert (ours - theirs).abs().max() <= 2


def test_s3_end_to_end_streamed_data_killed_driver_resume_results_predict_export(tmp_path, s3_server, capsys):
    """Parquet shards on a real S3-protocol server, results on it too. `raysweep train` runs
    in its own process (with its own embedded Ray) and is killed with SIGKILL once two
    checkpoints are on S3; `--resume` continues from the last one and keeps every epoch
    once. Then results, predict (inputs from S3) and export read the run back by URI."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import boto3
    import ray

    ray.shutdown()  # the embedded Ray that main() starts must inherit the S3 environment
    split, _, classes = DATASETS["synthetic"](DataConfig(name="synthetic", num_samples=360, image_size=12,
                                                         num_classes=3))
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):  # three shards, classes mixed in each
        part = slice(i * 120, (i + 1) * 120)
        write_parquet_images(shards / f"part-{i:05d}.parquet", split.x[part], split.y[part], classes)
    s3 = boto3.client("s3")
    for bucket in ("data", "runs"):
        s3.create_bucket(Bucket=bucket)
    for f in shards.iterdir():
        s3.upload_file(str(f), "data", f"cifar-like/{f.name}")
    args = ["train", "--workers", "1", "--storage", "s3://runs/exp", "--name", "s3run",
            "--set", "data.name=parquet", "--set", "data.root=s3://data/cifar-like", "--set", "train.epochs=3"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=Path(__file__).resolve().parent.parent,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoints = set()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(checkpoints) < 2:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            listing = s3.list_objects_v2(Bucket="runs", Prefix="exp/s3run/checkpoint_").get("Contents", [])
            checkpoints = {o["Key"].split("/")[2] for o in listing if o["Key"].endswith("/state.pt")}
            time.sleep(0.3)
        assert len(checkpoints) >= 2, "no two checkpoints on S3 in time"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, as if the machine died
        proc.wait()
        log.close()
    assert "streaming ~" in (tmp_path / "driver.log").read_text()
    assert not s3.list_objects_v2(Bucket="runs", Prefix="exp/s3run/summary.json").get("KeyCount")
    capsys.readouterr()
    assert main(args) == 2  # the name is taken: continuing needs --resume
    assert "--resume" in capsys.readouterr().err
    code = main([*args, "--resume"])
    assert code == 0, capsys.readouterr().out
    summary = json.loads(s3.get_object(Bucket="runs", Key="exp/s3run/summary.json")["Body"].read())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] >= 2, summary
    assert summary["test_accuracy"] > 0.4  # 3 classes
    assert summary["checkpoint"].startswith("s3://runs/exp/s3run/checkpoint_")  # a URI that opens later
    s3.download_file("runs", "exp/s3run/history.parquet", str(tmp_path / "history.parquet"))
    assert pq.read_table(tmp_path / "history.parquet").column("epoch").to_pylist() == [1, 2, 3]
    assert main(["results", "s3://runs/exp/s3run"]) == 0
    # The winner from S3, on inputs from S3.
    pred = tmp_path / "pred.parquet"
    assert main(["predict", "--checkpoint", "s3://runs/exp/s3run", "--data", "parquet:s3://data/cifar-like",
                 "--out", str(pred), "--actors", "1"]) == 0
    rows = pq.read_table(pred).to_pylist()
    assert len(rows) == 360 and sum(r["pred_index"] == r["label"] for r in rows) / 360 > 0.4
    assert rows[0]["id"].startswith("s3://data/cifar-like/part-00000.parquet#")
    assert main(["export", "--checkpoint", "s3://runs/exp/s3run", "--out", str(tmp_path / "m.pt")]) == 0


def test_unreachable_s3_endpoint_is_refused_naming_the_uri(tmp_path, monkeypatch, capsys):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    code = main(["train", "--storage", str(tmp_path / "runs"), "--name", "nos3",
                 "--set", "data.name=parquet", "--set", "data.root=s3://nowhere/shards"])
    assert code == 2
    assert "s3://nowhere/shards" in capsys.readouterr().err
    assert time.monotonic() - started < 60
