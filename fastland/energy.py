"""The energy view of a classifier: log-likelihoods and input scores.

``log p(x) = logsumexp_c f(x)_c - log Z``; see :mod:`fastland.reference` for
the math. These are the user-facing entry points (``fastland.log_likelihood``
etc.).
"""
from __future__ import annotations

from .reference import ams_score, input_score, log_likelihood, relative_log_likelihood

__all__ = ["log_likelihood", "relative_log_likelihood", "input_score", "ams_score"]
