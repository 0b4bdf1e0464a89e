"""k8s/raycluster.yaml and k8s/rayjob.yaml against KubeRay's published CRD schemas (v1.7.0, kept
in tests/data/kuberay), validated the way `kubectl apply --validate=strict` does, against the
checks KubeRay's operator makes when it reconciles them, and for the promises their comments
make: the pinned Ray, auth on, a private dashboard, GPU pods from 0, a cost cap, S3 results, a
raysweep command line that raysweep's own parser accepts. No cluster, no Ray, no network."""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "tests" / "data" / "kuberay"
GPU = "nvidia.com/gpu"


# --------------------------------------------------------------------------- the files

def _docs(name: str) -> dict[str, dict]:
    """The documents of a k8s/ file by kind (each kind once)."""
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / name).read_text()) if d is not None]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), f"{name}: one document per kind, got {kinds}"
    return {d["kind"]: d for d in docs}


def _cluster() -> dict:
    return _docs("raycluster.yaml")["RayCluster"]


def _job() -> dict:
    return _docs("rayjob.yaml")["RayJob"]


def _groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def _containers(spec: dict):
    """(where, pod spec, container) for every container of the head and the worker groups."""
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    for where, pod in pods:
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield where, pod, c


# --------------------------------------------------------------------------- strict schema validation

def _crd(kind: str) -> tuple[dict, dict]:
    data = json.loads((CRDS / f"ray.io_{kind.lower()}s.v1.json").read_text())
    return data["source"], data["openAPIV3Schema"]


