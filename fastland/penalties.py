"""Drop-in penalties: AMSReg's ``‖diag(p)·J‖²_F`` and Jacobian regularisation's ``‖J‖²_F``.

``J = ∂f(x)/∂x`` per sample (``[C, D]``), ``p = softmax(f(x))``. One vocabulary
throughout: arguments ``(logits, x)``, ``n_proj`` projections, ``estimator`` one
of :data:`ESTIMATORS`, ``generator`` for every random draw::

    x = fastland.penalty_input(x)        # x, detached, requiring grad for the penalty alone
    logits = model(x)
    loss = F.cross_entropy(logits, y) + lam / 2 * fastland.amsreg_loss(logits, x)
    loss.backward()

:func:`penalty_input` makes the copy whose gradient only the penalty computes: the
plain ``loss.backward()`` skips the input gradient nobody reads (on the CPU, the
first convolution's, the most expensive kernel of a small CNN's step) and leaves
``x.grad`` None. The older form, ``x.requires_grad_(True)`` on the caller's own
tensor, gives the same parameter gradients and also fills ``x.grad`` with
``∂loss/∂x`` as before, at the price of that input gradient.

The objective is the paper's (Eq. 20, in Hoffman et al.'s convention)
``mean CE + (λ/2)·penalty``, with the full penalty (batch mean) for both
functions and both modules. The paper's λ: Fashion-MNIST (Table 2) AMSReg 0.5,
Jacobian 0.01; CIFAR-10 (Table 1) AMSReg 1.0, Jacobian 0.05.

Estimators of the per-sample penalty:

* ``"projection"`` (default, the paper's): ``(C/P) Σ_p ‖(v_p ⊙ w)ᵀ J‖²``, ``v_p``
  uniform on ``S^{C-1}``, ``w = p`` (AMSReg) or ``1`` (Jacobian). Unbiased.
  ``n_proj >= C`` switches to ``"exact"``: ``C`` cotangents cost no more and
  carry no noise.
* ``"exact"``: ``Σ_c ‖(e_c ⊙ w)ᵀ J‖²`` with the ``C`` one-hot cotangents.
* ``"gradnorm"`` (AMSReg only): ``‖∇x log p(x)‖² = ‖pᵀ J‖²``, one VJP; Prop. 3.1
  bounds it by ``C·‖diag(p) J‖²_F``.
* ``"finite_difference"`` (AMSReg only): no double backpropagation at all. With
  ``u = ∇x log p / ‖∇x log p‖`` (detached; one first-order VJP),
  ``‖∇x log p‖² ≈ ((log p(x + h·u) − log p(x)) / h)²``, one more forward pass of
  ``model`` and an ordinary backward. Works through ops that have no double
  backward (``once_differentiable`` Functions, ``torch.compile``'d models).

Every estimator but ``finite_difference`` needs ``P`` vector-Jacobian products
with ``create_graph=True``: one batched backward (``is_grads_batched``) on CUDA,
a Python loop on CPU where batching was measured slower (``batched=None``; see
``benchmarks/notes/penalties.md``). A model whose ops have no batching rule falls
back to the loop with one warning. Logits of a ``torch.compile``'d model are
refused by these estimators up front (no double backward through compiled code).

Inputs and logits with NaN/inf are refused (a finite penalty of them would
mean nothing); on CUDA the check is asynchronous (``torch._assert_async``).

Under ``torch.autocast`` (bfloat16/float16 logits) the cotangents, squared norms
and the result are float32; ``finite_difference`` evaluates log p with autocast
off (see :func:`amsreg_loss`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _estimators as est
from ._checks import check_same_device, check_tensor
from ._conv_grad import mark_grad_on_request
from ._estimators import default_fd_step, fd_step_floor
from .choices import ESTIMATORS, JACOBIAN_ESTIMATORS, REDUCTIONS

__all__ = ["penalty_input", "amsreg_loss", "jacobian_loss", "AMSReg", "JacobianReg", "ESTIMATORS",
           "JACOBIAN_ESTIMATORS", "REDUCTIONS", "default_fd_step", "fd_step_floor"]

# Every estimator name (``amsreg_loss``/``AMSReg`` accept them all), those of ``jacobian_loss``/
# ``JacobianReg`` (``gradnorm`` and ``finite_difference`` are AMSReg quantities), and the reductions:
# defined once in fastland.choices.


# --------------------------------------------------------------------------- argument checks


def _check_n_proj(n_proj: object) -> None:
    if isinstance(n_proj, bool) or not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj: expected an integer >= 1 (estimator='exact' for the exact penalty), "
                         f"got {n_proj!r}")


def _check_choice(name: str, value: object, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_generator(generator: Optional[torch.Generator], device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    gdev = generator.device
    if gdev.type != device.type or (gdev.index is not None and device.index is not None and gdev.index != device.index):
        raise ValueError(
            f"generator: expected a torch.Generator on {device} (the device of logits), got one on {gdev}"
        )


def _check_args(
    logits: Tensor, x: Tensor, *, estimator: str, estimators: Tuple[str, ...],
    n_proj: int, reduction: str, generator: Optional[torch.Generator],
) -> None:
    """Raise a clear error for any bad argument of the penalties."""
    check_tensor("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected 2 dimensions [B, C], got shape {tuple(logits.shape)} "
                         "(the arguments are (logits, x))")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits: expected a non-empty [B, C] tensor, got shape {tuple(logits.shape)}")
    check_tensor("x", x, min_ndim=1)
    _check_choice("estimator", estimator, estimators)
    _check_n_proj(n_proj)
    _check_choice("reduction", reduction, REDUCTIONS)
    if x.shape[0] != logits.shape[0]:
        raise ValueError(f"x: expected batch size {logits.shape[0]} (that of logits), got shape {tuple(x.shape)}")
    check_same_device(("logits", "x"), (logits, x))
    if not x.requires_grad:
        raise ValueError(
            "x: expected a tensor that requires grad and from which logits were computed, "
            "got one with requires_grad=False; feed the model x = fastland.penalty_input(x)"
        )
    if not logits.requires_grad:
        raise ValueError(
            "logits: expected a tensor computed from x (requires grad), got one with "
            "requires_grad=False; compute logits = model(x) with grad enabled"
        )
    _check_generator(generator, logits.device)
    est.check_finite("x", x)
    est.check_finite("logits", logits)
    if estimator != "finite_difference":
        est.check_not_compiled(logits, estimator)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """``[B] -> []`` (mean, sum) or ``[B]`` (none)."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


