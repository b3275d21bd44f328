"""APGD and APGD-T (Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020), L∞, on inputs in ``[0, 1]``.

APGD is PGD without a step-size parameter: the step starts at ``η = 2ε`` and is halved
at checkpoints ``w_j = ⌈p_j·N⌉`` (``p_0 = 0``, ``p_1 = 0.22``,
``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``) for every sample whose progress
stalled since the previous checkpoint:

1. the loss rose in fewer than ``ρ·(w_j − w_{j−1})`` of the steps since then, or
2. the step was not halved at the previous checkpoint and the best loss did not improve.

A halved sample restarts from its best point. Steps carry momentum ``α = 0.75``:
``z = Π(xᵏ + η·sign ∇f(xᵏ))``, ``xᵏ⁺¹ = Π(xᵏ + α(z − xᵏ) + (1 − α)(xᵏ − xᵏ⁻¹))``
(the first step is plain). The start is ``x + ε·t/‖t‖∞``, ``t ~ U(−1, 1)``, clipped to ``[0, 1]``.

All samples run in one batch; a sample leaves the batch at the first iterate where it is
misclassified (that iterate is its result), so later steps cost only the survivors.
Gradients are taken with respect to the input only (``torch.autograd.grad``).

Shapes: ``x`` ``[B, *S]`` in ``[0, 1]``; ``y`` ``[B]`` integer labels; the model maps
``[B, *S]`` to logits ``[B, C]``.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._checks import (
    attack_mode,
    check_evaluation_inputs,
    check_fraction,
    check_generator,
    check_number,
    clean_logits,
    misclassified,
    project,
    rand,
)
from .losses import LOSSES, targeted_dlr_loss

__all__ = ["apgd", "apgd_targeted", "checkpoints"]

LossFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]
_MOMENTUM = 0.75


def checkpoints(steps: int) -> List[int]:
    """The iteration counts ``w_1 < w_2 < … ≤ steps`` after which the step size is checked
    (integer rounding of ``p_j·steps`` as in the authors' code: segment lengths
    ``⌊0.22·N⌋``, then shrinking by ``⌊0.03·N⌋`` down to ``⌊0.06·N⌋``, each at least 1)."""
    length = max(int(0.22 * steps), 1)
    shrink, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, w = [], length
    while w <= steps:
        out.append(w)
        length = max(length - shrink, shortest)
        w += length
    return out


def _loss_and_grad(
    model: nn.Module, x: Tensor, y: Tensor, target: Optional[Tensor], loss_fn: LossFn
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logits [n, C], loss [n], ∇x Σ loss [n, *S])`` from one forward and one input-only backward."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = loss_fn(logits, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return logits.detach(), loss.detach(), grad


def _start(x: Tensor, eps: float, generator: Optional[torch.Generator]) -> Tensor:
    """``clip(x + ε·t/‖t‖∞, 0, 1)`` with ``t ~ U(−1, 1)`` per entry: ``[n, *S]``."""
    t = 2 * rand(tuple(x.shape), generator, x) - 1
    scale = t.flatten(1).abs().amax(dim=1).clamp_min(1e-12)
    return (x + eps * t / scale.view(-1, *[1] * (x.dim() - 1))).clamp(0.0, 1.0)


class _Batch:
    """The running state of the samples still attacked; ``keep`` drops rows from all of it."""

    def __init__(self, **tensors: Tensor) -> None:
        self.__dict__.update(tensors)

    def keep(self, rows: Tensor) -> None:
        for name, value in list(self.__dict__.items()):
            self.__dict__[name] = value[rows]


def _step(s: _Batch, eps: float, x: Tensor, momentum: float) -> Tensor:
    """One momentum step of APGD from ``s.x_cur`` ``[n, *S]``."""
    eta = s.eta.view(-1, *[1] * (x.dim() - 1))
    z = project(s.x_cur + eta * s.grad.sign(), x, eps)
    return project(s.x_cur + momentum * (z - s.x_cur) + (1 - momentum) * (s.x_cur - s.x_prev), x, eps)


def _check_progress(s: _Batch, segment: int, rho: float) -> None:
    """At a checkpoint: halve ``η`` and return to the best point where progress stalled."""
    stalled = s.n_rises < rho * segment
    stalled |= ~s.halved_last & (s.loss_best <= s.loss_best_last)
    shape = (-1,) + (1,) * (s.x_cur.dim() - 1)
    s.eta = torch.where(stalled, s.eta / 2, s.eta)
    s.x_cur = torch.where(stalled.view(shape), s.x_best, s.x_cur)
    s.grad = torch.where(stalled.view(shape), s.grad_best, s.grad)
    s.loss_prev = torch.where(stalled, s.loss_best, s.loss_prev)
    s.halved_last, s.loss_best_last = stalled, s.loss_best.clone()
    s.n_rises = torch.zeros_like(s.n_rises)


def _single_run(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, loss_fn: LossFn, target: Optional[Tensor],
    steps: int, rho: float, generator: Optional[torch.Generator],
) -> Tuple[Tensor, Tensor, Tensor]:
    """One APGD run on ``x`` ``[n, *S]``.

    Returns ``(x_out [n, *S], loss_out [n], broken [n] bool)``: for a broken sample the first
    misclassified iterate (``loss_out = -inf``), for the others the best-loss point and its loss.
    """
    n = x.shape[0]
    x_out, loss_out = x.clone(), torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
    broken = torch.zeros(n, dtype=torch.bool, device=x.device)
    x_cur = _start(x, eps, generator)
    logits, loss, grad = _loss_and_grad(model, x_cur, y, target, loss_fn)
    s = _Batch(
        idx=torch.arange(n, device=x.device), x=x, y=y, x_cur=x_cur, x_prev=x_cur, grad=grad,
        loss_prev=loss, x_best=x_cur, loss_best=loss, grad_best=grad,
        eta=torch.full((n,), 2.0 * eps, dtype=x.dtype, device=x.device),
        n_rises=torch.zeros(n, dtype=torch.int64, device=x.device),
        halved_last=torch.ones(n, dtype=torch.bool, device=x.device), loss_best_last=loss.clone(),
    )
    if target is not None:
        s.target = target
    marks, last_mark = checkpoints(steps), 0
    for i in range(steps + 1):
        hit = misclassified(logits, s.y)
        if bool(hit.any()):
            x_out[s.idx[hit]], broken[s.idx[hit]] = s.x_cur[hit], True
            s.keep(~hit)
            if s.idx.numel() == 0:
                return x_out, loss_out, broken
        if i == steps:
            break
        if i in marks:
            _check_progress(s, i - last_mark, rho)
            last_mark = i
        with torch.no_grad():
            x_new = _step(s, eps, s.x, _MOMENTUM if i > 0 else 1.0)
        logits, loss, grad = _loss_and_grad(model, x_new, s.y, getattr(s, "target", None), loss_fn)
        better = loss > s.loss_best
        shape = (-1,) + (1,) * (x.dim() - 1)
        s.n_rises = s.n_rises + (loss > s.loss_prev)
        s.x_prev, s.x_cur, s.grad, s.loss_prev = s.x_cur, x_new, grad, loss
        s.x_best = torch.where(better.view(shape), x_new, s.x_best)
        s.grad_best = torch.where(better.view(shape), grad, s.grad_best)
        s.loss_best = torch.where(better, loss, s.loss_best)
    x_out[s.idx], loss_out[s.idx] = s.x_best, s.loss_best
    return x_out, loss_out, broken


def _run_plan(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, plan: Iterable[Tuple[LossFn, Optional[Tensor]]],
    *, steps: int, restarts: int, rho: float, generator: Optional[torch.Generator], broken: Tensor,
) -> Tuple[Tensor, Tensor]:
    """Run each ``(loss, targets [B] or None)`` of ``plan`` ``restarts`` times, each run only on
    the samples not yet broken. ``broken`` ``[B]`` bool marks those broken already (kept at ``x``).

    Returns ``(x_adv [B, *S], broken [B] bool)``; unbroken samples get their best-loss point.
    """
    x_adv = x.clone()
    best = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)
    broken = broken.clone()
    for loss_fn, targets in plan:
        for _ in range(restarts):
            todo = (~broken).nonzero().squeeze(1)
            if todo.numel() == 0:
                return x_adv, broken
            t = targets[todo] if targets is not None else None
            x_run, loss_run, hit = _single_run(model, x[todo], y[todo], eps, loss_fn, t, steps, rho, generator)
            take = hit | (loss_run > best[todo])
            x_adv[todo[take]] = x_run[take]
            best[todo] = torch.maximum(best[todo], loss_run)
            broken[todo[hit]] = True
    return x_adv, broken


def _untargeted(name: str) -> LossFn:
    fn = LOSSES[name]
    return lambda logits, y, target: fn(logits, y)


def _targeted(logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
    assert target is not None
    return targeted_dlr_loss(logits, y, target)


def _check_common(model, x, y, eps, steps, restarts, rho, generator, mode) -> None:
    check_evaluation_inputs(model, x, y, eps, mode)
    check_number("steps", steps, integer=True, minimum=1)
    check_number("restarts", restarts, integer=True, minimum=1)
    check_fraction("rho", rho)
    check_generator(generator)


def apgd_attack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *, loss: str = "ce", steps: int = 100,
    restarts: int = 1, rho: float = 0.75, generator: Optional[torch.Generator] = None, mode: str = "eval",
) -> Tuple[Tensor, Tensor]:
    """:func:`apgd` that also returns ``broken`` ``[B]`` bool (misclassified at ``x_adv``,
    clean-misclassified samples included). Same arguments."""
    _check_common(model, x, y, eps, steps, restarts, rho, generator, mode)
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    x = x.detach()
    with attack_mode(model, mode):
        logits = clean_logits(model, x, y)
        if loss == "dlr" and logits.shape[1] < 3:
            raise ValueError(f"loss: 'dlr' needs at least 3 classes, got logits of shape {tuple(logits.shape)}")
        plan = [(_untargeted(loss), None)]
        return _run_plan(model, x, y, eps, plan, steps=steps, restarts=restarts, rho=rho,
                         generator=generator, broken=misclassified(logits, y))


def apgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *, loss: str = "ce", steps: int = 100,
    restarts: int = 1, rho: float = 0.75, generator: Optional[torch.Generator] = None, mode: str = "eval",
) -> Tensor:
    """Auto-PGD (Croce & Hein, ICML 2020), L∞: PGD with momentum and an adaptive step size.

    Args:
        model: maps ``[B, *S]`` to logits ``[B, C]``.
        x: ``[B, *S]`` clean inputs in ``[0, 1]``.
        y: ``[B]`` integer labels in ``[0, C)``.
        eps: L∞ radius ``≥ 0`` in pixel units (e.g. 8/255).
        loss: ``"ce"`` (cross-entropy, default) or ``"dlr"`` (difference of logits ratio, ``C ≥ 3``).
        steps: gradient steps per run ``≥ 1`` (default 100; one more forward/backward at the start).
        restarts: random restarts ``≥ 1`` (default 1), each on the samples not yet broken.
        rho: the checkpoints' threshold on the fraction of loss-increasing steps, in ``[0, 1]``
            (default 0.75).
        generator: ``torch.Generator`` (any device) for the random starts, or None (global RNG).
        mode: ``"eval"`` (default; the model is put in eval mode and restored after) or
            ``"keep"`` (the model must already be in eval mode).
    Returns:
        ``x_adv`` ``[B, *S]``, detached, ``x``'s dtype and device, ``|x_adv − x| ≤ eps``, in ``[0, 1]``:
        the first misclassified iterate for a broken sample, ``x`` itself for a sample misclassified
        already, the best-loss point over all runs for the others.

    Example:
        >>> x_adv = fastland.attacks.apgd(model, x, y, 8 / 255, loss="ce", steps=100)
        >>> robust_accuracy = (model(x_adv).argmax(1) == y).float().mean()
    """
    return apgd_attack(model, x, y, eps, loss=loss, steps=steps, restarts=restarts, rho=rho,
                       generator=generator, mode=mode)[0]


def apgd_targeted_attack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *, n_target_classes: int = 9, steps: int = 100,
    restarts: int = 1, rho: float = 0.75, generator: Optional[torch.Generator] = None, mode: str = "eval",
) -> Tuple[Tensor, Tensor]:
    """:func:`apgd_targeted` that also returns ``broken`` ``[B]`` bool. Same arguments."""
    _check_common(model, x, y, eps, steps, restarts, rho, generator, mode)
    check_number("n_target_classes", n_target_classes, integer=True, minimum=1)
    x = x.detach()
    with attack_mode(model, mode):
        logits = clean_logits(model, x, y)
        n_classes = logits.shape[1]
        if n_classes < 4:
            raise ValueError(
                f"model: APGD-T's targeted DLR needs at least 4 classes, got logits of shape {tuple(logits.shape)}"
            )
        others = logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
        k = min(n_target_classes, n_classes - 1)
        plan = [(_targeted, others[:, r]) for r in range(k)]
        return _run_plan(model, x, y, eps, plan, steps=steps, restarts=restarts, rho=rho,
                         generator=generator, broken=misclassified(logits, y))


def apgd_targeted(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *, n_target_classes: int = 9, steps: int = 100,
    restarts: int = 1, rho: float = 0.75, generator: Optional[torch.Generator] = None, mode: str = "eval",
) -> Tensor:
    """APGD-T (Croce & Hein, ICML 2020), L∞: APGD on the targeted DLR loss, one run per target.

    The targets of a sample are the ``n_target_classes`` other classes with the largest clean
    logits, tried in decreasing order; each run (and each restart) attacks only the samples no
    earlier run broke.

    Args:
        model: maps ``[B, *S]`` to logits ``[B, C]``, ``C ≥ 4``.
        x: ``[B, *S]`` clean inputs in ``[0, 1]``.
        y: ``[B]`` integer labels in ``[0, C)``.
        eps: L∞ radius ``≥ 0`` in pixel units.
        n_target_classes: target classes per sample ``≥ 1`` (default 9; at most ``C − 1`` are used).
        steps: gradient steps per run ``≥ 1`` (default 100).
        restarts: random restarts per target ``≥ 1`` (default 1).
        rho: checkpoint threshold in ``[0, 1]`` (default 0.75).
        generator: ``torch.Generator`` for the random starts, or None.
        mode: ``"eval"`` (default) or ``"keep"`` (model already in eval mode).
    Returns:
        ``x_adv`` ``[B, *S]`` in the ε-ball and ``[0, 1]``: the first misclassified iterate for a
        broken sample, ``x`` for one misclassified already, else the point of the highest targeted
        DLR over all runs.

    Example:
        >>> x_adv = fastland.attacks.apgd_targeted(model, x, y, 8 / 255, n_target_classes=9)
    """
    return apgd_targeted_attack(model, x, y, eps, n_target_classes=n_target_classes, steps=steps,
                                restarts=restarts, rho=rho, generator=generator, mode=mode)[0]
