"""The fused ops of DESIGN §2, each a ``torch.library`` custom op with autograd.

* :func:`weighted_projection` ``(logits [B, C], noise [P, B, C], weight) -> (cot [P, B, C], lse [B])``
* :func:`grid_combine` ``(base, u, v [N, *S], a, b [G]) -> [N, G, *S]``
* :func:`grid_relative_loglik` ``(logits [N, G, C], base_lse [N]) -> [N, G]``

Each has Triton kernels (CUDA tensors), C++ kernels (CPU tensors, csrc/cpu/) and
the pure-PyTorch reference; :func:`backend_for` says which serves a tensor
(``FASTLAND_BACKEND=auto|triton|cpp|reference``, read at every call). One file
per op holds its kernels, launchers, custom ops and registrations; shared
helpers live in :mod:`fastland.ops.utils`.
"""
from __future__ import annotations

from .grid_combine import grid_combine, grid_combine_backward
from .grid_relative_loglik import grid_relative_loglik
from .utils import BACKENDS, backend_for
from .weighted_projection import weighted_projection

__all__ = [
    "weighted_projection",
    "grid_combine",
    "grid_combine_backward",
    "grid_relative_loglik",
    "backend_for",
    "BACKENDS",
]
