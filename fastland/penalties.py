"""Drop-in penalties: AMSReg's ``‖diag(p)·J‖²_F`` and Jacobian regularisation's ``‖J‖²_F``.

The math is DESIGN §1 (``J = ∂f(x)/∂x`` per sample, ``p = softmax(f(x))``)::

    x.requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y) + lam / 2 * fastland.amsreg_loss(logits, x)
    loss.backward()

Estimators of the per-sample penalty (the losses return the batch mean):

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
  backward (e.g. ``once_differentiable`` custom Functions).

Every estimator but ``finite_difference`` needs ``P`` vector-Jacobian products
with ``create_graph=True``. They run either as one batched backward
(``autograd.grad(..., is_grads_batched=True)``, i.e. vmap over the backward) or
as a Python loop. The choice is per device (``batched=None``): batched on CUDA,
where it replaces ``P`` backward launch sequences by one; a loop on CPU, where
the FLOPs are equal and the batched backward was measured slower (see
``benchmarks/notes/penalties.md``). A model whose ops have no batching rule
falls back to the loop with one warning.

Under ``torch.autocast`` (bfloat16/float16 logits) the cotangents, squared norms
and the result are float32.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from . import ops
from ._checks import check_same_device, check_tensor
from .reference import unit_sphere_noise

__all__ = ["amsreg_loss", "jacobian_loss", "AMSReg", "JacobianReg", "AMSREG_ESTIMATORS",
           "JACOBIAN_ESTIMATORS", "default_fd_step"]

AMSREG_ESTIMATORS = ("projection", "exact", "gradnorm", "finite_difference")
JACOBIAN_ESTIMATORS = ("projection", "exact")
REDUCTIONS = ("mean", "sum", "none")

# Default finite-difference step h (L2 length in input units) per logits dtype:
# large enough that rounding in log p(x + h·u) − log p(x) (about eps·|log p| / h)
# stays small against ‖∇x log p‖, small against the scale on which the input
# score changes for inputs in [0, 1] (an L2 step of 1e-2 moves a 28×28 image by
# 3.6e-4 per pixel in RMS).
_FD_STEPS = {torch.float64: 1e-4, torch.float32: 1e-2, torch.bfloat16: 1e-1, torch.float16: 1e-1}

_warned: Set[str] = set()


def default_fd_step(dtype: torch.dtype) -> float:
    """The default ``h`` of ``estimator="finite_difference"`` for logits of ``dtype``:
    ``1e-4`` (float64), ``1e-2`` (float32), ``1e-1`` (bfloat16/float16)."""
    return _FD_STEPS.get(dtype, 1e-2)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- argument checks


def _check_args(
    logits: Tensor, inputs: Tensor, *, estimator: str, estimators: Tuple[str, ...],
    n_proj: int, reduction: str, generator: Optional[torch.Generator],
) -> None:
    """Raise a clear error for any bad argument of the penalties."""
    check_tensor("logits", logits, ndim=2)
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits: expected a non-empty [B, C] tensor, got shape {tuple(logits.shape)}")
    check_tensor("inputs", inputs, min_ndim=1)
    if estimator not in estimators:
        raise ValueError(f"estimator: expected one of {estimators}, got {estimator!r}")
    if isinstance(n_proj, bool) or not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj: expected an integer >= 1, got {n_proj!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if inputs.shape[0] != logits.shape[0]:
        raise ValueError(
            f"inputs: expected batch size {logits.shape[0]} (that of logits), got shape {tuple(inputs.shape)}"
        )
    check_same_device(("logits", "inputs"), (logits, inputs))
    if not inputs.requires_grad:
        raise ValueError(
            "inputs: expected a tensor that requires grad and from which logits were computed, "
            "got one with requires_grad=False; call inputs.requires_grad_(True) before the forward pass"
        )
    if not logits.requires_grad:
        raise ValueError(
            "logits: expected a tensor computed from inputs (requires grad), got one with "
            "requires_grad=False; compute logits = model(inputs) with grad enabled"
        )
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        gdev, ldev = generator.device, logits.device
        if gdev.type != ldev.type or (gdev.index is not None and ldev.index is not None and gdev.index != ldev.index):
            raise ValueError(
                f"generator: expected a torch.Generator on {logits.device} (the device of logits), "
                f"got one on {generator.device}"
            )


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """``[B] -> []`` (mean, sum) or ``[B]`` (none)."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _accumulation_dtype(logits: Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 otherwise (float32 accumulation under autocast)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    """Our own small ops (softmax, norms) run in the accumulation dtype, not autocast's."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


# --------------------------------------------------------------------------- VJPs


def _no_dependency_error() -> ValueError:
    return ValueError(
        "inputs: expected a tensor in the graph of logits, but logits do not depend on inputs; "
        "pass the very tensor that was fed to the model"
    )


