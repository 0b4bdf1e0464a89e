"""Remake the schema files here from KubeRay's CRDs (see README.md for the release):

    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayclusters.yaml > rayclusters.yaml
    python3 tests/data/kuberay/extract.py rayclusters.yaml v1.7.0 59d663ae... > tests/data/kuberay/ray.io_rayclusters.v1.json

Keeps the ``openAPIV3Schema`` of the served storage version (``v1``) unchanged, wrapped with
where it came from; everything else in the CRD (names, printer columns, v1alpha1) is left out.
"""

import hashlib
import json
import sys

import yaml


def extract(crd_text: str, release: str, commit: str, path: str) -> dict:
    crd = yaml.safe_load(crd_text)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    return {
        "source": {"repository": "https://github.com/ray-project/kuberay", "release": release, "commit": commit,
                   "file": path, "sha256": hashlib.sha256(crd_text.encode()).hexdigest(),
                   "group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": version["name"]},
        "openAPIV3Schema": version["schema"]["openAPIV3Schema"],
    }


if __name__ == "__main__":
    crd_file, release, commit = sys.argv[1:4]
    name = crd_file.rsplit("/", 1)[-1]
    text = open(crd_file).read()
    print(json.dumps(extract(text, release, commit, f"ray-operator/config/crd/bases/ray.io_{name}"),
                     separators=(",", ":")))
