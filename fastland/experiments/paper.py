"""The paper's numbers in one place: its settings per data set and its Tables 1 and 2.

Lin et al., *Likelihood Landscapes: A Unifying Principle Behind Many Adversarial
Defenses*. All ε and α are in pixel units (inputs in [0, 1]); λ is that of the
objective ``CE + (λ/2)·penalty``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple

from ..choices import PAPER_DEFENCES

__all__ = ["PaperSettings", "paper_settings", "BASE_LR", "PaperRow", "Setting", "CONFIGS", "SWEEP_FACTORS"]


@dataclass(frozen=True)
class PaperSettings:
    """The paper's per-data-set settings (Sec. 3.5, Tables 1 and 2).

    ``eval_*``: the PGD attack of the evaluation; ``at_eps``: ε of PGD-10
    adversarial training; ``lam_*``: the regularisation strengths λ.
    """

    eval_eps: float
    eval_alpha: float
    eval_steps: int
    at_eps: float
    at_steps: int
    lam_jacobian: float
    lam_amsreg: float


_PAPER: Dict[str, PaperSettings] = {
    "fmnist": PaperSettings(25 / 255, 6.25 / 255, 10, 10 / 255, 10, 0.01, 0.5),
    "cifar10": PaperSettings(8 / 255, 2 / 255, 5, 3 / 255, 10, 0.05, 1.0),
}
# default base learning rate per architecture (the paper does not state one)
BASE_LR = {"lenet": 0.01, "ddnet": 0.01, "resnet18": 0.1}


def paper_settings(dataset: str) -> PaperSettings:
    """The paper's settings for ``dataset`` (``"fmnist"``, ``"cifar10"``; others
    such as ``"synthetic"`` get the Fashion-MNIST ones)."""
    return _PAPER.get(dataset, _PAPER["fmnist"])


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table 1 or 2: Φ, clean and PGD accuracy (%)."""

    label: str
    phi: float
    clean: float
    pgd: float


@dataclass(frozen=True)
class Setting:
    """A data set + architecture of the paper, with its table rows (by defence)."""

    dataset: str
    model: str
    table: str
    paper: Dict[str, PaperRow] = field(default_factory=dict)


def _rows(eps: str, lam_j: float, lam_a: float, vals: Sequence[Tuple[float, float, float]]) -> Dict[str, PaperRow]:
    labels = ("No Defense", f"AT (ε = {eps})", f"Jacobian Reg. (λ = {lam_j})", f"AMSReg (λ = {lam_a})")
    return {d: PaperRow(lab, *v) for d, lab, v in zip(PAPER_DEFENCES, labels, vals)}


CONFIGS: Dict[str, Setting] = {
    "fmnist-lenet": Setting("fmnist", "lenet", "Table 2", _rows("10/255", 0.01, 0.5, [
        (-9435.9, 91.53, 0.0), (-1504.0, 89.35, 62.64), (-1694.6, 88.76, 34.71), (-378.1, 89.51, 34.04)])),
    "fmnist-resnet18": Setting("fmnist", "resnet18", "Table 2", _rows("10/255", 0.01, 0.5, [
        (-12952.8, 93.75, 0.1), (-1257.8, 91.64, 65.24), (-821.7, 91.04, 45.37), (-482.9, 91.29, 46.06)])),
    "cifar10-ddnet": Setting("cifar10", "ddnet", "Table 1", _rows("3/255", 0.05, 1.0, [
        (-13035.5, 91.45, 1.7), (-2066.4, 85.90, 45.71), (-1692.6, 86.06, 18.31), (-768.7, 85.45, 20.78)])),
    "cifar10-resnet18": Setting("cifar10", "resnet18", "Table 1", _rows("3/255", 0.05, 1.0, [
        (-13974.3, 94.69, 0.1), (-1055.0, 85.32, 57.48), (-1945.1, 82.28, 14.73), (-659.5, 86.94, 11.07)])),
    # a tiny configuration for tests and smoke runs (no paper numbers)
    "synthetic-lenet": Setting("synthetic", "lenet", "none"),
}

# sweep strengths for Figs. 2 and 4 (multiples of the paper's ε / λ)
SWEEP_FACTORS = (0.25, 0.5, 2.0)
