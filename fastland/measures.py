"""Flatness of the likelihood landscape, Φ (paper Eqs. 7, 8).

``φ(x) = (1/n) Σ_j Σ_{a,b} s(x + a·d1_j + b·d2_j)`` with AMS scores
``s = −‖∇x log p‖₂`` over ``points × points`` grid points ``a, b ∈ [-span, span]``
and ``n = n_dirs`` direction pairs per sample; ``Φ = mean_i φ(x_i)``. Higher
(closer to 0) is flatter. Grid points go through forward and backward in batches
(one VJP per batch, input gradients only), with the first-layer fusion of
:mod:`fastland._grid` when the model allows it (the input gradient is then
``L₀ᵀ ∇h log p``). :func:`flatness` resolves its checks and the fused path once at
its entry and hands plain tensors and the plan down.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from ._checks import check_flatness_args, check_flatness_call  # noqa: F401 (check_flatness_args: the runs read it here)
from ._grid import GridPlan, chunk_ams_scores, eval_mode, flat_grid, grid_axis, grid_chunks, plan
from .neighbourhood import draw_pairs

__all__ = ["FLATNESS_SPAN", "FLATNESS_POINTS", "FLATNESS_DIRS", "Flatness", "flatness", "flatness_values"]

FLATNESS_SPAN = 8 / 255
FLATNESS_POINTS = 5
FLATNESS_DIRS = 2


@dataclass
class Flatness:
    """Flatness of the likelihood landscape (Eq. 7, 8); higher (closer to 0) is flatter.

    Attributes:
        phi: ``[N]`` per-sample ``φ(x_i)``.
        mean: ``Φ = mean_i φ(x_i)``.
        stderr: standard error of ``Φ`` over samples (``std/sqrt(N)``; NaN for ``N = 1``).
        meta: the settings (``n_dirs``, ``span``, ``points``, ``reduction``, ``directions``).
    """

    phi: Tensor
    mean: float
    stderr: float
    meta: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_phi(cls, phi: Tensor, meta: Dict[str, Any]) -> "Flatness":
        """Summary statistics of ``phi`` ``[N]``."""
        n = phi.shape[0]
        phi = phi.detach()
        mean = float(phi.double().mean())
        stderr = float(phi.double().std() / math.sqrt(n)) if n > 1 else float("nan")
        return cls(phi, mean, stderr, meta)


def flatness_values(
    model: nn.Module, x: Tensor, d1: Tensor, d2: Tensor, alphas: Tensor, betas: Tensor, p: GridPlan,
    *, reduction: str = "sum",
) -> Tensor:
    """The flatness kernel: no argument checks, model already in eval mode.

    Args:
        x: ``[N, *S]``; d1, d2: ``[n, N, *S]``; alphas ``[Sa]``; betas ``[Sb]``;
        p: the :func:`fastland._grid.plan` (``backward=True``).
    Returns:
        ``phi`` ``[N]``.
    """
    n, N = d1.shape[0], x.shape[0]
    a, b = flat_grid(alphas, betas)
    G = a.shape[0]
    base = x.unsqueeze(0).expand_as(d1).reshape(n * N, *x.shape[1:])
    totals = torch.zeros(n * N, dtype=torch.float64, device=x.device)
    for i0, i1, g0, g1, pts in grid_chunks(p, base, d1.reshape(base.shape), d2.reshape(base.shape), a, b):
        s = chunk_ams_scores(p, model, pts, x.shape[1:])
        totals[i0:i1] += s.view(i1 - i0, g1 - g0).sum(dim=1, dtype=torch.float64)
    phi = totals.view(n, N).mean(dim=0)
    if reduction == "mean":
        phi = phi / G
    return phi.to(x.dtype)


def flatness(
    model: nn.Module,
    x: Tensor,
    *,
    y: Optional[Tensor] = None,
    n_dirs: int = FLATNESS_DIRS,
    span: float = FLATNESS_SPAN,
    points: int = FLATNESS_POINTS,
    reduction: str = "sum",
    directions: str = "rademacher",
    batch_size: Union[int, str] = "auto",
    fuse_first_layer: Union[bool, str] = "auto",
    generator: Optional[torch.Generator] = None,
) -> Flatness:
    """Φ-flatness (Eqs. 7, 8): AMS scores ``-‖∇x log p‖`` summed over ``n_dirs`` grids.

    ``reduction="mean"`` divides by the number of grid points (comparable across
    grid sizes). The model is evaluated in eval mode (its modes are restored).

    Args:
        model: ``[B, *S] -> [B, C]`` logits.
        x: ``[N, *S]`` in ``[0, 1]``.
        y: ``[N]`` labels (``directions="fgsm"`` only).
        n_dirs: direction pairs per sample (>= 1).
        span, points: the grid, as in :func:`fastland.landscape`.
        reduction: ``"sum"`` (the paper's) or ``"mean"``.
        directions: ``"rademacher"``, ``"gaussian"`` or ``"fgsm"``.
        batch_size: grid points per forward+backward, or ``"auto"``.
        fuse_first_layer: as in :func:`fastland.landscape` (needs zero-padded convolutions).
        generator: on ``x``'s device, for the random directions.
    Returns:
        :class:`Flatness` with ``phi [N]``, ``mean`` (Φ) and ``stderr``.

    Example::

        phi = fastland.flatness(model, x, generator=torch.Generator().manual_seed(0))
        print(phi.mean, "±", phi.stderr)
    """
    check_flatness_call(model, x, y, n_dirs, span, points, reduction, directions)
    meta = {"n_dirs": n_dirs, "span": float(span), "points": points, "reduction": reduction,
            "directions": directions}
    grid = grid_axis(span, points, x.dtype, x.device)
    with eval_mode(model):
        p = plan(model, x, batch_size=batch_size, fuse_first_layer=fuse_first_layer, backward=True)
        d1, d2 = draw_pairs(model, x, y, directions, n_dirs, generator)
        phi = flatness_values(model, x, d1, d2, grid, grid, p, reduction=reduction)
    return Flatness.from_phi(phi, meta)
