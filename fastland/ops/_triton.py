"""Triton helpers shared by the op kernels (defined only where Triton imports)."""
from __future__ import annotations

from .utils import triton_available

__all__ = ["row_softmax"]

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def row_softmax(z_ptr, rows, cols, R, C, ACC_DTYPE: tl.constexpr):
        """Softmax pieces of a ``[BLOCK_R, BLOCK_C]`` block of row-major logits ``z [R, C]``.

        Returns ``(e, s, m)``: numerators ``exp(z - m)`` ``[BLOCK_R, BLOCK_C]`` (0 in padding),
        their row sums ``s`` and row maxima ``m`` ``[BLOCK_R]`` (padded rows: ``s = 1``,
        ``m = 0``), in ``ACC_DTYPE``; so ``softmax = e / s`` and ``logsumexp = m + log(s)``.
        """
        rmask = rows < R
        mask = rmask[:, None] & (cols < C)[None, :]
        z = tl.load(z_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        z = tl.where(mask, z, float("-inf"))
        m = tl.where(rmask, tl.max(z, axis=1), 0.0)
        e = tl.exp(z - m[:, None])
        s = tl.where(rmask, tl.sum(e, axis=1), 1.0)
        return e, s, m
