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
misclassified (that iterate is its result), so later steps cost only the survivors. APGD-T
runs the targets of all samples as one batch of (target, sample) rows, each row its own run;
a sample's remaining rows leave the batch once one of its rows misclassifies it.
Gradients are taken with respect to the input only (``torch.autograd.grad``).

Shapes: ``x`` ``[B, *S]`` in ``[0, 1]``; ``y`` ``[B]`` integer labels; the model maps
``[B, *S]`` to logits ``[B, C]``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._checks import attack_mode, check_attack_call, check_fraction, check_number, clean_logits, misclassified
from ._checks import feasible_box, rand
from ._fast_forward import Forward, forward_of
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
    forward: Forward, x: Tensor, y: Tensor, target: Optional[Tensor], loss_fn: LossFn
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logits [n, C], loss [n], ∇x Σ loss [n, *S])`` from one forward and one input-only backward."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(x)
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


def _step(s: _Batch, momentum: float) -> Tensor:
    """One momentum step of APGD from ``s.x_cur`` ``[n, *S]``, projected to ``[s.lo, s.hi]``
    (the ε-ball and ``[0, 1]``)."""
    eta = s.eta.view(-1, *[1] * (s.x_cur.dim() - 1))
    z = (s.x_cur + eta * s.grad.sign()).clamp_(s.lo, s.hi)
    return (s.x_cur + momentum * (z - s.x_cur) + (1 - momentum) * (s.x_cur - s.x_prev)).clamp_(s.lo, s.hi)


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


def _first_per_owner(owner: Tensor, n_owners: int) -> Tensor:
    """Positions ``[u]`` into ``owner`` ``[m]`` (int64 in ``[0, n_owners)``) of each distinct
    owner's first occurrence, in increasing owner order."""
    m = owner.numel()
    pos = torch.arange(m, device=owner.device)
    first = torch.full((n_owners,), m, dtype=torch.int64, device=owner.device)
    first = first.scatter_reduce(0, owner, pos, reduce="amin")
    return first[first < m]


def _record_breaks(s: _Batch, hit: Tensor, x_out: Tensor, broken: Tensor) -> None:
    """Mark the owners of the misclassified rows ``hit`` ``[n]`` broken; each gets the iterate of
    its first such row (rows are target-major, so the lowest target index wins a tie)."""
    rows = hit.nonzero().squeeze(1)
    owner = s.owner[rows]
    first = _first_per_owner(owner, broken.numel())
    x_out[owner[first]] = s.x_cur[rows[first]]
    broken[owner] = True


def _record_best(s: _Batch, x_out: Tensor, loss_out: Tensor) -> None:
    """Give every owner with rows left its highest-loss point over its rows (the first row, the
    lowest target, among equal losses)."""
    n_owners = loss_out.numel()
    top = torch.full((n_owners,), float("-inf"), dtype=s.loss_best.dtype, device=s.loss_best.device)
    top = top.scatter_reduce(0, s.owner, s.loss_best, reduce="amax")
    rows = (s.loss_best == top[s.owner]).nonzero().squeeze(1)
    owner = s.owner[rows]
    first = _first_per_owner(owner, n_owners)
    x_out[owner[first]], loss_out[owner[first]] = s.x_best[rows[first]], s.loss_best[rows[first]]