def _vjp_sqnorms_loop(logits: Tensor, inputs: Tensor, cotangents: Tensor) -> Tensor:
    """``Σ_p ‖cotangents[p]ᵀ J‖²`` per sample, one double-backward VJP at a time.

    Args:
        logits: ``[B, C]`` (accumulation dtype), in the graph of ``inputs``.
        inputs: ``[B, *S]``.
        cotangents: ``[P, B, C]``, may require grad (the gradient flows through them).
    Returns:
        ``[B]`` in the dtype of ``cotangents``.
    """
    total: Optional[Tensor] = None
    for k in range(cotangents.shape[0]):
        (g,) = torch.autograd.grad(
            logits, inputs, grad_outputs=cotangents[k], create_graph=True, retain_graph=True,
            allow_unused=True,
        )
        if g is None:
            raise _no_dependency_error()
        sq = g.reshape(g.shape[0], -1).to(cotangents.dtype).pow(2).sum(dim=1)
        total = sq if total is None else total + sq
    assert total is not None
    return total


def _vjp_sqnorms_batched(logits: Tensor, inputs: Tensor, cotangents: Tensor) -> Tensor:
    """Same as :func:`_vjp_sqnorms_loop` in one vmapped backward (``is_grads_batched``).

    Args/Returns: as :func:`_vjp_sqnorms_loop`; ``[P, B, C] -> [B]``.
    """
    (g,) = torch.autograd.grad(
        logits, inputs, grad_outputs=cotangents, create_graph=True, retain_graph=True,
        allow_unused=True, is_grads_batched=True,
    )
    if g is None:
        raise _no_dependency_error()
    P, B = cotangents.shape[0], cotangents.shape[1]
    return g.reshape(P, B, -1).to(cotangents.dtype).pow(2).sum(dim=2).sum(dim=0)


def _use_batched(device: torch.device, batched: Optional[bool]) -> bool:
    """Per-device default: batched on CUDA, loop elsewhere (measured slower on CPU)."""
    if batched is not None:
        return bool(batched)
    return device.type == "cuda"


def _vjp_sqnorms(
    logits: Tensor, inputs: Tensor, cotangents: Tensor, *, batched: Optional[bool] = None
) -> Tensor:
    """``Σ_p ‖cotangents[p]ᵀ J‖²`` per sample, differentiable (double backward).

    Args:
        logits: ``[B, C]`` computed from ``inputs``.
        inputs: ``[B, *S]``, requires grad.
        cotangents: ``[P, B, C]`` in ``logits``' dtype.
        batched: one vmapped backward (True), a loop of ``P`` backwards (False) or
            the per-device default (None: batched on CUDA only). When the
            batched backward fails (an op without a batching rule), falls back
            to the loop with one warning.
    Returns:
        ``[B]``.
    """
    if cotangents.shape[0] > 1 and _use_batched(inputs.device, batched):
        try:
            return _vjp_sqnorms_batched(logits, inputs, cotangents)
        except RuntimeError as err:  # no batching rule for some op of the model
            _warn_once(
                "fastland penalties: the batched backward (is_grads_batched) failed for this model "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "falling back to a loop over projections"
            )
    return _vjp_sqnorms_loop(logits, inputs, cotangents)


# --------------------------------------------------------------------------- estimators


def _one_hot_noise(logits: Tensor) -> Tensor:
    """``[C, B, C]`` one-hot rows: ``noise[c, b] = e_c`` (unit norm, so projections = one-hots)."""
    B, C = logits.shape
    eye = torch.eye(C, device=logits.device, dtype=logits.dtype)
    return eye.unsqueeze(1).expand(C, B, C).contiguous()


def _projection_penalty(
    logits: Tensor, inputs: Tensor, weight: str, estimator: str, n_proj: int,
    generator: Optional[torch.Generator], batched: Optional[bool],
) -> Tensor:
    """Per-sample ``projection`` / ``exact`` estimate of ``‖diag(w) J‖²_F``: ``[B]``.

    Args:
        logits: ``[B, C]`` as produced by the model (any float dtype).
        weight: ``"softmax"`` (AMSReg, ``w = p``) or ``"uniform"`` (Jacobian, ``w = 1``).
    """
    B, C = logits.shape
    acc = _accumulation_dtype(logits)
    if estimator == "projection" and n_proj >= C:
        estimator = "exact"
    with _no_autocast(logits.device):
        z = logits.to(acc)
        if estimator == "exact":
            noise, scale = _one_hot_noise(z), 1.0
        else:
            noise, scale = unit_sphere_noise(n_proj, z, generator), C / n_proj
        cot, _ = ops.weighted_projection(z, noise, weight)
        return _vjp_sqnorms(z, inputs, cot, batched=batched) * scale