# --------------------------------------------------------------------------- functions


def penalty_input(x: Tensor) -> Tensor:
    """The input to feed the model when a penalty differentiates with respect to it:
    ``x`` detached, as a leaf that requires grad and whose gradient only the penalties
    compute.

    A later ``loss.backward()`` leaves its ``.grad`` None, and the fast first
    convolutions (:mod:`fastland.fast_conv`, on by default in fastland's models)
    skip the input gradient it would have received: the parameter gradients are
    those of ``x.requires_grad_(True)`` on the caller's tensor, the step is cheaper.
    Its gradient is the penalties' alone: ``torch.autograd.grad(loss, x)`` of
    your own finds ``x`` unused behind a fast convolution (for an input gradient
    of your own, call ``x.requires_grad_(True)`` on your tensor instead).

    Args:
        x: ``[B, *S]`` floating point (the penalties check it is finite); any device. Shares ``x``'s storage
            (no copy); a graph ``x`` belongs to is cut.
    Returns:
        ``[B, *S]``, a new leaf with ``requires_grad=True``.
    """
    check_tensor("x", x, min_ndim=1)
    return mark_grad_on_request(x.detach().requires_grad_(True))


def amsreg_loss(
    logits: Tensor,
    x: Tensor,
    *,
    n_proj: int = 1,
    estimator: str = "projection",
    generator: Optional[torch.Generator] = None,
    model: Optional[nn.Module] = None,
    h: Optional[float] = None,
    reduction: str = "mean",
    batched: Optional[bool] = None,
) -> Tensor:
    """AMSReg penalty ``‖diag(softmax z)·J‖²_F`` (Eq. 24), averaged over the batch.

    Differentiable w.r.t. the model's parameters (and ``x``); the objective is
    ``cross_entropy + lam / 2 * amsreg_loss(logits, x)`` (the paper's λ = 0.5
    on Fashion-MNIST, 1.0 on CIFAR-10).

    Args:
        logits: ``[B, C]``, ``model(x)``, with grad enabled, finite; any float dtype
            (bfloat16 under autocast: the penalty is accumulated in float32).
        x: ``[B, *S]``, finite, the tensor fed to the model: ``penalty_input(x)``, or the
            caller's own tensor with ``requires_grad=True`` (whose ``x.grad`` a plain
            ``loss.backward()`` then also fills, at the cost of one more input gradient).
        n_proj: projections ``P >= 1`` for ``"projection"``; ``P >= C`` uses ``"exact"``.
        estimator: one of :data:`ESTIMATORS`: ``"projection"`` (unbiased random
            projections, the paper's), ``"exact"`` (``C`` one-hot cotangents),
            ``"gradnorm"`` (``‖∇x log p‖²``, one VJP; ``gradnorm <= C·exact``) or
            ``"finite_difference"`` (no double backward; needs ``model``).
        generator: draws the projection noise (on the logits' device) reproducibly.
        model: the module that computed ``logits`` (``"finite_difference"`` only);
            dropout must be off; BatchNorm running statistics are left untouched
            by the extra forward passes. A cheap check refuses a model whose
            finite difference is off from ``‖∇x log p‖`` by more than its size
            (not the model of ``logits``, or ``h`` far too large).
        h: finite-difference step, an L2 length in input units, at least
            :func:`fd_step_floor` of the evaluation dtype; default
            :func:`default_fd_step` (1e-2 for float32). Half-precision logits of
            a float32 ``x`` (autocast) are evaluated in float32, autocast off:
            one forward more, and the float32 step and accuracy.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per sample ``[B]``).
        batched: projections as one vmapped backward (True), a loop (False), or
            per device (None: batched on CUDA, loop on CPU).
    Returns:
        A scalar (``[B]`` for ``reduction="none"``), float32 (float64 for float64 logits).
    """
    _check_args(logits, x, estimator=estimator, estimators=ESTIMATORS,
                n_proj=n_proj, reduction=reduction, generator=generator)
    if estimator == "finite_difference":
        est.check_fd_model(model)
        assert model is not None
        per_sample = est.finite_difference_penalty(logits, x, model, h)
    elif estimator == "gradnorm":
        per_sample = est.gradnorm_penalty(logits, x)
    else:
        per_sample = est.projection_penalty(logits, x, "softmax", estimator, n_proj, generator, batched)
    return _reduce(per_sample, reduction)


