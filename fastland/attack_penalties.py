"""Penalties that flatten ``log p`` or the decision along the attack direction (the paper's open question).

AMSReg and Jacobian regularisation flatten ``log p`` in random directions but
not along the directions attacks take (the paper's Fig. 5). These penalties
target the FGSM direction ``d = sign(∇x CE(f(x), y))`` itself, drawn with the
model in eval mode (like PGD in adversarial training) and detached:

* ``"difference"`` (default): ``(log p(x + ε·d) − log p(x))²``, the squared
  height change of one FGSM step; one more forward pass and an ordinary
  backward (no double backpropagation).
* ``"directional"``: ``ε²·(dᵀ∇x log p(x))²``, the first-order version of
  ``"difference"`` (same units, so the same λ), by double backpropagation.
* ``"fgsm_amsreg"``: the AMSReg penalty ``‖diag(p) J‖²_F`` (any estimator of
  :func:`fastland.amsreg_loss`) at an FGSM point with random start,
  ``x' = Π(x₀ + 1.25·ε·sign(∇CE(x₀)))``, ``x₀ = x + U(−ε, ε)`` (Wong et al.'s
  "fast" adversarial example; ``Π`` projects to the ε-ball and ``[0, 1]``),
  instead of at ``x``. In AMSReg's units: its λ is AMSReg's.
* ``"margin"``: ``relu(m(x) − m(x'))²``, ``m = z_y − max_{c≠y} z_c`` the true-class
  margin and ``x' = clip(x + ε·d, 0, 1)``: how far one FGSM step lowers the margin
  (0 when it does not). For small ε it is ``ε²·relu(−d'ᵀ∇x m)²``, ``d' = (x' − x)/ε``.
* ``"kl"``: ``KL(p(·|x) ‖ p(·|x'))`` at the same ``x'``: how far one FGSM step moves
  the predicted distribution (TRADES' term at the FGSM point instead of a KL-ascent
  one). For small ε it is ``(ε²/2)·d'ᵀ F d'``, ``F = Jᵀ(diag p − ppᵀ)J`` the Fisher
  information of the prediction w.r.t. the input: half the variance under ``p`` of
  the logits' slopes along ``d'``, where ``"directional"`` is the square of their mean.

``"margin"`` and ``"kl"`` judge the *decision* (both are 0 for a model whose
logits move by a common amount, which changes only ``log p``); ``"difference"``
and ``"directional"`` judge ``log p`` (docs/design.md §6).

The points ``x + ε·d`` of ``"difference"`` are not clipped to ``[0, 1]``: they lie
on the line that :func:`fastland.attack_flatness` measures. Those of ``"margin"``
and ``"kl"`` are (they stand for the attack, which the box confines). Nothing is
detached but ``d``: the clean term takes gradients too (as in TRADES). Every
penalty is differentiable w.r.t. the model's parameters; the objective is
``CE + (λ/2)·penalty``, as for AMSReg
(``fastland.Defence("attack_flat", lam=..., eps=..., variant=...)``).

Defaults for Fashion-MNIST: ``eps = 10/255`` (adversarial training's ε) and
:data:`ATTACK_FLAT_LAM`, chosen by one small sweep (one seed; λ ∈ {0.5, 5, 50} for
``difference``/``directional``, {0.05, 0.1, 0.5, 5} for ``fgsm_amsreg``) on a
synthetic task (10 classes of 1×14×14 prototypes plus noise, a two-conv ReLU
net, 4 epochs, ε = 10/255): the largest λ that kept clean accuracy within half a
point of plain training. There ``difference`` (λ = 5) made the FGSM line 20×
less steep (anisotropy 4.9 → 2.0), ``directional`` (λ = 0.5) as steep as the
random lines (anisotropy 1.0), and ``fgsm_amsreg`` (λ = 0.1; 0.5 cost 33 points
of clean accuracy) came near AMSReg's PGD accuracy at ε = 0.05.
None reached adversarial training's PGD accuracy there (55% at ε = 0.05; these
24-46%): a flat log p along the attack line does not by itself keep the class.
A first look, not a tuned result: λ for real data is the experiments' to sweep.
``margin`` (λ = 8) was chosen on Fashion-MNIST itself (LeNet-5, 10 000 training images,
5 epochs, one seed; λ ∈ {0.5, 2, 8, 32}): the largest λ whose clean accuracy stayed within
4.5 points of plain training's on the same budget. ``kl`` (λ = 12) is the best point of the
full-length front (all training images, 20 epochs, three seeds; λ ∈ {12, 24, 48}): the worst
case 54.5 ± 0.1% against PGD-10 AT's 50.6 ± 0.7% at a third of its step cost; larger λ was
unstable across seeds (docs/design.md §6, docs/results.md).

Shapes: ``x`` ``[B, *S]`` in ``[0, 1]``, ``y`` ``[B]``, logits ``[B, C]``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ._checks import check_images, check_model
from ._grid import check_logits
from .attacks.losses import margin_loss
from .choices import ATTACK_PENALTY_VARIANTS, ESTIMATORS, REDUCTIONS
from .neighbourhood import check_labels, fgsm_direction

__all__ = ["ATTACK_PENALTY_VARIANTS", "ATTACK_FLAT_EPS", "ATTACK_FLAT_LAM", "attack_flatness_loss"]

#: ε of the attack-direction penalties on Fashion-MNIST (that of adversarial training).
ATTACK_FLAT_EPS = 10 / 255
#: Default λ per variant on Fashion-MNIST (objective ``CE + (λ/2)·penalty``).
ATTACK_FLAT_LAM: Dict[str, float] = {"difference": 5.0, "directional": 0.5, "fgsm_amsreg": 0.1,
                                     "margin": 8.0, "kl": 12.0}


def _check(model: nn.Module, x: Tensor, y: Optional[Tensor], eps: float, variant: str, reduction: str,
           logits: Optional[Tensor]) -> None:
    check_model(model)
    if variant not in ATTACK_PENALTY_VARIANTS:
        raise ValueError(f"variant: expected one of {ATTACK_PENALTY_VARIANTS}, got {variant!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: expected a finite number > 0 (an L∞ step in pixel units, e.g. 10/255), got {eps!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    check_images("x", x)
    if y is None:
        raise ValueError("y: the attack direction sign(∇x CE) needs labels; pass y=[B] integer labels")
    check_labels(x, y)
    if logits is not None:
        check_logits(logits, x)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    return per_sample.sum() if reduction == "sum" else per_sample


def _lse(model: nn.Module, x: Tensor) -> Tensor:
    return torch.logsumexp(check_logits(model(x), x), dim=-1)


def _difference(model: nn.Module, x: Tensor, d: Tensor, eps: float, logits: Optional[Tensor]) -> Tensor:
    """``(log p(x + ε·d) − log p(x))²`` ``[B]``; ``log p(x)`` from ``logits`` when given."""
    base = torch.logsumexp(logits, dim=-1) if logits is not None else _lse(model, x)
    return (_lse(model, x + eps * d) - base).square()


def _directional(model: nn.Module, x: Tensor, d: Tensor, eps: float) -> Tensor:
    """``ε²·(dᵀ∇x log p(x))²`` ``[B]`` by double backpropagation."""
    xg = x.detach().requires_grad_(True)
    lse = _lse(model, xg)
    (g,) = torch.autograd.grad(lse.sum(), xg, create_graph=True)
    return (eps * (g * d).flatten(1).sum(dim=1)).square()


def _fgsm_step(x: Tensor, d: Tensor, eps: float) -> Tensor:
    """The FGSM point ``clip(x + ε·d, 0, 1)`` ``[B, *S]`` of the decision variants."""
    return (x + eps * d).clamp(0.0, 1.0)


def _clean_logits(model: nn.Module, x: Tensor, logits: Optional[Tensor]) -> Tensor:
    return logits if logits is not None else check_logits(model(x), x)


def _margin(model: nn.Module, x: Tensor, y: Tensor, d: Tensor, eps: float, logits: Optional[Tensor]) -> Tensor:
    """``relu(m(x) − m(x'))²`` ``[B]``, ``m = z_y − max_{c≠y} z_c``, ``x' = clip(x + ε·d, 0, 1)``."""
    z = _clean_logits(model, x, logits)
    if z.shape[1] < 2:
        raise ValueError(f"model: the 'margin' variant needs logits of at least 2 classes, got shape {tuple(z.shape)}")
    z_adv = check_logits(model(_fgsm_step(x, d, eps)), x)
    return torch.relu(margin_loss(z, y) - margin_loss(z_adv, y)).square()


def _kl(model: nn.Module, x: Tensor, d: Tensor, eps: float, logits: Optional[Tensor]) -> Tensor:
    """``KL(p(·|x) ‖ p(·|x'))`` ``[B]``, ``x' = clip(x + ε·d, 0, 1)``."""
    log_p = torch.log_softmax(_clean_logits(model, x, logits), dim=-1)
    log_q = torch.log_softmax(check_logits(model(_fgsm_step(x, d, eps)), x), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _fgsm_amsreg(model: nn.Module, attack_model: nn.Module, x: Tensor, y: Tensor, eps: float,
                 estimator: str, n_proj: int, generator: Optional[torch.Generator]) -> Tensor:
    """AMSReg's per-sample penalty at the random-start FGSM point ``[B]``."""
    from .attacks import pgd
    from .penalties import amsreg_loss

    x_adv = pgd(attack_model, x, y, eps, alpha=1.25 * eps, steps=1, random_start=True, generator=generator)
    xa = x_adv.detach().requires_grad_(True)
    extra = {"model": model} if estimator == "finite_difference" else {}
    return amsreg_loss(model(xa), xa, n_proj=n_proj, estimator=estimator, generator=generator,
                       reduction="none", **extra)


def attack_flatness_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = ATTACK_FLAT_EPS,
    variant: str = "difference",
    logits: Optional[Tensor] = None,
    estimator: str = "projection",
    n_proj: int = 1,
    generator: Optional[torch.Generator] = None,
    attack_model: Optional[nn.Module] = None,
    reduction: str = "mean",
) -> Tensor:
    """A penalty that flattens ``log p`` or the decision along the FGSM direction (batch mean by default).

    The objective is ``cross_entropy + lam / 2 * attack_flatness_loss(model, x, y)``.
    The direction ``d = sign(∇x CE)`` (and the FGSM point of ``"fgsm_amsreg"``) is
    drawn with ``attack_model`` in eval mode and detached; the penalty's own forward
    passes run ``model`` in its current mode (BatchNorm in train mode then sees the
    shifted batch, as in adversarial training).

    Args:
        model: ``[B, *S] -> [B, C]`` logits.
        x: ``[B, *S]`` inputs in ``[0, 1]`` (need not require grad).
        y: ``[B]`` integer labels (the direction needs them).
        eps: the L∞ step ``ε > 0`` in pixel units (default 10/255).
        variant: one of :data:`ATTACK_PENALTY_VARIANTS`: ``"difference"``,
            ``"directional"``, ``"fgsm_amsreg"``, ``"margin"`` or ``"kl"`` (see the
            module docstring).
        logits: ``model(x)`` ``[B, C]`` if already computed (``"difference"``,
            ``"margin"`` and ``"kl"`` then skip one forward pass; pass them with their
            graph for the clean term's gradient); ignored by the other variants.
        estimator, n_proj: AMSReg's estimator (``"fgsm_amsreg"`` only; see
            :func:`fastland.amsreg_loss`).
        generator: on ``x``'s device: the random start and projections of ``"fgsm_amsreg"``.
        attack_model: the module the direction is taken on (default ``model``; under
            DDP the unwrapped module).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per sample ``[B]``).
    Returns:
        A scalar (``[B]`` for ``reduction="none"``), differentiable w.r.t. the parameters.

    Example::

        logits = model(x)
        pen = fastland.attack_flatness_loss(model, x, y, eps=10 / 255, logits=logits)
        loss = F.cross_entropy(logits, y) + 1.0 / 2 * pen
    """
    _check(model, x, y, eps, variant, reduction, logits)
    if variant == "fgsm_amsreg" and estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    attacker = attack_model if attack_model is not None else model
    x = x.detach()
    if variant == "fgsm_amsreg":
        per_sample = _fgsm_amsreg(model, attacker, x, y, float(eps), estimator, n_proj, generator)
    else:
        d = fgsm_direction(attacker, x, y)
        if variant == "difference":
            per_sample = _difference(model, x, d, float(eps), logits)
        elif variant == "directional":
            per_sample = _directional(model, x, d, float(eps))
        elif variant == "margin":
            per_sample = _margin(model, x, y, d, float(eps), logits)
        else:
            per_sample = _kl(model, x, d, float(eps), logits)
    return _reduce(per_sample, reduction)
