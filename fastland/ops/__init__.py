"""The fused ops of DESIGN §2.

PLACEHOLDER until the fused-ops issue lands: each op delegates to its
pure-PyTorch reference so that callers (penalties, landscapes) can be written
against the final API now. The fused-ops work replaces this file.
"""
from __future__ import annotations

from ..reference import grid_combine_ref as grid_combine
from ..reference import grid_relative_loglik_ref as grid_relative_loglik
from ..reference import weighted_projection_ref as weighted_projection

__all__ = ["weighted_projection", "grid_combine", "grid_relative_loglik"]
