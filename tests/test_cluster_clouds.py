"""cluster-gcp.yaml and cluster-azure.yaml go through Ray's own cluster-config preparation and
schema validation (what `ray up` does before any cloud call: provider defaults come from Ray's
installed defaults.yaml, no cloud SDK or credentials are touched), and keep cluster.yaml's
promises: a CPU head that takes no training, GPU workers from 0, a spot type, token auth, the
dashboard on the head's loopback, the same image and commands, a storage URI pyarrow opens."""

from __future__ import annotations

import json

import jsonschema
import pyarrow.fs as pafs
import pytest
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.connect import autoscaler_ceiling
from trainers.uris import open_location
from trainers.yamlfile import load_yaml_file
from test_cluster_yaml import ROOT, _prepared as _aws


def _gcp_spot(node_config: dict) -> bool:
    return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"


def _azure_spot(node_config: dict) -> bool:
    return node_config["azure_arm_parameters"].get("priority") == "Spot"


# file -> (provider type, how a node type asks for spot VMs, the --storage URI its header shows,
# the pyarrow filesystem that URI opens)
CLOUDS = {
    "cluster-gcp.yaml": ("gcp", _gcp_spot, "gs://BUCKET/raysweep", pafs.GcsFileSystem),
    "cluster-azure.yaml": ("azure", _azure_spot, "abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/raysweep",
                           pafs.AzureFileSystem),
}


def _prepared(name: str) -> dict:
    config = prepare_config(load_yaml_file(ROOT / name, name))
    validate_config(config)
    return config


@pytest.fixture(scope="module", params=sorted(CLOUDS))
def cloud(request):
    return request.param, _prepared(request.param)


def test_ray_accepts_the_config_with_the_node_types_of_cluster_yaml(cloud):
    name, config = cloud
    assert config["provider"]["type"] == CLOUDS[name][0] and config["head_node_type"] == "head"
    assert set(config["available_node_types"]) == set(_aws()["available_node_types"])
    assert config["max_workers"] == _aws()["max_workers"]


def test_ray_refuses_a_broken_one():
    """validate_config is a real check here, not a formality: a misspelt key fails it."""
    config = load_yaml_file(ROOT / "cluster-gcp.yaml", "cluster-gcp.yaml")
    config["available_node_types"]["gpu"]["max_worker"] = config["available_node_types"]["gpu"].pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


def test_the_head_takes_no_training_and_gpu_workers_start_from_zero(cloud):
    name, config = cloud
    types, spot = config["available_node_types"], CLOUDS[name][1]
    assert types["head"]["resources"] == {"CPU": 0}
    for worker in ("gpu", "gpu_spot"):
        assert types[worker]["min_workers"] == 0 and types[worker]["resources"]["GPU"] >= 1
    assert types["gpu"]["max_workers"] >= 1 and types["gpu_spot"]["max_workers"] == 0  # spot: opt in
    assert spot(types["gpu_spot"]["node_config"]) and not spot(types["gpu"]["node_config"])


def test_the_same_image_auth_and_private_dashboard_as_cluster_yaml(cloud):
    _, config = cloud
    aws = _aws()
    assert config["docker"] == aws["docker"]  # the image and how it runs
    assert config["file_mounts"] == aws["file_mounts"]  # the project and ~/.ray/auth_token
    assert config["setup_commands"] == aws["setup_commands"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert config[key] == aws[key]  # RAY_AUTH_MODE=token, --dashboard-host=127.0.0.1
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_the_storage_uri_the_file_shows_opens_with_pyarrow(cloud):
    name, _ = cloud
    uri, filesystem = CLOUDS[name][2], CLOUDS[name][3]
    assert uri in (ROOT / name).read_text()
    fs, path = open_location(uri, "--storage")  # builds the filesystem; no request is sent
    assert isinstance(fs, filesystem) and path.endswith("raysweep")


def test_raysweep_counts_the_gpu_nodes_the_autoscaler_may_add(cloud, tmp_path):
    _, config = cloud
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(json.dumps(config))  # as `ray up` leaves it on the head
    assert autoscaler_ceiling(bootstrap) == {"CPU": 64.0, "GPU": 8.0}  # 8 GPU nodes of 8 CPUs, spot off


@pytest.mark.parametrize("storage", ["abfs://raysweep@acct.dfs.core.windows.net/runs/r1/checkpoint_000002",
                                     "abfss://raysweep@acct.dfs.core.windows.net/runs/r1/checkpoint_000002"])
def test_an_azure_checkpoint_is_recorded_with_its_account(storage):
    """Issue #23: Ray's Checkpoint.path on Azure is CONTAINER/PATH; the URI raysweep records
    (summary.json, best.json) opens the same filesystem and path again, no request sent."""
    from ray.train import Checkpoint

    from trainers.distributed import checkpoint_uri

    fs, path = pafs.FileSystem.from_uri(storage)
    uri = checkpoint_uri(Checkpoint(path=path, filesystem=fs))
    assert uri == "abfs://raysweep@acct.dfs.core.windows.net/runs/r1/checkpoint_000002"
    again, again_path = pafs.FileSystem.from_uri(uri)
    assert again.equals(fs) and again_path == path


def test_an_azure_checkpoint_uri_never_carries_the_key():
    from ray.train import Checkpoint

    from trainers.distributed import checkpoint_uri

    fs = pafs.AzureFileSystem(account_name="acct", account_key="c2VjcmV0a2V5")
    assert checkpoint_uri(Checkpoint(path="c/run/ck", filesystem=fs)) == "abfs://c@acct.dfs.core.windows.net/run/ck"
