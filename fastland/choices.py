"""Every list of choices of the library, defined once (no torch import: the CLI's ``--help`` reads them).

The modules that take these choices re-export them (``fastland.DEFENCES`` is
``fastland.choices.DEFENCES``); the CLI's ``choices=`` come from here too.
"""
from __future__ import annotations

from typing import Dict, Tuple

__all__ = ["DEFENCES", "PAPER_DEFENCES", "ATTACK_PENALTY_VARIANTS", "ATTACK_DIRECTIONS", "DEFENCE_ESTIMATORS",
           "ESTIMATORS", "JACOBIAN_ESTIMATORS", "REDUCTIONS", "BACKENDS", "MODELS",
           "DATASETS", "DIRECTION_KINDS", "FLATNESS_REDUCTIONS", "ATTACKS", "PERTURBATIONS", "EVAL_ATTACKS"]

# training defences (fastland.Defence): the paper's four, fastland's attack-direction flattening, then two
# baselines beyond the paper: fast adversarial training (FGSM with a random start) and TRADES
DEFENCES: Tuple[str, ...] = ("none", "at", "jacobian", "amsreg", "attack_flat", "fgsm_rs", "trades")
PAPER_DEFENCES: Tuple[str, ...] = DEFENCES[:4]
# variants of the attack-direction penalty (fastland.attack_flatness_loss, Defence("attack_flat", variant=...))
ATTACK_PENALTY_VARIANTS: Tuple[str, ...] = ("difference", "directional", "fgsm_amsreg", "margin", "kl")
# the line directions of fastland.attack_flatness (or a tensor)
ATTACK_DIRECTIONS: Tuple[str, ...] = ("fgsm", "pgd", "random")
# penalty estimators (fastland.amsreg_loss / jacobian_loss)
ESTIMATORS: Tuple[str, ...] = ("projection", "exact", "gradnorm", "finite_difference")
JACOBIAN_ESTIMATORS: Tuple[str, ...] = ESTIMATORS[:2]
DEFENCE_ESTIMATORS: Dict[str, Tuple[str, ...]] = {"jacobian": JACOBIAN_ESTIMATORS, "amsreg": ESTIMATORS}
# how a penalty is reduced over the batch
REDUCTIONS: Tuple[str, ...] = ("mean", "sum", "none")
# fused-op backends (FASTLAND_BACKEND)
BACKENDS: Tuple[str, ...] = ("auto", "triton", "cpp", "reference")
# architectures (fastland.models.create) and data sets (fastland.data.load_dataset; "synthetic" for tests)
MODELS: Tuple[str, ...] = ("lenet", "ddnet", "resnet18")
DATASETS: Tuple[str, ...] = ("fmnist", "cifar10", "synthetic")
# neighbourhood directions (fastland.directions / landscape / flatness)
DIRECTION_KINDS: Tuple[str, ...] = ("rademacher", "gaussian", "fgsm")
# flatness reductions over grid points
FLATNESS_REDUCTIONS: Tuple[str, ...] = ("sum", "mean")
# strong-evaluation attacks (fastland.attacks.worst_case)
ATTACKS: Tuple[str, ...] = ("apgd-ce", "apgd-dlr", "apgd-t", "square")
# random perturbations of fastland.loglik_histogram
PERTURBATIONS: Tuple[str, ...] = ("rademacher", "uniform")
# evaluation modes of the experiments (``fastland evaluate --attack``): the paper's PGD alone, or the
# worst case over ATTACKS' standard three as well
EVAL_ATTACKS: Tuple[str, ...] = ("pgd", "strong")
