"""Keep freed memory in the process between training steps (glibc's malloc only).

By default glibc hands every allocation over 128 KiB-32 MiB straight to the kernel (mmap)
and gives it back on free (munmap), and trims the heap's free top after every large free.
A training step frees and re-allocates the same activations each time, so every step pays
for zero-filled fresh pages: fast_cifar at batch 1024 took ~750k minor page faults per
step on this 2-core CPU, and 1.29x as long as without them (the ``overhead`` benchmark
measures it side by side). Raising both thresholds lets the heap reuse those pages.

Threads are the catch. Ray Train and Tune run the training function in a thread of their
own, and glibc gives each new thread its own arena, whose heaps can never hold more than
64 MiB: larger activations are mmapped whatever the threshold. One arena for the whole
process (``MALLOC_ARENA_MAX=1``) fixes that, but only for threads that have not
allocated yet, so for Ray's processes these settings go in as environment variables
(``malloc_env``, handed to ``ray.init`` as the job's runtime environment), read by glibc
as each worker process starts. ``keep_freed_memory`` sets the same in a running process,
for training in this process (``fit`` calls it).

The cost: a process keeps its peak heap instead of returning it, which a training process
reaches again at the next step anyway, and its threads share one arena's lock.

A user's own glibc settings win: with any of ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` in the environment nothing is changed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: keep up to 2 GiB of free top
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
              "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
USER_SETTINGS = (*MALLOC_ENV, "GLIBC_TUNABLES")


def _user_has_own(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return any(environ.get(k) for k in USER_SETTINGS)


def malloc_env(environ=None) -> dict[str, str]:
    """The environment variables that give a new process these settings; {} where the
    user set glibc's knobs (in ``environ``, default this process's environment)."""
    return {} if _user_has_own(environ) else dict(MALLOC_ENV)


@functools.cache
def keep_freed_memory() -> bool:
    """Set this process's malloc to reuse freed memory; True if it did (once per process).
    False on other C libraries (musl, macOS) or where the user set glibc's own knobs."""
    if not sys.platform.startswith("linux") or _user_has_own():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all([mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)])
