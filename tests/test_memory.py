"""trainers.memory: freed activations are reused instead of faulted in afresh every step."""

import subprocess
import sys
import textwrap

import pytest

from trainers import memory

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from trainers.memory import keep_freed_memory
    changed = keep_freed_memory() if sys.argv[1] == "keep" else False
    def step():  # what a training step does: activations (16-64 MiB here) written, then all freed
        acts = [torch.empty(n << 18).fill_(1.0) for n in (16, 64, 32, 64, 8)]
    for _ in range(3):  # the heap's steady state
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(changed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str, env: dict | None = None) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    changed, faults = out.stdout.split()
    return changed == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    changed, kept = _faults("keep")
    _, default = _faults("default")
    assert changed
    # 5 steps x 184 MiB = 235,520 pages: glibc's defaults map (and fault in) most of them afresh
    assert default > 100_000, default
    assert kept < 2_000, kept


def _thread_faults() -> int:
    """Minor page faults of 3 steps run in a new thread, as Ray Train and Tune run training,
    with activations over the 64 MiB a thread's own glibc arena can hold."""
    import resource
    import threading

    import torch

    out = {}

    def train():
        def step():
            acts = [torch.empty(n << 18).fill_(1.0) for n in (64, 256, 32)]  # noqa: F841 (freed together)

        for _ in range(3):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            step()
        out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    return out["faults"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_ray_workers_training_thread_reuses_its_memory(ray_local):
    """The job's runtime environment (cluster.connect.job_runtime_env, which the fixture's
    Ray uses too) reaches the worker process before glibc starts; 3 steps x 352 MiB would
    be ~270k faults without it."""
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    faults = ray_local.get(ray_local.remote(_thread_faults).remote())
    assert faults < 2_000, faults


def test_users_own_glibc_setting_wins(monkeypatch):
    memory.keep_freed_memory.cache_clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    try:
        assert memory.keep_freed_memory() is False
        assert memory.malloc_env() == {}
        assert memory.malloc_env({})["MALLOC_ARENA_MAX"] == "1"
    finally:
        memory.keep_freed_memory.cache_clear()
