"""fastland: fast likelihood landscapes, flatness and AMSReg for PyTorch.

A classifier ``f`` read as an energy model: ``log p(x) = logsumexp_c f(x)_c - log Z``.
fastland draws and measures the landscape of ``log p`` around inputs and trains
models with the flatness regulariser AMSReg, Jacobian regularisation and PGD
adversarial training.

Drop-in penalty::

    x = fastland.penalty_input(x)   # x, detached, requiring grad for the penalty alone
    logits = model(x)
    loss = F.cross_entropy(logits, y) + lam / 2 * fastland.amsreg_loss(logits, x)
    loss.backward()

Names are resolved lazily (PEP 562): ``import fastland`` imports torch and
nothing heavier (no matplotlib, no Triton, no CUDA initialisation).
"""
from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # energy view of a classifier
    "log_likelihood": "energy",
    "relative_log_likelihood": "energy",
    "input_score": "energy",
    "ams_score": "energy",
    # drop-in penalties
    "penalty_input": "penalties",
    "amsreg_loss": "penalties",
    "jacobian_loss": "penalties",
    "AMSReg": "penalties",
    "JacobianReg": "penalties",
    # neighbourhoods, landscapes and flatness
    "DIRECTION_KINDS": "neighbourhood",
    "directions": "neighbourhood",
    "fgsm_direction": "neighbourhood",
    "grid_coordinates": "neighbourhood",
    "landscape": "landscapes",
    "Landscape": "landscapes",
    "flatness": "measures",
    "Flatness": "measures",
    "loglik_histogram": "histograms",
    "LoglikHistogram": "histograms",
    # flatness along attack directions, and the penalties that flatten it
    "attack_flatness": "anisotropy",
    "AttackFlatness": "anisotropy",
    "attack_flatness_loss": "attack_penalties",
    "ATTACK_PENALTY_VARIANTS": "attack_penalties",
    # defences: one training objective and one optimiser step
    "DEFENCES": "defences",
    "Defence": "defences",
    "defence_loss": "defences",
    "train_step": "defences",
}

_SUBMODULES = (
    "attacks", "choices", "data", "defences", "energy", "fast_conv", "histograms", "landscapes", "measures", "models", "neighbourhood",
    "ops", "penalties", "reference", "testing",
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value  # cache: later look-ups skip this hook
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastland' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
