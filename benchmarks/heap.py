"""A steady heap for the step benchmarks (glibc only; benchmarks, never the library).

glibc's allocator gives the top of its heap back to the operating system whenever the free block
there outgrows a threshold it adapts at run time. A training step whose peak memory outgrows what
the heap kept from earlier steps then regrows it, page fault by page fault, on every step; whether
it does depends on the process's history, not on the step. Measured on LeNet-5 (one thread, fresh
processes): a plain CE step paid 0-1 500 minor faults per step at batch 128 and 3 300 at batch 512,
the CE + penalty step 0-4 300 at batch 128, 1-3 ms of system time and colder caches each.

:func:`steady` fixes both thresholds (``mallopt``), as ``MALLOC_TRIM_THRESHOLD_`` /
``MALLOC_MMAP_THRESHOLD_`` in the environment or jemalloc/tcmalloc would, so that no step of a
benchmark pays them and the ratios compare the steps' own work. It holds for the rest of the
process. ``FASTLAND_BENCH_HEAP=default`` leaves glibc's adaptive behaviour on (to measure it).
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below it come from the heap
TRIM_THRESHOLD = 512 << 20  # keep up to 512 MiB of free heap instead of trimming it


def steady() -> str:
    """Fix glibc's trim and mmap thresholds; returns the heap's label for ``extra_info["heap"]``:
    ``"steady"`` (fixed here), ``"default"`` (asked for by ``FASTLAND_BENCH_HEAP=default``) or
    ``"default (not glibc)"``."""
    if os.environ.get("FASTLAND_BENCH_HEAP", "steady") == "default":
        return "default"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "default (not glibc)"
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "steady" if ok else "default (mallopt refused)"
