"""The references of the neighbourhood, landscape and flatness (Eqs. 4, 7): per-point loops, obviously correct.

Re-exported by :mod:`fastland.reference`; the tests hold :func:`fastland.landscape` and
:func:`fastland.flatness` to these.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ._checks import check_eval_mode, check_tensor
from .reference_energy import ams_score

__all__ = ["signed_orthogonal_directions", "landscape_ref", "flatness_ref"]


# --------------------------------------------------------------------------- landscapes


def signed_orthogonal_directions(
    x: Tensor, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """Two exactly orthogonal signed directions per sample.

    ``d1`` is Rademacher (``±1``); ``d2`` agrees with ``d1`` on a random half
    of the coordinates and disagrees on the other half, so ``d1·d2 = 0``
    exactly. For odd ``D`` one random coordinate of ``d2`` is 0.

    Args:
        x: ``[N, *S]`` (only its shape, dtype and device are used); ``D = prod(S) >= 2``.
        generator: on ``x``'s device, for reproducible draws.
    Returns:
        ``(d1, d2)``, each ``[N, *S]`` in ``x``'s dtype.
    """
    check_tensor("x", x, min_ndim=2)
    N = x.shape[0]
    D = math.prod(x.shape[1:])
    if D < 2:
        raise ValueError(f"x: expected at least 2 features per sample, got shape {tuple(x.shape)}")
    dev, dt = x.device, x.dtype
    d1 = torch.randint(0, 2, (N, D), generator=generator, device=dev).to(dt) * 2 - 1
    half = D // 2
    template = torch.cat(
        [torch.ones(half, device=dev, dtype=dt), -torch.ones(half, device=dev, dtype=dt),
         torch.zeros(D - 2 * half, device=dev, dtype=dt)]
    )
    perm = torch.rand((N, D), generator=generator, device=dev).argsort(dim=1)
    signs = torch.empty((N, D), device=dev, dtype=dt).scatter_(1, perm, template.expand(N, D))
    d2 = d1 * signs
    return d1.view_as(x), d2.view_as(x)


def _check_grid_args(x: Tensor, d1: Tensor, d2: Tensor, alphas: Tensor, betas: Tensor) -> None:
    check_tensor("x", x, min_ndim=2, finite=True)
    check_tensor("alphas", alphas, ndim=1)
    check_tensor("betas", betas, ndim=1)
    for name, d in (("d1", d1), ("d2", d2)):
        check_tensor(name, d)
        if d.shape[-x.dim():] != x.shape:
            raise ValueError(f"{name}: expected shape [..., {', '.join(map(str, x.shape))}], got {tuple(d.shape)}")


def landscape_ref(
    model: nn.Module, x: Tensor, d1: Tensor, d2: Tensor, alphas: Tensor, betas: Tensor
) -> Tensor:
    """``Δlog p`` on the grid ``x + a·d1 + b·d2``, one point at a time.

    Args:
        model: in eval mode.
        x, d1, d2: ``[N, *S]``.
        alphas: ``[Sa]`` steps along ``d1``; betas: ``[Sb]`` steps along ``d2``.
    Returns:
        ``[N, Sb, Sa]`` (alphas along the last axis).
    """
    check_eval_mode("model", model)
    _check_grid_args(x, d1, d2, alphas, betas)
    out = x.new_empty((x.shape[0], betas.shape[0], alphas.shape[0]))
    with torch.no_grad():
        for i in range(x.shape[0]):
            base = torch.logsumexp(model(x[i : i + 1]), dim=-1)[0]
            for bi, b in enumerate(betas.tolist()):
                for ai, a in enumerate(alphas.tolist()):
                    xp = x[i] + a * d1[i] + b * d2[i]
                    out[i, bi, ai] = torch.logsumexp(model(xp[None]), dim=-1)[0] - base
    return out


def flatness_ref(
    model: nn.Module,
    x: Tensor,
    d1: Tensor,
    d2: Tensor,
    alphas: Tensor,
    betas: Tensor,
    reduction: str = "sum",
) -> Tensor:
    """Per-sample flatness ``φ(x)`` (Eq. 7), one grid point at a time.

    ``φ(x_i) = (1/n) Σ_j Σ_{a, b} s(x_i + a·d1[j, i] + b·d2[j, i])`` with
    ``s`` the AMS score; ``reduction="mean"`` also divides by the number of grid
    points ``G = Sa·Sb`` (comparable across grid sizes). Points are not clipped
    to [0, 1].

    Args:
        model: in eval mode.
        x: ``[N, *S]``.
        d1, d2: ``[n, N, *S]``, ``n`` direction pairs per sample.
        alphas: ``[Sa]``; betas: ``[Sb]``.
        reduction: ``"sum"`` (the paper's) or ``"mean"``.
    Returns:
        ``[N]``; higher (closer to 0) is flatter.
    """
    check_eval_mode("model", model)
    _check_grid_args(x, d1, d2, alphas, betas)
    if d1.dim() != x.dim() + 1 or d1.shape != d2.shape:
        raise ValueError(f"d1, d2: expected shape [n, {', '.join(map(str, x.shape))}], got {tuple(d1.shape)}, {tuple(d2.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction: expected 'sum' or 'mean', got {reduction!r}")
    n = d1.shape[0]
    phi = x.new_zeros(x.shape[0])
    for i in range(x.shape[0]):
        total = 0.0
        for j in range(n):
            for b in betas.tolist():
                for a in alphas.tolist():
                    xp = x[i] + a * d1[j, i] + b * d2[j, i]
                    total = total + ams_score(model, xp[None])[0]
        phi[i] = total / n
    if reduction == "mean":
        phi = phi / (alphas.shape[0] * betas.shape[0])
    return phi
