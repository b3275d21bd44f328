"""Pure-PyTorch references: the executable spec of fastland.

Everything here is written to be obviously correct, not fast. The fused ops
(``fastland.ops``), the penalties, the landscapes and the flatness measure are
all tested against these functions. One module per subject, each importing
only the ones before it (no cycle); this module gathers their names:

* :mod:`fastland.reference_energy` — ``log p(x) = logsumexp_c f(x)_c`` (up to the
  constant ``log Z``), ``Δlog p(x') = logsumexp f(x') - logsumexp f(x)``, the input
  score ``∇x log p(x) = Jᵀ softmax(f(x))`` and the AMS score ``s(x) = -‖∇x log p(x)‖₂``;
* :mod:`fastland.reference_ops` — the fused ops, forward and backward;
* :mod:`fastland.reference_penalties` — ``‖J‖²_F = C · E_v ‖vᵀJ‖²`` with ``v`` uniform on
  the unit sphere ``S^{C-1}``, and AMSReg's ``‖diag(p) J‖²_F`` the same with cotangent ``v ⊙ p``;
* :mod:`fastland.reference_landscapes` — the directions, the landscape and the flatness
  ``φ(x) = (1/n) Σ_j Σ_{x' ∈ N_j(x)} s(x')`` over a grid ``x + a·d1 + b·d2``.

Shapes: ``B`` batch, ``C`` classes, ``P`` projections, ``N`` samples, ``G``
grid points, ``S`` the per-sample input shape (e.g. ``(1, 28, 28)``), ``D = prod(S)``.
"""
from __future__ import annotations

from . import reference_energy, reference_landscapes, reference_ops, reference_penalties
from .reference_energy import ams_score, input_score, log_likelihood, relative_log_likelihood
from .reference_landscapes import flatness_ref, landscape_ref, signed_orthogonal_directions
from .reference_ops import (
    WEIGHTS,
    grid_combine_backward_ref,
    grid_combine_ref,
    grid_relative_loglik_backward_ref,
    grid_relative_loglik_ref,
    weighted_projection_backward_ref,
    weighted_projection_ref,
)
from .reference_penalties import (
    PENALTY_ESTIMATORS,
    amsreg_penalty_ref,
    jacobian_penalty_ref,
    penalty_ref,
    unit_sphere_noise,
)

__all__ = [
    *reference_energy.__all__, *reference_ops.__all__, *reference_penalties.__all__, *reference_landscapes.__all__,
]
