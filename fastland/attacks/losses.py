"""Per-sample attack losses on logits: cross-entropy, DLR, targeted DLR and the margin.

Every function maps logits ``z`` ``[B, C]`` and integer labels ``y`` ``[B]`` to
one value per sample ``[B]`` (no reduction), in ``z``'s dtype. APGD *ascends*
CE and the DLR losses; Square *descends* the margin.

With ``z_π1 ≥ z_π2 ≥ …`` the logits of one row sorted in decreasing order:

- ``ce_loss``: ``−log softmax(z)_y``.
- ``dlr_loss`` (Croce & Hein 2020, Eq. 5): ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12)``;
  invariant to shifting and (positively) rescaling the logits; positive iff the sample
  is misclassified. Needs ``C ≥ 3``.
- ``targeted_dlr_loss`` (Eq. 6): ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)`` for
  target classes ``t`` ``[B]``. Needs ``C ≥ 4``.
- ``margin_loss`` (Andriushchenko et al. 2020): ``z_y − max_{i≠y} z_i``; the sample is
  misclassified when it is negative (a tie at 0 depends on argmax's tie-breaking).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_tensor

__all__ = ["ce_loss", "dlr_loss", "targeted_dlr_loss", "margin_loss", "LOSSES"]

_DENOM_EPS = 1e-12


def _check_logits(z: Tensor, y: Tensor, min_classes: int, y_name: str = "y") -> None:
    check_tensor("logits", z, ndim=2)
    check_tensor(y_name, y, ndim=1, floating=False)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{y_name}: expected an integer dtype (class indices), got {y.dtype}")
    if y.shape[0] != z.shape[0]:
        raise ValueError(
            f"{y_name}: expected shape ({z.shape[0]},) (one per row of logits), got {tuple(y.shape)}"
        )
    if z.shape[1] < min_classes:
        raise ValueError(f"logits: expected at least {min_classes} classes, got shape {tuple(z.shape)}")


def _true_and_best_other(z: Tensor, y: Tensor) -> tuple:
    """``(z_y [B], max_{i≠y} z_i [B])``."""
    z_y = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf"))
    return z_y, others.amax(dim=1)


def ce_loss(z: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per sample: logits ``[B, C]``, labels ``[B]`` → ``[B]``."""
    _check_logits(z, y, 1)
    return F.cross_entropy(z, y, reduction="none")


def dlr_loss(z: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio: ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12)``.

    Args:
        z: logits ``[B, C]`` with ``C ≥ 3``.
        y: labels ``[B]``.
    Returns:
        ``[B]``.
    """
    _check_logits(z, y, 3)
    z_y, z_other = _true_and_best_other(z, y)
    top = z.topk(3, dim=1).values
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + _DENOM_EPS)


def targeted_dlr_loss(z: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR: ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)``.

    Args:
        z: logits ``[B, C]`` with ``C ≥ 4``.
        y: labels ``[B]``.
        target: target classes ``[B]`` (integer).
    Returns:
        ``[B]``; ascending it moves ``z_t`` above ``z_y``.
    """
    _check_logits(z, y, 4)
    _check_logits(z, target, 4, "target")
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, target[:, None]).squeeze(1)
    top = z.topk(4, dim=1).values
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DENOM_EPS)


def margin_loss(z: Tensor, y: Tensor) -> Tensor:
    """Margin ``z_y − max_{i≠y} z_i``: logits ``[B, C]`` (``C ≥ 2``), labels ``[B]`` → ``[B]``."""
    _check_logits(z, y, 2)
    z_y, z_other = _true_and_best_other(z, y)
    return z_y - z_other


# The untargeted losses APGD accepts by name.
LOSSES = {"ce": ce_loss, "dlr": dlr_loss}
