"""L∞ attacks on pixel-space inputs in ``[0, 1]``.

- :mod:`fastland.attacks.pgd`: FGSM and PGD (Madry et al.), the paper's attack.

Every attack takes ``(model, x, y, eps, ...)`` with ``x`` ``[B, *S]`` in ``[0, 1]``
and ``y`` ``[B]`` integer labels, returns ``x_adv`` of ``x``'s shape inside the
ε-ball and ``[0, 1]``, and differentiates with respect to the input only.
"""
from __future__ import annotations

from .pgd import MODES, attack_mode, fgsm, pgd

__all__ = ["MODES", "attack_mode", "fgsm", "pgd"]
