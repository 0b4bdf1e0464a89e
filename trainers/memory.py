"""Keep freed memory in the process between training steps (glibc's malloc only).

By default glibc hands every allocation over 128 KiB-32 MiB straight to the kernel (mmap)
and gives it back on free (munmap), and trims the heap's free top after every large free.
A training step frees and re-allocates the same activations each time, so every step pays
for zero-filled fresh pages: fast_cifar at batch 512 took ~290k minor page faults per step
on this 2-core CPU, 10-15% of the step's time (measured side by side by the ``overhead``
benchmark). Raising both thresholds lets the heap reuse those pages (0 faults per step).
The cost: the process keeps its peak heap instead of returning it, which a training
process reaches again at the next step anyway.

A user's own glibc settings win: with ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``
or ``GLIBC_TUNABLES`` in the environment nothing is changed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: keep up to 2 GiB of free top
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def keep_freed_memory() -> bool:
    """Set this process's malloc to reuse freed memory; True if it did (once per process).
    False on other C libraries (musl, macOS) or where the user set glibc's own knobs."""
    if not sys.platform.startswith("linux") or any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
