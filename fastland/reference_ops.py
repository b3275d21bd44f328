"""The references of the fused ops of :mod:`fastland.ops` (docs/design.md §2), forward and backward.

The spec of each op in plain PyTorch ops (differentiable, so autograd through them is the
reference for every derivative); the ops' reference backend runs these. No argument checks:
the public ops check their arguments before any backend runs. Re-exported by
:mod:`fastland.reference`.

Shapes: ``B`` batch, ``C`` classes, ``P`` projections, ``N`` samples, ``G`` grid points,
``S`` the per-sample shape.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = [
    "WEIGHTS",
    "weighted_projection_ref",
    "weighted_projection_backward_ref",
    "grid_combine_ref",
    "grid_combine_backward_ref",
    "grid_relative_loglik_ref",
    "grid_relative_loglik_backward_ref",
]

# the weights of the cotangents: softmax (AMSReg) or uniform (Jacobian regularisation)
WEIGHTS = ("softmax", "uniform")


def _normalised_noise(noise: Tensor) -> Tensor:
    """``v = noise / ‖noise‖`` per row, ``1`` when C = 1: ``[P, B, C]``."""
    if noise.shape[-1] == 1:
        return torch.ones_like(noise)
    return noise / noise.norm(dim=-1, keepdim=True)


def weighted_projection_ref(
    logits: Tensor, noise: Tensor, weight: str = "softmax"
) -> Tuple[Tensor, Tensor]:
    """Cotangents of the random-projection estimators, and ``logsumexp``.

    Per row: ``v = noise / ‖noise‖`` (``v = 1`` when ``C = 1``), cotangent
    ``v ⊙ softmax(z)`` (``weight="softmax"``, AMSReg) or ``v`` (``"uniform"``,
    Jacobian regularisation), and ``lse = logsumexp(z)``. Differentiable w.r.t.
    ``logits`` through both outputs (the softmax Jacobian), so a penalty's
    gradient flows through ``p``.

    Args:
        logits: ``[B, C]``.
        noise: ``[P, B, C]``, e.g. standard normal (any scale: rows are normalised);
            cast to the dtype of ``logits``.
        weight: ``"softmax"`` or ``"uniform"``.
    Returns:
        ``(cotangents [P, B, C], lse [B])`` in the dtype of ``logits``.
    """
    v = _normalised_noise(noise.to(logits.dtype))
    lse = torch.logsumexp(logits, dim=-1)
    cot = v * torch.softmax(logits, dim=-1) if weight == "softmax" else v
    return cot, lse


def weighted_projection_backward_ref(
    grad_cot: Tensor, grad_lse: Tensor, logits: Tensor, noise: Tensor, weight: str = "softmax"
) -> Tensor:
    """The gradient of :func:`weighted_projection_ref` w.r.t. ``logits`` (``noise`` is a constant).

    With ``s = softmax(z)``: softmax weight ``w = Σ_p ḡ_cot[p] ⊙ v_p``,
    ``ḡ_z = s ⊙ (ḡ_lse + w - ⟨w, s⟩)``; uniform weight ``ḡ_z = ḡ_lse · s``.

    Args:
        grad_cot: ``[P, B, C]``; grad_lse: ``[B]``; logits: ``[B, C]``; noise: ``[P, B, C]``.
    Returns:
        ``[B, C]``.
    """
    s = torch.softmax(logits, dim=-1)
    if weight != "softmax":
        return grad_lse.unsqueeze(-1) * s
    w = (grad_cot * _normalised_noise(noise)).sum(0)
    shift = grad_lse - (w * s).sum(-1)
    return s * (w + shift.unsqueeze(-1))


def grid_combine_ref(base: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Grid synthesis ``out[n, g] = base[n] + a[g]·u[n] + b[g]·v[n]``.

    Args:
        base, u, v: ``[N, *S]``, same shape.
        a, b: ``[G]`` grid coordinates along ``u`` and ``v`` (cast to the dtype of ``base``).
    Returns:
        ``[N, G, *S]``.
    """
    extra = (1,) * (base.dim() - 1)
    a = a.to(base.dtype).view(1, -1, *extra)
    b = b.to(base.dtype).view(1, -1, *extra)
    return base.unsqueeze(1) + a * u.unsqueeze(1) + b * v.unsqueeze(1)


def grid_combine_backward_ref(grad_out: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The adjoint of :func:`grid_combine_ref` in ``base, u, v``: ``Σ_g grad_out[:, g]·(1, a[g], b[g])``.

    (The gradients to ``a`` and ``b`` are the contractions ``Σ_{n,s} grad_out[n, g, s]·u[n, s]``
    and likewise with ``v``.)

    Args:
        grad_out: ``[N, G, *S]``; a, b: ``[G]``.
    Returns:
        three ``[N, *S]``.
    """
    flat = grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1)
    shape = (grad_out.shape[0], *grad_out.shape[2:])
    a, b = a.to(grad_out.dtype), b.to(grad_out.dtype)
    return (
        flat.sum(1).reshape(shape),
        torch.einsum("ngd,g->nd", flat, a).reshape(shape),
        torch.einsum("ngd,g->nd", flat, b).reshape(shape),
    )


def grid_relative_loglik_ref(logits: Tensor, base_lse: Tensor) -> Tensor:
    """``Δlog p`` at every grid point: ``logsumexp(logits[n, g]) - base_lse[n]``.

    Args:
        logits: ``[N, G, C]``.
        base_lse: ``[N]``, ``logsumexp`` of the clean inputs' logits.
    Returns:
        ``[N, G]``.
    """
    return torch.logsumexp(logits, dim=-1) - base_lse.to(logits.dtype).unsqueeze(1)


def grid_relative_loglik_backward_ref(grad_out: Tensor, logits: Tensor) -> Tensor:
    """The gradient of :func:`grid_relative_loglik_ref` w.r.t. ``logits``: ``grad_out[..., None] · softmax``.

    (The gradient to ``base_lse`` is ``-Σ_g grad_out[:, g]``.)

    Args:
        grad_out: ``[N, G]``; logits: ``[N, G, C]``.
    Returns:
        ``[N, G, C]``.
    """
    return grad_out.unsqueeze(-1) * torch.softmax(logits, dim=-1)

