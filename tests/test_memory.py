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


def test_users_own_glibc_setting_wins(monkeypatch):
    memory.keep_freed_memory.cache_clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    try:
        assert memory.keep_freed_memory() is False
    finally:
        memory.keep_freed_memory.cache_clear()
