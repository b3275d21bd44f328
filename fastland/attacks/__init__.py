"""L∞ attacks on pixel-space inputs in ``[0, 1]``.

- :mod:`fastland.attacks.pgd`: FGSM and PGD (Madry et al.), the paper's attack.
- :mod:`fastland.attacks.apgd`: APGD (CE or DLR loss) and APGD-T (Croce & Hein 2020).
- :mod:`fastland.attacks.square`: the gradient-free Square attack (Andriushchenko et al. 2020).
- :mod:`fastland.attacks.worst_case`: the per-sample worst case over an ensemble of attacks,
  and plain-sentence warnings of gradient masking.
- :mod:`fastland.attacks.losses`: the per-sample losses (CE, DLR, targeted DLR, margin).

Every attack takes ``(model, x, y, eps, ...)`` with ``x`` ``[B, *S]`` in ``[0, 1]``
and ``y`` ``[B]`` integer labels, returns ``x_adv`` of ``x``'s shape inside the
ε-ball and ``[0, 1]``, and differentiates with respect to the input only.
"""
from __future__ import annotations

from .apgd import apgd, apgd_targeted
from .losses import ce_loss, dlr_loss, margin_loss, targeted_dlr_loss
from .pgd import MODES, attack_mode, fgsm, pgd
from .square import square
from .worst_case import ATTACKS, MISCLASSIFIED_CLEAN, SURVIVED, WorstCase, masking_flags, worst_case

__all__ = [
    "MODES",
    "attack_mode",
    "fgsm",
    "pgd",
    "apgd",
    "apgd_targeted",
    "square",
    "worst_case",
    "WorstCase",
    "masking_flags",
    "ATTACKS",
    "SURVIVED",
    "MISCLASSIFIED_CLEAN",
    "ce_loss",
    "dlr_loss",
    "targeted_dlr_loss",
    "margin_loss",
]