def jacobian_loss(
    logits: Tensor,
    x: Tensor,
    *,
    n_proj: int = 1,
    estimator: str = "projection",
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
    batched: Optional[bool] = None,
) -> Tensor:
    """Jacobian penalty ``‖J‖²_F`` (Hoffman et al. 2019), averaged over the batch.

    ``"projection"``: ``(C/P) Σ_p ‖v_pᵀ J‖²``, ``v_p`` uniform on ``S^{C-1}``
    (unbiased; ``P >= C`` uses ``"exact"``); ``"exact"``: ``Σ_c ‖e_cᵀ J‖²``.
    The objective is ``cross_entropy + lam / 2 * jacobian_loss(logits, x)``
    (the paper's λ = 0.01 on Fashion-MNIST, 0.05 on CIFAR-10).

    Args:
        logits: ``[B, C]`` computed from ``x`` with grad enabled, finite.
        x: ``[B, *S]``, finite: ``penalty_input(x)`` or a tensor with ``requires_grad=True``
            (as in :func:`amsreg_loss`).
        n_proj, generator, reduction, batched: as in :func:`amsreg_loss`.
        estimator: one of :data:`JACOBIAN_ESTIMATORS`.
    Returns:
        A scalar (``[B]`` for ``reduction="none"``).
    """
    _check_args(logits, x, estimator=estimator, estimators=JACOBIAN_ESTIMATORS,
                n_proj=n_proj, reduction=reduction, generator=generator)
    per_sample = est.projection_penalty(logits, x, "uniform", estimator, n_proj, generator, batched)
    return _reduce(per_sample, reduction)


