"""cluster.yaml goes through Ray's own cluster-config preparation and schema validation
(what `ray up` does before any cloud call), and keeps the promises its comments make."""

from __future__ import annotations

import re
from pathlib import Path

import ray
from ray.autoscaler._private.util import prepare_config, validate_config

from trainers.yamlfile import load_yaml_file

ROOT = Path(__file__).resolve().parents[1]


def _load() -> dict:
    return load_yaml_file(ROOT / "cluster.yaml", "cluster.yaml")  # the loader raysweep uses everywhere


def _prepared() -> dict:
    config = prepare_config(_load())  # defaults for AWS merged in, setup commands merged, per-type limits
    validate_config(config)           # ray-schema.json and Ray's own consistency checks
    return config


def test_ray_accepts_the_cluster_config():
    config = _prepared()
    assert config["provider"]["type"] == "aws" and config["head_node_type"] == "head"
    assert set(config["available_node_types"]) == {"head", "gpu", "gpu_spot"}


def test_the_image_runs_the_ray_version_setup_py_pins():
    pin = re.search(r'"ray\[[^\]]*\]>=([\d.]+),<([\d.]+)"', (ROOT / "setup.py").read_text())
    assert pin, "setup.py pins ray as ray[...]>=X,<Y"
    low = tuple(int(p) for p in pin.group(1).split("."))
    high = tuple(int(p) for p in pin.group(2).split("."))
    image = _prepared()["docker"]["image"]
    version = re.search(r":(\d+\.\d+\.\d+)-", image)
    assert version, f"pin the image to a Ray release: {image}"
    image_version = tuple(int(p) for p in version.group(1).split("."))
    assert low <= image_version < high and image.endswith("-gpu")
    assert ray.__version__.startswith(version.group(1).rsplit(".", 1)[0])  # and the client here matches


def test_the_head_runs_drivers_and_gpu_workers_train_from_zero():
    types = _prepared()["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0} and "GPU" not in types["head"]["resources"]
    for name in ("gpu", "gpu_spot"):
        assert types[name]["min_workers"] == 0 and types[name]["resources"]["GPU"] >= 1
    assert types["gpu"]["max_workers"] >= 1
    assert types["gpu_spot"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}


def test_every_node_installs_the_project_and_keeps_auth_on_and_the_dashboard_private():
    config = _prepared()
    assert config["file_mounts"]["~/raysweep"] == "."
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):  # setup_commands merged in
        assert "pip install -q -e ~/raysweep" in commands and "chmod 600 ~/.ray/auth_token" in commands
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "RAY_AUTH_MODE=token ray start --address" in workers
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "s3://" in (ROOT / "cluster.yaml").read_text()  # results and checkpoints go to object storage


def test_raysweep_counts_the_gpu_nodes_the_autoscaler_may_add(tmp_path):
    """On the head, `ray up` leaves the prepared config as ~/ray_bootstrap_config.yaml; with GPU
    workers at 0, raysweep's resource check counts what they can grow to instead of refusing."""
    import json

    from cluster.connect import autoscaler_ceiling

    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(json.dumps(_prepared()))  # Ray writes it as JSON, which YAML reads
    assert autoscaler_ceiling(bootstrap) == {"CPU": 64.0, "GPU": 8.0}  # 8 x g5.2xlarge, spot off
    assert autoscaler_ceiling(tmp_path / "none") == {}
