"""Fused op ``weighted_projection`` (DESIGN §2.1): the cotangents of the random-projection penalties.

``weighted_projection(logits [B, C], noise [P, B, C], weight) -> (cot [P, B, C], lse [B])``:
per row ``v = noise / ‖noise‖`` (``v = 1`` when ``C = 1``), ``cot = v ⊙ softmax(z)``
(``weight="softmax"``, AMSReg) or ``cot = v`` (``"uniform"``, Jacobian
regularisation), and ``lse = logsumexp(z)``, in one pass over the logits.

Backward (to ``logits`` only; ``noise`` is a constant), with ``s = softmax(z)``:

* softmax weight: ``w = Σ_p ḡ_cot[p] ⊙ v_p``, ``ḡ_z = s ⊙ (ḡ_lse + w - ⟨w, s⟩)``;
* uniform weight: ``ḡ_z = ḡ_lse · s``.

The backward is itself the custom op ``fastland::weighted_projection_backward``
whose own backward is written in differentiable PyTorch ops, so double (and
higher) backward works: the AMSReg penalty's gradient flows through ``softmax(z)``.

Layers, as in Liger-Kernel: Triton kernels ``_weighted_projection_{fwd,bwd}_kernel``
with launchers ``weighted_projection_{forward,backward}_triton``; the C++ kernels
``torch.ops.fastland.cpp_weighted_projection_{forward,backward}`` (csrc/cpu/);
pure-PyTorch fallbacks; the custom ops choosing a backend per call
(:func:`fastland.ops.backend_for`); autograd and fake registrations; the public function.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from .._checks import check_same_device, check_tensor
from ..reference import weighted_projection_ref
from .utils import (
    backend_for,
    contiguous,
    cpp_compute_dtype,
    pick_config,
    triton_acc_dtype,
    triton_available,
)

__all__ = ["weighted_projection", "LAUNCH_CONFIGS"]

WEIGHTS = ("softmax", "uniform")

# Triton launch configurations, the one table the launchers (and ahead-of-time
# compilation) read: (largest C covered = BLOCK_C, BLOCK_B rows per program, num_warps),
# sorted by BLOCK_C. A program holds BLOCK_B x BLOCK_C elements (1024-2048 up to C = 1024:
# enough programs to fill an H100's 132 SMs at B = 4096, C = 10) in registers.
# Wider rows than the last entry are served by the reference ops. The widest entry is
# (8192, 1, 16): a (16384, 1, 16) entry spilled to local memory on sm_80/sm_90 in every
# dtype (backward) — see `python -m fastland.ops.aot` and benchmarks/notes/triton.md.
LAUNCH_CONFIGS: Dict[str, Tuple[Tuple[int, int, int], ...]] = {
    "forward": ((16, 64, 4), (64, 16, 4), (256, 8, 4), (1024, 2, 4), (4096, 1, 8), (8192, 1, 16)),
    "backward": ((16, 64, 4), (64, 16, 4), (256, 8, 4), (1024, 2, 4), (4096, 1, 8), (8192, 1, 16)),
}
# float64 rows hold twice the registers: the (8192, 1, 16) entry spills there, so float64
# stops at C = 4096 (wider float64 rows use the reference ops).
_FP64_MAX_C = 4096


def launch_configs(kind: str, dtype: torch.dtype) -> Tuple[Tuple[int, int, int], ...]:
    """The entries of ``LAUNCH_CONFIGS[kind]`` that the kernels use for ``dtype`` (spill-free)."""
    table = LAUNCH_CONFIGS[kind]
    if dtype == torch.float64:
        return tuple(c for c in table if c[0] <= _FP64_MAX_C)
    return table
# dtypes the Triton kernels take (accumulation: float64 for float64, else float32)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _softmax_block(z_ptr, rows, cols, B, C, ACC_DTYPE: tl.constexpr):
        """Row softmax and logsumexp of a [BLOCK_B, BLOCK_C] block of logits (padded rows: s=1, lse=0)."""
        rmask = rows < B
        mask = rmask[:, None] & (cols < C)[None, :]
        z = tl.load(z_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
        z = z.to(ACC_DTYPE)
        z = tl.where(mask, z, float("-inf"))
        m = tl.where(rmask, tl.max(z, axis=1), 0.0)
        e = tl.exp(z - m[:, None])
        s = tl.where(rmask, tl.sum(e, axis=1), 1.0)
        return e / s[:, None], m + tl.log(s)

    @triton.jit
    def _normalised_noise(n, rmask, C):
        """``v = n / ‖n‖`` per row of a [BLOCK_B, BLOCK_C] block (``v = 1`` when C = 1)."""
        ss = tl.where(rmask, tl.sum(n * n, axis=1), 1.0)
        v = n / tl.sqrt(ss)[:, None]
        return tl.where(C == 1, 1.0, v)

    @triton.jit
    def _weighted_projection_fwd_kernel(
        z_ptr, noise_ptr, cot_ptr, lse_ptr, P, B, C,
        SOFTMAX: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < B
        mask = rmask[:, None] & (cols < C)[None, :]
        prob, lse = _softmax_block(z_ptr, rows, cols, B, C, ACC_DTYPE)
        tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=rmask)
        offs = rows[:, None] * C + cols[None, :]
        n_ptrs = noise_ptr + offs
        c_ptrs = cot_ptr + offs
        for _ in tl.range(0, P):
            n = tl.load(n_ptrs, mask=mask, other=0.0)
            n = n.to(ACC_DTYPE)
            cot = _normalised_noise(n, rmask, C)
            if SOFTMAX:
                cot = cot * prob
            tl.store(c_ptrs, cot.to(cot_ptr.dtype.element_ty), mask=mask)
            n_ptrs += B * C
            c_ptrs += B * C

    @triton.jit
    def _weighted_projection_bwd_kernel(
        gcot_ptr, glse_ptr, z_ptr, noise_ptr, gz_ptr, P, B, C,
        SOFTMAX: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < B
        mask = rmask[:, None] & (cols < C)[None, :]
        prob, _ = _softmax_block(z_ptr, rows, cols, B, C, ACC_DTYPE)
        glse = tl.load(glse_ptr + rows, mask=rmask, other=0.0)
        glse = glse.to(ACC_DTYPE)
        offs = rows[:, None] * C + cols[None, :]
        if SOFTMAX:
            w = tl.zeros_like(prob)
            n_ptrs = noise_ptr + offs
            g_ptrs = gcot_ptr + offs
            for _ in tl.range(0, P):
                n = tl.load(n_ptrs, mask=mask, other=0.0)
                g = tl.load(g_ptrs, mask=mask, other=0.0)
                n = n.to(ACC_DTYPE)
                g = g.to(ACC_DTYPE)
                w += g * _normalised_noise(n, rmask, C)
                n_ptrs += B * C
                g_ptrs += B * C
            shift = glse - tl.sum(w * prob, axis=1)
            gz = prob * (w + shift[:, None])
        else:
            gz = prob * glse[:, None]
        tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)


def _triton_config(kind: str, C: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    table = launch_configs(kind, dtype)
    cfg = pick_config(table, C)
    if cfg is None:  # checked by the caller; kept as a clear error for direct launches
        raise ValueError(f"logits: the Triton kernels take C <= {table[-1][0]} for {dtype}, got C = {C}")
    return cfg


def _triton_serves(logits: Tensor) -> bool:
    return logits.dtype in TRITON_DTYPES and pick_config(
        launch_configs("forward", logits.dtype), logits.shape[1]) is not None


def weighted_projection_forward_triton(logits: Tensor, noise: Tensor, softmax: bool) -> Tuple[Tensor, Tensor]:
    """Launch the forward kernel. logits ``[B, C]``, noise ``[P, B, C]`` (same dtype, contiguous)."""
    P, B, C = noise.shape
    cot = torch.empty_like(noise)
    lse = logits.new_empty(B)
    if B == 0:
        return cot, lse
    block_c, block_b, num_warps = _triton_config("forward", C, logits.dtype)
    _weighted_projection_fwd_kernel[(triton.cdiv(B, block_b),)](
        logits, noise, cot, lse, P, B, C,
        SOFTMAX=softmax, ACC_DTYPE=triton_acc_dtype(logits.dtype),
        BLOCK_B=block_b, BLOCK_C=block_c, num_warps=num_warps,
    )
    return cot, lse


def weighted_projection_backward_triton(
    grad_cot: Tensor, grad_lse: Tensor, logits: Tensor, noise: Tensor, softmax: bool
) -> Tensor:
    """Launch the backward kernel; every tensor contiguous, in the dtype of ``logits``. Returns ``[B, C]``."""
    P, B, C = noise.shape
    grad_logits = torch.empty_like(logits)
    if B == 0:
        return grad_logits
    block_c, block_b, num_warps = _triton_config("backward", C, logits.dtype)
    _weighted_projection_bwd_kernel[(triton.cdiv(B, block_b),)](
        grad_cot, grad_lse, logits, noise, grad_logits, P, B, C,
        SOFTMAX=softmax, ACC_DTYPE=triton_acc_dtype(logits.dtype),
        BLOCK_B=block_b, BLOCK_C=block_c, num_warps=num_warps,
    )
    return grad_logits


# --------------------------------------------------------------------------- C++ and PyTorch paths


def weighted_projection_forward_cpp(logits: Tensor, noise: Tensor, softmax: bool) -> Tuple[Tensor, Tensor]:
    """The C++ kernel (csrc/cpu/weighted_projection.cpp); half precision computed in float32."""
    dt = cpp_compute_dtype(logits.dtype)
    cot, lse = torch.ops.fastland.cpp_weighted_projection_forward(logits.to(dt), noise.to(dt), softmax)
    return cot.to(logits.dtype), lse.to(logits.dtype)


def weighted_projection_backward_cpp(
    grad_cot: Tensor, grad_lse: Tensor, logits: Tensor, noise: Tensor, softmax: bool
) -> Tensor:
    """The C++ backward kernel; half precision computed in float32."""
    dt = cpp_compute_dtype(logits.dtype)
    out = torch.ops.fastland.cpp_weighted_projection_backward(
        grad_cot.to(dt), grad_lse.to(dt), logits.to(dt), noise.to(dt), softmax
    )
    return out.to(logits.dtype)


def weighted_projection_forward_reference(logits: Tensor, noise: Tensor, softmax: bool) -> Tuple[Tensor, Tensor]:
    """:func:`fastland.reference.weighted_projection_ref` (the spec)."""
    return weighted_projection_ref(logits, noise, "softmax" if softmax else "uniform")


def _normalised_noise_torch(noise: Tensor) -> Tensor:
    """``v = noise / ‖noise‖`` per row, ``1`` when C = 1: ``[P, B, C]``."""
    if noise.shape[-1] == 1:
        return torch.ones_like(noise)
    return noise / noise.norm(dim=-1, keepdim=True)


def weighted_projection_backward_reference(
    grad_cot: Tensor, grad_lse: Tensor, logits: Tensor, noise: Tensor, softmax: bool
) -> Tensor:
    """The backward formula in (differentiable) PyTorch ops: ``[B, C]``."""
    s = torch.softmax(logits, dim=-1)
    if not softmax:
        return grad_lse.unsqueeze(-1) * s
    w = (grad_cot * _normalised_noise_torch(noise)).sum(0)
    shift = grad_lse - (w * s).sum(-1)
    return s * (w + shift.unsqueeze(-1))


_FORWARD: Dict[str, Callable[..., Tuple[Tensor, Tensor]]] = {
    "triton": weighted_projection_forward_triton,
    "cpp": weighted_projection_forward_cpp,
    "reference": weighted_projection_forward_reference,
}
_BACKWARD: Dict[str, Callable[..., Tensor]] = {
    "triton": weighted_projection_backward_triton,
    "cpp": weighted_projection_backward_cpp,
    "reference": weighted_projection_backward_reference,
}


def _backend(logits: Tensor) -> str:
    backend = backend_for(logits)
    if backend == "triton" and not _triton_serves(logits):
        return "reference"
    return backend


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastland::weighted_projection", mutates_args=())
def _weighted_projection_op(logits: Tensor, noise: Tensor, softmax: bool) -> Tuple[Tensor, Tensor]:
    """logits ``[B, C]``, noise ``[P, B, C]`` (same dtype and device) -> (cot ``[P, B, C]``, lse ``[B]``)."""
    backend = _backend(logits)
    if backend != "reference":
        logits, noise = contiguous(logits, noise)
    return _FORWARD[backend](logits, noise, softmax)


@_weighted_projection_op.register_fake
def _(logits: Tensor, noise: Tensor, softmax: bool) -> Tuple[Tensor, Tensor]:
    return noise.new_empty(noise.shape), logits.new_empty(logits.shape[:1])


@torch.library.custom_op("fastland::weighted_projection_backward", mutates_args=())
def _weighted_projection_backward_op(
    grad_cot: Tensor, grad_lse: Tensor, logits: Tensor, noise: Tensor, softmax: bool
) -> Tensor:
    """grad_cot ``[P, B, C]``, grad_lse ``[B]``, logits ``[B, C]``, noise ``[P, B, C]`` -> grad_logits ``[B, C]``."""
    backend = _backend(logits)
    if backend != "reference":
        grad_cot, grad_lse, logits, noise = contiguous(grad_cot, grad_lse, logits, noise)
    return _BACKWARD[backend](grad_cot, grad_lse, logits, noise, softmax)


@_weighted_projection_backward_op.register_fake
def _(grad_cot: Tensor, grad_lse: Tensor, logits: Tensor, noise: Tensor, softmax: bool) -> Tensor:
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, noise, softmax = inputs
    ctx.save_for_backward(logits, noise)
    ctx.softmax = softmax


def _backward(ctx, grad_cot: Tensor, grad_lse: Tensor):
    logits, noise = ctx.saved_tensors
    grad_logits = _weighted_projection_backward_op(grad_cot, grad_lse, logits, noise, ctx.softmax)
    return grad_logits, None, None


_weighted_projection_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_bwd(ctx, inputs, output) -> None:
    grad_cot, grad_lse, logits, noise, softmax = inputs
    ctx.save_for_backward(grad_cot, grad_lse, logits, noise)
    ctx.softmax = softmax


def _backward_bwd(ctx, grad: Tensor):
    """Backward of the backward, in differentiable PyTorch ops (so higher orders work too).

    With ``s = softmax(z)``, ``q`` the incoming gradient ``[B, C]`` and ``⟨q, s⟩`` per row:
    ``ḡ_lse = ⟨q, s⟩``; softmax weight: ``w`` as in the forward, ``a = q ⊙ (ḡ_lse + w - ⟨w, s⟩)
    - ⟨q, s⟩ w``, ``ḡ_cot[p] = v_p ⊙ s ⊙ (q - ⟨q, s⟩)``, ``ḡ_z = s ⊙ (a - ⟨a, s⟩)``;
    uniform weight: ``a = ḡ_lse_in · q``.
    """
    grad_cot, grad_lse, logits, noise = ctx.saved_tensors
    s = torch.softmax(logits, dim=-1)
    qs = (grad * s).sum(-1)
    d_grad_lse = qs
    if ctx.softmax:
        v = _normalised_noise_torch(noise)
        w = (grad_cot * v).sum(0)
        ws = (w * s).sum(-1)
        d_w = s * (grad - qs.unsqueeze(-1))
        d_grad_cot = v * d_w.unsqueeze(0)
        a = grad * (grad_lse - ws).unsqueeze(-1) + grad * w - qs.unsqueeze(-1) * w
    else:
        d_grad_cot = torch.zeros_like(grad_cot)
        a = grad_lse.unsqueeze(-1) * grad
    d_logits = s * (a - (a * s).sum(-1, keepdim=True))
    return d_grad_cot, d_grad_lse, d_logits, None, None


_weighted_projection_backward_op.register_autograd(_backward_bwd, setup_context=_setup_context_bwd)


# --------------------------------------------------------------------------- public function


def _check_args(logits: Tensor, noise: Tensor, weight: str) -> None:
    check_tensor("logits", logits, ndim=2)
    check_tensor("noise", noise, ndim=3)
    if weight not in WEIGHTS:
        raise ValueError(f"weight: expected one of {WEIGHTS}, got {weight!r}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits: expected at least one class, got shape {tuple(logits.shape)}")
    if noise.shape[1:] != logits.shape:
        raise ValueError(
            f"noise: expected shape [P, {logits.shape[0]}, {logits.shape[1]}], got {tuple(noise.shape)}"
        )
    check_same_device(("logits", "noise"), (logits, noise))
    if noise.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "noise: expected a tensor that does not require grad (weighted_projection is "
            "differentiable w.r.t. logits only); pass noise.detach()"
        )


def weighted_projection(logits: Tensor, noise: Tensor, weight: str = "softmax") -> Tuple[Tensor, Tensor]:
    """Cotangents of the random-projection penalties and ``logsumexp``, fused.

    Per row ``v = noise / ‖noise‖`` (``v = 1`` when ``C = 1``); cotangent ``v ⊙
    softmax(z)`` (``weight="softmax"``, AMSReg) or ``v`` (``"uniform"``, Jacobian
    regularisation); ``lse = logsumexp(z)``, max-shifted (finite for ``|z| ~ 1e4``).
    Differentiable w.r.t. ``logits`` through both outputs, to any order.

    Args:
        logits: ``[B, C]``, C >= 1, floating point.
        noise: ``[P, B, C]`` on the same device (any scale: rows are normalised);
            cast to the dtype of ``logits``; must not require grad.
        weight: ``"softmax"`` or ``"uniform"``.
    Returns:
        ``(cotangents [P, B, C], lse [B])`` in the dtype of ``logits``.
    """
    _check_args(logits, noise, weight)
    return _weighted_projection_op(logits, noise.to(logits.dtype), weight == "softmax")
