"""Jacobian regularisation of Hoffman, Roberts and Yaida (2019), "Robust Learning with
Jacobian Regularization", written here from the paper's formula (no fastland code).

For logits ``z = f(x) ∈ R^C`` per sample and ``J = ∂z/∂x``, the Frobenius norm is

    ‖J‖²_F = C · E_v ‖vᵀ J‖²,   v uniform on the unit sphere S^{C−1},

since ``E[v vᵀ] = I / C``. The estimator draws ``n_proj`` such ``v`` per sample, gets
each ``vᵀ J`` from one backward pass with ``create_graph=True`` (double backward, so the
estimate is differentiable in the parameters) and returns

    (1/B) Σ_b (C / n_proj) Σ_p ‖v_{p,b}ᵀ J_b‖²,

unbiased for the batch mean of ``‖J_b‖²_F``. ``n_proj = -1`` takes the C one-hot vectors
instead and is exact. The paper's objective is ``CE + (λ_JR / 2)·‖J‖²_F``; its
``JacobianReg`` module returns ``½·‖J‖²_F`` and is added as ``λ_JR · R``, which is the
form peer users paste::

    x.requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y) + lam * JacobianReg(n=1)(x, logits)
    loss.backward()
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["unit_sphere_vectors", "jacobian_sq_norm", "JacobianReg"]


def unit_sphere_vectors(n_proj: int, batch: int, classes: int, *, dtype: torch.dtype = torch.float32,
                        device: Optional[torch.device] = None,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """``[n_proj, batch, classes]`` rows uniform on the unit sphere (normalised Gaussians)."""
    v = torch.randn(n_proj, batch, classes, dtype=dtype, device=device, generator=generator)
    return v / v.norm(dim=-1, keepdim=True)


def jacobian_sq_norm(x: Tensor, logits: Tensor, n_proj: int = 1,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Batch mean of ``‖J‖²_F``, ``J = ∂logits/∂x`` per sample: the random-projection estimate
    (``n_proj >= 1``, unbiased) or the exact value (``n_proj = -1``). Differentiable.

    Args:
        x: ``[B, *S]``, requires grad, the model's input.
        logits: ``[B, C]`` computed from ``x``.
    Returns:
        A scalar.
    """
    B, C = logits.shape
    if n_proj == -1:
        vs = torch.eye(C, dtype=logits.dtype, device=logits.device).unsqueeze(1).expand(C, B, C)
        scale = 1.0
    else:
        vs = unit_sphere_vectors(n_proj, B, C, dtype=logits.dtype, device=logits.device, generator=generator)
        scale = C / n_proj
    total = logits.new_zeros(())
    for v in vs:
        (vj,) = torch.autograd.grad(logits, x, grad_outputs=v, create_graph=True, retain_graph=True)
        total = total + vj.pow(2).sum()
    return scale * total / B


class JacobianReg(nn.Module):
    """The paper's regulariser as its users call it: ``JacobianReg(n)(x, logits)`` returns
    ``½·‖J‖²_F`` (batch mean, ``n`` projections, ``n = -1`` exact), added as ``λ_JR · R``."""

    def __init__(self, n: int = 1) -> None:
        super().__init__()
        if n != -1 and n < 1:
            raise ValueError(f"n: expected -1 (exact) or a number of projections >= 1, got {n}")
        self.n = n

    def forward(self, x: Tensor, logits: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return 0.5 * jacobian_sq_norm(x, logits, self.n, generator)
