"""Pure-PyTorch references: the executable spec of fastland.

Everything here is written to be obviously correct, not fast. The fused ops
(``fastland.ops``), the penalties, the landscapes and the flatness measure are
all tested against these functions. The math:

* ``log p(x) = logsumexp_c f(x)_c`` (up to the constant ``log Z``),
* ``Δlog p(x') = logsumexp f(x') - logsumexp f(x)``,
* input score ``∇x log p(x) = Jᵀ softmax(f(x))``, AMS score ``s(x) = -‖∇x log p(x)‖₂``,
* ``‖J‖²_F = C · E_v ‖vᵀJ‖²`` with ``v`` uniform on the unit sphere ``S^{C-1}``,
  and AMSReg's ``‖diag(p) J‖²_F`` the same with cotangent ``v ⊙ p``,
* flatness ``φ(x) = (1/n) Σ_j Σ_{x' ∈ N_j(x)} s(x')`` over a grid ``x + a·d1 + b·d2``.

Shapes: ``B`` batch, ``C`` classes, ``P`` projections, ``N`` samples, ``G``
grid points, ``S`` the per-sample input shape (e.g. ``(1, 28, 28)``), ``D = prod(S)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ._checks import check_eval_mode, check_tensor
from .choices import ESTIMATORS

__all__ = [
    "log_likelihood",
    "relative_log_likelihood",
    "input_score",
    "ams_score",
    "weighted_projection_ref",
    "weighted_projection_backward_ref",
    "grid_combine_ref",
    "grid_combine_backward_ref",
    "grid_relative_loglik_ref",
    "grid_relative_loglik_backward_ref",
    "unit_sphere_noise",
    "jacobian_penalty_ref",
    "amsreg_penalty_ref",
    "signed_orthogonal_directions",
    "landscape_ref",
    "flatness_ref",
    "PENALTY_ESTIMATORS",
]

# the estimators with a reference here: every one of fastland.choices.ESTIMATORS but the finite difference
PENALTY_ESTIMATORS = tuple(e for e in ESTIMATORS if e != "finite_difference")
WEIGHTS = ("softmax", "uniform")


# --------------------------------------------------------------------------- energy view


def log_likelihood(logits: Tensor) -> Tensor:
    """Unnormalised log-likelihood ``log p(x) + log Z = logsumexp_c z_c``.

    Args:
        logits: ``[B, C]`` floating point.
    Returns:
        ``[B]``, same dtype as ``logits``.
    """
    check_tensor("logits", logits, ndim=2, finite=True)
    return torch.logsumexp(logits, dim=-1)


def relative_log_likelihood(logits: Tensor, base_logits: Tensor) -> Tensor:
    """Relative log-likelihood ``Δlog p(x') = logsumexp f(x') - logsumexp f(x)``.

    (The paper's Eq. 3 drops the logs; this is the corrected form.) Each
    logsumexp is max-shifted, so logits of magnitude 1e4 give finite results.

    Args:
        logits: ``[B, C]``, the logits ``f(x')`` of perturbed inputs.
        base_logits: ``[B, C]``, the logits ``f(x)`` of the clean inputs.
    Returns:
        ``[B]``.
    """
    check_tensor("logits", logits, ndim=2, finite=True)
    check_tensor("base_logits", base_logits, ndim=2, finite=True)
    if logits.shape != base_logits.shape:
        raise ValueError(
            f"base_logits: expected shape {tuple(logits.shape)} (that of logits), "
            f"got {tuple(base_logits.shape)}"
        )
    return torch.logsumexp(logits, dim=-1) - torch.logsumexp(base_logits, dim=-1)


def input_score(model: nn.Module, x: Tensor, *, create_graph: bool = False) -> Tensor:
    """Input score ``∇x log p(x) = J(x)ᵀ softmax(f(x))``, one VJP per batch.

    The model must be in eval mode, so that each sample's score depends on
    that sample alone.

    Args:
        model: maps ``[B, *S]`` to logits ``[B, C]``.
        x: ``[B, *S]`` inputs (pixel space).
        create_graph: keep the graph of the score (for penalties on it).
    Returns:
        ``[B, *S]``, same dtype as ``x``.
    """
    check_eval_mode("model", model)
    check_tensor("x", x, min_ndim=1, finite=True, nonempty=True)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        check_tensor("model(x)", logits, ndim=2)
        (grad,) = torch.autograd.grad(
            torch.logsumexp(logits, dim=-1).sum(), xg, create_graph=create_graph
        )
    return grad


def ams_score(model: nn.Module, x: Tensor) -> Tensor:
    """Approximate Mass Score ``s(x) = -‖∇x log p(x)‖₂`` per sample (Eq. 5).

    Args:
        model: in eval mode; maps ``[B, *S]`` to ``[B, C]``.
        x: ``[B, *S]``.
    Returns:
        ``[B]``; closer to 0 is flatter.
    """
    return -input_score(model, x).flatten(1).norm(dim=1)


# --------------------------------------------------------------------------- fused-op references
#
# The spec of each fused op of fastland.ops, forward and backward, in plain PyTorch ops
# (differentiable, so autograd through them is the reference for every derivative). No
# argument checks: the public ops check their arguments before any backend runs.


def _normalised_noise(noise: Tensor) -> Tensor:
    """``v = noise / ‖noise‖`` per row, ``1`` when C = 1: ``[P, B, C]``."""
    if noise.shape[-1] == 1:
        return torch.ones_like(noise)
    return noise / noise.norm(dim=-1, keepdim=True)


def weighted_projection_ref(
    logits: Tensor, noise: Tensor, weight: str = "softmax"
) -> Tuple[Tensor, Tensor]:
    """Cotangents of the random-projection estimators, and ``logsumexp``.

    Per row: ``v = noise / ‖noise‖`` (``v = 1`` when ``C = 1``), cotangent
    ``v ⊙ softmax(z)`` (``weight="softmax"``, AMSReg) or ``v`` (``"uniform"``,
    Jacobian regularisation), and ``lse = logsumexp(z)``. Differentiable w.r.t.
    ``logits`` through both outputs (the softmax Jacobian), so a penalty's
    gradient flows through ``p``.

    Args:
        logits: ``[B, C]``.
        noise: ``[P, B, C]``, e.g. standard normal (any scale: rows are normalised);
            cast to the dtype of ``logits``.
        weight: ``"softmax"`` or ``"uniform"``.
    Returns:
        ``(cotangents [P, B, C], lse [B])`` in the dtype of ``logits``.
    """
    v = _normalised_noise(noise.to(logits.dtype))
    lse = torch.logsumexp(logits, dim=-1)
    cot = v * torch.softmax(logits, dim=-1) if weight == "softmax" else v
    return cot, lse


def weighted_projection_backward_ref(
    grad_cot: Tensor, grad_lse: Tensor, logits: Tensor, noise: Tensor, weight: str = "softmax"
) -> Tensor:
    """The gradient of :func:`weighted_projection_ref` w.r.t. ``logits`` (``noise`` is a constant).

    With ``s = softmax(z)``: softmax weight ``w = Σ_p ḡ_cot[p] ⊙ v_p``,
    ``ḡ_z = s ⊙ (ḡ_lse + w - ⟨w, s⟩)``; uniform weight ``ḡ_z = ḡ_lse · s``.

    Args:
        grad_cot: ``[P, B, C]``; grad_lse: ``[B]``; logits: ``[B, C]``; noise: ``[P, B, C]``.
    Returns:
        ``[B, C]``.
    """
    s = torch.softmax(logits, dim=-1)
    if weight != "softmax":
        return grad_lse.unsqueeze(-1) * s
    w = (grad_cot * _normalised_noise(noise)).sum(0)
    shift = grad_lse - (w * s).sum(-1)
    return s * (w + shift.unsqueeze(-1))


def grid_combine_ref(base: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Grid synthesis ``out[n, g] = base[n] + a[g]·u[n] + b[g]·v[n]``.

    Args:
        base, u, v: ``[N, *S]``, same shape.
        a, b: ``[G]`` grid coordinates along ``u`` and ``v`` (cast to the dtype of ``base``).
    Returns:
        ``[N, G, *S]``.
    """
    extra = (1,) * (base.dim() - 1)
    a = a.to(base.dtype).view(1, -1, *extra)
    b = b.to(base.dtype).view(1, -1, *extra)
    return base.unsqueeze(1) + a * u.unsqueeze(1) + b * v.unsqueeze(1)


def grid_combine_backward_ref(grad_out: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The adjoint of :func:`grid_combine_ref` in ``base, u, v``: ``Σ_g grad_out[:, g]·(1, a[g], b[g])``.

    (The gradients to ``a`` and ``b`` are the contractions ``Σ_{n,s} grad_out[n, g, s]·u[n, s]``
    and likewise with ``v``.)

    Args:
        grad_out: ``[N, G, *S]``; a, b: ``[G]``.
    Returns:
        three ``[N, *S]``.
    """
    flat = grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1)
    shape = (grad_out.shape[0], *grad_out.shape[2:])
    a, b = a.to(grad_out.dtype), b.to(grad_out.dtype)
    return (
        flat.sum(1).reshape(shape),
        torch.einsum("ngd,g->nd", flat, a).reshape(shape),
        torch.einsum("ngd,g->nd", flat, b).reshape(shape),
    )


def grid_relative_loglik_ref(logits: Tensor, base_lse: Tensor) -> Tensor:
    """``Δlog p`` at every grid point: ``logsumexp(logits[n, g]) - base_lse[n]``.

    Args:
        logits: ``[N, G, C]``.
        base_lse: ``[N]``, ``logsumexp`` of the clean inputs' logits.
    Returns:
        ``[N, G]``.
    """
    return torch.logsumexp(logits, dim=-1) - base_lse.to(logits.dtype).unsqueeze(1)


def grid_relative_loglik_backward_ref(grad_out: Tensor, logits: Tensor) -> Tensor:
    """The gradient of :func:`grid_relative_loglik_ref` w.r.t. ``logits``: ``grad_out[..., None] · softmax``.

    (The gradient to ``base_lse`` is ``-Σ_g grad_out[:, g]``.)

    Args:
        grad_out: ``[N, G]``; logits: ``[N, G, C]``.
    Returns:
        ``[N, G, C]``.
    """
    return grad_out.unsqueeze(-1) * torch.softmax(logits, dim=-1)


# --------------------------------------------------------------------------- penalties


def unit_sphere_noise(
    n_proj: int, logits: Tensor, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Standard normal noise ``[P, B, C]`` for the projection estimators.

    Drawn on the logits' device, in float32 for half-precision logits (else
    their dtype). Rows are normalised by :func:`weighted_projection_ref` to lie
    uniformly on ``S^{C-1}``.
    """
    dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.randn(
        (n_proj, *logits.shape), generator=generator, device=logits.device, dtype=dtype
    )


def _check_penalty_args(logits: Tensor, inputs: Tensor, estimator: str, n_proj: int) -> None:
    check_tensor("logits", logits, ndim=2, nonempty=True)
    check_tensor("inputs", inputs, min_ndim=1)
    if estimator not in PENALTY_ESTIMATORS:
        raise ValueError(f"estimator: expected one of {PENALTY_ESTIMATORS}, got {estimator!r}")
    if not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj: expected an integer >= 1, got {n_proj!r}")
    if not inputs.requires_grad:
        raise ValueError(
            "inputs: expected a tensor that requires grad and from which logits were computed; "
            "call inputs.requires_grad_(True) before the forward pass"
        )
    if inputs.shape[0] != logits.shape[0]:
        raise ValueError(
            f"inputs: expected batch size {logits.shape[0]} (that of logits), got shape {tuple(inputs.shape)}"
        )


def _vjp_sqnorm(logits: Tensor, inputs: Tensor, cotangent: Tensor) -> Tensor:
    """``‖cotangentᵀ J‖²`` per sample, differentiable (double backward): ``[B, C] -> [B]``."""
    (g,) = torch.autograd.grad(
        logits, inputs, grad_outputs=cotangent, create_graph=True, retain_graph=True,
        allow_unused=True,
    )
    if g is None:
        raise ValueError("inputs: logits do not depend on inputs (not in the graph of logits)")
    return g.flatten(1).pow(2).sum(1)


def _penalty_ref(
    logits: Tensor,
    inputs: Tensor,
    weight: str,
    estimator: str,
    n_proj: int,
    generator: Optional[torch.Generator],
) -> Tensor:
    _check_penalty_args(logits, inputs, estimator, n_proj)
    B, C = logits.shape
    p = torch.softmax(logits, dim=-1) if weight == "softmax" else torch.ones_like(logits)
    if estimator == "gradnorm":
        return _vjp_sqnorm(logits, inputs, p)
    if estimator == "exact":
        total = logits.new_zeros(B)
        for c in range(C):
            onehot = torch.zeros_like(logits)
            onehot[:, c] = 1
            total = total + _vjp_sqnorm(logits, inputs, onehot * p)
        return total
    noise = unit_sphere_noise(n_proj, logits, generator)
    cot, _ = weighted_projection_ref(logits, noise, weight)
    total = logits.new_zeros(B)
    for k in range(n_proj):
        total = total + _vjp_sqnorm(logits, inputs, cot[k])
    return total * (C / n_proj)


def jacobian_penalty_ref(
    logits: Tensor,
    inputs: Tensor,
    *,
    estimator: str = "projection",
    n_proj: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Per-sample ``‖J(x)‖²_F`` (Hoffman et al. 2019), differentiable w.r.t. parameters.

    ``projection``: ``(C/P) Σ_p ‖v_pᵀ J‖²``, ``v_p`` uniform on ``S^{C-1}``
    (unbiased); ``exact``: ``Σ_c ‖e_cᵀ J‖²``.

    Args:
        logits: ``[B, C]`` computed from ``inputs``.
        inputs: ``[B, *S]`` with ``requires_grad=True``.
    Returns:
        ``[B]``.
    """
    if estimator == "gradnorm":
        raise ValueError(
            "estimator: 'gradnorm' estimates ‖∇x log p‖², an AMSReg quantity; "
            "for ‖J‖²_F use 'projection' or 'exact'"
        )
    return _penalty_ref(logits, inputs, "uniform", estimator, n_proj, generator)


def amsreg_penalty_ref(
    logits: Tensor,
    inputs: Tensor,
    *,
    estimator: str = "projection",
    n_proj: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Per-sample AMSReg penalty ``‖diag(p) J(x)‖²_F``, ``p = softmax(f(x))`` (Eq. 24).

    ``projection``: ``(C/P) Σ_p ‖(v_p ⊙ p)ᵀ J‖²`` (unbiased); ``exact``:
    ``Σ_c p_c² ‖e_cᵀ J‖²``; ``gradnorm``: ``‖∇x log p(x)‖² = ‖pᵀ J‖²``, which
    Prop. 3.1 bounds by ``C ‖diag(p) J‖²_F``. The gradient flows through ``p``.

    Args:
        logits: ``[B, C]`` computed from ``inputs``.
        inputs: ``[B, *S]`` with ``requires_grad=True``.
    Returns:
        ``[B]``.
    """
    return _penalty_ref(logits, inputs, "softmax", estimator, n_proj, generator)


# the landscape and flatness references (Eqs. 4, 7) live beside this file
from .reference_landscapes import flatness_ref, landscape_ref, signed_orthogonal_directions  # noqa: E402
