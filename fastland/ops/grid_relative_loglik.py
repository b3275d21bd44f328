"""Fused op ``grid_relative_loglik``: ``Δlog p`` at every grid point.

``grid_relative_loglik(logits [N, G, C], base_lse [N]) -> [N, G]``,
``out[n, g] = logsumexp(logits[n, g]) - base_lse[n]``, max-shifted (finite for
``|logits| ~ 1e4``), one pass over the logits.

Backward: ``ḡ_logits[n, g] = ḡ[n, g]·softmax(logits[n, g])`` — the op
``fastland::grid_relative_loglik_backward``
(:func:`fastland.reference.grid_relative_loglik_backward_ref`), whose own backward is
written below in differentiable PyTorch ops — and ``ḡ_base_lse[n] = -Σ_g ḡ[n, g]``.

Kernels: Triton here (``_grid_relative_loglik_{fwd,bwd}_kernel``, CUDA), C++ in
``csrc/grid_relative_loglik.cpp`` (CPU); wiring by :mod:`fastland.ops._scaffold`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .. import reference_ops as ref
from .._checks import check_same_device, check_tensor
from ._scaffold import TRITON_DTYPES, Launch, LaunchConfig, define, pick_config, save_inputs
from .utils import triton_acc_dtype, triton_available

__all__ = ["grid_relative_loglik", "LAUNCH_CONFIGS", "BLOCK_NAMES", "launch_configs"]

# Triton launch configurations, the one table the launchers (and the ahead-of-time tool)
# read: ((BLOCK_R grid points, BLOCK_C = widest C covered), num_warps, num_stages), sorted
# by BLOCK_C; wider rows than the last entry use the reference.
BLOCK_NAMES = ("BLOCK_R", "BLOCK_C")
_TABLE = (
    LaunchConfig((128, 16), 4), LaunchConfig((32, 64), 4), LaunchConfig((8, 256), 4),
    LaunchConfig((2, 1024), 4), LaunchConfig((1, 4096), 8), LaunchConfig((1, 16384), 16),
)
LAUNCH_CONFIGS: Dict[str, Tuple[LaunchConfig, ...]] = {"forward": _TABLE, "backward": _TABLE}


def launch_configs(kind: str, dtype: torch.dtype) -> Tuple[LaunchConfig, ...]:
    """The entries of ``LAUNCH_CONFIGS[kind]`` the kernels use for ``dtype`` (the same for every dtype)."""
    return LAUNCH_CONFIGS[kind]


# --------------------------------------------------------------------------- Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    from ._triton import row_softmax

    @triton.jit
    def _grid_relative_loglik_fwd_kernel(
        z_ptr, base_ptr, out_ptr, R, G, C,
        ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < R
        _, s, m = row_softmax(z_ptr, rows, cols, R, C, ACC_DTYPE)
        base = tl.load(base_ptr + rows // G, mask=rmask, other=0.0).to(ACC_DTYPE)
        tl.store(out_ptr + rows, (m + tl.log(s) - base).to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _grid_relative_loglik_bwd_kernel(
        gout_ptr, z_ptr, gz_ptr, R, C,
        ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < R
        e, s, _ = row_softmax(z_ptr, rows, cols, R, C, ACC_DTYPE)
        g = tl.load(gout_ptr + rows, mask=rmask, other=0.0).to(ACC_DTYPE)
        gz = e * (g / s)[:, None]
        mask = rmask[:, None] & (cols < C)[None, :]
        tl.store(gz_ptr + rows[:, None] * C + cols[None, :], gz.to(gz_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, args: tuple, R: int, C: int, kind: str, dtype: torch.dtype) -> Launch:
    cfg = pick_config(launch_configs(kind, dtype), C)
    block_r, block_c = cfg.block
    return Launch(kernel, (triton.cdiv(R, block_r),), args, dict(
        ACC_DTYPE=triton_acc_dtype(dtype), BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    ))


def forward_plan(logits: Tensor, base_lse: Tensor) -> Tuple[Tensor, List[Launch]]:
    """Output ``[N, G]`` and launches of the forward; logits ``[N, G, C]``, base_lse ``[N]`` contiguous."""
    N, G, C = logits.shape
    out = logits.new_empty((N, G))
    R = N * G
    if R == 0:
        return out, []
    return out, [_launch(_grid_relative_loglik_fwd_kernel, (logits, base_lse, out, R, G, C), R, C, "forward",
                         logits.dtype)]


def backward_plan(grad_out: Tensor, logits: Tensor) -> Tuple[Tensor, List[Launch]]:
    """Output ``grad_out[..., None] * softmax(logits)`` ``[N, G, C]`` and launches of the backward."""
    N, G, C = logits.shape
    grad_logits = torch.empty_like(logits)
    R = N * G
    if R == 0:
        return grad_logits, []
    return grad_logits, [_launch(_grid_relative_loglik_bwd_kernel, (grad_out, logits, grad_logits, R, C), R, C,
                                 "backward", logits.dtype)]


def _serves(logits: Tensor) -> bool:
    return logits.dtype in TRITON_DTYPES and pick_config(
        launch_configs("forward", logits.dtype), logits.shape[2]) is not None


# --------------------------------------------------------------------------- ops and autograd


def _backward_bwd(ctx, grad: Tensor):
    """With ``s = softmax(z)`` and ``⟨q, s⟩`` per row of the incoming ``q``:
    ``ḡ_grad_out = ⟨q, s⟩``, ``ḡ_z = grad_out · s ⊙ (q - ⟨q, s⟩)``."""
    grad_out, logits = ctx.saved_tensors
    s = torch.softmax(logits, dim=-1)
    qs = (grad * s).sum(-1)
    d_logits = grad_out.unsqueeze(-1) * s * (grad - qs.unsqueeze(-1))
    return qs, d_logits


_backward_op = define(
    "grid_relative_loglik_backward",
    "(Tensor grad_out, Tensor logits) -> Tensor",
    reference=ref.grid_relative_loglik_backward_ref,
    fake=lambda grad_out, logits: torch.empty_like(logits),
    triton_plan=backward_plan if triton_available() else None,
    triton_serves=lambda grad_out, logits: _serves(logits),
    backward=_backward_bwd,
    setup_context=save_inputs,
)


def _backward(ctx, grad_out: Tensor):
    (logits,) = ctx.saved_tensors
    need_logits, need_base = ctx.needs_input_grad
    g_logits = _backward_op(grad_out, logits) if need_logits else None
    g_base = -grad_out.sum(1) if need_base else None
    return g_logits, g_base


def _save(ctx, inputs, output) -> None:
    logits, base_lse = inputs
    ctx.save_for_backward(logits)


_op = define(
    "grid_relative_loglik",
    "(Tensor logits, Tensor base_lse) -> Tensor",
    reference=ref.grid_relative_loglik_ref,
    fake=lambda logits, base_lse: logits.new_empty(logits.shape[:2]),
    triton_plan=forward_plan if triton_available() else None,
    triton_serves=lambda logits, base_lse: _serves(logits),
    backward=_backward,
    setup_context=_save,
)


# --------------------------------------------------------------------------- public function


def _check_args(logits: Tensor, base_lse: Tensor) -> None:
    check_tensor("logits", logits, ndim=3)
    check_tensor("base_lse", base_lse, ndim=1)
    if logits.shape[2] == 0:
        raise ValueError(f"logits: expected at least one class, got shape {tuple(logits.shape)}")
    if base_lse.shape[0] != logits.shape[0]:
        raise ValueError(f"base_lse: expected shape [{logits.shape[0]}], got {tuple(base_lse.shape)}")
    check_same_device(("logits", "base_lse"), (logits, base_lse))


def grid_relative_loglik(logits: Tensor, base_lse: Tensor) -> Tensor:
    """``Δlog p`` at every grid point: ``logsumexp(logits[n, g]) - base_lse[n]``, fused.

    Differentiable w.r.t. both inputs, to any order.

    Args:
        logits: ``[N, G, C]``, C >= 1.
        base_lse: ``[N]``, ``logsumexp`` of the clean inputs' logits (cast to the dtype of ``logits``).
    Returns:
        ``[N, G]`` in the dtype of ``logits``.
    """
    _check_args(logits, base_lse)
    return _op(logits, base_lse.to(logits.dtype))