# What the API server itself checks of `metadata` (the CRD leaves it to ObjectMeta).
OBJECT_META = {"type": "object", "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "namespace": {"type": "string"}, "generateName": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}


def _strict(node):
    """The schema as a strict API server applies it, in JSON-schema terms: unknown fields are
    errors wherever the schema neither lists nor preserves them (the API server would prune
    them, and `--validate=strict` refuses them), and `nullable` admits null."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in ("enum", "default", "required", "x-kubernetes-list-map-keys") else _strict(v))
           for k, v in node.items() if k != "properties"}
    if "properties" in node:
        out["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
    if node.get("type") == "object" and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `set` items are unique, `map` items unique by their map keys."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    elif list_type == "map":
        fields = schema.get("items", {}).get("properties", {})
        keys = [tuple(item.get(k, fields.get(k, {}).get("default")) for k in schema["x-kubernetes-list-map-keys"])
                for item in instance if isinstance(item, dict)]
    else:  # atomic: no rule on the items
        return
    for key in {k for k in keys if keys.count(k) > 1}:
        yield jsonschema.ValidationError(f"duplicate entry {key} in a list of type {list_type}")


FORMATS = jsonschema.FormatChecker()
for _name, _bits in (("int32", 31), ("int64", 63)):
    FORMATS.checks(_name)(lambda v, b=_bits: not isinstance(v, int) or -(2 ** b) <= v < 2 ** b)
KubeValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


def schema_errors(doc: dict, strict: bool = True) -> list[str]:
    """What the API server would refuse in ``doc`` (a RayCluster or RayJob), as 'path: message'."""
    _, schema = _crd(doc.get("kind", "RayCluster"))
    schema = copy.deepcopy(schema)
    schema["properties"]["metadata"] = OBJECT_META
    validator = KubeValidator(_strict(schema) if strict else schema, format_checker=FORMATS)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in validator.iter_errors(doc))


def _cel_paths(node, path=()):
    """Paths of the fields whose x-kubernetes-validations (CEL) rules this test cannot evaluate."""
    if not isinstance(node, dict):
        return
    if node.get("x-kubernetes-validations"):
        yield path
    for key, sub in node.get("properties", {}).items():
        yield from _cel_paths(sub, path + (key,))
    if isinstance(node.get("items"), dict):
        yield from _cel_paths(node["items"], path + ("*",))


def _present(doc, path) -> bool:
    if not path:
        return True
    if path[0] == "*":
        return isinstance(doc, list) and any(_present(d, path[1:]) for d in doc)
    return isinstance(doc, dict) and path[0] in doc and _present(doc[path[0]], path[1:])


# --------------------------------------------------------------------------- KubeRay's operator checks

def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"v?(\d+)\.(\d+)\.(\d+)", text).groups())


def _env(container: dict, name: str):
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def operator_problems(spec: dict) -> list[str]:
    """The refusals of ValidateRayClusterSpec (ray-operator/controllers/ray/utils/validation.go,
    v1.7.0) that concern these files: the operator checks them only after `kubectl apply`."""
    p = []
    head = spec["headGroupSpec"]
    v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    head_env_v2 = _env(head["template"]["spec"]["containers"][0], "RAY_enable_autoscaler_v2")
    if autoscaling and (spec.get("autoscalerOptions") or {}).get("version") and head_env_v2 is not None:
        p.append("both autoscalerOptions.version and RAY_enable_autoscaler_v2 are set")
    groups = [("head", head)] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, g in groups:
        if not g["template"]["spec"].get("containers"):
            p.append(f"{name}: no container")
        if g.get("resources") and set(g.get("rayStartParams", {})) & {"num-cpus", "num-gpus", "memory", "resources"}:
            p.append(f"{name}: resources in both rayStartParams and resources")
        if v2 and g["template"]["spec"].get("restartPolicy", "Never") != "Never":
            p.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
    for name, g in groups[1:]:
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if (lo is None or hi is None) and not autoscaling:
            p.append(f"{name}: minReplicas and maxReplicas are needed without autoscaling")
        if lo is not None and hi is not None and not 0 <= lo <= hi:
            p.append(f"{name}: minReplicas {lo} / maxReplicas {hi}")
        if g.get("idleTimeoutSeconds") is not None and not (v2 or head_env_v2 in ("1", "true")):
            p.append(f"{name}: idleTimeoutSeconds needs autoscaler v2")
        if g.get("priority") and not (v2 and _version(spec.get("rayVersion", "0.0.0")) >= (2, 56, 0)):
            p.append(f"{name}: priority needs autoscaler v2 and Ray >= 2.56.0")
    if (spec.get("authOptions") or {}).get("mode") == "token" and \
            not (spec.get("rayVersion") and _version(spec["rayVersion"]) >= (2, 52, 0)):
        p.append("authOptions.mode token needs rayVersion >= 2.52.0")
    return p


def rayjob_operator_problems(job: dict) -> list[str]:
    """ValidateRayJobSpec and ValidateRayJobMetadata (same file) for what this RayJob uses."""
    spec, p = job["spec"], []
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]) or len(job["metadata"]["name"]) > 47:
        p.append("metadata.name: a DNS-1035 label of at most 47 characters")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        p.append("one of rayClusterSpec or clusterSelector")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            p.append(f"{key} must be positive")
    if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "{}")), dict):
        p.append("runtimeEnvYAML is not a YAML mapping")
    return p + operator_problems(spec["rayClusterSpec"]) if spec.get("rayClusterSpec") else p


# --------------------------------------------------------------------------- validation, and that it bites

def test_the_schemas_are_kuberay_v1_7_0_and_stay_small():
    for kind in ("RayCluster", "RayJob"):
        source, schema = _crd(kind)
        assert (source["release"], source["commit"], source["kind"], source["version"]) == \
            ("v1.7.0", "59d663aeec13760646da3db9c1cf8cfe883e30b7", kind, "v1")
        assert "headGroupSpec" in json.dumps(schema)
    assert sum(f.stat().st_size for f in CRDS.iterdir()) < 1_000_000


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_the_files_pass_strict_schema_validation_and_the_operators_checks(name):
    doc = _docs(name)["RayCluster" if name == "raycluster.yaml" else "RayJob"]
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(doc) == []
    problems = operator_problems(doc["spec"]) if doc["kind"] == "RayCluster" else rayjob_operator_problems(doc)
    assert problems == []
    if doc["kind"] == "RayCluster":
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 53
    _, schema = _crd(doc["kind"])
    unchecked = [p for p in _cel_paths(schema) if _present(doc, p)]
    assert unchecked == [], f"fields with CEL rules (x-kubernetes-validations) that this test cannot evaluate: {unchecked}"


def _head(doc):
    return doc["spec"]["headGroupSpec"]


def _gpu_container(doc):
    return _groups(doc["spec"])["gpu"]["template"]["spec"]["containers"][0]


# (what is wrong, how to make it wrong, what the error says)
BROKEN = [
    ("typo'd key under headGroupSpec", lambda d: _head(d).update(rayStartParam={}), "'rayStartParam' was unexpected"),
    ("typo'd key in a container", lambda d: _gpu_container(d).update(resource={}), "'resource' was unexpected"),
    ("typo'd key at the spec's top", lambda d: d["spec"].update(enableInTreeAutoscalling=True), "was unexpected"),
    ("string where an integer goes", lambda d: _groups(d["spec"])["gpu"].update(maxReplicas="8"), "is not of type 'integer'"),
    ("integer past int32", lambda d: _groups(d["spec"])["gpu"].update(maxReplicas=2 ** 31), "is not a 'int32'"),
    ("unknown auth mode", lambda d: d["spec"]["authOptions"].update(mode="tokens"), "is not one of ['disabled', 'token']"),
    ("not a quantity", lambda d: _gpu_container(d)["resources"]["limits"].update(cpu="seven"), "does not match"),
    ("worker group without groupName", lambda d: _groups(d["spec"])["gpu"].pop("groupName"), "'groupName' is a required property"),
    ("the same container port twice", lambda d: _head(d)["template"]["spec"]["containers"][0]["ports"].append(
        {"containerPort": 8265, "name": "dash2"}), "duplicate entry (8265, 'TCP')"),
    ("unknown metadata field", lambda d: d["metadata"].update(nmae="x"), "'nmae' was unexpected"),
]


@pytest.mark.parametrize("what,break_it,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_strict_validation_refuses_a_broken_raycluster(what, break_it, message):
    doc = _cluster()
    break_it(doc)
    errors = schema_errors(doc)
    assert any(message in e for e in errors), errors


def test_typos_pass_the_plain_schema_so_strictness_is_what_catches_them():
    """The CRDs prune unknown fields rather than refuse them: a typo would vanish silently."""
    doc = _cluster()
    _head(doc)["rayStartParam"] = {"num-cpus": "0"}
    assert schema_errors(doc, strict=False) == []
    assert schema_errors(doc) != []


@pytest.mark.parametrize("break_it,message", [
    (lambda s: s["autoscalerOptions"].pop("version") and _groups(s)["gpu"].update(idleTimeoutSeconds=60),
     "idleTimeoutSeconds needs autoscaler v2"),
    (lambda s: s.update(rayVersion="2.51.0"), "token needs rayVersion >= 2.52.0"),
    (lambda s: _groups(s)["gpu"].update(minReplicas=9), "minReplicas 9 / maxReplicas 8"),
    (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].setdefault("env", []).append(
        {"name": "RAY_enable_autoscaler_v2", "value": "true"}), "both autoscalerOptions.version"),
])
def test_the_operator_checks_refuse_what_kuberay_would(break_it, message):
    spec = _cluster()["spec"]
    break_it(spec)
    assert any(message in p for p in operator_problems(spec)), operator_problems(spec)


# --------------------------------------------------------------------------- pins and settings

def _setup_py() -> list[str]:
    call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))


def test_every_image_runs_the_ray_version_setup_py_pins():
    ray_pin = next(r for r in _setup_py() if r.startswith("ray["))
    low, high = (_version(v + ".0" * (2 - v.count("."))) for v in re.search(r">=([\d.]+),<([\d.]+)", ray_pin).groups())
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = _docs(name)["RayCluster" if name == "raycluster.yaml" else "RayJob"]
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert low <= _version(spec["rayVersion"]) < high
        for where, _, c in _containers(spec):
            image = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(gpu|cpu)", c["image"])
            assert image, f"{name} {where}: pin the image to a Ray release: {c['image']}"
            assert image.group(1) == spec["rayVersion"], f"{name} {where}: image and rayVersion differ"
            if GPU in c["resources"]["limits"]:
                assert image.group(2) == "gpu"
    installed = importlib.metadata.version("ray")  # and the client here speaks the same Ray
    assert installed.rsplit(".", 1)[0] == _cluster()["spec"]["rayVersion"].rsplit(".", 1)[0]


def test_every_pod_installs_raysweeps_dependencies_from_setup_py():
    wanted = sorted(r for r in _setup_py() if not r.startswith("ray["))
    for where, _, c in _containers(_cluster()["spec"]):
        (command,) = c["args"]
        words = shlex.split(command)
        assert words[:3] == ["pip", "install", "-q"] and sorted(words[3:]) == wanted, where


def test_the_head_trains_nothing_and_autoscaler_v2_scales_gpus_from_zero():
    spec = _cluster()["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert GPU not in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert 0 < spec["autoscalerOptions"]["idleTimeoutSeconds"] <= 1800
    groups = _groups(spec)
    for name in ("gpu", "gpu-spot"):
        g = groups[name]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits[GPU]) >= 1 and g["template"]["spec"]["containers"][0]["resources"]["requests"][GPU] == limits[GPU]
        assert g["minReplicas"] == 0 and g["replicas"] == 0
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in g["template"]["spec"]["tolerations"]
    assert groups["gpu"]["maxReplicas"] >= 1 and groups["gpu-spot"]["maxReplicas"] == 0  # spot: off until asked
    cpu = groups["cpu"]
    assert GPU not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"] and cpu["maxReplicas"] >= 1


def test_auth_is_on_and_the_dashboard_stays_inside_the_cluster():
    for name in ("raycluster.yaml", "rayjob.yaml"):
        docs = _docs(name)
        assert set(docs) <= {"ConfigMap", "RayCluster", "RayJob"}, f"{name}: no Service or Ingress of its own"
        doc = docs.get("RayCluster") or docs["RayJob"]
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["authOptions"] == {"mode": "token"}
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
        assert (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        assert "dashboard-host" not in head["rayStartParams"]  # KubeRay's in-pod default; the Service stays private
        for where, pod, c in _containers(spec):
            assert _env(c, "RAY_AUTH_MODE") in (None, "token"), where
            assert not pod.get("hostNetwork") and all("hostPort" not in p for p in c.get("ports", [])), where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert pod.get("automountServiceAccountToken", where == "head") is (where == "head"), where
            assert {"secretRef": {"name": "raysweep-s3"}} in c["envFrom"], where  # S3 keys from a Secret, not the file


def test_raysweep_on_the_head_counts_the_pods_the_autoscaler_may_add(tmp_path):
    """The ConfigMap mounted as the head's ~/ray_bootstrap_config.yaml holds each worker group's
    Ray resources (what KubeRay starts Ray with: the container's CPU and GPU limits) times its
    maxReplicas, so raysweep's check does not refuse --gpu while the GPU group is at 0."""
    from cluster.connect import autoscaler_ceiling

    docs = _docs("raycluster.yaml")
    spec = docs["RayCluster"]["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/home/ray/ray_bootstrap_config.yaml"]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(configmap["data"][mount["subPath"]])
    expected: dict[str, float] = {}
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        for ray_name, k8s_name in (("CPU", "cpu"), ("GPU", GPU)):
            expected[ray_name] = expected.get(ray_name, 0.0) + float(limits.get(k8s_name, 0)) * g["maxReplicas"]
    assert autoscaler_ceiling(bootstrap) == expected == {"CPU": 84.0, "GPU": 8.0}


def test_the_rayjob_runs_the_same_cluster_with_a_cost_cap_and_s3_results():
    cluster, job_docs = _docs("raycluster.yaml"), _docs("rayjob.yaml")
    spec = job_docs["RayJob"]["spec"]
    assert spec["rayClusterSpec"] == cluster["RayCluster"]["spec"] and job_docs["ConfigMap"] == cluster["ConfigMap"]
    assert spec["shutdownAfterJobFinishes"] is True and spec.get("ttlSecondsAfterFinished", 0) <= 600
    assert 0 < spec["activeDeadlineSeconds"] <= 24 * 3600 and 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    assert spec.get("backoffLimit", 0) == 0  # a retry would re-run the same --name, which raysweep refuses
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert re.fullmatch(r"s3://[^/]+/.+\.zip", runtime_env["working_dir"])


def _entrypoint_args(entrypoint: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "cluster.cli"], "the entrypoint `raysweep submit` sends"
    return words[3:]


def test_the_rayjobs_command_is_one_raysweep_accepts():
    """Parsed by raysweep's own parser with the checks `raysweep submit` makes (jobs_cmd.job_spec),
    its --set keys and search space checked as `raysweep tune` checks them before Ray starts."""
    from cluster.cli import build_parser
    from cluster.jobs_cmd import job_spec
    from search_spaces.space import load_space
    from trainers.config import load_run_values
    from trainers.configtools import ConfigError

    args = _entrypoint_args(_job()["spec"]["entrypoint"])
    spec = job_spec(args, local_cluster=False)
    parsed = build_parser().parse_args(args)
    assert parsed.command == "tune" and parsed.gpu and parsed.name
    assert parsed.storage.startswith("s3://") and spec.results == f"{parsed.storage}/{parsed.name}"
    space = load_space(parsed.space)
    user = load_run_values(parsed.config, parsed.overrides)
    assert space.trial_config(user, space.default_point()).data.root.startswith("s3://")  # data from S3 too
    with pytest.raises(ConfigError):  # and the checks bite: a misspelt option, a misspelt key
        job_spec([a.replace("--trials", "--trails") for a in args], local_cluster=False)
    with pytest.raises(ConfigError, match="rooot"):
        load_run_values(None, [o.replace("data.root=", "data.rooot=") for o in parsed.overrides])


# --------------------------------------------------------------------------- preemption on Kubernetes

FAKE_TRAINER = """
import signal, sys, time
def stop(*_):  # as raysweep's workers do: finish the step, checkpoint, then end
    time.sleep(0.5)
    open(sys.argv[1], "w").write("SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


def _fake(title: str, marker: Path):
    """A process whose command line starts with ``title``, as Ray's retitled workers' do."""
    import subprocess
    import sys

    proc = subprocess.Popen(["bash", "-c", f'exec -a "{title}" "$0" -c "$1" "$2"', sys.executable, FAKE_TRAINER,
                             str(marker)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_the_gpu_pods_prestop_hook_tells_the_training_workers_and_waits_for_them(tmp_path):
    """Kubernetes runs a pod's preStop hook before its SIGTERM (which goes to `ray start`,
    not the workers). The hook, run here as the pod would, sends SIGTERM to Ray Train
    workers only, and returns once they have ended; the grace period covers its wait."""
    import subprocess
    import sys
    import time

    commands = set()
    for spec in (_cluster()["spec"], _job()["spec"]["rayClusterSpec"]):
        pods = {name: g["template"]["spec"] for name, g in _groups(spec).items() if name.startswith("gpu")}
        assert set(pods) == {"gpu", "gpu-spot"}
        for pod in pods.values():
            assert pod["terminationGracePeriodSeconds"] >= 120 + 30  # the hook's wait + Ray's drain
            commands.add(tuple(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]))
    (command,) = commands  # one hook, the same in both files
    assert command[:2] == ("python", "-c")
    trainer = _fake("ray::RayTrainWorker.run_train_fn", tmp_path / "trainer")
    bystander = _fake("ray::IDLE", tmp_path / "idle")
    try:
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", command[2]], check=True, timeout=60)
        assert trainer.wait(timeout=1) == 0 and (tmp_path / "trainer").read_text() == "SIGTERM"
        assert 0.4 < time.monotonic() - started < 30  # it waited for the worker to end, no longer
        assert bystander.poll() is None and not (tmp_path / "idle").exists()
    finally:
        for proc in (trainer, bystander):
            proc.kill()
            proc.wait()
