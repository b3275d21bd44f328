"""Square attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020), L∞, on images in ``[0, 1]``.

Gradient-free random search on the margin ``z_y − max_{i≠y} z_i``:

- start: vertical stripes, ``x + ε·s`` with one sign ``s ∈ {±1}`` per (sample, channel,
  column), clipped to ``[0, 1]``;
- each query: a square window of side ``h = max(round(√(p·H·W)), 1)`` at a uniform position,
  one sign per (sample, channel); the window gets ``±2ε`` added and the point is projected
  back to the ε-ball and ``[0, 1]`` (so it jumps to the other face of the ball); signs are
  redrawn (up to 10 times, no query) while the window would not change (all redraws drawn
  at once, the first that changes the window taken);
- the candidate replaces the current point when its margin is lower;
- ``p`` starts at ``p_init`` and is halved at fixed fractions of ``n_queries`` (the authors'
  schedule for 10 000 queries, rescaled to ``n_queries``).

Windows and signs are drawn per sample; all samples still attacked share one batch (one
model call per query), and a sample leaves it at its first misclassified point.
Only forward passes (``torch.no_grad``) are used, so masked gradients do not stop it.

Shapes: ``x`` ``[B, C, H, W]`` in ``[0, 1]``; ``y`` ``[B]`` integer labels; the model maps
``[B, C, H, W]`` to logits ``[B, K]``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ._checks import attack_mode, check_attack_call, check_fraction, check_number, clean_logits, misclassified
from ._checks import feasible_box, randint, random_signs
from ._local_prefix import local_prefix
from .losses import _true_and_best_other, margin_loss

__all__ = ["square", "square_attack", "p_schedule"]

# (upper end of the query range out of 10 000, divisor of p_init) in the authors' schedule
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
             (8000, 256))
_RESAMPLE = 10
# below this many samples still attacked, a whole forward is cheaper than the windowed
# prefix update's gathers and scatters (the per-call overhead dominates at a few rows)
_MIN_WINDOWED_ROWS = 32


def p_schedule(i: int, n_queries: int, p_init: float) -> float:
    """The fraction ``p`` of pixels a window covers at query ``i`` (0-based) of ``n_queries``."""
    it = int(i / n_queries * 10000)
    for end, divisor in _SCHEDULE:
        if it <= end:
            return p_init / divisor
    return p_init / 512


def _corners(side: int, n: int, shape: Tuple[int, ...], generator: Optional[torch.Generator],
             like: Tensor) -> Tuple[Tensor, Tensor]:
    """The top-left corners ``(top [n], left [n])`` (int64) of one random ``side × side``
    window per sample inside an image of ``shape`` ``(C, H, W)``."""
    _, h, w = shape
    top = randint(h - side + 1, (n,), generator, like)
    left = randint(w - side + 1, (n,), generator, like)
    return top, left


def _windows(side: int, n: int, shape: Tuple[int, ...], generator: Optional[torch.Generator],
             like: Tensor) -> Tensor:
    """One random ``side × side`` window per sample: ``[n, 1, H, W]`` 0/1 in ``like``'s dtype
    (the windows :func:`_candidate` draws from the same generator state)."""
    _, h, w = shape
    top, left = _corners(side, n, shape, generator, like)
    rows = torch.arange(h, device=like.device)
    cols = torch.arange(w, device=like.device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side)  # [n, H]
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + side)  # [n, W]
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None].to(like.dtype)


def _candidate(x: Tensor, x_best: Tensor, eps: float, side: int,
               generator: Optional[torch.Generator]) -> Tensor:
    """``Π(x_best + 2ε·s·window)`` ``[n, C, H, W]`` with one sign ``s`` per (sample, channel),
    signs redrawn (up to ``_RESAMPLE`` times, no query) where the window would not change
    (:func:`_candidate_in_window` without the window's corners)."""
    return _candidate_in_window(x, x_best, eps, side, generator)[0]


def _candidate_in_window(x: Tensor, x_best: Tensor, eps: float, side: int,
                         generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(candidate [n, C, H, W], top [n], left [n])``: the candidate of :func:`_candidate` and
    the top-left corners of the windows it moved.

    Only the window's pixels can change (``x_best`` is in the ball and the box), so they are
    gathered as patches ``[n, C, side, side]``, moved and written into a copy of ``x_best``.
    The first sign draw and its ``_RESAMPLE`` redraws are drawn at once
    (``[_RESAMPLE + 1, n, C]``); each sample takes the first draw that changes its window, else
    the last one: the sequential redraw loop's result, with one draw instead of one per round."""
    n, c = x.shape[:2]
    top, left = _corners(side, n, tuple(x.shape[1:]), generator, x)
    offsets = torch.arange(side, device=x.device)
    index = (torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(c, device=x.device).view(1, c, 1, 1),
             (top[:, None] + offsets).view(n, 1, side, 1), (left[:, None] + offsets).view(n, 1, 1, side))
    best = x_best[index]  # [n, C, side, side]
    lo, hi = feasible_box(x[index], eps)
    up = (best + 2 * eps).clamp_(lo, hi)
    down = (best - 2 * eps).clamp_(lo, hi)
    moves_up = (up != best).flatten(2).any(dim=2)  # [n, C]
    moves_down = (down != best).flatten(2).any(dim=2)
    draws = random_signs((_RESAMPLE + 1, n, c), generator, x) > 0  # [R + 1, n, C]
    moves = torch.where(draws, moves_up, moves_down).any(dim=2)  # [R + 1, n]
    moves[-1] = True  # the last draw is kept when none changes the window
    pick = moves.to(torch.int8).argmax(dim=0)  # [n], the first draw that moves
    signs = draws.gather(0, pick.view(1, n, 1).expand(1, n, c))[0]  # [n, C]
    out = x_best.clone()
    out[index] = torch.where(signs[:, :, None, None], up, down)
    return out, top, left


def _single_run(model: nn.Module, x: Tensor, y: Tensor, eps: float, n_queries: int, p_init: float,
                generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor, Tensor]:
    """One Square run on ``x`` ``[n, C, H, W]`` (the start counts as one query).

    Where the model has a local prefix (:func:`~fastland.attacks._local_prefix.local_prefix`),
    each candidate's prefix features are recomputed on its window's receptive field only, and
    the current points' features are kept beside them, while at least ``_MIN_WINDOWED_ROWS``
    samples are attacked.

    Returns ``(x_out [n, C, H, W], margin_out [n], broken [n] bool)``: the first misclassified
    point of a broken sample (margin ``-inf``), else the lowest-margin point and its margin.
    """
    n, c, h, w = x.shape
    prefix = local_prefix(model) if n >= _MIN_WINDOWED_ROWS else None
    x_out = x.clone()
    margin_out = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    broken = torch.zeros(n, dtype=torch.bool, device=x.device)
    idx, xs, ys = torch.arange(n, device=x.device), x, y
    x_best = (x + eps * random_signs((n, c, 1, w), generator, x)).clamp(0.0, 1.0)
    if prefix is None:
        feat_best, logits = None, model(x_best)
    else:
        feat_best = prefix.features(x_best)
        logits = prefix.rest(feat_best)
    best = margin_loss(logits, y)  # checks the logits once; the loop uses the unchecked parts
    hit = misclassified(logits, ys)  # [n]: misclassified at x_best
    for i in range(n_queries):
        if bool(hit.any()):
            x_out[idx[hit]], broken[idx[hit]] = x_best[hit], True
            margin_out[idx[hit]] = float("-inf")
            keep = ~hit
            idx, xs, ys, x_best, best = idx[keep], xs[keep], ys[keep], x_best[keep], best[keep]
            feat_best = feat_best[keep] if feat_best is not None else None
            if idx.numel() == 0:
                break
            if idx.numel() < _MIN_WINDOWED_ROWS:
                prefix, feat_best = None, None
        if i == n_queries - 1:
            break
        side = min(max(int(round(math.sqrt(p_schedule(i, n_queries, p_init) * h * w))), 1), h, w)
        x_new, top, left = _candidate_in_window(xs, x_best, eps, side, generator)
        if prefix is None:
            new_logits = model(x_new)
        else:
            feat_new = prefix.update(feat_best, x_new, top, left, side)
            new_logits = prefix.rest(feat_new)
        z_y, z_other = _true_and_best_other(new_logits, ys)
        margin = z_y - z_other
        # a misclassified candidate is always taken, so x_best is misclassified exactly where hit
        hit = misclassified(new_logits, ys)
        take = (margin < best) | hit
        x_best = torch.where(take.view(-1, 1, 1, 1), x_new, x_best)
        if prefix is not None:
            feat_best = torch.where(take.view(-1, 1, 1, 1), feat_new, feat_best)
        best = torch.where(take, margin, best)
    x_out[idx], margin_out[idx] = x_best, best
    return x_out, margin_out, broken


def _check_square(x: Tensor, n_queries: int, p_init: float) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: expected 4 dimensions [B, C, H, W] for the Square attack, got shape {tuple(x.shape)}")
    check_number("n_queries", n_queries, integer=True, minimum=1)
    check_fraction("p_init", p_init, low_open=True)


def square_attack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *, n_queries: int = 5000, p_init: float = 0.8,
    restarts: int = 1, generator: Optional[torch.Generator] = None, mode: str = "eval",
) -> Tuple[Tensor, Tensor]:
    """:func:`square` that also returns ``broken`` ``[B]`` bool (misclassified at ``x_adv``,
    clean-misclassified samples included). Same arguments."""
    check_attack_call(model, x, y, eps, mode, restarts=restarts, generator=generator)
    _check_square(x, n_queries, p_init)
    x = x.detach()
    with attack_mode(model, mode), torch.no_grad():
        broken = misclassified(clean_logits(model, x, y), y)
        x_adv = x.clone()
        best = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
        for _ in range(restarts):
            todo = (~broken).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            x_run, margin, hit = _single_run(model, x[todo], y[todo], eps, n_queries, p_init, generator)
            take = hit | (margin < best[todo])
            x_adv[todo[take]] = x_run[take]
            best[todo] = torch.minimum(best[todo], margin)
            broken[todo[hit]] = True
    return x_adv, broken


def square(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *, n_queries: int = 5000, p_init: float = 0.8,
    restarts: int = 1, generator: Optional[torch.Generator] = None, mode: str = "eval",
) -> Tensor:
    """Square attack (Andriushchenko et al., ECCV 2020), L∞, gradient-free.

    Args:
        model: maps ``[B, C, H, W]`` to logits ``[B, K]``, ``K ≥ 2``.
        x: ``[B, C, H, W]`` clean images in ``[0, 1]``.
        y: ``[B]`` integer labels in ``[0, K)``.
        eps: L∞ radius ``≥ 0`` in pixel units.
        n_queries: model queries per sample and restart ``≥ 1`` (default 5000; the start is one).
        p_init: the first windows' share of the image's pixels, in ``(0, 1]`` (default 0.8).
        restarts: runs ``≥ 1`` (default 1), each on the samples not yet broken.
        generator: ``torch.Generator`` (any device) for the random search, or None (global RNG).
        mode: ``"eval"`` (default) or ``"keep"`` (the model must already be in eval mode).
    Returns:
        ``x_adv`` ``[B, C, H, W]``, detached, in the ε-ball and ``[0, 1]``: the first misclassified
        point for a broken sample, ``x`` for one misclassified already, else the lowest-margin point.

    Example:
        >>> x_adv = fastland.attacks.square(model, x, y, 8 / 255, n_queries=5000)
    """
    return square_attack(model, x, y, eps, n_queries=n_queries, p_init=p_init, restarts=restarts,
                         generator=generator, mode=mode)[0]
