"""With Ray on loopback, nothing a `raysweep train` starts listens beyond it: not Ray's
processes, not the workers' torch.distributed store (TCPStore) or gloo's connections."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|\[::ffff:127\.\d+\.\d+\.\d+\]):\d+$")
USER = re.compile(r'\("([^"]+)",pid=(\d+)')


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in found]
        found.update(children)
        frontier += children
    return found


def _listeners(pids: set[int]) -> set[tuple[str, str]]:
    """(process name, local address) of every TCP listener owned by one of ``pids``."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    seen = set()
    for line in out.splitlines():
        cols = line.split()
        for name, pid in USER.findall(line):
            if int(pid) in pids:
                seen.add((name, cols[3]))
    return seen


# `raysweep train` on a machine with no Ray running: the CLI starts its embedded Ray.
TRAIN_ON_A_FRESH_RAY = r'''
import json, os, sys
import ray
from cluster.cli import main
code = main(["train", "--workers", "2", "--storage", sys.argv[1], "--name", "lo", "--set", "train.epochs=2",
             "--set", "data.limit=400"])
node = ray._private.worker._global_node
print(json.dumps({"code": code, "webui": node.address_info.get("webui_url"),
                  "api": os.environ.get("RAY_API_SERVER_ADDRESS")}))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ss")
def test_a_two_worker_train_on_a_fresh_machine_listens_only_on_loopback_with_no_dashboard(tmp_path):
    """One run, two checks. Nothing it starts listens beyond loopback (Ray's processes, the
    workers' TCPStore and gloo). And the embedded Ray has no dashboard: a single fit needs no
    state API (its placement group ends with the job), and the dashboard's processes slow
    training on a small machine (cluster.connect.embedded_ray_options)."""
    cmd = [sys.executable, "-c", TRAIN_ON_A_FRESH_RAY, str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    seen: set[tuple[str, str]] = set()
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                seen |= _listeners(_descendants(proc.pid))
                time.sleep(0.5)  # the store and gloo listen from start-up to the end
        finally:
            if proc.poll() is None:
                proc.kill()
            stdout = proc.stdout.read()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    workers = {addr for name, addr in seen if name.startswith("ray::RayTrainW")}
    assert workers, f"no training worker's listener was seen (the test saw: {sorted(seen)})"
    exposed = sorted((name, addr) for name, addr in seen if not LOOPBACK.match(addr))
    assert not exposed, f"listening beyond loopback: {exposed}"
    ran = json.loads(stdout.strip().splitlines()[-1])
    assert ran["code"] == 0 and not ran["webui"] and ran["api"] is None
    assert json.loads((tmp_path / "lo" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux names its loopback interface lo")
def test_only_loopback_master_addresses_take_the_loopback_path():
    from trainers.process_group import is_loopback, loopback_interface

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.0.1.1")
    assert not is_loopback("10.0.0.5") and not is_loopback("192.0.2.2") and not is_loopback("head-node")
    assert loopback_interface() == "lo"


def test_untested_ray_versions_get_rays_public_torch_config(monkeypatch, caplog):
    """The loopback store uses Ray's private parts, so it is enabled only on the Ray versions
    where the listener test above passed; other versions get Ray's own TorchConfig, with a
    warning that says what that means."""
    from ray.train.torch import TorchConfig

    from trainers import process_group

    assert type(process_group.torch_config()) is process_group.LoopbackTorchConfig
    monkeypatch.setattr(process_group, "TESTED_RAY_VERSIONS", ())
    with caplog.at_level("WARNING"):
        config = process_group.torch_config()
    assert type(config) is TorchConfig
    assert "listens on all interfaces" in caplog.text
