"""Shared fixtures. Ray is real here: a local Ray per module, bound to loopback."""

from __future__ import annotations

import os

# Keep every Ray process on 127.0.0.1 (Ray otherwise swaps in the machine's address).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# An error no check caught prints its traceback here (cluster.cli.unexpected), so a failing test shows where.
os.environ.setdefault("RAYSWEEP_TRACEBACK", "1")
# `make test` runs 2 modules at once, each with a Ray of 2 CPUs, so torch's threads outnumber
# the 2 cores. torch's OpenMP threads then spin while they wait for work (libgomp's default),
# taking the cores from the threads that have work. Read when torch loads, hence before its
# import here; every Ray process and subprocess a test starts inherits it. Two processes of
# 2-thread conv steps on 2 cores (2026-12-02): 13.9 + 19.4 steps/s spinning, 33.4 + 35.2
# passive. Tests only: alone on the cores, spinning was the faster (68.5 vs 48.7 steps/s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# `make test` runs whole modules in 2 processes (pytest-xdist, --dist loadfile), handing each
# process the next module in collection order as it frees up. Starting the longest first keeps
# one process from running a long module alone at the end. Seconds are from a 2-process run on
# 2 cores (2026-12-01); modules not named are shorter and keep their order after these.
HEAVIEST_MODULES = ["test_benchmarks_smoke", "test_tune", "test_multinode", "test_train_ray", "test_streaming",
                    "test_predict", "test_jobs", "test_serve", "test_api", "test_tracking", "test_report"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVIEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))


@pytest.fixture
def no_ray_before():
    """For a test that checks a refused request started no Ray: shuts down the Ray an
    earlier module left up in this process (the CLI keeps its own up), whichever ran before."""
    import ray

    from cluster.connect import forget_dashboard_address

    ray.shutdown()
    forget_dashboard_address()


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs and the dashboard (Ray Train's cleanup of stopped
    trials needs its state API), shut down after the module."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from cluster.connect import embedded_ray_options, forget_dashboard_address

    ray.init(**embedded_ray_options(num_cpus=2))
    yield ray
    ray.shutdown()
    forget_dashboard_address()


@pytest.fixture
def tiny_parquet(tmp_path):
    """A small generated image set in the layout `data.name=parquet` reads (train + test)."""
    from trainers.config import DataConfig
    from trainers.data import DATASETS, write_parquet_images

    split, _, classes = DATASETS["synthetic"](DataConfig(name="synthetic", num_samples=400, image_size=16, num_classes=4))
    write_parquet_images(tmp_path / "train.parquet", split.x[:320], split.y[:320], classes)
    write_parquet_images(tmp_path / "test.parquet", split.x[320:], split.y[320:], classes)
    return tmp_path


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-protocol server (moto) on loopback; yields its endpoint URL with the
    environment set so that boto3 and ``pyarrow.fs.FileSystem.from_uri("s3://...")`` use it.
    Buckets must be created first (boto3), as on real S3."""
    import moto
    from moto.server import ThreadedMotoServer

    if tuple(int(p) for p in moto.__version__.split(".")[:3]) < (5, 2, 2):
        # moto 5.2.1 answers CompleteMultipartUpload with the wrong XML root (getmoto/moto#10055)
        # and every pyarrow write then fails after retries.
        pytest.fail(f"moto {moto.__version__} breaks pyarrow's S3 writes; pip install 'moto[server]>=5.2.2'")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    yield endpoint
    server.stop()
