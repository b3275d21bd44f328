"""A stride = kernel 2-D max-pool with PyTorch's values and gradients, faster on CPU.

PyTorch's CPU ``max_pool2d`` kernel branches on every comparison and is several times
slower than needed on the planes of small CNNs (LeNet-5's first pool, 128 × 6 × 28 × 28,
one thread: 3.6 ms). :func:`max_pool` gives the same values and the same gradient:

* no gradient needed: elementwise maxima of strided slices (0.4 ms; a maximum rounds
  nothing);
* a gradient needed: the C++ kernel of ``fastland._C`` (csrc/max_pool.cpp; 0.9 ms) gives
  the values and each window's *first* maximal input in row-major window order (strictly
  greater, or NaN, replaces), the input PyTorch's pooling kernel picks; the backward is
  PyTorch's own ``max_pool2d_with_indices_backward`` with those indices. Without the
  extension, or off the CPU, or in other dtypes, PyTorch's ``max_pool2d_with_indices``
  gives both.

So values and gradients are bitwise PyTorch's, ties included (ties are common: a flat
background gives equal convolution outputs across a window).

Shapes: ``z`` ``[n, C, H, W]`` → ``[n, C, H // kh, W // kw]`` (trailing rows and columns
that fill no window are dropped, as by ``max_pool2d``).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from .._ext import extension_available

__all__ = ["max_pool"]


def _values(z: Tensor, kh: int, kw: int) -> Tensor:
    """The window maxima ``[n, C, H // kh, W // kw]`` (no indices)."""
    ho, wo = z.shape[2] // kh, z.shape[3] // kw
    z = z[:, :, :ho * kh, :wo * kw]
    rows = z[:, :, 0::kh]
    for i in range(1, kh):
        rows = torch.maximum(rows, z[:, :, i::kh])
    out = rows[:, :, :, 0::kw]
    for j in range(1, kw):
        out = torch.maximum(out, rows[:, :, :, j::kw])
    return out


def _values_and_indices(z: Tensor, kh: int, kw: int) -> Tuple[Tensor, Tensor]:
    """The window maxima and the flat plane index ``h · W + w`` (int64) of each window's
    first maximum, as PyTorch's pooling kernel picks it."""
    if z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64) and extension_available():
        from .. import _C

        values, index = _C.max_pool2d(z, kh, kw)
        return values, index
    return torch.ops.aten.max_pool2d_with_indices(z, [kh, kw], [kh, kw], [0, 0], [1, 1], False)


class _MaxPool(torch.autograd.Function):
    """``z ↦ max_pool2d(z, (kh, kw))`` (stride = kernel), PyTorch's gradient."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, kh: int, kw: int) -> Tensor:  # type: ignore[override]
        out, index = _values_and_indices(z, kh, kw)
        ctx.save_for_backward(z, index)
        ctx.kernel = (kh, kw)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tuple[Optional[Tensor], None, None]:  # type: ignore[override]
        z, index = ctx.saved_tensors
        k = list(ctx.kernel)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            g, z, k, k, [0, 0], [1, 1], False, index), None, None


def max_pool(z: Tensor, kh: int, kw: int) -> Tensor:
    """``max_pool2d(z, (kh, kw))`` with stride = kernel and no padding, PyTorch's values and
    gradient: ``[n, C, H, W]`` → ``[n, C, H // kh, W // kw]``. Its backward is PyTorch's
    pooling backward, itself differentiable (double backward works through it)."""
    if not (torch.is_grad_enabled() and z.requires_grad):
        return _values(z, kh, kw)
    return _MaxPool.apply(z, kh, kw)
