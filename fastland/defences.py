"""The training objectives of the defences, one mini-batch at a time.

A :class:`Defence` is a small spec: which objective and its few numbers.

* ``none``: ``mean CE(f(x), y)``;
* ``at``: ``mean CE(f(x_adv), y)`` with ``x_adv`` a PGD-``steps`` attack (L∞,
  random start, step ``alpha``, default ``2.5·eps/steps``), generated with the
  model in eval mode;
* ``jacobian``: ``mean CE + (λ/2)·mean ‖J‖²_F``;
* ``amsreg``: ``mean CE + (λ/2)·mean ‖diag(p) J‖²_F`` (any estimator of
  :func:`fastland.amsreg_loss`);
* ``attack_flat``: ``mean CE + (λ/2)·mean penalty`` with the attack-direction
  penalty :func:`fastland.attack_flatness_loss` of ``variant`` at step ``eps``
  (beyond the paper);
* ``fgsm_rs``: "fast" adversarial training (Wong, Rice & Kolter, ICLR 2020):
  ``mean CE(f(x'), y)`` with ``x'`` one FGSM step of size ``alpha`` (default
  ``1.25·eps``) from a uniform random start ``clip(x + U(−ε, ε), 0, 1)``,
  projected to the ε-ball and ``[0, 1]``; the model in eval mode for the step;
* ``trades`` (Zhang et al., ICML 2019): ``mean CE(f(x), y) + β·KL(p(·|x) ‖ p(·|x'))``
  (KL summed over classes, averaged over the batch), ``x'`` ``steps`` sign steps
  of size ``alpha`` (default ``eps/4``) ascending that KL from ``x + 0.001·N(0, I)``,
  each projected to the ε-ball and ``[0, 1]``, the model in eval mode and
  ``p(·|x)`` fixed during the attack.

The baselines' objectives are derived in ``docs/design.md`` §1.

Example::

    defence = fastland.Defence("amsreg", lam=0.5)          # Table 2's AMSReg
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in loader:
        loss, ce, penalty, logits = fastland.train_step(model, x, y, defence, opt)

The experiments layer (:mod:`fastland.experiments.train`) wraps this in a
resumable training loop with the paper's settings per data set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_model_dtype, check_tensor
from ._grid import check_logits

__all__ = ["DEFENCES", "ATTACK_PENALTY_VARIANTS", "TRADES_BETA", "Defence", "default_step_size", "defence_loss",
           "trades_example", "train_step"]

from .choices import ATTACK_PENALTY_VARIANTS, DEFENCES
from .choices import DEFENCE_ESTIMATORS as _DEFENCE_ESTIMATORS

_ALL_DEFENCES = DEFENCES

#: TRADES' β by default (Zhang et al.'s setting for CIFAR-10 and MNIST).
TRADES_BETA = 6.0
#: The standard deviation of TRADES' Gaussian start ``x + 0.001·N(0, I)``.
_TRADES_START_STD = 0.001


def _need(cond: bool, name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}, got {got!r}")


def default_step_size(defence: str, eps: float, steps: int) -> float:
    """The training attack's step when none is given: ``1.25·eps`` for ``fgsm_rs`` (Wong et al.),
    ``eps/4`` for ``trades``, else PGD's ``2.5·eps/steps``."""
    if defence == "fgsm_rs":
        return 1.25 * eps
    if defence == "trades":
        return eps / 4
    return 2.5 * eps / steps


