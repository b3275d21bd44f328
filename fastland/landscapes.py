"""Relative likelihood landscapes ``Δlog p(x + a·d1 + b·d2)`` (paper Sec. 3.2, Figs. 1, 2, 5).

Tensor in, tensor out: the grid points of many samples are batched through the
model under inference mode, with the first-layer fusion of :mod:`fastland._grid`
when the model allows it. Grid points are not clipped to ``[0, 1]`` (clipping
would break the linearity the fusion relies on; the reference does not clip).
Runs over a whole data set (resumable, sharded) live in
:mod:`fastland.experiments.runs`.

Shapes: ``N`` samples, ``S`` the per-sample shape, ``Sa``/``Sb`` grid points
along ``d1``/``d2``, ``G = Sa·Sb``, ``C`` classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from . import ops
from ._checks import check_landscape_call
from ._grid import GridPlan, check_logits, eval_mode, flat_grid, grid_axis, grid_chunks, plan
from .neighbourhood import Directions, draw_pairs, given_pair

__all__ = ["LANDSCAPE_SPAN", "LANDSCAPE_POINTS", "Landscape", "landscape", "landscape_values"]

LANDSCAPE_SPAN = 16 / 255
LANDSCAPE_POINTS = 41


@dataclass
class Landscape:
    """``Δlog p`` on the grid ``x + a·d1 + b·d2`` around ``N`` samples.

    Attributes:
        alphas: ``[Sa]`` steps along ``d1`` (pixel units).
        betas: ``[Sb]`` steps along ``d2``.
        values: ``[N, Sb, Sa]`` ``Δlog p`` (alphas along the last axis).
        base_logp: ``[N]`` ``log p(x) + log Z`` of the clean samples.
        d1, d2: ``[N, *S]`` the directions, or None for data-set runs (whose
            directions are re-drawn from ``(seed, index)``).
        meta: the settings (``directions``, ``span``, ``points``, ``fused``).
    """

    alphas: Tensor
    betas: Tensor
    values: Tensor
    base_logp: Tensor
    d1: Optional[Tensor] = None
    d2: Optional[Tensor] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.values.shape[0]


class GridResult(NamedTuple):
    """Output of :func:`landscape_values`."""

    values: Tensor  # [N, Sb, Sa]
    base_lse: Tensor  # [N]
    fused: bool  # whether the first-layer fusion was used


def landscape_values(
    model: nn.Module, x: Tensor, d1: Tensor, d2: Tensor, alphas: Tensor, betas: Tensor, p: GridPlan,
) -> GridResult:
    """The landscape kernel: no argument checks, model already in eval mode.

    Args:
        x, d1, d2: ``[N, *S]``; alphas ``[Sa]``; betas ``[Sb]`` (x's dtype and device);
        p: the :func:`fastland._grid.plan` for ``model`` and ``x``.
    Returns:
        :class:`GridResult` ``(values [N, Sb, Sa], base_lse [N], fused)``.
    """
    N, Sa, Sb = x.shape[0], alphas.shape[0], betas.shape[0]
    a, b = flat_grid(alphas, betas)
    forward = p.split.rest if p.split is not None else model
    with torch.inference_mode():
        base_lse = torch.cat([torch.logsumexp(check_logits(model(x[i:i + p.per_call]), x[i:i + p.per_call]), dim=-1)
                              for i in range(0, N, p.per_call)])
        out = x.new_empty((N, Sa * Sb))
        for i0, i1, g0, g1, pts in grid_chunks(p, x, d1, d2, a, b):
            z = forward(pts).view(i1 - i0, g1 - g0, -1)
            out[i0:i1, g0:g1] = ops.grid_relative_loglik(z, base_lse[i0:i1])
    return GridResult(out.view(N, Sb, Sa).clone(), base_lse.clone(), p.split is not None)


def landscape(
    model: nn.Module,
    x: Tensor,
    *,
    y: Optional[Tensor] = None,
    directions: Directions = "rademacher",
    span: float = LANDSCAPE_SPAN,
    points: int = LANDSCAPE_POINTS,
    batch_size: Union[int, str] = "auto",
    fuse_first_layer: Union[bool, str] = "auto",
    generator: Optional[torch.Generator] = None,
) -> Landscape:
    """Relative likelihood landscapes ``Δlog p(x + a·d1 + b·d2)`` around each sample.

    ``a`` and ``b`` run over ``points`` evenly spaced values in ``[-span, span]``.
    The model is evaluated in eval mode (its modes are restored afterwards).

    Args:
        model: ``[B, *S] -> [B, C]`` logits.
        x: ``[N, *S]`` in ``[0, 1]``.
        y: ``[N]`` labels, needed for ``directions="fgsm"``.
        directions: ``"rademacher"``, ``"gaussian"``, ``"fgsm"`` (d1 the FGSM
            direction, d2 a random sign vector orthogonal to it) or a pair
            ``(d1, d2)`` of ``[N, *S]`` (or ``[*S]``) tensors.
        span: half-width of the grid in pixel units (> 0).
        points: grid points per axis (>= 1; odd puts the clean sample at the centre).
        batch_size: grid points per model call, or ``"auto"`` (memory budget).
        fuse_first_layer: True, False or ``"auto"`` (fuse when the structure
            is recognised and reproduces ``model(x)``).
        generator: on ``x``'s device, for the random directions.
    Returns:
        :class:`Landscape` with ``values [N, points, points]``.

    Example::

        land = fastland.landscape(model, x, span=16 / 255, points=41)
        land.values.shape  # [N, 41, 41]
    """
    check_landscape_call(model, x, y, span, points, directions)
    with eval_mode(model):
        p = plan(model, x, batch_size=batch_size, fuse_first_layer=fuse_first_layer, backward=False)
        if isinstance(directions, str):
            d1s, d2s = draw_pairs(model, x, y, directions, 1, generator)
            d1, d2 = d1s[0], d2s[0]
        else:
            d1, d2 = given_pair(x, directions)
        alphas = grid_axis(span, points, x.dtype, x.device)
        res = landscape_values(model, x, d1, d2, alphas, alphas.clone(), p)
    kind = directions if isinstance(directions, str) else "given"
    return Landscape(alphas, alphas.clone(), res.values, res.base_lse, d1, d2,
                     {"directions": kind, "span": float(span), "points": points, "fused": res.fused})
