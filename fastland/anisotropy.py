"""Flatness along attack directions: how steeply log p changes along the line an attack takes.

The AMS-score flatness Φ (:func:`fastland.flatness`) hardly depends on the plane
it is measured on: ``‖∇x log p‖`` at a point is the same whichever plane passes
through it. What the paper's Fig. 5 shows is the *height change* of ``log p``
along the attack direction. Per sample, with ``a`` over
``grid_coordinates(span, points)``::

    steepness(x, d) = mean_a |log p(x + a·d) − log p(x)|
    value(x)        = −steepness(x, d)          (higher = flatter, like Φ)

with ``d`` one of:

* ``"fgsm"``: ``sign(∇x CE(f(x), y))``;
* ``"pgd"``: ``sign(x_pgd − x)`` of a PGD attack (L∞, ``eps``, ``alpha``,
  ``steps``; random start). The *sign* of the displacement, not the displacement
  itself: entries are in ``{−1, 0, 1}`` like the FGSM direction, so ``a`` is an
  L∞ step in pixel units for every kind (``a = eps`` moves each changed pixel as
  far as the attack could). For ``steps=1``, no random start and ``alpha >= eps``
  it is the FGSM direction, up to pixels that the projection to ``[0, 1]`` kept;
* ``"random"``: Rademacher signs (the attack-free baseline);
* a tensor ``d`` ``[N, *S]`` (or ``[*S]``, shared), used as given.

The same steepness along ``n_random`` Rademacher directions per sample is the
comparison: ``anisotropy = mean_i steepness_attack / mean_i steepness_random``
(``> 1``: the attack direction is steeper than a random one). Line points are
not clipped to ``[0, 1]`` (as in :func:`fastland.landscape`).

Shapes: ``N`` samples, ``S`` the per-sample shape, ``R = n_random``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import check_images, check_model, check_model_dtype, check_same_device, check_tensor
from ._grid import eval_mode, plan
from .choices import ATTACK_DIRECTIONS
from .landscapes import landscape_values
from .neighbourhood import check_labels, check_span_points, fgsm_direction, grid_coordinates

__all__ = ["ATTACK_DIRECTIONS", "ATTACK_SPAN", "ATTACK_POINTS", "ATTACK_RANDOM", "AttackFlatness",
           "attack_flatness", "line_steepness"]

ATTACK_SPAN = 16 / 255
ATTACK_POINTS = 9
ATTACK_RANDOM = 4

Direction = Union[str, Tensor]


def _summary(values: Tensor) -> Tuple[float, float]:
    """``(mean, std/sqrt(N))`` of ``values`` ``[N]`` in float64 (stderr NaN for ``N = 1``)."""
    v = values.detach().double()
    n = v.shape[0]
    return float(v.mean()), (float(v.std() / math.sqrt(n)) if n > 1 else float("nan"))


@dataclass
class AttackFlatness:
    """Flatness of ``log p`` along an attack direction; higher (closer to 0) is flatter.

    Attributes:
        values: ``[N]`` per sample ``−mean_a |log p(x + a·d) − log p(x)|`` along the attack direction.
        mean, stderr: mean of ``values`` and its standard error (NaN for ``N = 1``).
        random: ``[N]`` the same along random signed directions (mean over ``n_random``
            of them per sample), or None for ``n_random = 0``.
        random_mean, random_stderr: mean and standard error of ``random`` (NaN when None).
        anisotropy: ``mean(−values) / mean(−random)``; ``> 1`` means the attack direction
            is steeper than random ones (NaN when ``n_random = 0`` or the random lines are flat).
        direction: ``[N, *S]`` the attack direction ``d``.
        random_directions: ``[R, N, *S]`` when asked for (``keep_random=True``), else None.
        meta: the settings (``directions``, ``span``, ``points``, ``n_random``, PGD's when used).
    """

    values: Tensor
    mean: float
    stderr: float
    random: Optional[Tensor]
    random_mean: float
    random_stderr: float
    anisotropy: float
    direction: Tensor
    random_directions: Optional[Tensor] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.values.shape[0]


def line_steepness(model: nn.Module, x: Tensor, d: Tensor, grid: Tensor, *, batch_size: Union[int, str] = "auto",
                   fuse_first_layer: Union[bool, str] = "auto") -> Tensor:
    """The kernel: ``mean_a |log p(x_m + a·d_m) − log p(x_m)|`` per row; no checks, model in eval mode.

    All ``M·G`` line points go through the model in chunks under inference mode
    (with the first-layer fusion of :mod:`fastland._grid` when the model allows it).

    Args:
        x, d: ``[M, *S]`` (x's dtype and device); grid: ``[G]`` steps ``a``.
    Returns:
        ``[M]`` in x's dtype, ``>= 0``.

    Example::

        s = line_steepness(model, x, torch.ones_like(x), grid_coordinates(0.1, 5))
    """
    p = plan(model, x, batch_size=batch_size, fuse_first_layer=fuse_first_layer, backward=False)
    zero = torch.zeros(1, dtype=x.dtype, device=x.device)
    res = landscape_values(model, x, d, torch.zeros_like(d), grid, zero, p)  # values [M, 1, G]
    return res.values[:, 0, :].abs().mean(dim=1)


def _rademacher(shape: Tuple[int, ...], x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1


def _pgd_direction(model: nn.Module, x: Tensor, y: Tensor, pgd_args: Dict[str, Any],
                   generator: Optional[torch.Generator]) -> Tensor:
    from .attacks import pgd

    x_adv = pgd(model, x, y, pgd_args["eps"], alpha=pgd_args["alpha"], steps=pgd_args["steps"],
                random_start=pgd_args["random_start"], generator=generator)
    return (x_adv - x).sign()


def _given_direction(x: Tensor, d: Tensor) -> Tensor:
    check_tensor("directions", d, finite=True)
    if tuple(d.shape) == tuple(x.shape[1:]):
        d = d.unsqueeze(0).expand_as(x)
    if d.shape != x.shape:
        raise ValueError(f"directions: expected a tensor of shape {tuple(x.shape)} (that of x) or "
                         f"{tuple(x.shape[1:])}, got {tuple(d.shape)}")
    check_same_device(("x", "directions"), (x, d))
    return d.to(x.dtype).contiguous()


def _check_positive(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a finite number > 0 (pixel units), got {v!r}")


def _check_args(directions: Direction, n_random: int, y: Optional[Tensor], x: Tensor,
                pgd_eps: Optional[float], pgd_alpha: Optional[float], pgd_steps: int) -> None:
    if isinstance(directions, str):
        if directions not in ATTACK_DIRECTIONS:
            raise ValueError(f"directions: expected one of {ATTACK_DIRECTIONS} or a tensor [N, *S], "
                             f"got {directions!r}")
        if directions in ("fgsm", "pgd"):
            if y is None:
                raise ValueError(f"y: directions={directions!r} needs labels; pass y=[N] integer labels "
                                 "(or directions='random' / a tensor)")
            check_labels(x, y)
    elif not isinstance(directions, Tensor):
        raise TypeError(f"directions: expected one of {ATTACK_DIRECTIONS} or a tensor [N, *S], "
                        f"got {type(directions).__name__}")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random: expected an integer >= 0, got {n_random!r}")
    for name, v in (("pgd_eps", pgd_eps), ("pgd_alpha", pgd_alpha)):
        if v is not None:
            _check_positive(name, v)
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ValueError(f"pgd_steps: expected an integer >= 1, got {pgd_steps!r}")


def attack_flatness(
    model: nn.Module,
    x: Tensor,
    y: Optional[Tensor] = None,
    *,
    directions: Direction = "fgsm",
    span: float = ATTACK_SPAN,
    points: int = ATTACK_POINTS,
    n_random: int = ATTACK_RANDOM,
    pgd_eps: Optional[float] = None,
    pgd_alpha: Optional[float] = None,
    pgd_steps: int = 10,
    pgd_random_start: bool = True,
    keep_random: bool = False,
    batch_size: Union[int, str] = "auto",
    fuse_first_layer: Union[bool, str] = "auto",
    generator: Optional[torch.Generator] = None,
) -> AttackFlatness:
    """Flatness of ``log p`` along the attack direction, against random signed directions.

    Per sample: ``−mean_a |log p(x + a·d) − log p(x)|`` over ``a`` in
    ``grid_coordinates(span, points)`` (see the module docstring for ``d``).
    The model is evaluated in eval mode (its modes are restored); the line points
    go through it under inference mode, in chunks of ``batch_size`` points.

    Args:
        model: ``[B, *S] -> [B, C]`` logits.
        x: ``[N, *S]`` in ``[0, 1]``.
        y: ``[N]`` integer labels; required for ``"fgsm"`` and ``"pgd"``.
        directions: ``"fgsm"``, ``"pgd"``, ``"random"`` or a tensor ``[N, *S]`` / ``[*S]``.
        span, points: the line's steps ``a``, ``points >= 2`` evenly spaced in ``[−span, span]``.
        n_random: random signed directions per sample for the comparison (0: none).
        pgd_eps, pgd_alpha, pgd_steps, pgd_random_start: the PGD attack of
            ``"pgd"`` (defaults: ``eps = span``, ``alpha = 2.5·eps/steps``, 10 steps, random start).
        keep_random: also return the random directions ``[R, N, *S]``.
        batch_size: line points per model call, or ``"auto"``.
        fuse_first_layer: as in :func:`fastland.landscape`.
        generator: on ``x``'s device: PGD's random start, then the random directions.
    Returns:
        :class:`AttackFlatness` (``values [N]``, ``random [N]``, ``anisotropy``, ...).

    Example::

        af = fastland.attack_flatness(model, x, y, generator=torch.Generator().manual_seed(0))
        print(af.mean, af.random_mean, af.anisotropy)  # anisotropy > 1: attacks find steep lines
    """
    check_model(model)
    check_span_points(span, points)
    if points < 2:
        raise ValueError(f"points: expected an integer >= 2 (a line of one point, a = 0, has no height change), "
                         f"got {points!r}")
    check_images("x", x)
    check_model_dtype(model, x)
    _check_args(directions, n_random, y, x, pgd_eps, pgd_alpha, pgd_steps)
    eps = float(span if pgd_eps is None else pgd_eps)
    pgd_args = {"eps": eps, "alpha": float(2.5 * eps / pgd_steps if pgd_alpha is None else pgd_alpha),
                "steps": pgd_steps, "random_start": bool(pgd_random_start)}
    N = x.shape[0]
    grid = grid_coordinates(span, points, dtype=x.dtype, device=x.device)
    with eval_mode(model):
        if isinstance(directions, Tensor):
            d = _given_direction(x, directions)
        elif directions == "fgsm":
            d = fgsm_direction(model, x, y)  # type: ignore[arg-type]
        elif directions == "pgd":
            d = _pgd_direction(model, x.detach(), y, pgd_args, generator)  # type: ignore[arg-type]
        else:
            d = _rademacher(tuple(x.shape), x, generator)
        rand = _rademacher((n_random, *x.shape), x, generator) if n_random else x.new_empty((0, *x.shape))
        lines = torch.cat([d.unsqueeze(0), rand]).flatten(0, 1)  # [(1+R)·N, *S]
        base = x.detach().unsqueeze(0).expand(1 + n_random, *x.shape).flatten(0, 1)
        steep = line_steepness(model, base, lines, grid, batch_size=batch_size,
                               fuse_first_layer=fuse_first_layer).view(1 + n_random, N)
    values = -steep[0]
    random = -steep[1:].mean(dim=0) if n_random else None
    mean, stderr = _summary(values)
    r_mean, r_stderr = _summary(random) if random is not None else (float("nan"), float("nan"))
    anisotropy = mean / r_mean if random is not None and r_mean != 0 else float("nan")
    kind = directions if isinstance(directions, str) else "given"
    meta: Dict[str, Any] = {"directions": kind, "span": float(span), "points": points, "n_random": n_random}
    if kind == "pgd":
        meta.update({f"pgd_{k}": v for k, v in pgd_args.items()})
    return AttackFlatness(values, mean, stderr, random, r_mean, r_stderr, anisotropy, d,
                          rand if keep_random and n_random else None, meta)
