"""fastland.flatness and ams_score against the references."""
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
from fastland._grid import plan
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


# --------------------------------------------------------------------------- flatness


@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "classifier", "strided", "scaled"])
@pytest.mark.parametrize("reduction,fuse", [("sum", "auto"), ("mean", False)])
def test_flatness_equals_reference(name, reduction, fuse):
    model = _model(name)
    x = torch.rand(3, *_shape(name), dtype=torch.float64)
    grid = grid_coordinates(0.1, 3, dtype=torch.float64)
    d1, d2 = directions(x.repeat(2, *[1] * (x.dim() - 1)), generator=torch.Generator().manual_seed(4))
    d1, d2 = d1.view(2, *x.shape), d2.view(2, *x.shape)
    p = plan(model, x, batch_size=5, fuse_first_layer=fuse, backward=True)
    phi = flatness_values(model, x, d1, d2, grid, grid, p, reduction=reduction)
    ref = reference.flatness_ref(model, x, d1, d2, grid, grid, reduction=reduction)
    torch.testing.assert_close(phi, ref, **TOL64)
    # the public function draws its n pairs as directions(x repeated n times)
    out = flatness(model, x, n_dirs=2, span=0.1, points=3, reduction=reduction, fuse_first_layer=fuse,
                   generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out.phi, ref, **TOL64)
    assert out.mean == pytest.approx(ref.mean().item(), rel=1e-12)
    assert out.stderr == pytest.approx((ref.std() / math.sqrt(3)).item(), rel=1e-10)
    assert (out.phi < 0).all()


def test_flatness_mean_is_sum_over_grid_size_and_single_sample_stderr_is_nan():
    model = _model("cnn")
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    kw = dict(n_dirs=1, span=0.05, points=4)
    s = flatness(model, x, reduction="sum", generator=torch.Generator().manual_seed(0), **kw)
    m = flatness(model, x, reduction="mean", generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(m.phi * 16, s.phi, **TOL64)
    assert math.isnan(s.stderr)
    assert isinstance(s, Flatness)


@pytest.mark.parametrize("batch_size", [None, 2, "auto"])
def test_ams_score_fast_path_equals_reference(batch_size):
    model = _model("bn_cnn")
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(ams_score(model, x, batch_size=batch_size),
                               reference.ams_score(model, x), **TOL64)
    # the library's one train-mode policy: evaluate in eval mode, restore the mode
    torch.testing.assert_close(ams_score(model.train(), x, batch_size=batch_size),
                               reference.ams_score(model.eval(), x), **TOL64)


