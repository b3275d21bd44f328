"""The fused ops, each a ``torch.library`` operator ``fastland::<op>`` with autograd.

* :func:`weighted_projection` ``(logits [B, C], noise [P, B, C], weight) -> (cot [P, B, C], lse [B])``
* :func:`grid_combine` ``(base, u, v [N, *S], a, b [G]) -> [N, G, *S]`` (and its adjoint
  :func:`grid_combine_backward`)
* :func:`grid_relative_loglik` ``(logits [N, G, C], base_lse [N]) -> [N, G]``

The dispatcher picks each call's kernel from the tensors' device: the C++ kernels of
``fastland._C`` (csrc/) for CPU, Triton for CUDA, the pure-PyTorch references of
:mod:`fastland.reference_ops` elsewhere (and where those are missing). ``FASTLAND_BACKEND=
auto|triton|cpp|reference`` forces one; it is read at import and by :func:`refresh_backend`
(:func:`forced_backend` sets it for a block). :func:`backend_for` says which serves a tensor.
One file per op holds its math, Triton kernels and launch table; :mod:`._scaffold` wires them.
"""
from __future__ import annotations

from ._scaffold import (
    BACKENDS,
    TRITON_DTYPES,
    backend_for,
    backend_refusal,
    forced_backend,
    load_cpu_kernels,
    refresh_backend,
)
from .grid_combine import grid_combine, grid_combine_backward
from .grid_relative_loglik import grid_relative_loglik
from .weighted_projection import weighted_projection

__all__ = [
    "weighted_projection",
    "grid_combine",
    "grid_combine_backward",
    "grid_relative_loglik",
    "backend_for",
    "backend_refusal",
    "refresh_backend",
    "forced_backend",
    "BACKENDS",
    "TRITON_DTYPES",
]

load_cpu_kernels()  # after the schemas exist: the C++ kernels register under them
refresh_backend()
