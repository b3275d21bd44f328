"""Fused op ``weighted_projection``: the cotangents of the random-projection penalties.

``weighted_projection(logits [B, C], noise [P, B, C], weight) -> (cot [P, B, C], lse [B])``:
per row ``v = noise / ‖noise‖`` (``v = 1`` when ``C = 1``), ``cot = v ⊙ softmax(z)``
(``weight="softmax"``, AMSReg) or ``cot = v`` (``"uniform"``, Jacobian
regularisation), and ``lse = logsumexp(z)``, in one pass over the logits.

Backward (to ``logits`` only; ``noise`` is a constant): the op
``fastland::weighted_projection_backward``
(:func:`fastland.reference.weighted_projection_backward_ref` is its spec), whose own
backward is written below in differentiable PyTorch ops, so every order works: the
AMSReg penalty's gradient flows through ``softmax(z)``.

Kernels: Triton here (``_weighted_projection_{fwd,bwd}_kernel``, CUDA), C++ in
``csrc/weighted_projection.cpp`` (CPU); wiring by :mod:`fastland.ops._scaffold`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .. import reference_ops as ref
from .._checks import check_same_device, check_tensor
from ._scaffold import TRITON_DTYPES, Launch, LaunchConfig, define, pick_config
from .utils import triton_acc_dtype, triton_available

__all__ = ["weighted_projection", "LAUNCH_CONFIGS", "BLOCK_NAMES", "launch_configs"]

WEIGHTS = ref.WEIGHTS

# Triton launch configurations, the one table the launchers (and the ahead-of-time tool)
# read: ((BLOCK_B rows, BLOCK_C = widest C covered), num_warps, num_stages), sorted by
# BLOCK_C. A program holds BLOCK_B x BLOCK_C elements (1024-2048 up to C = 1024: enough
# programs to fill an H100's 132 SMs at B = 4096, C = 10) in registers. Wider rows than
# the last entry use the reference. The widest entry is C = 8192: a C = 16384 entry
# spilled to local memory on sm_80/sm_90 in every dtype (backward); see
# benchmarks/notes/triton.md.
BLOCK_NAMES = ("BLOCK_B", "BLOCK_C")
_TABLE = (
    LaunchConfig((64, 16), 4), LaunchConfig((16, 64), 4), LaunchConfig((8, 256), 4),
    LaunchConfig((2, 1024), 4), LaunchConfig((1, 4096), 8), LaunchConfig((1, 8192), 16),
)
LAUNCH_CONFIGS: Dict[str, Tuple[LaunchConfig, ...]] = {"forward": _TABLE, "backward": _TABLE}
# float64 rows hold twice the registers: the C = 8192 entry spills there, so float64
# stops at C = 4096 (wider float64 rows use the reference).
_FP64_MAX_C = 4096


def launch_configs(kind: str, dtype: torch.dtype) -> Tuple[LaunchConfig, ...]:
    """The entries of ``LAUNCH_CONFIGS[kind]`` the kernels use for ``dtype`` (spill-free)."""
    table = LAUNCH_CONFIGS[kind]
    if dtype == torch.float64:
        return tuple(c for c in table if c.block[-1] <= _FP64_MAX_C)
    return table


# --------------------------------------------------------------------------- Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    from ._triton import row_softmax

    @triton.jit
    def _normalised_noise(n, rmask, C):
        """``v = n / ‖n‖`` per row of a [BLOCK_B, BLOCK_C] block (``v = 1`` when C = 1)."""
        ss = tl.where(rmask, tl.sum(n * n, axis=1), 1.0)
        v = n / tl.sqrt(ss)[:, None]
        return tl.where(C == 1, 1.0, v)

    @triton.jit
    def _softmax_rows(z_ptr, B, C, ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's ``[BLOCK_B, BLOCK_C]`` block of the logits ``z [B, C]``.

        Returns ``(rows, rmask, mask, offs, prob, lse)``: row indices and mask ``[BLOCK_B]``,
        the element mask and row-major offsets ``[BLOCK_B, BLOCK_C]``, ``softmax(z)``
        ``[BLOCK_B, BLOCK_C]`` and ``logsumexp(z)`` ``[BLOCK_B]`` in ``ACC_DTYPE``.
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < B
        mask = rmask[:, None] & (cols < C)[None, :]
        e, s, m = row_softmax(z_ptr, rows, cols, B, C, ACC_DTYPE)
        return rows, rmask, mask, rows[:, None] * C + cols[None, :], e / s[:, None], m + tl.log(s)

    @triton.jit
    def _weighted_projection_fwd_kernel(
        z_ptr, noise_ptr, cot_ptr, lse_ptr, P, B, C,
        SOFTMAX: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows, rmask, mask, offs, prob, lse = _softmax_rows(z_ptr, B, C, ACC_DTYPE, BLOCK_B, BLOCK_C)
        tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=rmask)
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
        rows, rmask, mask, offs, prob, _ = _softmax_rows(z_ptr, B, C, ACC_DTYPE, BLOCK_B, BLOCK_C)
        glse = tl.load(glse_ptr + rows, mask=rmask, other=0.0)
        glse = glse.to(ACC_DTYPE)
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


def _launch(kernel, args: tuple, B: int, C: int, kind: str, dtype: torch.dtype, softmax: bool) -> Launch:
    cfg = pick_config(launch_configs(kind, dtype), C)
    block_b, block_c = cfg.block
    return Launch(kernel, (triton.cdiv(B, block_b),), args, dict(
        SOFTMAX=softmax, ACC_DTYPE=triton_acc_dtype(dtype), BLOCK_B=block_b, BLOCK_C=block_c,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    ))


def forward_plan(logits: Tensor, noise: Tensor, softmax: bool) -> Tuple[Tuple[Tensor, Tensor], List[Launch]]:
    """Outputs and launches of the forward: logits ``[B, C]``, noise ``[P, B, C]`` (contiguous, one dtype)."""
    P, B, C = noise.shape
    cot, lse = torch.empty_like(noise), logits.new_empty(B)
    if B == 0:
        return (cot, lse), []
    args = (logits, noise, cot, lse, P, B, C)
    return (cot, lse), [_launch(_weighted_projection_fwd_kernel, args, B, C, "forward", logits.dtype, softmax)]


def backward_plan(
    grad_cot: Tensor, grad_lse: Tensor, logits: Tensor, noise: Tensor, softmax: bool
) -> Tuple[Tensor, List[Launch]]:
    """Output ``[B, C]`` and launches of the backward; every tensor contiguous, in the dtype of ``logits``."""
    P, B, C = noise.shape
    grad_logits = torch.empty_like(logits)
    if B == 0:
        return grad_logits, []
    args = (grad_cot, grad_lse, logits, noise, grad_logits, P, B, C)
    return grad_logits, [_launch(_weighted_projection_bwd_kernel, args, B, C, "backward", logits.dtype, softmax)]


def _serves(logits: Tensor) -> bool:
    return logits.dtype in TRITON_DTYPES and pick_config(
        launch_configs("forward", logits.dtype), logits.shape[1]) is not None


# --------------------------------------------------------------------------- ops and autograd


def _weight(softmax: bool) -> str:
    return "softmax" if softmax else "uniform"


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
    if ctx.softmax:
        v = ref._normalised_noise(noise)
        w = (grad_cot * v).sum(0)
        ws = (w * s).sum(-1)
        d_grad_cot = v * (s * (grad - qs.unsqueeze(-1))).unsqueeze(0)
        a = grad * (grad_lse - ws).unsqueeze(-1) + grad * w - qs.unsqueeze(-1) * w
    else:
        d_grad_cot = torch.zeros_like(grad_cot)
        a = grad_lse.unsqueeze(-1) * grad
    d_logits = s * (a - (a * s).sum(-1, keepdim=True))
    return d_grad_cot, qs, d_logits, None, None


def _save_bwd(ctx, inputs, output) -> None:
    grad_cot, grad_lse, logits, noise, softmax = inputs
    ctx.save_for_backward(grad_cot, grad_lse, logits, noise)
    ctx.softmax = softmax


_backward_op = define(
    "weighted_projection_backward",
    "(Tensor grad_cot, Tensor grad_lse, Tensor logits, Tensor noise, bool softmax) -> Tensor",
    reference=lambda g_cot, g_lse, z, noise, softmax: ref.weighted_projection_backward_ref(
        g_cot, g_lse, z, noise, _weight(softmax)),
    fake=lambda grad_cot, grad_lse, logits, noise, softmax: torch.empty_like(logits),
    triton_plan=backward_plan if triton_available() else None,
    triton_serves=lambda grad_cot, grad_lse, logits, noise, softmax: _serves(logits),
    backward=_backward_bwd,
    setup_context=_save_bwd,
)


def _backward(ctx, grad_cot: Tensor, grad_lse: Tensor):
    logits, noise = ctx.saved_tensors
    return _backward_op(grad_cot, grad_lse, logits, noise, ctx.softmax), None, None


def _save(ctx, inputs, output) -> None:
    logits, noise, softmax = inputs
    ctx.save_for_backward(logits, noise)
    ctx.softmax = softmax


_op = define(
    "weighted_projection",
    "(Tensor logits, Tensor noise, bool softmax) -> (Tensor, Tensor)",
    reference=lambda logits, noise, softmax: ref.weighted_projection_ref(logits, noise, _weight(softmax)),
    fake=lambda logits, noise, softmax: (torch.empty_like(noise), logits.new_empty(logits.shape[:1])),
    triton_plan=forward_plan if triton_available() else None,
    triton_serves=lambda logits, noise, softmax: _serves(logits),
    backward=_backward,
    setup_context=_save,
)


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
    return _op(logits, noise.to(logits.dtype), weight == "softmax")