def _gradnorm_penalty(logits: Tensor, inputs: Tensor) -> Tensor:
    """Per-sample ``‖∇x log p(x)‖² = ‖pᵀ J‖²`` (one double-backward VJP): ``[B]``."""
    with _no_autocast(logits.device):
        z = logits.to(_accumulation_dtype(logits))
        p = torch.softmax(z, dim=-1)
        return _vjp_sqnorms_loop(z, inputs, p.unsqueeze(0))


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _running_stats_kept(model: nn.Module) -> Iterator[None]:
    """Let an extra forward pass in train mode update scratch copies of the
    BatchNorm running statistics, not the module's own.

    The finite-difference forward at ``x + h·u`` is not a training sample, so it
    must not move the running mean/var a second time per step. The buffers are
    swapped, not restored by copying: the first forward's graph saved them, and
    any in-place write would invalidate its backward.
    """
    swapped: List[Tuple[nn.Module, str, Tensor]] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            for name in _RUNNING_STATS:
                buf = getattr(m, name, None)
                if isinstance(buf, Tensor):
                    swapped.append((m, name, buf))
                    setattr(m, name, buf.detach().clone())
    try:
        yield
    finally:
        for m, name, buf in swapped:
            setattr(m, name, buf)


def _check_fd_model(model: Optional[nn.Module], h: float) -> None:
    if model is None:
        raise ValueError(
            "model: estimator='finite_difference' evaluates the model once more at x + h·u, "
            "so it needs model=<the module that computed logits>, got None"
        )
    if not callable(model):
        raise TypeError(f"model: expected a callable torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(h, (int, float)) and math.isfinite(h) and h > 0):
        raise ValueError(f"h: expected a finite step > 0, got {h!r}")
    if isinstance(model, nn.Module):
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise ValueError(
                    f"model: estimator='finite_difference' needs the same function at x and x + h·u, "
                    f"but {name or 'model'} is a {type(m).__name__} in train mode (a new random mask "
                    "per forward pass); use another estimator or switch dropout off"
                )


def _finite_difference_penalty(
    logits: Tensor, inputs: Tensor, model: nn.Module, h: float
) -> Tensor:
    """Per-sample ``((log p(x + h·u) − log p(x)) / h)²``, ``u = ∇x log p / ‖∇x log p‖``: ``[B]``.

    One first-order VJP (detached direction ``u``), one more forward pass; the
    result is differentiable by an ordinary backward through both forward passes.
    """
    acc = _accumulation_dtype(logits)
    with _no_autocast(logits.device):
        lse0 = torch.logsumexp(logits.to(acc), dim=-1)  # [B]
        (g,) = torch.autograd.grad(lse0.sum(), inputs, retain_graph=True, allow_unused=True)
    if g is None:
        raise _no_dependency_error()
    with torch.no_grad():
        g_flat = g.reshape(g.shape[0], -1).to(acc)
        norm = g_flat.norm(dim=1).clamp_min(torch.finfo(acc).tiny)
        u = (g_flat / norm.unsqueeze(1)).reshape(g.shape).to(inputs.dtype)  # [B, *S], unit rows
    with _running_stats_kept(model):
        logits_h = model(inputs + h * u)
    check_tensor("model(inputs + h·u)", logits_h, ndim=2)
    if logits_h.shape != logits.shape:
        raise ValueError(
            f"model: expected logits of shape {tuple(logits.shape)} (those given), got "
            f"{tuple(logits_h.shape)}; pass the model that computed logits"
        )
    with _no_autocast(logits.device):
        lse_h = torch.logsumexp(logits_h.to(acc), dim=-1)
        return ((lse_h - lse0) / h).pow(2)


# --------------------------------------------------------------------------- public API


def amsreg_loss(
    logits: Tensor,
    inputs: Tensor,
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

    Differentiable w.r.t. the model's parameters (and ``inputs``); add
    ``lam / 2 * amsreg_loss(logits, x)`` to the loss (DESIGN §1's convention).

    Args:
        logits: ``[B, C]``, ``model(inputs)``, with grad enabled; any float dtype
            (bfloat16 under autocast: the penalty is accumulated in float32).
        inputs: ``[B, *S]`` with ``requires_grad=True``, the tensor fed to the model.
        n_proj: projections ``P >= 1`` for ``"projection"``; ``P >= C`` uses ``"exact"``.
        estimator: ``"projection"`` (unbiased random projections, the paper's),
            ``"exact"`` (``C`` one-hot cotangents), ``"gradnorm"`` (``‖∇x log p‖²``,
            one VJP; a lower bound: ``gradnorm <= C·exact``) or
            ``"finite_difference"`` (no double backward; needs ``model``).
        generator: draws the projection noise (on the logits' device) reproducibly.
        model: the module that computed ``logits`` (``"finite_difference"`` only);
            dropout must be off; BatchNorm running statistics are left untouched
            by the extra forward pass.
        h: finite-difference step, an L2 length in input units; default
            :func:`default_fd_step` of the logits' dtype (1e-2 for float32).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per sample ``[B]``).
        batched: projections as one vmapped backward (True), a loop (False), or
            per device (None: batched on CUDA, loop on CPU).
    Returns:
        A scalar (``[B]`` for ``reduction="none"``), float32 (float64 for float64 logits).
    """
    _check_args(logits, inputs, estimator=estimator, estimators=AMSREG_ESTIMATORS,
                n_proj=n_proj, reduction=reduction, generator=generator)
    if estimator == "finite_difference":
        step = default_fd_step(logits.dtype) if h is None else h
        _check_fd_model(model, step)
        assert model is not None
        per_sample = _finite_difference_penalty(logits, inputs, model, float(step))
    elif estimator == "gradnorm":
        per_sample = _gradnorm_penalty(logits, inputs)
    else:
        per_sample = _projection_penalty(logits, inputs, "softmax", estimator, n_proj, generator, batched)
    return _reduce(per_sample, reduction)


def jacobian_loss(
    logits: Tensor,
    inputs: Tensor,
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

    Args:
        logits: ``[B, C]`` computed from ``inputs`` with grad enabled.
        inputs: ``[B, *S]`` with ``requires_grad=True``.
        n_proj, generator, reduction, batched: as in :func:`amsreg_loss`.
    Returns:
        A scalar (``[B]`` for ``reduction="none"``).
    """
    _check_args(logits, inputs, estimator=estimator, estimators=JACOBIAN_ESTIMATORS,
                n_proj=n_proj, reduction=reduction, generator=generator)
    per_sample = _projection_penalty(logits, inputs, "uniform", estimator, n_proj, generator, batched)
    return _reduce(per_sample, reduction)


class AMSReg(nn.Module):
    """AMSReg as a module: ``reg(x, logits)`` = :func:`amsreg_loss` ``(logits, x)``.

    Args:
        n_proj: projections per sample (``"projection"``).
        estimator: one of :data:`AMSREG_ESTIMATORS`.
        h: finite-difference step (``"finite_difference"``), default per dtype.
        batched: see :func:`amsreg_loss`.

    ``forward(x [B, *S], logits [B, C], *, model=None, generator=None) -> []``;
    ``model`` is needed for ``"finite_difference"`` only.
    """

    def __init__(self, n_proj: int = 1, estimator: str = "projection", *, h: Optional[float] = None,
                 batched: Optional[bool] = None) -> None:
        super().__init__()
        if estimator not in AMSREG_ESTIMATORS:
            raise ValueError(f"estimator: expected one of {AMSREG_ESTIMATORS}, got {estimator!r}")
        if isinstance(n_proj, bool) or not isinstance(n_proj, int) or n_proj < 1:
            raise ValueError(f"n_proj: expected an integer >= 1, got {n_proj!r}")
        self.n_proj, self.estimator, self.h, self.batched = n_proj, estimator, h, batched

    def forward(self, x: Tensor, logits: Tensor, *, model: Optional[nn.Module] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
        return amsreg_loss(logits, x, n_proj=self.n_proj, estimator=self.estimator,
                           generator=generator, model=model, h=self.h, batched=self.batched)

    def extra_repr(self) -> str:
        return f"n_proj={self.n_proj}, estimator={self.estimator!r}"


class JacobianReg(nn.Module):
    """Drop-in for Hoffman et al.'s ``JacobianReg``: ``reg(x, logits) = ½·‖J‖²_F`` averaged over the batch.

    With ``n`` random unit projections ``v`` per sample it returns
    ``½ · C · Σ_v ‖vᵀJ‖² / (n·B)``; ``n = -1`` uses the ``C`` one-hot
    vectors (exact), and so does any ``n >= C``.

    Args:
        n: projections per sample, or ``-1`` for exact.
        batched: see :func:`amsreg_loss`.

    ``forward(x [B, *S], logits [B, C], *, generator=None) -> []``.
    """

    def __init__(self, n: int = 1, *, batched: Optional[bool] = None) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or (n < 1 and n != -1):
            raise ValueError(f"n: expected an integer >= 1, or -1 for the exact penalty, got {n!r}")
        self.n, self.batched = n, batched

    def forward(self, x: Tensor, logits: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
        if self.n == -1:
            return 0.5 * jacobian_loss(logits, x, estimator="exact", batched=self.batched)
        return 0.5 * jacobian_loss(logits, x, n_proj=self.n, generator=generator, batched=self.batched)

    def extra_repr(self) -> str:
        return f"n={self.n}"
