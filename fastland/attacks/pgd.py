"""L∞ attacks: FGSM and PGD (Madry et al.) on pixel-space inputs in ``[0, 1]``.

Both ascend the cross-entropy with sign steps and project to the ε-ball around
``x`` and to ``[0, 1]``. Gradients are taken with respect to the input only
(``torch.autograd.grad``), so nothing accumulates in the parameters' ``.grad``
and the weight-gradient products of an ordinary ``backward()`` are skipped.
The attack runs with the model in eval mode by default and restores every
submodule's previous ``training`` flag afterwards.

Paper settings (docs/design.md §1): Fashion-MNIST ``pgd(model, x, y, 25/255, 6.25/255, 10)``;
CIFAR-10 ``pgd(model, x, y, 8/255, 2/255, 5)``; adversarial training PGD-10 with
``α = 2.5·ε/10``.

Shapes: ``x`` ``[B, *S]`` floating point in ``[0, 1]``; ``y`` ``[B]`` integer
class indices; the model maps ``[B, *S]`` to logits ``[B, C]``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_in_unit_box, check_same_device, check_tensor
from .._checks import check_model_dtype
from .._grid import check_logits, module_mode
from .._progress import progress_bar
from ._fast_forward import Forward, forward_of

__all__ = ["fgsm", "pgd", "MODES"]

MODES = ("eval", "train", "keep")


# --------------------------------------------------------------------------- checks and helpers


def _check_number(name: str, value: object, *, integer: bool = False, minimum: float = 0.0) -> None:
    """A finite real (or int when ``integer``) ``≥ minimum``, else an error naming ``name``."""
    kind = "int" if integer else "number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool):
        raise TypeError(f"{name}: expected a {kind} >= {minimum:g}, got {value!r}")
    if not math.isfinite(value) or value < minimum:  # type: ignore[arg-type]
        raise ValueError(f"{name}: expected a finite {kind} >= {minimum:g}, got {value!r}")


def _check_attack_inputs(model: nn.Module, x: Tensor, y: Tensor, mode: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_tensor("x", x, min_ndim=2, finite=True, nonempty=True)
    if not check_in_unit_box("x", x):
        raise ValueError(
            f"x: expected values in [0, 1] (pixel space), got range "
            f"[{x.min().item():.4g}, {x.max().item():.4g}]"
        )
    check_tensor("y", y, ndim=1, floating=False)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"y: expected an integer dtype (class indices), got {y.dtype}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected shape ({x.shape[0]},) (one label per row of x), got {tuple(y.shape)}")
    check_same_device(["x", "y"], [x, y])
    check_model_dtype(model, x)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")


def _check_labels_in_range(y: Tensor, logits: object) -> None:
    """The model returned logits ``[B, C]``, and the labels are in ``[0, C)`` (one device sync, once per attack)."""
    logits = check_logits(logits, y)
    n_classes = logits.shape[-1]
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"y: expected class indices in [0, {n_classes}), got range [{lo}, {hi}]")


def attack_mode(model: nn.Module, mode: str = "eval") -> "contextlib.AbstractContextManager[nn.Module]":
    """Put ``model`` in ``mode`` (``"eval"``, ``"train"`` or ``"keep"``) and restore
    each submodule's own ``training`` flag on exit (also on error)."""
    return module_mode(model, {"eval": False, "train": True, "keep": None}[mode])


def _input_gradient(forward: Forward, x_adv: Tensor, y: Tensor, first: bool) -> Tensor:
    """``∇_x Σ_i CE(forward(x_adv)_i, y_i)`` ``[B, *S]``; only the input's gradient is computed;
    ``forward`` gives the model's logits (:func:`~fastland.attacks._fast_forward.forward_of`).

    The sum (not the mean) keeps each row's gradient independent of ``B``.
    """
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(x_adv)
        if first:
            _check_labels_in_range(y, logits)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
    return grad


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Into the L∞ ball of radius ``eps`` around ``x``, then into ``[0, 1]`` (both convex;
    ``x`` itself is in both, so the result is in their intersection)."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _uniform_start(x: Tensor, eps: float, generator: Optional[torch.Generator]) -> Tensor:
    """``x + U(-eps, eps)`` per entry, drawn on the generator's device."""
    device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
    return x + (2 * noise.to(x.device) - 1) * eps


# --------------------------------------------------------------------------- attacks


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, mode: str = "eval") -> Tensor:
    """Fast gradient sign method: ``clip(x + eps·sign(∇x CE(model(x), y)), 0, 1)``.

    Args:
        model: maps ``[B, *S]`` to logits ``[B, C]``.
        x: ``[B, *S]`` clean inputs in ``[0, 1]``.
        y: ``[B]`` integer labels in ``[0, C)``.
        eps: L∞ radius ``≥ 0`` in pixel units (e.g. 8/255).
        mode: run the model in ``"eval"`` (default) or ``"train"`` mode, or ``"keep"`` it.
    Returns:
        ``x_adv`` ``[B, *S]``, detached, same dtype and device as ``x``.
    """
    _check_attack_inputs(model, x, y, mode)
    _check_number("eps", eps)
    x = x.detach()
    with attack_mode(model, mode):
        grad = _input_gradient(forward_of(model), x, y, first=True)
    return _project(x + eps * grad.sign(), x, eps)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    generator: Optional[torch.Generator] = None,
    *,
    mode: str = "eval",
    progress: bool = False,
) -> Tensor:
    """Projected gradient descent on the cross-entropy, L∞ (Madry et al. 2018).

    ``x⁰ = x + U(-ε, ε)`` projected (or ``x`` when ``random_start`` is False),
    ``xᵗ⁺¹ = Π(xᵗ + α·sign(∇x CE(model(xᵗ), y)))``, with ``Π`` the projection to
    the ε-ball around ``x`` and to ``[0, 1]``. Returns the last iterate.

    Args:
        model: maps ``[B, *S]`` to logits ``[B, C]``.
        x: ``[B, *S]`` clean inputs in ``[0, 1]``.
        y: ``[B]`` integer labels in ``[0, C)``.
        eps: L∞ radius ``≥ 0`` in pixel units.
        alpha: step size ``≥ 0`` in pixel units.
        steps: number of gradient steps ``≥ 1``.
        random_start: start from a uniform point of the ε-ball.
        generator: ``torch.Generator`` for the random start (any device), or None.
        mode: ``"eval"`` (default: BatchNorm running statistics, no dropout),
            ``"train"`` (as in Madry et al.'s adversarial training; BatchNorm
            running statistics are then updated by the attack's forward passes),
            or ``"keep"`` the model's current mode. Restored afterwards.
        progress: show a progress bar over the steps (the library is quiet by default).
    Returns:
        ``x_adv`` ``[B, *S]``, detached, same dtype and device as ``x``, with
        ``|x_adv - x| ≤ eps`` and ``0 ≤ x_adv ≤ 1`` entrywise.
    """
    _check_attack_inputs(model, x, y, mode)
    _check_number("eps", eps)
    _check_number("alpha", alpha)
    _check_number("steps", steps, integer=True, minimum=1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    x = x.detach()
    x_adv = _project(_uniform_start(x, eps, generator), x, eps) if random_start else x.clone()
    bar = progress_bar(steps, "pgd", progress, unit="step")
    with attack_mode(model, mode):
        forward = forward_of(model)
        for t in range(steps):
            grad = _input_gradient(forward, x_adv, y, first=t == 0)
            x_adv = _project(x_adv + alpha * grad.sign(), x, eps)
            bar.update(1)
    bar.close()
    return x_adv
