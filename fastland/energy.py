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

from ._checks import check_model, check_model_dtype, check_tensor
from ._grid import ams_scores, eval_mode, plan
from .reference import input_score, log_likelihood, relative_log_likelihood

__all__ = ["log_likelihood", "relative_log_likelihood", "input_score", "ams_score"]


def ams_score(
    model: nn.Module, x: Tensor, *, batch_size: Optional[Union[int, str]] = None
) -> Tensor:
    """Approximate Mass Score ``s(x) = -‖∇x log p(x)‖₂`` per sample (Eq. 5).

    Equal to :func:`fastland.reference.ams_score`; computed in chunks of
    ``batch_size`` inputs (``None``: all at once; ``"auto"``: a memory budget).

    Args:
        model: maps ``[B, *S]`` to ``[B, C]``; evaluated in eval mode (its modes are restored).
        x: ``[B, *S]``.
        batch_size: inputs per VJP, ``"auto"`` or None.
    Returns:
        ``[B]``, detached; closer to 0 is flatter.
    """
    check_model(model)
    check_tensor("x", x, min_ndim=2, finite=True, nonempty=True)
    check_model_dtype(model, x)
    with eval_mode(model):
        if batch_size is None:
            step = x.shape[0]
        else:
            step = plan(model, x, batch_size=batch_size, fuse_first_layer=False, backward=True).per_call
        return torch.cat([ams_scores(model, x[i : i + step]) for i in range(0, x.shape[0], step)])
