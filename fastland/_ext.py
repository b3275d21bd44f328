"""Lazy loading of the C++ extension ``fastland._C``.

The extension holds the CPU kernels of the fused ops (csrc/). It is optional:
without it the reference (pure-PyTorch) backend serves CPU tensors, and one
warning says so the first time a kernel is wanted.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings


@functools.lru_cache(maxsize=None)
def extension_available() -> bool:
    """True when ``fastland._C`` imports (its kernels are then registered for CPU)."""
    if os.environ.get("FASTLAND_SKIP_EXT", "0") == "1":
        return False
    try:
        importlib.import_module("fastland._C")
    except ImportError as err:  # not built, or built against another torch
        warnings.warn(
            f"fastland: the C++ extension fastland._C is not available ({err}); "
            "CPU tensors use the pure-PyTorch reference ops. Build it with "
            "`pip install -e . --no-build-isolation`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
