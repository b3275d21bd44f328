"""Loading of the C++ extension ``fastland._C`` (the CPU kernels of the fused ops, csrc/).

The extension is optional: without it the pure-PyTorch references serve CPU tensors.
:mod:`fastland.ops` loads it once, after defining the ops' schemas (its kernels register
under them). When it does not load, one warning says why and what to do:

* installed with ``FASTLAND_SKIP_EXT=1`` (the install leaves the marker ``fastland/_C.skipped``):
  the build was skipped on purpose; the warning says how to build it if wanted;
* otherwise (not built, or built against another torch): the import error and how to build it.

``FASTLAND_SKIP_EXT=1`` at run time skips loading silently.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Optional

_BUILD = "`pip install -e . --no-build-isolation` (without FASTLAND_SKIP_EXT)"
_SKIP_MARKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.skipped")


def _skipped_at_install() -> bool:
    return os.path.exists(_SKIP_MARKER)


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
    """Import ``fastland._C``; None when it loaded, else the reason it did not."""
    if os.environ.get("FASTLAND_SKIP_EXT", "0") == "1":
        return "FASTLAND_SKIP_EXT=1 is set"
    try:
        importlib.import_module("fastland._C")
    except ImportError as err:  # not built, or built against another torch
        if _skipped_at_install():
            reason = "fastland was installed with FASTLAND_SKIP_EXT=1, so the extension was not built"
            advice = f"this is deliberate; to use the C++ CPU kernels, reinstall with {_BUILD}"
        else:
            reason = f"the import failed: {err}"
            advice = f"build it with {_BUILD}"
        warnings.warn(
            f"fastland: the C++ extension fastland._C is not available ({reason}); "
            f"CPU tensors use the pure-PyTorch reference ops. To change that, {advice}.",
            RuntimeWarning,
            stacklevel=4,
        )
        return reason
    return None


def extension_available() -> bool:
    """True when ``fastland._C`` is loaded (its CPU kernels then serve the ops)."""
    return _load() is None


def unavailable_reason() -> str:
    """Why the extension is not loaded (``""`` when it is)."""
    return _load() or ""