# --------------------------------------------------------------------------- modules


class AMSReg(nn.Module):
    """AMSReg as a module: ``AMSReg(...)(logits, x)`` is :func:`amsreg_loss` ``(logits, x, ...)``,
    the full penalty ``‖diag(p) J‖²_F`` (batch mean).

    Objective: ``loss = cross_entropy(logits, y) + lam / 2 * reg(logits, x)``, the
    paper's Table 2 (Fashion-MNIST) ``lam = 0.5`` (Table 1, CIFAR-10: 1.0).

    Args:
        n_proj: projections per sample (``"projection"``).
        estimator: one of :data:`ESTIMATORS`.
        h: finite-difference step (``"finite_difference"``), default per dtype.
        reduction, batched: see :func:`amsreg_loss`.

    ``forward(logits [B, C], x [B, *S], *, model=None, generator=None) -> []``
    (``[B]`` for ``reduction="none"``); ``model`` is for ``"finite_difference"`` only.
    """

    def __init__(self, n_proj: int = 1, estimator: str = "projection", *, h: Optional[float] = None,
                 reduction: str = "mean", batched: Optional[bool] = None) -> None:
        super().__init__()
        _check_choice("estimator", estimator, ESTIMATORS)
        _check_n_proj(n_proj)
        _check_choice("reduction", reduction, REDUCTIONS)
        self.n_proj, self.estimator, self.h, self.reduction, self.batched = n_proj, estimator, h, reduction, batched

    def forward(self, logits: Tensor, x: Tensor, *, model: Optional[nn.Module] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
        return amsreg_loss(logits, x, n_proj=self.n_proj, estimator=self.estimator, generator=generator,
                           model=model, h=self.h, reduction=self.reduction, batched=self.batched)

    def extra_repr(self) -> str:
        return f"n_proj={self.n_proj}, estimator={self.estimator!r}"


class JacobianReg(nn.Module):
    """Jacobian regularisation as a module: ``JacobianReg(...)(logits, x)`` is
    :func:`jacobian_loss` ``(logits, x, ...)``, the full penalty ``‖J‖²_F`` (batch mean).

    Objective: ``loss = cross_entropy(logits, y) + lam / 2 * reg(logits, x)``, the
    paper's Table 2 (Fashion-MNIST) ``lam = 0.01`` (Table 1, CIFAR-10: 0.05).

    Hoffman et al.'s ``JacobianReg(n=n_proj)(x, y)`` returns half of this value
    (``½·‖J‖²_F``) and is added as ``lam * R``: the same objective. Their value is
    ``0.5 * JacobianReg(n_proj)(logits, x)``; their ``n=-1`` is ``estimator="exact"``.

    Args:
        n_proj: projections per sample (``"projection"``); ``n_proj >= C`` is exact.
        estimator: one of :data:`JACOBIAN_ESTIMATORS`.
        reduction, batched: see :func:`amsreg_loss`.

    ``forward(logits [B, C], x [B, *S], *, generator=None) -> []`` (``[B]`` for ``reduction="none"``).
    """

    def __init__(self, n_proj: int = 1, estimator: str = "projection", *, reduction: str = "mean",
                 batched: Optional[bool] = None) -> None:
        super().__init__()
        _check_choice("estimator", estimator, JACOBIAN_ESTIMATORS)
        _check_n_proj(n_proj)
        _check_choice("reduction", reduction, REDUCTIONS)
        self.n_proj, self.estimator, self.reduction, self.batched = n_proj, estimator, reduction, batched

    def forward(self, logits: Tensor, x: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
        return jacobian_loss(logits, x, n_proj=self.n_proj, estimator=self.estimator, generator=generator,
                             reduction=self.reduction, batched=self.batched)

    def extra_repr(self) -> str:
        return f"n_proj={self.n_proj}, estimator={self.estimator!r}"
