"""Small helpers of the fused ops: is Triton here, is it interpreted, which dtype it accumulates in."""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["triton_available", "triton_interpreted", "triton_acc_dtype"]


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


def triton_acc_dtype(dtype: torch.dtype):
    """The ``tl`` dtype Triton kernels accumulate ``dtype`` inputs in: float64 for float64, else float32."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32