@dataclass(frozen=True)
class Defence:
    """One defence and its settings (validated on construction).

    Attributes:
        name: one of :data:`DEFENCES`.
        lam: λ of the objective ``CE + (λ/2)·penalty`` (``jacobian``/``amsreg``/``attack_flat``;
            Table 2: 0.01 and 0.5 on Fashion-MNIST; ``attack_flat``: see
            :data:`fastland.attack_penalties.ATTACK_FLAT_LAM`).
        estimator: the penalty's estimator (see :func:`fastland.amsreg_loss`; for
            ``attack_flat`` used by ``variant="fgsm_amsreg"`` only).
        n_proj: random projections per sample for ``estimator="projection"``.
        eps: the L∞ radius of adversarial training (``at``; Table 2: 10/255; ``fgsm_rs`` and
            ``trades``: must be > 0), or the step of the attack-direction penalty
            (``attack_flat``, must be > 0; 10/255).
        alpha: the training attack's step; ``None`` means :func:`default_step_size`
            (``at``: ``2.5·eps/steps``, ``fgsm_rs``: ``1.25·eps``, ``trades``: ``eps/4``).
        steps: PGD iterations of adversarial training (``at``) and of TRADES' attack
            (``fgsm_rs`` always takes one step).
        variant: the attack-direction penalty, one of :data:`ATTACK_PENALTY_VARIANTS`
            (``attack_flat`` only; validated and ignored by the other defences).
        beta: TRADES' β ``≥ 0`` in ``CE + β·KL`` (``trades`` only; validated and ignored by
            the other defences).
    """

    name: str = "none"
    lam: float = 0.0
    estimator: str = "projection"
    n_proj: int = 1
    eps: float = 0.0
    alpha: Optional[float] = None
    steps: int = 10
    variant: str = "difference"
    beta: float = TRADES_BETA

    def __post_init__(self) -> None:
        _need(self.name in _ALL_DEFENCES, "defence", f"one of {_ALL_DEFENCES}", self.name)
        _need(isinstance(self.lam, (int, float)) and self.lam >= 0, "lam", "a number >= 0", self.lam)
        _need(isinstance(self.n_proj, int) and self.n_proj >= 1, "n_proj", "an integer >= 1", self.n_proj)
        _need(isinstance(self.eps, (int, float)) and self.eps >= 0, "eps", "a number >= 0", self.eps)
        _need(self.alpha is None or self.alpha >= 0, "alpha", "a number >= 0 or None", self.alpha)
        _need(isinstance(self.steps, int) and self.steps >= 1, "steps", "an integer >= 1", self.steps)
        _need(self.variant in ATTACK_PENALTY_VARIANTS, "variant", f"one of {ATTACK_PENALTY_VARIANTS}", self.variant)
        _need(isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and math.isfinite(self.beta)
              and self.beta >= 0, "beta", "a finite number >= 0", self.beta)
        if self.name in ("attack_flat", "fgsm_rs", "trades"):
            _need(self.eps > 0, "eps", f"a number > 0 for the {self.name!r} defence (e.g. 10/255)", self.eps)
        allowed = _DEFENCE_ESTIMATORS.get(self.name, _DEFENCE_ESTIMATORS["amsreg"])
        _need(self.estimator in allowed, "estimator", f"one of {allowed} for the {self.name!r} defence",
              self.estimator)

    @property
    def step_size(self) -> float:
        """The training attack's step ``alpha`` (:func:`default_step_size` unless given)."""
        return default_step_size(self.name, self.eps, self.steps) if self.alpha is None else float(self.alpha)


def _penalty(name: str) -> Any:
    from . import penalties

    return penalties.amsreg_loss if name == "amsreg" else penalties.jacobian_loss


