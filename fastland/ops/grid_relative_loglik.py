"""Fused op ``grid_relative_loglik`` (DESIGN §2.3): ``Δlog p`` at every grid point.

``grid_relative_loglik(logits [N, G, C], base_lse [N]) -> [N, G]``,
``out[n, g] = logsumexp(logits[n, g]) - base_lse[n]``, max-shifted (finite for
``|logits| ~ 1e4``), one pass over the logits.

Backward: ``ḡ_logits[n, g] = ḡ[n, g]·softmax(logits[n, g])`` — the custom op
``fastland::grid_relative_loglik_backward``, whose own backward is written in
differentiable PyTorch ops — and ``ḡ_base_lse[n] = -Σ_g ḡ[n, g]``.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from .._checks import check_same_device, check_tensor
from ..reference import grid_relative_loglik_ref
from .utils import backend_for, contiguous, cpp_compute_dtype, pick_config, triton_acc_dtype, triton_available

__all__ = ["grid_relative_loglik", "LAUNCH_CONFIGS"]

# Triton launch configurations, the one table the launchers (and ahead-of-time
# compilation) read: (largest C covered = BLOCK_C, BLOCK_R grid points per program,
# num_warps), sorted by BLOCK_C; wider rows than the last entry use the reference ops.
LAUNCH_CONFIGS: Dict[str, Tuple[Tuple[int, int, int], ...]] = {
    "forward": ((16, 128, 4), (64, 32, 4), (256, 8, 4), (1024, 2, 4), (4096, 1, 8), (16384, 1, 16)),
    "backward": ((16, 128, 4), (64, 32, 4), (256, 8, 4), (1024, 2, 4), (4096, 1, 8), (16384, 1, 16)),
}
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _row_softmax(z_ptr, rows, cols, R, C, ACC_DTYPE: tl.constexpr):
        """Softmax numerators ``exp(z - max)``, their sum and the max of a [BLOCK_R, BLOCK_C] block."""
        rmask = rows < R
        mask = rmask[:, None] & (cols < C)[None, :]
        z = tl.load(z_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        z = tl.where(mask, z, float("-inf"))
        m = tl.where(rmask, tl.max(z, axis=1), 0.0)
        e = tl.exp(z - m[:, None])
        s = tl.where(rmask, tl.sum(e, axis=1), 1.0)
        return e, s, m

    @triton.jit
    def _grid_relative_loglik_fwd_kernel(
        z_ptr, base_ptr, out_ptr, R, G, C,
        ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < R
        _, s, m = _row_softmax(z_ptr, rows, cols, R, C, ACC_DTYPE)
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
        e, s, _ = _row_softmax(z_ptr, rows, cols, R, C, ACC_DTYPE)
        g = tl.load(gout_ptr + rows, mask=rmask, other=0.0).to(ACC_DTYPE)
        gz = e * (g / s)[:, None]
        mask = rmask[:, None] & (cols < C)[None, :]
        tl.store(gz_ptr + rows[:, None] * C + cols[None, :], gz.to(gz_ptr.dtype.element_ty), mask=mask)


def _triton_serves(logits: Tensor) -> bool:
    return logits.dtype in TRITON_DTYPES and pick_config(LAUNCH_CONFIGS["forward"], logits.shape[2]) is not None


def _triton_config(kind: str, C: int) -> Tuple[int, int, int]:
    cfg = pick_config(LAUNCH_CONFIGS[kind], C)
    if cfg is None:
        raise ValueError(f"logits: the Triton kernels take C <= {LAUNCH_CONFIGS[kind][-1][0]}, got C = {C}")
    return cfg


def grid_relative_loglik_forward_triton(logits: Tensor, base_lse: Tensor) -> Tensor:
    """Launch the forward kernel; logits ``[N, G, C]``, base_lse ``[N]`` contiguous, one dtype."""
    N, G, C = logits.shape
    out = logits.new_empty((N, G))
    R = N * G
    if R == 0:
        return out
    block_c, block_r, num_warps = _triton_config("forward", C)
    _grid_relative_loglik_fwd_kernel[(triton.cdiv(R, block_r),)](
        logits, base_lse, out, R, G, C,
        ACC_DTYPE=triton_acc_dtype(logits.dtype), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def grid_relative_loglik_backward_triton(grad_out: Tensor, logits: Tensor) -> Tensor:
    """Launch the backward kernel: ``grad_out[..., None] * softmax(logits)``, ``[N, G, C]``."""
    N, G, C = logits.shape
    grad_logits = torch.empty_like(logits)
    R = N * G
    if R == 0:
        return grad_logits
    block_c, block_r, num_warps = _triton_config("backward", C)
    _grid_relative_loglik_bwd_kernel[(triton.cdiv(R, block_r),)](
        grad_out, logits, grad_logits, R, C,
        ACC_DTYPE=triton_acc_dtype(logits.dtype), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return grad_logits


# --------------------------------------------------------------------------- C++ and PyTorch paths


def grid_relative_loglik_forward_cpp(logits: Tensor, base_lse: Tensor) -> Tensor:
    """The C++ kernel (csrc/cpu/grid_relative_loglik.cpp); half precision computed in float32."""
    dt = cpp_compute_dtype(logits.dtype)
    return torch.ops.fastland.cpp_grid_relative_loglik_forward(logits.to(dt), base_lse.to(dt)).to(logits.dtype)


def grid_relative_loglik_backward_cpp(grad_out: Tensor, logits: Tensor) -> Tensor:
    """The C++ backward kernel; half precision computed in float32."""
    dt = cpp_compute_dtype(logits.dtype)
    return torch.ops.fastland.cpp_grid_relative_loglik_backward(grad_out.to(dt), logits.to(dt)).to(logits.dtype)


def grid_relative_loglik_backward_reference(grad_out: Tensor, logits: Tensor) -> Tensor:
    """``grad_out[..., None] * softmax(logits)`` in PyTorch ops: ``[N, G, C]``."""
    return grad_out.unsqueeze(-1) * torch.softmax(logits, dim=-1)


_FORWARD: Dict[str, Callable[..., Tensor]] = {
    "triton": grid_relative_loglik_forward_triton,
    "cpp": grid_relative_loglik_forward_cpp,
    "reference": grid_relative_loglik_ref,
}
_BACKWARD: Dict[str, Callable[..., Tensor]] = {
    "triton": grid_relative_loglik_backward_triton,
    "cpp": grid_relative_loglik_backward_cpp,
    "reference": grid_relative_loglik_backward_reference,
}


def _backend(logits: Tensor) -> str:
    backend = backend_for(logits)
    if backend == "triton" and not _triton_serves(logits):
        return "reference"
    return backend


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastland::grid_relative_loglik", mutates_args=())
def _grid_relative_loglik_op(logits: Tensor, base_lse: Tensor) -> Tensor:
    """logits ``[N, G, C]``, base_lse ``[N]`` (one dtype and device) -> ``[N, G]``."""
    backend = _backend(logits)
    if backend != "reference":
        logits, base_lse = contiguous(logits, base_lse)
    return _FORWARD[backend](logits, base_lse)


@_grid_relative_loglik_op.register_fake
def _(logits: Tensor, base_lse: Tensor) -> Tensor:
    return logits.new_empty(logits.shape[:2])


@torch.library.custom_op("fastland::grid_relative_loglik_backward", mutates_args=())
def _grid_relative_loglik_backward_op(grad_out: Tensor, logits: Tensor) -> Tensor:
    """grad_out ``[N, G]``, logits ``[N, G, C]`` -> ``grad_out[..., None] * softmax(logits)``."""
    backend = _backend(logits)
    if backend != "reference":
        grad_out, logits = contiguous(grad_out, logits)
    return _BACKWARD[backend](grad_out, logits)


@_grid_relative_loglik_backward_op.register_fake
def _(grad_out: Tensor, logits: Tensor) -> Tensor:
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, base_lse = inputs
    ctx.save_for_backward(logits)


def _backward(ctx, grad_out: Tensor):
    (logits,) = ctx.saved_tensors
    need_logits, need_base = ctx.needs_input_grad
    g_logits = _grid_relative_loglik_backward_op(grad_out, logits) if need_logits else None
    g_base = -grad_out.sum(1) if need_base else None
    return g_logits, g_base


_grid_relative_loglik_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_bwd(ctx, inputs, output) -> None:
    grad_out, logits = inputs
    ctx.save_for_backward(grad_out, logits)


def _backward_bwd(ctx, grad: Tensor):
    """With ``s = softmax(z)`` and ``⟨q, s⟩`` per row of the incoming ``q``:
    ``ḡ_grad_out = ⟨q, s⟩``, ``ḡ_z = grad_out · s ⊙ (q - ⟨q, s⟩)``."""
    grad_out, logits = ctx.saved_tensors
    s = torch.softmax(logits, dim=-1)
    qs = (grad * s).sum(-1)
    d_logits = grad_out.unsqueeze(-1) * s * (grad - qs.unsqueeze(-1))
    return qs, d_logits


_grid_relative_loglik_backward_op.register_autograd(_backward_bwd, setup_context=_setup_context_bwd)


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
    return _grid_relative_loglik_op(logits, base_lse.to(logits.dtype))
