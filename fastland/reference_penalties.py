"""The references of the penalties (docs/design.md §1): ``‖J‖²_F`` and AMSReg's ``‖diag(p) J‖²_F``.

``‖J‖²_F = C · E_v ‖vᵀJ‖²`` with ``v`` uniform on the unit sphere ``S^{C-1}``, and AMSReg's
``‖diag(p) J‖²_F`` the same with cotangent ``v ⊙ p``; one double-backward VJP per
projection (or per class for ``exact``). Re-exported by :mod:`fastland.reference`.

Shapes: ``B`` batch, ``C`` classes, ``P`` projections, ``S`` the per-sample input shape.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ._checks import check_tensor
from .choices import ESTIMATORS
from .reference_ops import WEIGHTS, weighted_projection_ref

__all__ = ["unit_sphere_noise", "penalty_ref", "jacobian_penalty_ref", "amsreg_penalty_ref", "PENALTY_ESTIMATORS"]

# the estimators with a reference here: every one of fastland.choices.ESTIMATORS but the finite difference
PENALTY_ESTIMATORS = tuple(e for e in ESTIMATORS if e != "finite_difference")

def unit_sphere_noise(
    n_proj: int, logits: Tensor, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Standard normal noise ``[P, B, C]`` for the projection estimators.

    Drawn on the logits' device, in float32 for half-precision logits (else
    their dtype). Rows are normalised by :func:`weighted_projection_ref` to lie
    uniformly on ``S^{C-1}``.
    """
    dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.randn(
        (n_proj, *logits.shape), generator=generator, device=logits.device, dtype=dtype
    )


def _check_penalty_args(logits: Tensor, inputs: Tensor, estimator: str, n_proj: int) -> None:
    check_tensor("logits", logits, ndim=2, nonempty=True)
    check_tensor("inputs", inputs, min_ndim=1)
    if estimator not in PENALTY_ESTIMATORS:
        raise ValueError(f"estimator: expected one of {PENALTY_ESTIMATORS}, got {estimator!r}")
    if not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj: expected an integer >= 1, got {n_proj!r}")
    if not inputs.requires_grad:
        raise ValueError(
            "inputs: expected a tensor that requires grad and from which logits were computed; "
            "call inputs.requires_grad_(True) before the forward pass"
        )
    if inputs.shape[0] != logits.shape[0]:
        raise ValueError(
            f"inputs: expected batch size {logits.shape[0]} (that of logits), got shape {tuple(inputs.shape)}"
        )


def _vjp_sqnorm(logits: Tensor, inputs: Tensor, cotangent: Tensor) -> Tensor:
    """``‖cotangentᵀ J‖²`` per sample, differentiable (double backward): ``[B, C] -> [B]``."""
    (g,) = torch.autograd.grad(
        logits, inputs, grad_outputs=cotangent, create_graph=True, retain_graph=True,
        allow_unused=True,
    )
    if g is None:
        raise ValueError("inputs: logits do not depend on inputs (not in the graph of logits)")
    return g.flatten(1).pow(2).sum(1)


def penalty_ref(
    logits: Tensor,
    inputs: Tensor,
    *,
    weight: str,
    estimator: str = "projection",
    n_proj: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Per-sample ``‖diag(w) J(x)‖²_F``, ``w = softmax(f(x))`` (``weight="softmax"``, AMSReg) or ``1``
    (``"uniform"``, ``‖J‖²_F``); differentiable w.r.t. parameters (the gradient flows through ``w``).

    ``projection``: ``(C/P) Σ_p ‖(v_p ⊙ w)ᵀ J‖²``, ``v_p`` uniform on ``S^{C-1}`` (unbiased);
    ``exact``: ``Σ_c w_c² ‖e_cᵀ J‖²``; ``gradnorm`` (softmax weight only): ``‖∇x log p(x)‖² = ‖pᵀ J‖²``.

    Args:
        logits: ``[B, C]`` computed from ``inputs``.
        inputs: ``[B, *S]`` with ``requires_grad=True``.
        weight: ``"softmax"`` or ``"uniform"``.
        estimator: one of :data:`PENALTY_ESTIMATORS`; n_proj: projections (>= 1).
        generator: for the projections' noise, on the logits' device.
    Returns:
        ``[B]``.
    """
    if weight not in WEIGHTS:
        raise ValueError(f"weight: expected one of {WEIGHTS}, got {weight!r}")
    if weight == "uniform" and estimator == "gradnorm":
        raise ValueError(
            "estimator: 'gradnorm' estimates ‖∇x log p‖², an AMSReg quantity; "
            "for ‖J‖²_F use 'projection' or 'exact'"
        )
    _check_penalty_args(logits, inputs, estimator, n_proj)
    B, C = logits.shape
    p = torch.softmax(logits, dim=-1) if weight == "softmax" else torch.ones_like(logits)
    if estimator == "gradnorm":
        return _vjp_sqnorm(logits, inputs, p)
    if estimator == "exact":
        total = logits.new_zeros(B)
        for c in range(C):
            onehot = torch.zeros_like(logits)
            onehot[:, c] = 1
            total = total + _vjp_sqnorm(logits, inputs, onehot * p)
        return total
    noise = unit_sphere_noise(n_proj, logits, generator)
    cot, _ = weighted_projection_ref(logits, noise, weight)
    total = logits.new_zeros(B)
    for k in range(n_proj):
        total = total + _vjp_sqnorm(logits, inputs, cot[k])
    return total * (C / n_proj)


def jacobian_penalty_ref(logits: Tensor, inputs: Tensor, **settings: Any) -> Tensor:
    """Per-sample ``‖J(x)‖²_F`` (Hoffman et al. 2019): :func:`penalty_ref` with ``weight="uniform"``.

    ``projection``: ``(C/P) Σ_p ‖v_pᵀ J‖²`` (unbiased); ``exact``: ``Σ_c ‖e_cᵀ J‖²``.
    ``settings``: ``estimator``, ``n_proj``, ``generator`` of :func:`penalty_ref`. Returns ``[B]``.
    """
    return penalty_ref(logits, inputs, weight="uniform", **settings)


def amsreg_penalty_ref(logits: Tensor, inputs: Tensor, **settings: Any) -> Tensor:
    """Per-sample AMSReg penalty ``‖diag(p) J(x)‖²_F``, ``p = softmax(f(x))`` (Eq. 24):
    :func:`penalty_ref` with ``weight="softmax"``.

    ``projection``: ``(C/P) Σ_p ‖(v_p ⊙ p)ᵀ J‖²`` (unbiased); ``exact``: ``Σ_c p_c² ‖e_cᵀ J‖²``;
    ``gradnorm``: ``‖∇x log p(x)‖² = ‖pᵀ J‖²``, which Prop. 3.1 bounds by ``C ‖diag(p) J‖²_F``.
    ``settings``: ``estimator``, ``n_proj``, ``generator`` of :func:`penalty_ref`. Returns ``[B]``.
    """
    return penalty_ref(logits, inputs, weight="softmax", **settings)
