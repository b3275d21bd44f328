"""Shared machinery of the fused ops: backend choice and launch helpers.

Backend choice (DESIGN §2), read from ``FASTLAND_BACKEND`` at every call:

* ``auto`` (default): Triton for CUDA tensors, the C++ kernels for CPU tensors,
  the pure-PyTorch reference where neither is available (one warning);
* ``triton``: the Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``
  (the interpreter the tests use);
* ``cpp``: the C++ kernels (CPU tensors only); the reference, with one warning,
  when the extension ``fastland._C`` is not built;
* ``reference``: the pure-PyTorch references of :mod:`fastland.reference`.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor

from .. import _ext

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "backend_for",
    "requested_backend",
    "triton_available",
    "triton_interpreted",
    "next_power_of_2",
    "pick_config",
    "cpp_compute_dtype",
    "contiguous",
    "triton_acc_dtype",
]

ENV_VAR = "FASTLAND_BACKEND"
BACKENDS = ("auto", "triton", "cpp", "reference")

# dtypes the C++ kernels take natively; half-precision inputs are computed in float32.
_CPP_DTYPES = (torch.float32, torch.float64)


def requested_backend() -> str:
    """The value of ``FASTLAND_BACKEND`` (``auto`` when unset), validated."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}: expected one of {BACKENDS}, got {os.environ.get(ENV_VAR)!r}")
    return value


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``triton`` imports (its kernels are then defined in each op module)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), e.g. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn(
        "fastland: triton is not installed; CUDA tensors use the pure-PyTorch reference ops",
        RuntimeWarning,
        stacklevel=4,
    )


def backend_for(tensor: Tensor) -> str:
    """The backend that serves an op on ``tensor``: ``"triton"``, ``"cpp"`` or ``"reference"``.

    Reads ``FASTLAND_BACKEND`` now (so a test or a user may switch it at any
    time). Raises ``ValueError`` for an unknown value or a backend that cannot
    serve ``tensor``'s device.
    """
    requested = requested_backend()
    if requested == "reference":
        return "reference"
    device = tensor.device.type
    if requested == "triton":
        if not triton_available():
            raise ValueError(f"{ENV_VAR}=triton: triton is not installed")
        if device == "cuda" or (device == "cpu" and triton_interpreted()):
            return "triton"
        raise ValueError(
            f"{ENV_VAR}=triton: expected CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got a tensor on {tensor.device}"
        )
    if requested == "cpp":
        if device != "cpu":
            raise ValueError(f"{ENV_VAR}=cpp: expected CPU tensors, got a tensor on {tensor.device}")
        return "cpp" if _ext.extension_available() else "reference"
    # auto
    if device == "cuda":
        if triton_available():
            return "triton"
        _warn_no_triton()
        return "reference"
    if device == "cpu" and _ext.extension_available():
        return "cpp"
    return "reference"


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()


Config = TypeVar("Config", bound=Tuple[int, ...])


def pick_config(configs: Sequence[Config], width: int) -> Optional[Config]:
    """The first launch configuration whose first field (the largest block it covers) is ``>= width``.

    Each op file keeps its configurations in one module-level table of tuples
    ``(max_width, ...)`` sorted by ``max_width``; None when ``width`` exceeds them all.
    """
    for cfg in configs:
        if cfg[0] >= width:
            return cfg
    return None


def cpp_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the C++ kernels compute ``dtype`` inputs in (float32 for half precision)."""
    return dtype if dtype in _CPP_DTYPES else torch.float32


def contiguous(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """Each tensor made contiguous (a no-op for those that are)."""
    return tuple(t.contiguous() for t in tensors)


def triton_acc_dtype(dtype: torch.dtype):
    """The ``tl`` dtype Triton kernels accumulate ``dtype`` inputs in: float64 for float64, else float32."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32
