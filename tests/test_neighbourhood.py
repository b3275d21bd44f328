"""fastland.neighbourhood: directions, orthogonal signs, FGSM direction, grid coordinates."""
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


from landscape_models import *  # noqa: F401,F403
from landscape_models import Classifier, FUSABLE, MODELS, Normalize, REPO, ScaledClassifier, Unrecognised, _model, _models, _shape  # noqa: F401


# --------------------------------------------------------------------------- directions


@pytest.mark.parametrize("shape", [(3, 1, 5, 5), (2, 3, 4, 7), (4, 10)])
def test_rademacher_directions_are_signed_and_orthogonal(shape):
    x = torch.rand(shape)
    d1, d2 = directions(x, generator=torch.Generator().manual_seed(3))
    D = math.prod(shape[1:])
    assert d1.shape == d2.shape == x.shape
    assert set(d1.unique().tolist()) == {-1.0, 1.0}
    # exactly orthogonal, ±1 entries; for odd D exactly one zero in d2
    assert torch.equal((d1 * d2).flatten(1).sum(1), torch.zeros(shape[0]))
    zeros = (d2 == 0).flatten(1).sum(1)
    assert torch.equal(zeros, torch.full((shape[0],), D % 2))
    assert set(d2.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # samples get different directions; the generator makes them reproducible
    assert not torch.equal(d1[0], d1[1])
    e1, e2 = directions(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d1, e1) and torch.equal(d2, e2)


def test_gaussian_directions_orthogonal_with_sqrt_d_norm():
    x = torch.rand(3, 2, 5, 7, dtype=torch.float64)
    d1, d2 = directions(x, "gaussian", generator=torch.Generator().manual_seed(0))
    D = 70
    torch.testing.assert_close(d1.flatten(1).norm(dim=1), torch.full((3,), math.sqrt(D), dtype=torch.float64))
    torch.testing.assert_close(d2.flatten(1).norm(dim=1), torch.full((3,), math.sqrt(D), dtype=torch.float64))
    assert (d1 * d2).flatten(1).sum(1).abs().max() < 1e-10
    assert len(d1.unique()) > 60  # Gaussian, not signs


def test_orthogonal_signs_handles_zeros_in_d1():
    d1 = torch.randint(-1, 2, (5, 33)).double()  # about a third zeros
    d2 = orthogonal_signs(d1, generator=torch.Generator().manual_seed(2))
    assert torch.equal((d1 * d2).sum(1), torch.zeros(5, dtype=torch.float64))
    # d2 is a sign vector except one 0 for each row with an odd number of non-zeros in d1
    odd = ((d1 != 0).sum(1) % 2).double()
    assert torch.equal((d2 == 0).sum(1).double(), odd)


def test_fgsm_direction_is_sign_of_loss_gradient_and_restores_mode():
    model = tiny_bn_cnn(in_channels=2, n_classes=4, size=5).double()
    model.train()
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    d = fgsm_direction(model, x, y)
    assert model.training and model[1].training
    model.eval()
    for i in range(3):  # independent per-sample gradient
        xi = x[i : i + 1].clone().requires_grad_(True)
        F.cross_entropy(model(xi), y[i : i + 1]).backward()
        assert torch.equal(d[i], xi.grad[0].sign())


