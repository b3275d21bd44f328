"""The references of the energy view (docs/design.md §1): log-likelihoods, the input score, the AMS score.

``log p(x) = logsumexp_c f(x)_c`` (up to ``log Z``), ``Δlog p(x') = logsumexp f(x') - logsumexp f(x)``,
the input score ``∇x log p(x) = Jᵀ softmax(f(x))`` and the AMS score ``s(x) = -‖∇x log p(x)‖₂``.
The public functions of :mod:`fastland.energy` are these (or are held to them); re-exported by
:mod:`fastland.reference`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_eval_mode, check_tensor

__all__ = ["log_likelihood", "relative_log_likelihood", "input_score", "ams_score"]

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

