"""trainers.memory: freed activations are reused instead of faulted in afresh every step."""

import statistics
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
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):  # the heap's steady state
        step()
    per_step = []
    for _ in range(7):
        before = faults()
        step()
        per_step.append(faults() - before)
    print(changed, *per_step)
""")


def _faults(mode: str, env: dict | None = None) -> tuple[bool, int]:
    """Whether the setting was changed, and the median page faults of one step."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    changed, *per_step = out.stdout.split()
    return changed == "True", statistics.median(int(n) for n in per_step)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    changed, kept = _faults("keep")
    _, default = _faults("default")
    assert changed
    # one step writes 184 MiB = 47,104 pages: glibc's defaults map (and fault in) most of them afresh.
    # The median, because on a loaded machine a step now and then faults its pages in again (CI saw one)
    assert default > 20_000, default
    assert kept < 2_048, (kept, default)


def _mapped_by_a_thread() -> int:
    """Bytes of a 256 MiB tensor, made in a new thread (as Ray Train and Tune train), that
    glibc served with mmap (mallinfo2's hblkhd): such memory is unmapped again on free and
    faulted in afresh by the next step. A thread's own arena cannot hold over 64 MiB."""
    import ctypes
    import threading

    import torch

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = Mallinfo2
    out = {}

    def train():
        before = mallinfo2().hblkhd
        activation = torch.empty(64 << 20)  # noqa: F841 (alive while measured)
        out["mapped"] = mallinfo2().hblkhd - before

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    return out["mapped"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_ray_workers_training_thread_allocates_from_the_reusable_heap(ray_local):
    """The job's runtime environment (cluster.connect.job_runtime_env, which the fixture's
    Ray uses too) reaches each worker process before glibc starts."""
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    probe = ray_local.remote(_mapped_by_a_thread)
    assert ray_local.get(probe.remote()) < (1 << 20)
    glibc_default = probe.options(runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "64"}})
    assert ray_local.get(glibc_default.remote()) >= (256 << 20)  # what Ray Train's thread had before


def test_users_own_glibc_setting_wins(monkeypatch):
    memory.keep_freed_memory.cache_clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    try:
        assert memory.keep_freed_memory() is False
        assert memory.malloc_env() == {}
        assert memory.malloc_env({})["MALLOC_ARENA_MAX"] == "1"
    finally:
        memory.keep_freed_memory.cache_clear()
