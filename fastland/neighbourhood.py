"""The axes of a neighbourhood ``N(x) = {x + a·d1 + b·d2}`` and its grid coordinates.

* ``"rademacher"`` (default): ``d1 ∈ {±1}^D``; ``d2`` agrees with ``d1`` on a
  random half of the coordinates and disagrees on the other, so ``d1·d2 = 0``
  exactly (for odd ``D`` one coordinate of ``d2`` is 0). A step ``a`` moves
  every pixel by ``a``: an L∞ step in pixel units.
* ``"gaussian"``: orthogonal Gaussian directions scaled to ``‖d‖₂ = sqrt(D)``.
* ``"fgsm"``: ``d1 = sign(∇x CE(f(x), y))`` (the FGSM direction), ``d2`` a
  random signed vector orthogonal to it (the paper's Fig. 5).

Shapes: ``N`` samples, ``S`` the per-sample shape, ``D = prod(S)``, ``n`` pairs per sample.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import check_labels, check_same_device, check_span_points, check_tensor
from ._grid import eval_mode, grid_axis

__all__ = ["DIRECTION_KINDS", "directions", "orthogonal_signs", "fgsm_direction", "grid_coordinates"]

from .choices import DIRECTION_KINDS

Directions = Union[str, Tuple[Tensor, Tensor]]


def _balanced_signs(keys: Tensor, k: Tensor) -> Tensor:
    """Per row of ``keys`` ``[N, D]``: +1 on the ``k//2`` smallest keys, −1 on the next
    ``k//2``, 0 elsewhere (``k`` ``[N, 1]`` or an int). The one routine behind every
    orthogonal signed direction: ``d1 ⊙ s`` is orthogonal to ``d1`` because ``Σ s = 0``."""
    N, D = keys.shape
    rank = torch.empty((N, D), dtype=torch.long, device=keys.device).scatter_(
        1, keys.argsort(dim=1), torch.arange(D, device=keys.device).expand(N, D).contiguous()
    )
    half = k // 2
    return torch.where(rank < half, 1.0, torch.where(rank < 2 * half, -1.0, 0.0))


def _rademacher(x: Tensor, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    N, D, dev, dt = x.shape[0], math.prod(x.shape[1:]), x.device, x.dtype
    d1 = torch.randint(0, 2, (N, D), generator=generator, device=dev).to(dt) * 2 - 1
    keys = torch.rand((N, D), generator=generator, device=dev)
    d2 = d1 * _balanced_signs(keys, D).to(dt)
    return d1.view_as(x), d2.view_as(x)


def _gaussian(x: Tensor, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """Orthogonal Gaussian directions (Gram–Schmidt in float64), ``‖d1‖ = ‖d2‖ = sqrt(D)``."""
    N, D = x.shape[0], math.prod(x.shape[1:])
    g = torch.randn((2, N, D), generator=generator, device=x.device, dtype=torch.float64)
    u = g[0] / g[0].norm(dim=1, keepdim=True)
    v = g[1] - (g[1] * u).sum(dim=1, keepdim=True) * u
    scale = math.sqrt(D)
    d1 = u * (scale / u.norm(dim=1, keepdim=True))
    d2 = v * (scale / v.norm(dim=1, keepdim=True))
    return d1.to(x.dtype).view_as(x), d2.to(x.dtype).view_as(x)


# the random kinds: kind -> (x [N, *S], generator) -> (d1, d2), each [N, *S], unchecked
_RANDOM = {"rademacher": _rademacher, "gaussian": _gaussian}


def directions(
    x: Tensor, kind: str = "rademacher", *, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """Two orthogonal random directions per sample.

    Args:
        x: ``[N, *S]``; only shape, dtype and device are used; ``D = prod(S) >= 2``.
        kind: ``"rademacher"`` or ``"gaussian"`` (for ``"fgsm"`` use :func:`fgsm_direction`).
        generator: on ``x``'s device, for reproducible draws.
    Returns:
        ``(d1, d2)``, each ``[N, *S]`` in ``x``'s dtype.

    Example::

        d1, d2 = fastland.directions(x, generator=torch.Generator().manual_seed(0))
    """
    check_tensor("x", x, min_ndim=2)
    _check_features(x)
    if kind not in _RANDOM:
        raise ValueError(f"kind: expected 'rademacher' or 'gaussian' (for 'fgsm' use fgsm_direction), got {kind!r}")
    return _RANDOM[kind](x, generator)


def _check_features(x: Tensor) -> None:
    """At least two features per sample: orthogonal signed directions need ``D = prod(S) >= 2``."""
    if math.prod(x.shape[1:]) < 2:
        raise ValueError(f"x: expected at least 2 features per sample, got shape {tuple(x.shape)}")


def orthogonal_signs(d1: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random signed direction exactly orthogonal to the signed direction ``d1``.

    On the ``K`` non-zero coordinates of each row, ``d2 = d1·s`` with ``s`` a random
    balanced sign pattern (one 0 for odd ``K``); on the zero coordinates of ``d1``,
    ``d2`` is a random sign.

    Args:
        d1: ``[N, *S]`` with entries in ``{-1, 0, 1}``.
    Returns:
        ``[N, *S]`` in ``d1``'s dtype.
    """
    N, dev, dt = d1.shape[0], d1.device, d1.dtype
    flat = d1.reshape(N, -1)
    nz = flat != 0
    keys = torch.rand(flat.shape, generator=generator, device=dev)
    keys = torch.where(nz, keys, torch.full_like(keys, 2.0))  # zeros sort last
    s = _balanced_signs(keys, nz.sum(dim=1, keepdim=True)).to(dt)
    free = torch.randint(0, 2, flat.shape, generator=generator, device=dev).to(dt) * 2 - 1
    return torch.where(nz, flat * s, free).view_as(d1)


