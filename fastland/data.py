"""Data sets: Fashion-MNIST, CIFAR-10 and synthetic sets, held in memory.

Images are float32 ``[N, C, H, W]`` in pixel space ``[0, 1]``; labels int64
``[N]``. (Normalisation belongs to the model: see :mod:`fastland.models`.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DatasetInfo",
    "DATASETS",
    "synthetic_info",
    "synthetic_dataset",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set.

    Attributes:
        name: short name (``"fmnist"``, ``"cifar10"``, ``"synthetic"``).
        shape: per-sample shape ``(C, H, W)``.
        n_classes: number of classes ``K``.
        mean: per-channel mean of the training images in ``[0, 1]`` units.
        std: per-channel standard deviation.
        classes: the ``K`` class names.
    """

    name: str
    shape: Tuple[int, int, int]
    n_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    classes: Tuple[str, ...]


FMNIST = DatasetInfo(
    name="fmnist",
    shape=(1, 28, 28),
    n_classes=10,
    mean=(0.2860,),
    std=(0.3530,),
    classes=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
)

CIFAR10 = DatasetInfo(
    name="cifar10",
    shape=(3, 32, 32),
    n_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    classes=(
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
)

DATASETS: Dict[str, DatasetInfo] = {"fmnist": FMNIST, "cifar10": CIFAR10}


def synthetic_info(shape: Sequence[int] = (1, 28, 28), n_classes: int = 10) -> DatasetInfo:
    """The :class:`DatasetInfo` of :func:`synthetic_dataset` (mean 0.5, std 0.25 per channel)."""
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) <= 0:
        raise ValueError(f"shape: expected (C, H, W) positive ints, got {tuple(shape)}")
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 1:
        raise ValueError(f"n_classes: expected a positive int, got {n_classes!r}")
    c = shape_t[0]
    return DatasetInfo(
        name="synthetic",
        shape=shape_t,  # type: ignore[arg-type]
        n_classes=n_classes,
        mean=(0.5,) * c,
        std=(0.25,) * c,
        classes=tuple(f"class {k}" for k in range(n_classes)),
    )


def synthetic_dataset(
    n: int, shape: Sequence[int] = (1, 28, 28), n_classes: int = 10, seed: int = 0
) -> TensorDataset:
    """A learnable synthetic set: class prototypes plus noise, clipped to ``[0, 1]``.

    Each class ``k`` has a fixed random prototype ``μ_k ∈ [0.2, 0.8]^D``; a sample
    of class ``k`` is ``clip(μ_k + 0.15·ε, 0, 1)`` with ``ε ~ N(0, I)``. Labels
    cycle through the classes in a random order, so every class appears
    ``⌊n/K⌋`` or ``⌈n/K⌉`` times. Deterministic given ``seed`` (its own generator;
    the global RNG is untouched).

    Returns:
        ``TensorDataset(images [n, *shape] float32, labels [n] int64)``.
    """
    info = synthetic_info(shape, n_classes)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    prototypes = 0.2 + 0.6 * torch.rand((n_classes, *info.shape), generator=gen)
    labels = torch.arange(n, dtype=torch.int64) % n_classes
    labels = labels[torch.randperm(n, generator=gen)]
    noise = torch.randn((n, *info.shape), generator=gen)
    images = (prototypes[labels] + 0.15 * noise).clamp_(0.0, 1.0)
    return TensorDataset(images, labels)
