"""fastland.loglik_histogram against direct computation."""
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


# --------------------------------------------------------------------------- histograms


class Recorder(nn.Module):
    """Wraps a model and records every input batch it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: List[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("kind,clip", [("rademacher", False), ("uniform", True)])
def test_loglik_histogram(kind, clip):
    inner = _model("mlp")
    x = torch.rand(7, 1, 4, 5, dtype=torch.float64)
    rec = Recorder(inner).eval()
    h = loglik_histogram(rec, x, eps=0.05,
                         n_perturb=3, kind=kind, clip=clip, batch_size=9)
    torch.testing.assert_close(h.clean, torch.logsumexp(inner(x), -1), **TOL64)
    assert h.perturbed.shape == (7, 3)
    perturbed = torch.cat([s for s in rec.seen[1::2]])  # the model sees clean, perturbed, clean, ...
    xp = perturbed.view(7, 3, 1, 4, 5)
    dev = (xp - x[:, None]).abs()
    if kind == "rademacher":
        torch.testing.assert_close(dev, torch.full_like(dev, 0.05), **TOL64)
    else:
        assert dev.max() <= 0.05 + 1e-12 and dev.std() > 0.005
        assert xp.min() >= 0 and xp.max() <= 1
    torch.testing.assert_close(h.perturbed, torch.logsumexp(inner(perturbed), -1).view(7, 3), **TOL64)


