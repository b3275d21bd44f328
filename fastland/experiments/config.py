"""The settings of a training run: :class:`TrainConfig`, and the model and data it names."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..defences import DEFENCES, TRADES_BETA, Defence, default_step_size
from .paper import BASE_LR, paper_settings

__all__ = ["TrainConfig", "build_model", "load_data"]


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``).

    ``None`` fields take the paper's defaults for the data set and defence:
    ``lr`` per model (0.01 LeNet/DDNet, 0.1 ResNet-18), ``lam`` per defence
    (Tables 1/2), ``at_eps`` per data set and ``at_alpha`` per defence
    (:func:`fastland.defences.default_step_size`: ``2.5·at_eps/at_steps``,
    ``1.25·at_eps`` for ``fgsm_rs``, ``at_eps/4`` for ``trades``).
    ``at_eps`` is the ε of the training-time attack: AT's PGD, the FGSM step of
    ``fgsm_rs``, TRADES' KL ascent (``at_steps`` steps) and the attack direction
    of ``attack_flat`` (whose penalty is ``variant``; default λ per variant from
    :data:`fastland.attack_penalties.ATTACK_FLAT_LAM`). ``beta`` is TRADES' β
    (default 6.0 for ``trades``, 0.0 for the others, which ignore it).
    ``train_size`` keeps that many training examples (a fixed random subset;
    for ``synthetic`` it is the data set size, default 512).
    """

    model: str = "lenet"
    dataset: str = "fmnist"
    defence: str = "none"
    epochs: int = 200
    batch_size: int = 128
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lam: Optional[float] = None
    estimator: str = "projection"
    n_proj: int = 1
    at_eps: Optional[float] = None
    at_alpha: Optional[float] = None
    at_steps: int = 10
    variant: str = "difference"
    seed: int = 0
    train_size: Optional[int] = None
    synthetic_shape: Tuple[int, ...] = (1, 28, 28)
    synthetic_classes: int = 10
    beta: Optional[float] = None

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in and the fields validated."""
        from ..attack_penalties import ATTACK_FLAT_LAM

        c = dataclasses.replace(self, synthetic_shape=tuple(self.synthetic_shape))
        ps = paper_settings(c.dataset)
        if c.lr is None:
            c.lr = BASE_LR.get(c.model, 0.01)
        if c.lam is None:
            lams = {"jacobian": ps.lam_jacobian, "amsreg": ps.lam_amsreg, "attack_flat": ATTACK_FLAT_LAM.get(c.variant)}
            c.lam = lams.get(c.defence, 0.0)
        if c.at_eps is None:
            c.at_eps = ps.at_eps if c.defence in _ATTACKING_DEFENCES else 0.0
        if c.at_alpha is None and isinstance(c.at_steps, int) and c.at_steps >= 1:
            c.at_alpha = default_step_size(c.defence, c.at_eps, c.at_steps)
        if c.beta is None:
            c.beta = _default_beta(c.defence)
        _validate(c)
        return c

    def defence_spec(self) -> Defence:
        """The library's :class:`fastland.Defence` for this (resolved) config."""
        beta = _default_beta(self.defence) if self.beta is None else self.beta
        return Defence(self.defence, lam=float(self.lam or 0.0), estimator=self.estimator, n_proj=self.n_proj,
                       eps=float(self.at_eps or 0.0), alpha=self.at_alpha, steps=self.at_steps, variant=self.variant,
                       beta=beta)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["synthetic_shape"] = list(self.synthetic_shape)
        return d

    @classmethod
    def normalise(cls, d: Dict[str, Any]) -> Dict[str, Any]:
        """A saved (resolved) config in the current format: fields added since it was written take
        their defaults, resolved ones (``beta``) the value :meth:`resolved` gives them."""
        d = dict(d)
        if "beta" not in d:  # written before TRADES existed: the resolved default of its defence
            d["beta"] = _default_beta(str(d.get("defence", "none")))
        return cls.from_dict(d).to_dict()

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}; expected a subset of {sorted(known)}")
        d = dict(d)
        if "synthetic_shape" in d:
            d["synthetic_shape"] = tuple(d["synthetic_shape"])
        return cls(**d)


# the defences that attack during training; their at_eps defaults to the data set's AT ε
_ATTACKING_DEFENCES = ("at", "attack_flat", "fgsm_rs", "trades")


def _default_beta(defence: str) -> float:
    """TRADES' β by default; 0.0 for the defences that ignore it."""
    return TRADES_BETA if defence == "trades" else 0.0


def _validate(c: TrainConfig) -> None:
    def need(cond: bool, name: str, expected: str, got: Any) -> None:
        if not cond:
            raise ValueError(f"{name}: expected {expected}, got {got!r}")

    need(c.defence in DEFENCES, "defence", f"one of {DEFENCES}", c.defence)
    need(isinstance(c.epochs, int) and c.epochs >= 1, "epochs", "an integer >= 1", c.epochs)
    need(isinstance(c.batch_size, int) and c.batch_size >= 1, "batch_size", "an integer >= 1", c.batch_size)
    need(c.lr is None or c.lr > 0, "lr", "a positive number", c.lr)
    need(0 <= c.momentum < 1, "momentum", "a number in [0, 1)", c.momentum)
    need(c.weight_decay >= 0, "weight_decay", "a number >= 0", c.weight_decay)
    need(c.train_size is None or (isinstance(c.train_size, int) and c.train_size >= 1),
         "train_size", "an integer >= 1 or None", c.train_size)
    c.defence_spec()  # validates the defence's own fields


# --------------------------------------------------------------------------- from names


def build_model(c: TrainConfig) -> nn.Module:
    """``fastland.models.create`` for the config's model and data set."""
    from .. import models

    if c.dataset == "synthetic":
        from ..data import synthetic_info

        return models.create(c.model, synthetic_info(c.synthetic_shape, c.synthetic_classes))
    return models.create(c.model, c.dataset)


def load_data(
    c: TrainConfig, split: str, *, data_dir: Optional[str] = None, download: bool = False
) -> Tuple[Tensor, Tensor]:
    """``(x, y)`` for the config's data set and ``split`` (``"train"``: limited to
    ``train_size`` examples, a fixed random subset)."""
    from .. import data

    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if c.dataset == "synthetic":  # one draw (shared class prototypes), split into train and test
        n_train = c.train_size or 512
        n_test = max(64, n_train // 4)
        ds = data.synthetic_dataset(n_train + n_test, shape=tuple(c.synthetic_shape),
                                    n_classes=c.synthetic_classes, seed=c.seed)
        x, y = ds.tensors
        sl = slice(0, n_train) if split == "train" else slice(n_train, None)
        return x[sl], y[sl]
    ds = data.load_dataset(c.dataset, split, data_dir=data_dir, download=download)
    x, y = ds.tensors
    if split == "train" and c.train_size is not None and c.train_size < x.shape[0]:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(c.seed))[: c.train_size]
        x, y = x[keep], y[keep]
    return x, y


