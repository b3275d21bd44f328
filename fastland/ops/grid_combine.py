"""Fused op ``grid_combine`` (DESIGN §2.2): synthesis of a grid of inputs (or first-layer outputs).

``grid_combine(base [N, *S], u [N, *S], v [N, *S], a [G], b [G]) -> out [N, G, *S]``,
``out[n, g] = base[n] + a[g]·u[n] + b[g]·v[n]``: one read of ``base, u, v`` and one
write of the output (the eager expression materialises two ``[N, G, *S]``
temporaries). It serves input-space grids ``x + a·d1 + b·d2`` and the first-layer
linearity trick ``L(x + a d1 + b d2) = L(x) + a·L₀(d1) + b·L₀(d2)``.

Backward: ``ḡ_base, ḡ_u, ḡ_v = Σ_g ḡ[n, g]·(1, a[g], b[g])`` — the adjoint
reduction, itself the custom op ``fastland::grid_combine_backward`` whose
backward is ``grid_combine`` again — and ``ḡ_a[g] = Σ_{n, s} ḡ[n, g, s] u[n, s]``
(likewise ``ḡ_b`` with ``v``), a contraction left to ``torch.einsum``.
Every order of derivative is therefore available.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from .._checks import check_same_device, check_tensor
from ..reference import grid_combine_ref
from .utils import backend_for, contiguous, cpp_compute_dtype, triton_acc_dtype, triton_available

__all__ = ["grid_combine", "LAUNCH_CONFIGS"]

# Triton launch configurations, the one table the launchers (and ahead-of-time
# compilation) read. forward: (BLOCK_G grid points, BLOCK_D features, num_warps) per
# program, a [BLOCK_G, BLOCK_D] tile of the output; backward: (BLOCK_G grid points per
# loop step, BLOCK_D features, num_warps) per program, reducing over all G.
LAUNCH_CONFIGS: Dict[str, Tuple[int, int, int]] = {
    "forward": (16, 256, 4),
    "backward": (16, 256, 4),
}
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
        x = tl.load(base_ptr + n * D + ds, mask=dmask, other=0.0)
        u = tl.load(u_ptr + n * D + ds, mask=dmask, other=0.0)
        v = tl.load(v_ptr + n * D + ds, mask=dmask, other=0.0)
        a = tl.load(a_ptr + gs, mask=gmask, other=0.0)
        b = tl.load(b_ptr + gs, mask=gmask, other=0.0)
        x = x.to(ACC_DTYPE)
        u = u.to(ACC_DTYPE)
        v = v.to(ACC_DTYPE)
        a = a.to(ACC_DTYPE)
        b = b.to(ACC_DTYPE)
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


def _out_shape(base: Tensor, G: int) -> Tuple[int, ...]:
    return (base.shape[0], G, *base.shape[1:])


def grid_combine_forward_triton(base: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Launch the forward kernel; every tensor contiguous, one dtype. Returns ``[N, G, *S]``."""
    N, G = base.shape[0], a.shape[0]
    out = base.new_empty(_out_shape(base, G))
    D = base[0].numel() if N else 0
    if out.numel() == 0:
        return out
    block_g, block_d, num_warps = LAUNCH_CONFIGS["forward"]
    grid = (N, triton.cdiv(G, block_g), triton.cdiv(D, block_d))
    _grid_combine_fwd_kernel[grid](
        base, u, v, a, b, out, G, D,
        ACC_DTYPE=triton_acc_dtype(base.dtype), BLOCK_G=block_g, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def grid_combine_backward_triton(grad_out: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Launch the adjoint reduction; ``grad_out [N, G, *S]`` contiguous. Returns three ``[N, *S]``."""
    N, G = grad_out.shape[0], grad_out.shape[1]
    shape = (N, *grad_out.shape[2:])
    g0, g1, g2 = (grad_out.new_empty(shape) for _ in range(3))
    D = g0[0].numel() if N else 0
    if g0.numel() == 0:
        return g0, g1, g2
    block_g, block_d, num_warps = LAUNCH_CONFIGS["backward"]
    _grid_combine_bwd_kernel[(N, triton.cdiv(D, block_d))](
        grad_out, a, b, g0, g1, g2, G, D,
        ACC_DTYPE=triton_acc_dtype(grad_out.dtype), BLOCK_G=block_g, BLOCK_D=block_d, num_warps=num_warps,
    )
    return g0, g1, g2


# --------------------------------------------------------------------------- C++ and PyTorch paths


def grid_combine_forward_cpp(base: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The C++ kernel (csrc/cpu/grid_combine.cpp); half precision computed in float32."""
    dt = cpp_compute_dtype(base.dtype)
    out = torch.ops.fastland.cpp_grid_combine_forward(base.to(dt), u.to(dt), v.to(dt), a.to(dt), b.to(dt))
    return out.to(base.dtype)


def grid_combine_backward_cpp(grad_out: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The C++ adjoint reduction; half precision computed in float32."""
    dt = cpp_compute_dtype(grad_out.dtype)
    g0, g1, g2 = torch.ops.fastland.cpp_grid_combine_backward(grad_out.to(dt), a.to(dt), b.to(dt))
    return g0.to(grad_out.dtype), g1.to(grad_out.dtype), g2.to(grad_out.dtype)


def grid_combine_backward_reference(grad_out: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``Σ_g grad_out[:, g]·(1, a[g], b[g])`` in PyTorch ops: three ``[N, *S]``."""
    flat = grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1)
    shape = (grad_out.shape[0], *grad_out.shape[2:])
    return (
        flat.sum(1).reshape(shape),
        torch.einsum("ngd,g->nd", flat, a).reshape(shape),
        torch.einsum("ngd,g->nd", flat, b).reshape(shape),
    )


_FORWARD: Dict[str, Callable[..., Tensor]] = {
    "triton": grid_combine_forward_triton,
    "cpp": grid_combine_forward_cpp,
    "reference": grid_combine_ref,
}
_BACKWARD: Dict[str, Callable[..., Tuple[Tensor, Tensor, Tensor]]] = {
    "triton": grid_combine_backward_triton,
    "cpp": grid_combine_backward_cpp,
    "reference": grid_combine_backward_reference,
}


def _backend(t: Tensor) -> str:
    backend = backend_for(t)
    if backend == "triton" and t.dtype not in TRITON_DTYPES:
        return "reference"
    return backend


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastland::grid_combine", mutates_args=())
def _grid_combine_op(base: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """base, u, v ``[N, *S]``, a, b ``[G]`` (one dtype and device) -> ``[N, G, *S]``."""
    backend = _backend(base)
    if backend != "reference":
        base, u, v, a, b = contiguous(base, u, v, a, b)
    return _FORWARD[backend](base, u, v, a, b)


@_grid_combine_op.register_fake
def _(base: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return base.new_empty(_out_shape(base, a.shape[0]))


@torch.library.custom_op("fastland::grid_combine_backward", mutates_args=())
def _grid_combine_backward_op(grad_out: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """grad_out ``[N, G, *S]``, a, b ``[G]`` -> ``Σ_g grad_out[:, g]·(1, a[g], b[g])``, three ``[N, *S]``."""
    backend = _backend(grad_out)
    if backend != "reference":
        grad_out, a, b = contiguous(grad_out, a, b)
    return _BACKWARD[backend](grad_out, a, b)


@_grid_combine_backward_op.register_fake
def _(grad_out: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    shape = (grad_out.shape[0], *grad_out.shape[2:])
    return grad_out.new_empty(shape), grad_out.new_empty(shape), grad_out.new_empty(shape)


def _contract(grad_out: Tensor, x: Tensor) -> Tensor:
    """``Σ_{n, s} grad_out[n, g, s] x[n, s]``: ``[N, G, *S] x [N, *S] -> [G]``."""
    N, G = grad_out.shape[0], grad_out.shape[1]
    return torch.einsum("ngd,nd->g", grad_out.reshape(N, G, -1), x.reshape(N, -1))


def _setup_context(ctx, inputs, output) -> None:
    base, u, v, a, b = inputs
    ctx.save_for_backward(u, v, a, b)


def _backward(ctx, grad_out: Tensor):
    u, v, a, b = ctx.saved_tensors
    need_base, need_u, need_v, need_a, need_b = ctx.needs_input_grad
    g_base = g_u = g_v = g_a = g_b = None
    if need_base or need_u or need_v:
        g_base, g_u, g_v = _grid_combine_backward_op(grad_out, a, b)
    if need_a:
        g_a = _contract(grad_out, u)
    if need_b:
        g_b = _contract(grad_out, v)
    return g_base, g_u, g_v, g_a, g_b


_grid_combine_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_bwd(ctx, inputs, output) -> None:
    grad_out, a, b = inputs
    ctx.save_for_backward(grad_out, a, b)


def _backward_bwd(ctx, g0: Tensor, g1: Tensor, g2: Tensor):
    """The adjoint of the reduction is the synthesis: ``ḡ_grad_out = grid_combine(g0, g1, g2, a, b)``."""
    grad_out, a, b = ctx.saved_tensors
    need_gout, need_a, need_b = ctx.needs_input_grad
    d_gout = _grid_combine_op(g0, g1, g2, a, b) if need_gout else None
    d_a = _contract(grad_out, g1) if need_a else None
    d_b = _contract(grad_out, g2) if need_b else None
    return d_gout, d_a, d_b


_grid_combine_backward_op.register_autograd(_backward_bwd, setup_context=_setup_context_bwd)


# --------------------------------------------------------------------------- public function


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
    return _grid_combine_op(base, u, v, a.to(base.dtype), b.to(base.dtype))


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
    return _grid_combine_backward_op(grad_out, a.to(grad_out.dtype), b.to(grad_out.dtype))
