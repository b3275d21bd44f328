"""Models shared by the landscape, flatness, histogram and data-set-run tests."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fastland import reference
from fastland._fusion import split_first_layer
from fastland.energy import ams_score
from fastland.histograms import loglik_histogram
from fastland.landscapes import landscape
from fastland.measures import Flatness, flatness, flatness_values
from fastland.models import LeNet5
from fastland.neighbourhood import directions, fgsm_direction, grid_coordinates, orthogonal_signs
from fastland.testing import tiny_bn_cnn, tiny_cnn, tiny_mlp

TOL64 = dict(atol=1e-10, rtol=1e-10)
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- models


class Normalize(nn.Module):
    """Same structure as fastland.models.Normalize: buffers [1, C, 1, 1]."""

    def __init__(self, mean: List[float], std: List[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``body(normalize(x))`` with a padded first conv (padding happens in normalised space)."""

    def __init__(self, channels: int = 3, size: int = 5, classes: int = 4) -> None:
        super().__init__()
        self.normalize = Normalize([0.4, 0.5, 0.6][:channels], [0.2, 0.3, 0.25][:channels])
        self.body = nn.Sequential(
            nn.Conv2d(channels, 4, 3, padding=1), nn.Softplus(), nn.Flatten(),
            nn.Linear(4 * size * 7, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.normalize(x))


class ScaledClassifier(Classifier):
    """Same attributes but another forward: fusion must notice and fall back."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * self.body(self.normalize(x)) + 1


class Unrecognised(nn.Module):
    """A model whose structure fusion does not know (a residual input term)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp((1, 4, 5), n_classes=3)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + x.flatten(1)[:, :3].sin()


def _models():
    """(name, model, input shape [S]) with odd shapes; all float64, eval mode."""
    return [
        ("mlp", tiny_mlp((1, 4, 5), n_classes=3), (1, 4, 5)),
        ("cnn", tiny_cnn(in_channels=2, n_classes=5, size=6), (2, 6, 6)),
        ("bn_cnn", tiny_bn_cnn(in_channels=1, n_classes=3, size=6), (1, 6, 6)),
        ("classifier", Classifier(), (3, 5, 7)),
        ("scaled", ScaledClassifier(), (3, 5, 7)),
        ("unrecognised", Unrecognised(), (1, 4, 5)),
        ("strided", nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Softplus(), nn.Flatten(),
                                  nn.Linear(3 * 4 * 3, 3)), (2, 7, 5)),
    ]


MODELS = _models()
FUSABLE = {"mlp", "cnn", "bn_cnn", "classifier", "strided"}


def _model(name: str) -> nn.Module:
    torch.manual_seed(1)
    for n, m, _ in _models():
        if n == name:
            return m.double().eval()
    raise KeyError(name)


def _shape(name: str):
    return next(s for n, _, s in MODELS if n == name)