def fgsm_direction(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``sign(∇x CE(f(x), y))`` per sample: the direction of an FGSM attack.

    The model is evaluated in eval mode (restored afterwards).

    Args:
        model: ``[N, *S] -> [N, C]``.
        x: ``[N, *S]``; y: ``[N]`` integer labels.
    Returns:
        ``[N, *S]`` in ``x``'s dtype, entries in ``{-1, 0, 1}``.
    """
    check_tensor("x", x, min_ndim=2, nonempty=True)
    check_labels(x, y)
    from .attacks.pgd import _input_gradient  # the attacks' own input gradient of the summed CE

    with eval_mode(model):
        return _input_gradient(model, x, y, first=True).sign().to(x.dtype)


def draw_pairs(
    model: nn.Module, x: Tensor, y: Optional[Tensor], kind: str, n: int, generator: Optional[torch.Generator]
) -> Tuple[Tensor, Tensor]:
    """``n`` direction pairs per sample of kind ``kind``: ``(d1, d2)`` each ``[n, N, *S]``.

    ``x`` is a checked ``[N, *S]`` batch (the grid functions check it at their entry); the
    random kinds are drawn without re-checking it, ``"fgsm"`` goes through :func:`fgsm_direction`.
    """
    if kind not in DIRECTION_KINDS:
        raise ValueError(f"directions: expected one of {DIRECTION_KINDS} or a pair (d1, d2), got {kind!r}")
    if kind == "fgsm":
        return fgsm_pairs(fgsm_direction(model, x, y), n, generator)  # type: ignore[arg-type]
    _check_features(x)
    rep = x.unsqueeze(0).expand(n, *x.shape).reshape(n * x.shape[0], *x.shape[1:])
    d1, d2 = _RANDOM[kind](rep, generator)
    return d1.view(n, *x.shape), d2.view(n, *x.shape)


def fgsm_pairs(d1: Tensor, n: int, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """``n`` pairs ``(d1, d2_j)``, ``d2_j`` random signs orthogonal to ``d1`` ``[N, *S]``: each ``[n, N, *S]``."""
    d2 = torch.stack([orthogonal_signs(d1, generator=generator) for _ in range(n)])
    return d1.unsqueeze(0).expand_as(d2).contiguous(), d2


def _describe(value: Any) -> str:
    """A short description of a value for an error message (never a tensor's contents)."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: (" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def given_pair(x: Tensor, pair: Any) -> Tuple[Tensor, Tensor]:
    """User directions ``(d1, d2)``, each ``[N, *S]`` or ``[*S]`` (shared), as ``[N, *S]``."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(d, Tensor) for d in pair)):
        raise ValueError(f"directions: expected one of {DIRECTION_KINDS} or a pair (d1, d2) of tensors, "
                         f"got {_describe(pair)}")
    out = []
    for name, d in zip(("d1", "d2"), pair):
        check_tensor(name, d)
        if tuple(d.shape) == tuple(x.shape[1:]):
            d = d.unsqueeze(0).expand_as(x).contiguous()
        if d.shape != x.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(x.shape)} (that of x) or {tuple(x.shape[1:])}, got {tuple(d.shape)}"
            )
        check_same_device(("x", name), (x, d))
        out.append(d.to(x.dtype))
    return out[0], out[1]


def grid_coordinates(span: float, points: int, *, dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device, None] = None) -> Tensor:
    """``points`` evenly spaced values on ``[-span, span]``; the centre is exactly 0 for odd ``points``.

    ``points = 1`` gives ``[0]``. Returns ``[points]``.
    """
    check_span_points(span, points)
    return grid_axis(span, points, dtype, device)
