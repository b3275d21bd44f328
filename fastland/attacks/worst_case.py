"""The per-sample worst case over an ensemble of L∞ attacks, and gradient-masking warnings.

A sample is robust only if it survives every attack. The attacks run in the given order,
each only on the samples still classified correctly (as in AutoAttack, Croce & Hein 2020):
by default APGD-CE, then APGD-T, then the gradient-free Square attack, which catches
defences whose gradients are masked (zero, noisy or shattered) rather than robust.

Shapes: ``x`` ``[B, *S]`` in ``[0, 1]`` (``[B, C, H, W]`` when Square is used); ``y`` ``[B]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import attack_mode, check_evaluation_inputs, check_generator, check_number, clean_logits, misclassified
from ._counting import CallCounter
from .apgd import apgd_attack, apgd_targeted_attack
from .square import square_attack

__all__ = ["ATTACKS", "GRADIENT_FREE", "SURVIVED", "MISCLASSIFIED_CLEAN", "WorstCase", "worst_case",
           "masking_flags"]

from ..choices import ATTACKS  # noqa: E402  (defined once)
GRADIENT_FREE = frozenset({"square"})
SURVIVED = -1  # broken_by code: robust against every attack
MISCLASSIFIED_CLEAN = -2  # broken_by code: misclassified before any attack


@dataclass(frozen=True)
class WorstCase:
    """The result of :func:`worst_case`.

    Attributes:
        x_adv: ``[B, *S]`` per sample, the point that broke it (``x`` itself when misclassified
            clean), or the last attack's best point for a robust sample.
        robust: ``[B]`` bool, correctly classified at ``x_adv`` (checked in one final forward).
        broken_by: ``[B]`` int64: ``SURVIVED`` (−1) for a robust sample, ``MISCLASSIFIED_CLEAN``
            (−2) for one misclassified at ``x``, else the index into ``attacks`` of the first
            attack that broke it.
        attacks: the attack names, in the order they ran.
    """

    x_adv: Tensor
    robust: Tensor
    broken_by: Tensor
    attacks: Tuple[str, ...]

    @property
    def accuracy(self) -> float:
        """Robust accuracy: the share of samples that survive every attack."""
        return float(self.robust.float().mean()) if self.robust.numel() else float("nan")

    @property
    def share_broken(self) -> Dict[str, float]:
        """Share of all ``B`` samples that each attack broke first, plus ``"clean"`` for those
        misclassified without attack; with :attr:`accuracy` the values sum to 1."""
        n = max(self.broken_by.numel(), 1)
        out = {"clean": int((self.broken_by == MISCLASSIFIED_CLEAN).sum()) / n}
        for i, name in enumerate(self.attacks):
            out[name] = int((self.broken_by == i).sum()) / n
        return out

    @staticmethod
    def cat(parts: Sequence["WorstCase"]) -> "WorstCase":
        """One result from the results of consecutive batches (same ``attacks``), rows in order."""
        if not parts or not all(isinstance(p, WorstCase) for p in parts):
            raise TypeError(f"parts: expected a non-empty sequence of WorstCase, got {parts!r:.80}")
        names = {p.attacks for p in parts}
        if len(names) != 1:
            raise ValueError(f"parts: expected results of the same attacks, got {sorted(names)}")
        return WorstCase(x_adv=torch.cat([p.x_adv for p in parts]), robust=torch.cat([p.robust for p in parts]),
                         broken_by=torch.cat([p.broken_by for p in parts]), attacks=parts[0].attacks)

    def robust_before(self, index: int) -> Tensor:
        """``[B]`` bool: correct after the attacks ``attacks[:index]`` (clean-correct when 0)."""
        return (self.broken_by == SURVIVED) | (self.broken_by >= index)


def _check_attack_names(attacks: object) -> Tuple[str, ...]:
    if isinstance(attacks, str) or not isinstance(attacks, Sequence) or len(attacks) == 0:
        raise TypeError(f"attacks: expected a non-empty sequence of names from {ATTACKS}, got {attacks!r}")
    for name in attacks:
        if name not in ATTACKS:
            raise ValueError(f"attacks: expected names from {', '.join(map(repr, ATTACKS))}, got {name!r}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks: expected each name once, got {tuple(attacks)!r}")
    return tuple(attacks)


def _run_one(name: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, kw: dict) -> Tuple[Tensor, Tensor]:
    """``(x_adv [n, *S], broken [n] bool)`` of attack ``name`` (model already in eval mode).
    APGD-T batches its targets up to ``kw["max_rows"]`` rows (the batch ``worst_case`` got)."""
    if isinstance(model, CallCounter):
        model.stage = name
    common = dict(restarts=kw["restarts"], generator=kw["generator"], mode="keep")
    if name in ("apgd-ce", "apgd-dlr"):
        return apgd_attack(model, x, y, eps, loss=name[5:], steps=kw["steps"], **common)
    if name == "apgd-t":
        return apgd_targeted_attack(model, x, y, eps, n_target_classes=kw["n_target_classes"],
                                    steps=kw["steps"], max_rows=kw["max_rows"], **common)
    return square_attack(model, x, y, eps, n_queries=kw["n_queries"], p_init=kw["p_init"], **common)


def worst_case(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, *,
    attacks: Sequence[str] = ("apgd-ce", "apgd-t", "square"), steps: int = 100, n_queries: int = 5000,
    restarts: int = 1, n_target_classes: int = 9, p_init: float = 0.8,
    generator: Optional[torch.Generator] = None, mode: str = "eval",
) -> WorstCase:
    """Per-sample worst case over an ensemble of L∞ attacks (AutoAttack's protocol).

    Args:
        model: maps ``[B, *S]`` to logits ``[B, C]`` (``C ≥ 4`` for ``"apgd-t"``).
        x: ``[B, *S]`` clean inputs in ``[0, 1]`` (``[B, C, H, W]`` for ``"square"``).
        y: ``[B]`` integer labels in ``[0, C)``.
        eps: L∞ radius ``≥ 0`` in pixel units.
        attacks: names from ``ATTACKS`` — ``"apgd-ce"``, ``"apgd-dlr"``, ``"apgd-t"``,
            ``"square"`` — run in this order, each on the samples still correct
            (default ``("apgd-ce", "apgd-t", "square")``).
        steps: APGD steps per run (default 100).
        n_queries: Square queries per sample (default 5000).
        restarts: restarts of every attack (default 1).
        n_target_classes: APGD-T's targets (default 9, at most ``C − 1``).
        p_init: Square's initial window share (default 0.8).
        generator: one ``torch.Generator`` shared by the attacks in turn, or None.
        mode: ``"eval"`` (default) or ``"keep"`` (model already in eval mode).

    APGD-T runs the targets of all its samples as one batch of at most ``B`` rows (more
    batches when ``K·n > B``), so a model call is never larger than the batch given. A model
    wrapped in :class:`fastland.attacks._counting.CallCounter` gets its calls counted per stage
    (``"clean"``, each attack's name, ``"final"``).

    Returns:
        :class:`WorstCase` with ``x_adv`` ``[B, *S]``, ``robust`` ``[B]``, ``broken_by`` ``[B]``.

    Example:
        >>> res = fastland.attacks.worst_case(model, x, y, 8 / 255)
        >>> res.accuracy, res.share_broken
    """
    names = _check_attack_names(attacks)
    check_evaluation_inputs(model, x, y, eps, mode)
    for arg, value in (("steps", steps), ("n_queries", n_queries), ("restarts", restarts),
                       ("n_target_classes", n_target_classes)):
        check_number(arg, value, integer=True, minimum=1)
    check_generator(generator)
    kw = dict(steps=steps, n_queries=n_queries, restarts=restarts, n_target_classes=n_target_classes,
              p_init=p_init, generator=generator, max_rows=x.shape[0])
    x = x.detach()
    with attack_mode(model, mode):
        if isinstance(model, CallCounter):
            model.stage = "clean"
        wrong = misclassified(clean_logits(model, x, y), y)
        broken_by = torch.full((x.shape[0],), SURVIVED, dtype=torch.int64, device=x.device)
        broken_by[wrong] = MISCLASSIFIED_CLEAN
        x_adv = x.clone()
        for i, name in enumerate(names):
            todo = (broken_by == SURVIVED).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            x_run, hit = _run_one(name, model, x[todo], y[todo], eps, kw)
            x_adv[todo] = x_run
            broken_by[todo[hit]] = i
        if isinstance(model, CallCounter):
            model.stage = "final"
        with torch.no_grad():
            robust = ~misclassified(model(x_adv), y)
    # the final forward decides: a point broken only by rounding in another batch counts as robust
    broken_by = torch.where(robust, torch.full_like(broken_by, SURVIVED), broken_by)
    return WorstCase(x_adv=x_adv, robust=robust, broken_by=broken_by, attacks=names)


# --------------------------------------------------------------------------- masking flags


def _as_accuracy(name: str, value: Union[float, Tensor]) -> float:
    """A float in ``[0, 1]``, or a ``[B]`` bool tensor of per-sample correctness, as a float."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.dtype != torch.bool:
            raise TypeError(f"{name}: expected a float or a [B] bool tensor, got {value.dtype} {tuple(value.shape)}")
        return float(value.float().mean())
    check_number(name, value)
    if value > 1:
        raise ValueError(f"{name}: expected an accuracy in [0, 1], got {value!r}")
    return float(value)


def _gradient_robust(result: WorstCase) -> Tensor:
    """``[B]`` bool: survived the gradient attacks, when all of them ran before any gradient-free one."""
    free = [i for i, a in enumerate(result.attacks) if a in GRADIENT_FREE]
    grads = [i for i, a in enumerate(result.attacks) if a not in GRADIENT_FREE]
    if not free or not grads or max(grads) > min(free):
        raise ValueError(
            f"gradient_robust: needed unless the gradient attacks run before the gradient-free ones, "
            f"got attacks {result.attacks!r}"
        )
    return result.robust_before(min(free))


def masking_flags(
    result: WorstCase, *, gradient_robust: Optional[Tensor] = None,
    pgd10_accuracy: Union[float, Tensor, None] = None, pgd100_accuracy: Union[float, Tensor, None] = None,
    large_eps_accuracy: Union[float, Tensor, None] = None, eps: Optional[float] = None,
    gradient_free_share: float = 0.01, large_eps_floor: float = 0.10,
) -> List[str]:
    """Plain-sentence warnings that a robustness number may come from masked gradients.

    Pure: looks only at the numbers given; each check runs when its inputs are given ((a) runs
    when ``result.attacks`` holds a gradient-free attack).

    Args:
        result: the :func:`worst_case` result at radius ``eps``.
        gradient_robust: ``[B]`` bool, samples that survived the gradient attacks; default: read
            from ``result`` when its gradient attacks ran before its gradient-free ones.
        pgd10_accuracy, pgd100_accuracy: PGD-10 and PGD-100 robust accuracies at ``eps``
            (floats in ``[0, 1]`` or ``[B]`` bool tensors).
        large_eps_accuracy: robust accuracy at a large radius (``4·eps``).
        eps: the radius, quoted in the sentences when given.
        gradient_free_share: (a) fires when the gradient-free attacks break more than this share
            (default 1%) of the samples the gradient attacks missed.
        large_eps_floor: (b) fires when ``large_eps_accuracy`` is at least this (default 10%).
    Returns:
        Sentences (possibly none) for: (a) the gradient-free attack breaking > 1% of the samples the
        gradient attacks missed; (b) robust accuracy at ``4·eps`` not below 10%; (c) PGD-100 weaker
        than PGD-10.
    """
    if not isinstance(result, WorstCase):
        raise TypeError(f"result: expected a WorstCase, got {type(result).__name__}")
    at = f" at eps={eps:.4g}" if eps is not None else ""
    flags: List[str] = []
    if any(a in GRADIENT_FREE for a in result.attacks):
        survivors = _gradient_robust(result) if gradient_robust is None else gradient_robust
        if not isinstance(survivors, Tensor) or survivors.shape != result.robust.shape or survivors.dtype != torch.bool:
            raise ValueError(f"gradient_robust: expected a bool tensor of shape {tuple(result.robust.shape)}, "
                             f"got {survivors!r:.60}")
        missed = int(survivors.sum())
        extra = int((survivors & ~result.robust).sum())
        if missed and extra / missed > gradient_free_share:
            flags.append(
                f"The gradient-free attack broke {extra} of the {missed} samples ({extra / missed:.1%}) that "
                f"the gradient attacks missed{at}: the gradients are likely masked, and gradient-based "
                "robust accuracy overstates robustness."
            )
    if large_eps_accuracy is not None:
        acc = _as_accuracy("large_eps_accuracy", large_eps_accuracy)
        big = f" (eps={4 * eps:.4g})" if eps is not None else ""
        if acc >= large_eps_floor:
            flags.append(
                f"Robust accuracy at 4x the radius{big} is {acc:.1%}, not below {large_eps_floor:.0%}: "
                "so large a perturbation should break nearly every sample, so the attack is likely failing."
            )
    if (pgd10_accuracy is None) != (pgd100_accuracy is None):
        raise ValueError("pgd100_accuracy: expected it together with pgd10_accuracy (both or neither)")
    if pgd10_accuracy is not None:
        acc10 = _as_accuracy("pgd10_accuracy", pgd10_accuracy)
        acc100 = _as_accuracy("pgd100_accuracy", pgd100_accuracy)  # type: ignore[arg-type]
        if acc100 > acc10:
            flags.append(
                f"PGD-100 is weaker than PGD-10{at} ({acc100:.1%} vs {acc10:.1%} robust accuracy): more "
                "steps should never help the model, so the loss surface is likely obfuscated."
            )
    return flags
