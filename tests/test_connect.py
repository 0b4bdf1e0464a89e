"""cluster.connect's embedded Ray: the Ray Train settings its processes inherit (no Ray started here)."""

from __future__ import annotations

import os

import ray

from cluster import connect as connect_mod


def test_embedded_ray_gets_the_train_settings_before_it_starts(monkeypatch):
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(
        {k: os.environ.get(k) for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}))
    monkeypatch.setattr(connect_mod, "secure_token_file", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # recorded, so restored after the test
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # a user's (or a test's) own value wins
    connect_mod.connect()
    assert seen == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def test_a_running_cluster_keeps_its_own_train_settings(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(connect_mod, "_check_reachable", lambda address: None)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # recorded, so restored after the test
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    connect_mod.connect("127.0.0.1:6379")
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # preemption is real on cloud clusters