def defence_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    defence: Defence,
    *,
    generator: Optional[torch.Generator] = None,
    attack_model: Optional[nn.Module] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The training objective of ``defence`` on one mini-batch.

    Args:
        model: in train mode; maps ``[B, *S]`` to logits ``[B, C]``.
        x: ``[B, *S]`` inputs in [0, 1]; y: ``[B]`` int64 labels.
        defence: a :class:`Defence`.
        generator: on ``x``'s device, for the penalty's projections and the
            attacks' random starts (reproducible runs).
        attack_model: the module the training attack (PGD, FGSM, TRADES' KL ascent, the
            attack direction of ``attack_flat``) runs on (default ``model``; under DDP
            the unwrapped module, so that the attack's passes bypass DDP).
    Returns:
        ``(loss, ce, penalty, logits)``: the scalar objective, the scalar mean
        cross-entropy, the scalar mean penalty (0 for ``none``/``at``/``fgsm_rs``;
        TRADES' unscaled KL term for ``trades``) and the logits ``[B, C]`` the
        cross-entropy was computed on (those of ``x'`` for ``at``/``fgsm_rs``, of ``x``
        for ``trades``).
    """
    if not isinstance(defence, Defence):
        raise TypeError(f"defence: expected a fastland.Defence, got {type(defence).__name__}")
    d = defence.name
    if not (d == "attack_flat" and y is None):  # that case gets its own message below
        _check_batch(model, x, y)
    if d == "attack_flat":
        return _attack_flat_loss(model, x, y, defence, generator, attack_model)
    if d == "trades":
        return _trades_loss(model, x, y, defence, generator, attack_model)
    if d in ("at", "fgsm_rs"):
        from .attacks import pgd

        # fgsm_rs is PGD-1 with a uniform start: x0 = Π(x + U(−ε, ε)) = clip(x + δ0, 0, 1), one step
        steps = 1 if d == "fgsm_rs" else defence.steps
        x = pgd(attack_model if attack_model is not None else model, x, y, defence.eps,
                alpha=defence.step_size, steps=steps, random_start=True, generator=generator)
    if d in ("jacobian", "amsreg"):
        x = x.detach().clone().requires_grad_(True)
        logits = _checked_logits(model(x), x, y)
        ce = F.cross_entropy(logits, y)
        kwargs: Dict[str, Any] = dict(n_proj=defence.n_proj, estimator=defence.estimator, generator=generator)
        if defence.estimator == "finite_difference":
            kwargs["model"] = model
        penalty = _penalty(d)(logits, x, **kwargs)
        return ce + defence.lam / 2 * penalty, ce, penalty, logits
    logits = _checked_logits(model(x), x, y)
    ce = F.cross_entropy(logits, y)
    return ce, ce, ce.new_zeros(()), logits


def _check_batch(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Shapes and dtypes of one mini-batch (no device synchronisation)."""
    check_tensor("x", x, min_ndim=2, nonempty=True)
    if not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise TypeError(f"y: expected integer class indices of shape [{x.shape[0]}], got {got}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected shape [{x.shape[0]}] (one label per row of x), got {tuple(y.shape)}")
    check_model_dtype(model, x)


def _checked_logits(out: object, x: Tensor, y: Tensor) -> Tensor:
    """``out = model(x)`` is logits ``[B, C]``; ``x`` is finite and ``y`` in ``[0, C)``.

    One host synchronisation on the CPU (the loop syncs on the loss anyway); on CUDA
    asynchronous asserts, so the step is not stalled.
    """
    logits = check_logits(out, x)
    n_classes = logits.shape[1]
    finite, lo_ok, hi_ok = torch.isfinite(x).all(), (y >= 0).all(), (y < n_classes).all()
    if x.device.type == "cuda":
        for ok, what in ((finite, "x: contains NaN or inf"), (lo_ok & hi_ok, f"y: expected labels in [0, {n_classes})")):
            torch._assert_async(ok, what)
        return logits
    ok = torch.stack([finite, lo_ok, hi_ok]).tolist()
    if not ok[0]:
        raise ValueError("x: contains NaN or inf")
    if not (ok[1] and ok[2]):
        raise ValueError(f"y: expected class indices in [0, {n_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return logits


def _attack_flat_loss(model: nn.Module, x: Tensor, y: Tensor, defence: Defence,
                      generator: Optional[torch.Generator], attack_model: Optional[nn.Module]
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``CE(f(x), y) + (λ/2)·attack_flatness_loss`` (the clean forward is shared with ``"difference"``)."""
    from .attack_penalties import attack_flatness_loss

    if y is None:
        raise ValueError("y: the 'attack_flat' defence needs labels (its direction is sign(∇x CE)); "
                         "pass y=[B] integer labels")
    logits = _checked_logits(model(x), x, y)
    ce = F.cross_entropy(logits, y)
    penalty = attack_flatness_loss(model, x, y, eps=defence.eps, variant=defence.variant, logits=logits,
                                   estimator=defence.estimator, n_proj=defence.n_proj, generator=generator,
                                   attack_model=attack_model)
    return ce + defence.lam / 2 * penalty, ce, penalty, logits


def trades_example(model: nn.Module, x: Tensor, eps: float, alpha: float, steps: int,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """TRADES' adversarial example: ``steps`` sign steps ascending ``KL(p(·|x) ‖ p(·|x'))``.

    ``x'₀ = x + 0.001·N(0, I)`` (drawn with ``generator``, on its device);
    ``x'ₜ₊₁ = Π(x'ₜ + alpha·sign(∇x' Σ_i KL_i))`` with ``Π`` the projection to the ε-ball
    around ``x`` and to ``[0, 1]``. ``model`` runs in eval mode (restored afterwards) and
    ``p(·|x)`` is fixed (computed once, detached).

    Args:
        model: ``[B, *S] -> [B, C]`` logits.
        x: ``[B, *S]`` clean inputs in ``[0, 1]``.
        eps, alpha: the L∞ radius and step (pixel units); steps: sign steps ``≥ 1``.
    Returns:
        ``x'`` ``[B, *S]``, detached, inside the ε-ball and ``[0, 1]``.
    """
    from ._checks import check_in_unit_box
    from .attacks.pgd import _project, attack_mode

    x = x.detach()
    if not check_in_unit_box("x", x):
        raise ValueError(f"x: expected values in [0, 1] (pixel space), got range "
                         f"[{x.min().item():.4g}, {x.max().item():.4g}]")
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    x_adv = x + _TRADES_START_STD * noise
    with attack_mode(model, "eval"), torch.enable_grad():
        with torch.no_grad():
            log_p = F.log_softmax(check_logits(model(x), x), dim=1)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            kl = _kl_sum(log_p, check_logits(model(x_adv), x_adv))
            (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = _project(x_adv.detach() + alpha * grad.sign(), x, eps)
    return x_adv.detach()


def _kl_sum(log_p: Tensor, logits_adv: Tensor) -> Tensor:
    """``Σ_i Σ_c p_ic (log p_ic − log q_ic)``, ``q = softmax(logits_adv)``; ``log_p``, logits ``[B, C]``."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), log_p, reduction="sum", log_target=True)


def _trades_loss(model: nn.Module, x: Tensor, y: Tensor, defence: Defence,
                 generator: Optional[torch.Generator], attack_model: Optional[nn.Module]
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``CE(f(x), y) + β·KL(p(·|x) ‖ p(·|x'))/B``, both terms differentiated through ``f(x)``."""
    attacker = attack_model if attack_model is not None else model
    x_adv = trades_example(attacker, x, defence.eps, defence.step_size, defence.steps, generator)
    logits = _checked_logits(model(x), x, y)
    ce = F.cross_entropy(logits, y)
    kl = _kl_sum(F.log_softmax(logits, dim=1), check_logits(model(x_adv), x_adv)) / x.shape[0]
    return ce + defence.beta * kl, ce, kl, logits


def train_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    defence: Defence,
    optimizer: torch.optim.Optimizer,
    *,
    generator: Optional[torch.Generator] = None,
    attack_model: Optional[nn.Module] = None,
    params: Optional[List[Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One optimiser step on :func:`defence_loss`: zero the gradients, backward, step.

    The backward pass accumulates into the parameters only
    (``loss.backward(inputs=params)``): the Jacobian and AMSReg objectives
    differentiate with respect to a copy of ``x``, whose gradient nobody needs.

    Args:
        model: in train mode (or its DDP wrapper); ``[B, *S]`` to logits ``[B, C]``.
        x: ``[B, *S]`` inputs in [0, 1]; y: ``[B]`` int64 labels.
        defence: a :class:`Defence`.
        optimizer: over ``model``'s parameters.
        generator, attack_model: see :func:`defence_loss`.
        params: the tensors to differentiate (default: ``model``'s parameters
            that require grad; pass the list once per epoch to save rebuilding it).
    Returns:
        ``(loss, ce, penalty, logits)`` as :func:`defence_loss` returns them.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    loss, ce, penalty, logits = defence_loss(model, x, y, defence, generator=generator,
                                             attack_model=attack_model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=params)
    optimizer.step()
    return loss, ce, penalty, logits
