"""cluster.connect's embedded Ray: the Ray Train settings its processes inherit (no Ray started here)."""

from __future__ import annotations

import os

import ray

from cluster import connect as connect_mod


def test_embedded_ray_gets_its_settings_before_it_starts(monkeypatch):
    seen = {}
    keys = (*connect_mod.EMBEDDED_RAY_ENV, "RAY_API_SERVER_ADDRESS")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update({k: os.environ.get(k) for k in keys},
                                                              port=kw["dashboard_port"], runtime_env=kw["runtime_env"]))
    monkeypatch.setattr(connect_mod, "secure_token_file", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in keys:
        monkeypatch.setenv(key, "x")  # recorded, so restored after the test
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_event_stats", "1")  # a user's own value wins
    connect_mod.connect()
    assert seen["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert seen["RAY_enable_metrics_collection"] == "0"  # nothing reads an embedded Ray's metrics
    assert seen["RAY_event_stats"] == "1"
    # Every Ray process (Ray Train's placement-group cleaner among them) finds this
    # cluster's state API, not another Ray's on the same machine.
    assert seen["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{seen['port']}"
    # Ray Train's training threads reuse freed activations (trainers.memory)
    assert seen["runtime_env"]["env_vars"]["MALLOC_ARENA_MAX"] == "1"


def test_ray_train_settings_apply_around_our_fits_only(monkeypatch):
    from trainers.distributed import RAY_TRAIN_ENV, ray_train_env

    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    monkeypatch.setenv(key, "x")  # recorded, so restored after the test
    monkeypatch.delenv(key)
    with ray_train_env():
        assert os.environ[key] == RAY_TRAIN_ENV[key]
    assert key not in os.environ  # a Tune trial's own TorchTrainer keeps Ray's default
    monkeypatch.setenv(key, "0.7")  # a user's own value wins
    with ray_train_env():
        assert os.environ[key] == "0.7"
    assert os.environ[key] == "0.7"


def test_a_running_cluster_keeps_its_own_train_settings(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(connect_mod, "_check_reachable", lambda address: None)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user's own glibc setting wins
    for key in connect_mod.EMBEDDED_RAY_ENV:
        monkeypatch.setenv(key, "x")  # recorded, so restored after the test
        monkeypatch.delenv(key)
    connect_mod.connect("127.0.0.1:6379")
    # preemption is real on cloud clusters, and their metrics may be watched
    assert not set(connect_mod.EMBEDDED_RAY_ENV) & set(os.environ)
    assert seen["runtime_env"] is None


def test_a_malformed_address_is_refused_even_with_a_ray_already_up(monkeypatch):
    """Seen in a full run: ``serve status --address ray://`` exited 2 with no message, as the
    Ray an earlier module left up in that process was used instead of refusing the address."""
    import pytest

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("a Ray was already up"))
    for bad in ("ray://", "127.0.0.1:99999"):
        with pytest.raises(connect_mod.ClusterError, match="--address"):
            connect_mod.connect(bad)
    connect_mod.connect("auto")  # joins the Ray this process holds
    connect_mod.connect("127.0.0.1:6379")


def test_the_controller_polls_less_often_while_no_report_comes(monkeypatch):
    """AdaptivePollController: the fastest interval until the first report; then 1.5x longer
    after each poll that brings no report, up to 1 s, and the fastest again after one that
    does. (Ray's worker group is stood in for: what is tested is our interval, not Ray's
    polling.)"""
    import asyncio

    import pytest
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus

    from trainers.ray_private import AdaptivePollController

    reports = iter([None, None, "epoch 1"] + [None] * 6 + ["epoch 2", None])

    async def poll(self):
        return WorkerGroupPollStatus({0: WorkerStatus(running=True, training_report=next(reports))})

    monkeypatch.setattr(TrainController, "_poll_workers", poll)
    controller = AdaptivePollController.__new__(AdaptivePollController)  # no Ray: only its interval is used
    controller._health_check_interval_s = controller._fastest_s = 0.2
    controller._reported = False
    intervals = []
    for _ in range(11):
        asyncio.run(controller._poll_workers())
        intervals.append(controller._health_check_interval_s)
    assert intervals[:3] == pytest.approx([0.2, 0.2, 0.2])  # start-up, then the first report
    assert intervals[3:6] == pytest.approx([0.3, 0.45, 0.675])
    assert intervals[7:9] == [1.0, 1.0]  # the slowest
    assert intervals[9:] == pytest.approx([0.2, 0.3])  # a report: fast again
