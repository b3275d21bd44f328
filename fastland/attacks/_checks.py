"""Checks and small helpers shared by the evaluation attacks (APGD, APGD-T, Square).

They reuse :mod:`fastland.attacks.pgd`'s checks, so every attack reports bad input
in the same words. Evaluation attacks run the model in eval mode: ``mode`` is
``"eval"`` (switch to eval and restore afterwards) or ``"keep"`` (the model must
already be in eval mode).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_eval_mode
from .pgd import _check_attack_inputs, _check_labels_in_range, _check_number, _project, attack_mode

__all__ = [
    "EVAL_MODES",
    "attack_mode",
    "check_evaluation_inputs",
    "check_attack_call",
    "check_number",
    "check_fraction",
    "check_generator",
    "clean_logits",
    "project",
    "feasible_box",
    "misclassified",
    "rand",
    "randint",
    "random_signs",
]

EVAL_MODES = ("eval", "keep")

check_number = _check_number
project = _project


def check_evaluation_inputs(model: nn.Module, x: Tensor, y: Tensor, eps: float, mode: str) -> None:
    """``model``, ``x`` ``[B, *S]`` in ``[0, 1]``, ``y`` ``[B]``, ``eps ≥ 0`` and an eval ``mode``."""
    _check_attack_inputs(model, x, y, mode)
    _check_number("eps", eps)
    if mode not in EVAL_MODES:
        raise ValueError(
            f"mode: expected 'eval' or 'keep' for an evaluation attack (a train-mode forward "
            f"updates BatchNorm statistics and draws dropout masks), got {mode!r}"
        )
    if mode == "keep":
        check_eval_mode("model", model)


def check_attack_call(model: nn.Module, x: Tensor, y: Tensor, eps: float, mode: str, *,
                      restarts: int, generator: object) -> None:
    """The arguments every evaluation attack (APGD, APGD-T, Square) takes: ``model``, ``x``
    ``[B, *S]`` in ``[0, 1]``, ``y`` ``[B]``, ``eps ≥ 0``, an eval ``mode``, ``restarts ≥ 1``
    and a ``generator`` (a ``torch.Generator`` or None)."""
    check_evaluation_inputs(model, x, y, eps, mode)
    check_number("restarts", restarts, integer=True, minimum=1)
    check_generator(generator)


def check_fraction(name: str, value: object, *, low_open: bool = False) -> None:
    """A real number in ``[0, 1]`` (``(0, 1]`` when ``low_open``), else an error naming ``name``."""
    _check_number(name, value)
    if value > 1 or (low_open and value == 0):  # type: ignore[operator]
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")


def check_generator(generator: object) -> None:
    """A ``torch.Generator`` or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


def clean_logits(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Logits ``[B, C]`` at the clean ``x`` ``[B, *S]`` (no graph), labels checked against ``C``."""
    with torch.no_grad():
        logits = model(x)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"model: expected logits of shape ({x.shape[0]}, C), got {got}")
    _check_labels_in_range(y, logits)
    return logits


def feasible_box(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """``(lo, hi)`` ``[B, *S]``: the intersection of the ε-ball around ``x`` and ``[0, 1]``,
    ``[max(x − ε, 0), min(x + ε, 1)]`` per entry (never empty for ``x`` in ``[0, 1]``), so
    ``v.clamp(lo, hi)`` is :func:`project` ``(v, x, eps)`` to the bit (both are comparisons only)
    in one operation."""
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


def rand(shape: Tuple[int, ...], generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """``U[0, 1)`` of ``shape``, drawn on the generator's device, returned on ``like``'s
    device and dtype (so a CPU generator gives the same numbers for any ``like``)."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=like.dtype)
    return u.to(like.device)


def misclassified(logits: Tensor, y: Tensor) -> Tensor:
    """``argmax(logits) ≠ y``: logits ``[B, C]``, labels ``[B]`` → ``[B]`` bool."""
    return logits.argmax(dim=1) != y


def randint(high: int, shape: Tuple[int, ...], generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """Integers uniform in ``[0, high)`` of ``shape`` (int64), drawn on the generator's device,
    returned on ``like``'s device."""
    device = generator.device if generator is not None else like.device
    return torch.randint(0, high, shape, generator=generator, device=device).to(like.device)


def random_signs(shape: Tuple[int, ...], generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """``±1`` with equal probability, of ``shape``, in ``like``'s dtype and device."""
    return (2 * randint(2, shape, generator, like) - 1).to(like.dtype)
