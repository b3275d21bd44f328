"""The energy view of a classifier: log-likelihoods and input scores.

``log p(x) = logsumexp_c f(x)_c - log Z``; see :mod:`fastland.reference` for
the math. These are the user-facing entry points (``fastland.log_likelihood``
etc.). :func:`ams_score` is the fast path used by :func:`fastland.flatness`:
one VJP per chunk of inputs, gradients w.r.t. the inputs only (no parameter
gradients are formed), chunks bounded by a memory budget.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._batching import resolve_batch_size
from ._checks import check_eval_mode, check_tensor
from .reference import input_score, log_likelihood, relative_log_likelihood

__all__ = ["log_likelihood", "relative_log_likelihood", "input_score", "ams_score"]


def ams_score_batch(model: nn.Module, x: Tensor) -> Tensor:
    """``s(x) = -‖∇x log p(x)‖₂`` for one batch that fits in memory (no checks).

    Args:
        model: in eval mode, ``[B, *S] -> [B, C]``.
        x: ``[B, *S]``.
    Returns:
        ``[B]``, detached.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        lse = torch.logsumexp(model(xg), dim=-1)
        (grad,) = torch.autograd.grad(lse.sum(), xg)
    return -grad.flatten(1).norm(dim=1)


def ams_score(
    model: nn.Module, x: Tensor, *, batch_size: Optional[Union[int, str]] = None
) -> Tensor:
    """Approximate Mass Score ``s(x) = -‖∇x log p(x)‖₂`` per sample (Eq. 5).

    Equal to :func:`fastland.reference.ams_score`; computed in chunks of
    ``batch_size`` inputs (``None``: all at once; ``"auto"``: a memory budget).

    Args:
        model: in eval mode; maps ``[B, *S]`` to ``[B, C]``.
        x: ``[B, *S]``.
        batch_size: inputs per VJP, ``"auto"`` or None.
    Returns:
        ``[B]``, detached; closer to 0 is flatter.
    """
    check_eval_mode("model", model)
    check_tensor("x", x, min_ndim=1, finite=True, nonempty=True)
    if batch_size is None:
        return ams_score_batch(model, x)
    step = resolve_batch_size(batch_size, model, x[:1], backward=True)
    return torch.cat([ams_score_batch(model, x[i : i + step]) for i in range(0, x.shape[0], step)])