def _batched_run(
    forward: Forward, x: Tensor, y: Tensor, target: Optional[Tensor], owner: Tensor, n_owners: int,
    x_start: Tensor, eps: float, loss_fn: LossFn, steps: int, rho: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One APGD run per row, all rows in one batch; the rows of a sample (one per target) stop
    together as soon as one of them misclassifies it.

    Args:
        forward: the model's logits (:func:`~fastland.attacks._fast_forward.forward_of`).
        x, y: ``[R, *S]`` and ``[R]``, each row's clean input and label.
        target: ``[R]`` each row's target class, or None (untargeted).
        owner: ``[R]`` int64, each row's sample in ``[0, n_owners)``; rows are target-major
            (a sample's rows in increasing target order), every sample has at least one.
        x_start: ``[R, *S]`` each row's random start.
    Returns:
        ``(x_out [n_owners, *S], loss_out [n_owners], broken [n_owners] bool)``: for a broken
        sample the first misclassified iterate (``loss_out = -inf``), for the others the point
        of the highest loss over its rows and that loss.
    """
    x_out = x.new_empty((n_owners,) + tuple(x.shape[1:]))
    x_out[owner] = x
    loss_out = torch.full((n_owners,), float("-inf"), dtype=x.dtype, device=x.device)
    broken = torch.zeros(n_owners, dtype=torch.bool, device=x.device)
    logits, loss, grad = _loss_and_grad(forward, x_start, y, target, loss_fn)
    r = x.shape[0]
    s = _Batch(
        owner=owner, y=y, x_cur=x_start, x_prev=x_start, grad=grad,
        loss_prev=loss, x_best=x_start, loss_best=loss, grad_best=grad,
        eta=torch.full((r,), 2.0 * eps, dtype=x.dtype, device=x.device),
        n_rises=torch.zeros(r, dtype=torch.int64, device=x.device),
        halved_last=torch.ones(r, dtype=torch.bool, device=x.device), loss_best_last=loss.clone(),
    )
    s.lo, s.hi = feasible_box(x, eps)
    if target is not None:
        s.target = target
    marks, last_mark = checkpoints(steps), 0
    shape = (-1,) + (1,) * (x.dim() - 1)
    for i in range(steps + 1):
        hit = misclassified(logits, s.y)
        if bool(hit.any()):
            _record_breaks(s, hit, x_out, broken)
            s.keep(~broken[s.owner])
            if s.owner.numel() == 0:
                return x_out, loss_out, broken
        if i == steps:
            break
        if i in marks:
            _check_progress(s, i - last_mark, rho)
            last_mark = i
        with torch.no_grad():
            x_new = _step(s, _MOMENTUM if i > 0 else 1.0)
        logits, loss, grad = _loss_and_grad(forward, x_new, s.y, getattr(s, "target", None), loss_fn)
        better = loss > s.loss_best
        s.n_rises = s.n_rises + (loss > s.loss_prev)
        s.x_prev, s.x_cur, s.grad, s.loss_prev = s.x_cur, x_new, grad, loss
        s.x_best = torch.where(better.view(shape), x_new, s.x_best)
        s.grad_best = torch.where(better.view(shape), grad, s.grad_best)
        s.loss_best = torch.where(better, loss, s.loss_best)
    _record_best(s, x_out, loss_out)
    return x_out, loss_out, broken


def _run_restarts(
    forward: Forward, x: Tensor, y: Tensor, eps: float, loss_fn: LossFn, targets: Optional[Tensor], *,
    steps: int, restarts: int, rho: float, generator: Optional[torch.Generator], broken: Tensor,
    max_rows: int,
) -> Tuple[Tensor, Tensor]:
    """``restarts`` rounds of one APGD run per (sample, target), each round on the samples not
    yet broken. ``targets`` ``[B, K]`` (or None: one untargeted run per sample); ``broken``
    ``[B]`` bool marks those broken already (kept at ``x``).

    A round draws the starts of all its rows at once (``[K·n, *S]``, target-major), then runs
    the targets in groups of ``max(⌊max_rows / n⌋, 1)`` as one batch (``n`` the samples still
    unbroken), each group only on the samples no earlier group broke; so the starts, and
    which samples break, do not depend on ``max_rows`` (up to the float rounding of other
    batch sizes in the model).

    Returns ``(x_adv [B, *S], broken [B] bool)``; unbroken samples get their best-loss point.
    """
    x_adv = x.clone()
    best = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)
    broken = broken.clone()
    k_all = 1 if targets is None else targets.shape[1]
    for _ in range(restarts):
        todo = (~broken).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        n = todo.numel()
        starts = _start(x[todo].repeat((k_all,) + (1,) * (x.dim() - 1)), eps, generator)
        starts = starts.view((k_all, n) + tuple(x.shape[1:]))
        alive, k0 = torch.arange(n, device=x.device), 0
        while k0 < k_all and alive.numel() > 0:
            m = alive.numel()
            ks = torch.arange(k0, min(k_all, k0 + max(max_rows // m, 1)), device=x.device)
            k0 += ks.numel()
            rows = todo[alive.repeat(ks.numel())]  # target-major
            t = None if targets is None else targets[rows, ks.repeat_interleave(m)]
            owner = torch.arange(m, device=x.device).repeat(ks.numel())
            x_run, loss_run, hit = _batched_run(forward, x[rows], y[rows], t, owner, m,
                                                starts[ks][:, alive].flatten(0, 1), eps, loss_fn, steps, rho)
            done = todo[alive]
            take = hit | (loss_run > best[done])
            x_adv[done[take]] = x_run[take]
            best[done] = torch.maximum(best[done], loss_run)
            broken[done[hit]] = True
            alive = alive[~hit]
    return x_adv, broken


def _untargeted(name: str) -> LossFn:
    fn = LOSSES[name]
    return lambda logits, y, target: fn(logits, y)


def _targeted(logits: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
    assert target is not None
    return targeted_dlr_loss(logits, y, target)


def _check_common(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int, rho: float,
                  generator: object, mode: str) -> None:
    check_attack_call(model, x, y, eps, mode, restarts=restarts, generator=generator)
    check_number("steps", steps, integer=True, minimum=1)
    check_fraction("rho", rho)


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
        return _run_restarts(forward_of(model), x, y, eps, _untargeted(loss), None, steps=steps,
                             restarts=restarts, rho=rho, generator=generator,
                             broken=misclassified(logits, y), max_rows=x.shape[0])


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
    max_rows: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`apgd_targeted` that also returns ``broken`` ``[B]`` bool. Same arguments."""
    _check_common(model, x, y, eps, steps, restarts, rho, generator, mode)
    check_number("n_target_classes", n_target_classes, integer=True, minimum=1)
    if max_rows is not None:
        check_number("max_rows", max_rows, integer=True, minimum=1)
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
        return _run_restarts(forward_of(model), x, y, eps, _targeted, others[:, :k], steps=steps,
                             restarts=restarts, rho=rho, generator=generator, broken=misclassified(logits, y),
                             max_rows=x.shape[0] if max_rows is None else max_rows)


def apgd_targeted(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *, n_target_classes: int = 9, steps: int = 100,
    restarts: int = 1, rho: float = 0.75, generator: Optional[torch.Generator] = None, mode: str = "eval",
    max_rows: Optional[int] = None,
) -> Tensor:
    """APGD-T (Croce & Hein, ICML 2020), L∞: APGD on the targeted DLR loss, one run per target.

    The targets of a sample are the ``n_target_classes`` other classes with the largest clean
    logits. Each (sample, target) pair is one APGD run with its own start, step sizes and
    checkpoints; the runs of several targets go through the model as one batch (rows
    target-major, at most ``max_rows`` of them), and a sample's other runs stop as soon as one
    of them misclassifies it. Targets that do not fit one batch run in later batches, each only
    on the samples no earlier batch broke; each restart attacks only the samples still unbroken.
    Which samples break does not depend on ``max_rows`` (the starts of a restart are drawn
    before its first batch; up to the model's float rounding at other batch sizes); a broken
    sample's point is its first misclassified iterate, the
    lowest target's among runs that misclassify it at the same step.

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
        max_rows: rows per model call ``≥ 1`` (default ``B``, so a call is never larger than the
            batch given); at least one target per call.
    Returns:
        ``x_adv`` ``[B, *S]`` in the ε-ball and ``[0, 1]``: the first misclassified iterate for a
        broken sample, ``x`` for one misclassified already, else the point of the highest targeted
        DLR over all runs (the first run's among equal ones).

    Example:
        >>> x_adv = fastland.attacks.apgd_targeted(model, x, y, 8 / 255, n_target_classes=9)
    """
    return apgd_targeted_attack(model, x, y, eps, n_target_classes=n_target_classes, steps=steps,
                                restarts=restarts, rho=rho, generator=generator, mode=mode, max_rows=max_rows)[0]
