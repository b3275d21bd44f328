"""Fused op ``grid_combine``: synthesis of a grid of inputs (or first-layer outputs).

``grid_combine(base [N, *S], u [N, *S], v [N, *S], a [G], b [G]) -> out [N, G, *S]``,
``out[n, g] = base[n] + a[g]·u[n] + b[g]·v[n]``: one read of ``base, u, v`` and one
write of the output (the eager expression materialises two ``[N, G, *S]``
temporaries). It serves input-space grids ``x + a·d1 + b·d2`` and the first-layer
linearity trick ``L(x + a d1 + b d2) = L(x) + a·L₀(d1) + b·L₀(d2)``.

Backward: ``ḡ_base, ḡ_u, ḡ_v = Σ_g ḡ[n, g]·(1, a[g], b[g])`` — the adjoint
reduction, the op ``fastland::grid_combine_backward``
(:func:`fastland.reference.grid_combine_backward_ref`), whose backward is
``grid_combine`` again — and ``ḡ_a[g] = Σ_{n, s} ḡ[n, g, s] u[n, s]`` (likewise ``ḡ_b``
with ``v``), a contraction left to ``torch.einsum``. Every order of derivative is available.

Kernels: Triton here (``_grid_combine_{fwd,bwd}_kernel``, CUDA), C++ in
``csrc/grid_combine.cpp`` (CPU); wiring by :mod:`fastland.ops._scaffold`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .. import reference_ops as ref
from .._checks import check_same_device, check_tensor
from ._scaffold import TRITON_DTYPES, Launch, LaunchConfig, define, save_inputs
from .utils import triton_acc_dtype, triton_available

__all__ = ["grid_combine", "grid_combine_backward", "LAUNCH_CONFIGS", "BLOCK_NAMES", "launch_configs"]

# Triton launch configurations, the one table the launchers (and the ahead-of-time tool)
# read: ((BLOCK_G grid points, BLOCK_D features), num_warps, num_stages). forward: a
# [BLOCK_G, BLOCK_D] tile of the output per program; backward: BLOCK_G grid points per
# loop step, BLOCK_D features per program, reducing over all G. One entry per kind.
BLOCK_NAMES = ("BLOCK_G", "BLOCK_D")
LAUNCH_CONFIGS: Dict[str, Tuple[LaunchConfig, ...]] = {
    "forward": (LaunchConfig((16, 256), 4),),
    "backward": (LaunchConfig((16, 256), 4),),
}


def launch_configs(kind: str, dtype: torch.dtype) -> Tuple[LaunchConfig, ...]:
    """The entries of ``LAUNCH_CONFIGS[kind]`` the kernels use for ``dtype`` (the same for every dtype)."""
    return LAUNCH_CONFIGS[kind]


# --------------------------------------------------------------------------- Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _grid_combine_fwd_kernel(
        base_ptr, u_ptr, v_ptr, a_ptr, b_ptr, out_ptr, G, D,
        ACC_DTYPE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        ds = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        gmask = gs < G
        dmask = ds < D
        x = tl.load(base_ptr + n * D + ds, mask=dmask, other=0.0).to(ACC_DTYPE)
        u = tl.load(u_ptr + n * D + ds, mask=dmask, other=0.0).to(ACC_DTYPE)
        v = tl.load(v_ptr + n * D + ds, mask=dmask, other=0.0).to(ACC_DTYPE)
        a = tl.load(a_ptr + gs, mask=gmask, other=0.0).to(ACC_DTYPE)
        b = tl.load(b_ptr + gs, mask=gmask, other=0.0).to(ACC_DTYPE)
        out = x[None, :] + a[:, None] * u[None, :] + b[:, None] * v[None, :]
        offs = (n * G + gs.to(tl.int64))[:, None] * D + ds[None, :]
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])

    @triton.jit
    def _grid_combine_bwd_kernel(
        gout_ptr, a_ptr, b_ptr, g0_ptr, g1_ptr, g2_ptr, G, D,
        ACC_DTYPE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        ds = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = ds < D
        acc0 = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
        acc1 = tl.zeros_like(acc0)
        acc2 = tl.zeros_like(acc0)
        for g0 in tl.range(0, G, BLOCK_G):
            gs = g0 + tl.arange(0, BLOCK_G)
            gmask = gs < G
            offs = (n * G + gs.to(tl.int64))[:, None] * D + ds[None, :]
            t = tl.load(gout_ptr + offs, mask=gmask[:, None] & dmask[None, :], other=0.0).to(ACC_DTYPE)
            a = tl.load(a_ptr + gs, mask=gmask, other=0.0).to(ACC_DTYPE)
            b = tl.load(b_ptr + gs, mask=gmask, other=0.0).to(ACC_DTYPE)
            acc0 += tl.sum(t, axis=0)
            acc1 += tl.sum(a[:, None] * t, axis=0)
            acc2 += tl.sum(b[:, None] * t, axis=0)
        tl.store(g0_ptr + n * D + ds, acc0.to(g0_ptr.dtype.element_ty), mask=dmask)
        tl.store(g1_ptr + n * D + ds, acc1.to(g1_ptr.dtype.element_ty), mask=dmask)
        tl.store(g2_ptr + n * D + ds, acc2.to(g2_ptr.dtype.element_ty), mask=dmask)


def _kwargs(kind: str, dtype: torch.dtype) -> Tuple[Tuple[int, int], Dict]:
    (cfg,) = launch_configs(kind, dtype)
    block_g, block_d = cfg.block
    return cfg.block, dict(ACC_DTYPE=triton_acc_dtype(dtype), BLOCK_G=block_g, BLOCK_D=block_d,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _out_shape(base: Tensor, G: int) -> Tuple[int, ...]:
    return (base.shape[0], G, *base.shape[1:])


def forward_plan(base: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, List[Launch]]:
    """Output ``[N, G, *S]`` and launches of the forward; every tensor contiguous, one dtype."""
    N, G = base.shape[0], a.shape[0]
    out = base.new_empty(_out_shape(base, G))
    if out.numel() == 0:
        return out, []
    D = base[0].numel()
    (block_g, block_d), kwargs = _kwargs("forward", base.dtype)
    grid = (N, triton.cdiv(G, block_g), triton.cdiv(D, block_d))
    return out, [Launch(_grid_combine_fwd_kernel, grid, (base, u, v, a, b, out, G, D), kwargs)]


def backward_plan(grad_out: Tensor, a: Tensor, b: Tensor) -> Tuple[Tuple[Tensor, Tensor, Tensor], List[Launch]]:
    """Outputs (three ``[N, *S]``) and launches of the adjoint reduction; ``grad_out [N, G, *S]`` contiguous."""
    N, G = grad_out.shape[0], grad_out.shape[1]
    shape = (N, *grad_out.shape[2:])
    g0, g1, g2 = (grad_out.new_empty(shape) for _ in range(3))
    if g0.numel() == 0:
        return (g0, g1, g2), []
    D = g0[0].numel()
    (_, block_d), kwargs = _kwargs("backward", grad_out.dtype)
    grid = (N, triton.cdiv(D, block_d))
    return (g0, g1, g2), [Launch(_grid_combine_bwd_kernel, grid, (grad_out, a, b, g0, g1, g2, G, D), kwargs)]


# --------------------------------------------------------------------------- ops and autograd


def _contract(grad_out: Tensor, x: Tensor) -> Tensor:
    """``Σ_{n, s} grad_out[n, g, s] x[n, s]``: ``[N, G, *S] x [N, *S] -> [G]``."""
    N, G = grad_out.shape[0], grad_out.shape[1]
    return torch.einsum("ngd,nd->g", grad_out.reshape(N, G, -1), x.reshape(N, -1))


def _backward_bwd(ctx, g0: Tensor, g1: Tensor, g2: Tensor):
    """The adjoint of the reduction is the synthesis: ``ḡ_grad_out = grid_combine(g0, g1, g2, a, b)``."""
    grad_out, a, b = ctx.saved_tensors
    need_gout, need_a, need_b = ctx.needs_input_grad
    d_gout = _op(g0, g1, g2, a, b) if need_gout else None
    d_a = _contract(grad_out, g1) if need_a else None
    d_b = _contract(grad_out, g2) if need_b else None
    return d_gout, d_a, d_b


_backward_op = define(
    "grid_combine_backward",
    "(Tensor grad_out, Tensor a, Tensor b) -> (Tensor, Tensor, Tensor)",
    reference=ref.grid_combine_backward_ref,
    fake=lambda grad_out, a, b: tuple(grad_out.new_empty((grad_out.shape[0], *grad_out.shape[2:]))
                                      for _ in range(3)),
    triton_plan=backward_plan if triton_available() else None,
    triton_serves=lambda grad_out, a, b: grad_out.dtype in TRITON_DTYPES,
    backward=_backward_bwd,
    setup_context=save_inputs,
)


def _backward(ctx, grad_out: Tensor):
    u, v, a, b = ctx.saved_tensors
    need_base, need_u, need_v, need_a, need_b = ctx.needs_input_grad
    g_base = g_u = g_v = None
    if need_base or need_u or need_v:
        g_base, g_u, g_v = _backward_op(grad_out, a, b)
    g_a = _contract(grad_out, u) if need_a else None
    g_b = _contract(grad_out, v) if need_b else None
    return g_base, g_u, g_v, g_a, g_b


def _save(ctx, inputs, output) -> None:
    base, u, v, a, b = inputs
    ctx.save_for_backward(u, v, a, b)


_op = define(
    "grid_combine",
    "(Tensor base, Tensor u, Tensor v, Tensor a, Tensor b) -> Tensor",
    reference=ref.grid_combine_ref,
    fake=lambda base, u, v, a, b: base.new_empty(_out_shape(base, a.shape[0])),
    triton_plan=forward_plan if triton_available() else None,
    triton_serves=lambda base, u, v, a, b: base.dtype in TRITON_DTYPES,
    backward=_backward,
    setup_context=_save,
)


# --------------------------------------------------------------------------- public functions


def _check_args(base: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor) -> None:
    check_tensor("base", base, min_ndim=1)
    for name, t in (("u", u), ("v", v)):
        check_tensor(name, t)
        if t.shape != base.shape:
            raise ValueError(f"{name}: expected shape {tuple(base.shape)} (that of base), got {tuple(t.shape)}")
        if t.dtype != base.dtype:
            raise TypeError(f"{name}: expected dtype {base.dtype} (that of base), got {t.dtype}")
    check_tensor("a", a, ndim=1)
    check_tensor("b", b, ndim=1)
    if a.shape != b.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} (that of a), got {tuple(b.shape)}")
    check_same_device(("base", "u", "v", "a", "b"), (base, u, v, a, b))


def grid_combine(base: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Grid synthesis ``out[n, g] = base[n] + a[g]·u[n] + b[g]·v[n]``, fused.

    Differentiable w.r.t. every input, to any order.

    Args:
        base, u, v: ``[N, *S]``, one shape and dtype.
        a, b: ``[G]`` grid coordinates along ``u`` and ``v`` (cast to the dtype of ``base``).
    Returns:
        ``[N, G, *S]`` in the dtype of ``base``.
    """
    _check_args(base, u, v, a, b)
    return _op(base, u, v, a.to(base.dtype), b.to(base.dtype))


def grid_combine_backward(grad_out: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The adjoint reduction ``Σ_g grad_out[:, g]·(1, a[g], b[g])`` (the backward of :func:`grid_combine`).

    Args:
        grad_out: ``[N, G, *S]``.
        a, b: ``[G]``.
    Returns:
        three ``[N, *S]`` tensors in the dtype of ``grad_out``.
    """
    check_tensor("grad_out", grad_out, min_ndim=2)
    check_tensor("a", a, ndim=1)
    check_tensor("b", b, ndim=1)
    if a.shape != b.shape or grad_out.shape[1] != a.shape[0]:
        raise ValueError(
            f"a, b: expected shape [{grad_out.shape[1]}] (dim 1 of grad_out), got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    check_same_device(("grad_out", "a", "b"), (grad_out, a, b))
    return _backward_op(grad_out, a.to(grad_out.dtype), b.to(grad_out.dtype))
