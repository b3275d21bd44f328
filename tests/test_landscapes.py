"""fastland.landscape against the per-point reference; fusion; argument errors."""
from __future__ import annotations

import math
import warnings
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


# --------------------------------------------------------------------------- landscapes


def test_grid_coordinates():
    g = grid_coordinates(0.3, 7, dtype=torch.float64)
    torch.testing.assert_close(g, torch.linspace(-0.3, 0.3, 7, dtype=torch.float64))
    assert g[3].item() == 0.0
    assert grid_coordinates(0.3, 1).tolist() == [0.0]
    torch.testing.assert_close(grid_coordinates(1.0, 4), torch.tensor([-1, -1 / 3, 1 / 3, 1.0]))


@pytest.mark.parametrize("name", [n for n, _, _ in MODELS])
@pytest.mark.parametrize("fuse", ["auto", False])
@pytest.mark.parametrize("steps,batch_size", [(5, 7), (4, 40)])
def test_landscape_equals_per_point_loop(name, fuse, steps, batch_size):
    model = _model(name)
    x = torch.rand(3, *_shape(name), dtype=torch.float64)
    ls = landscape(model, x, span=0.2, points=steps, fuse_first_layer=fuse, batch_size=batch_size,
                   generator=torch.Generator().manual_seed(5))
    assert ls.values.shape == (3, steps, steps)
    assert ls.meta["fused"] == (fuse == "auto" and name in FUSABLE)
    ref = reference.landscape_ref(model, x, ls.d1, ls.d2, ls.alphas, ls.betas)
    torch.testing.assert_close(ls.values, ref, **TOL64)
    torch.testing.assert_close(ls.base_logp, torch.logsumexp(model(x), -1), **TOL64)
    if steps % 2:
        c = steps // 2
        assert ls.values[:, c, c].abs().max() < 1e-12  # Δlog p = 0 at the clean sample


def test_landscape_float32_fused_matches_reference_and_centre_is_zero():
    torch.manual_seed(2)
    model = LeNet5((1, 12, 12), num_classes=5, mean=[0.3], std=[0.4]).eval()
    x = torch.rand(4, 1, 12, 12)
    ls = landscape(model, x, span=8 / 255, points=5)
    assert ls.meta["fused"]
    ref = reference.landscape_ref(model, x, ls.d1, ls.d2, ls.alphas, ls.betas)
    torch.testing.assert_close(ls.values, ref, atol=2e-5, rtol=1e-4)
    assert ls.values[:, 2, 2].abs().max() < 2e-5


def test_landscape_directions_alphas_on_last_axis_and_given_pair():
    model = _model("cnn")
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    d1 = torch.zeros_like(x)
    d2 = torch.randn(2, 6, 6, dtype=torch.float64)  # shared by both samples
    ls = landscape(model, x, directions=(d1, d2), span=0.5, points=3)
    # moving along d1 = 0 changes nothing: constant along the last (alpha) axis
    torch.testing.assert_close(ls.values, ls.values[:, :, :1].expand_as(ls.values), **TOL64)
    assert ls.values[:, 0, 0].abs().min() > 1e-6
    assert torch.equal(ls.d2[1], d2)


def test_landscape_fgsm_directions():
    model = _model("classifier")
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    y = torch.tensor([1, 2])
    ls = landscape(model, x, y=y, directions="fgsm", span=0.1, points=3)
    assert torch.equal(ls.d1, fgsm_direction(model, x, y))
    assert torch.equal((ls.d1 * ls.d2).flatten(1).sum(1), torch.zeros(2, dtype=torch.float64))
    ref = reference.landscape_ref(model, x, ls.d1, ls.d2, ls.alphas, ls.betas)
    torch.testing.assert_close(ls.values, ref, **TOL64)


def test_landscape_restores_train_mode_and_uses_eval():
    model = _model("bn_cnn").train()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    ls = landscape(model, x, span=0.1, points=3)
    assert model.training and model[1].training
    model.eval()
    ref = reference.landscape_ref(model, x, ls.d1, ls.d2, ls.alphas, ls.betas)
    torch.testing.assert_close(ls.values, ref, **TOL64)


def test_fusion_split_structure():
    assert split_first_layer(_model("classifier")) is not None
    assert len(split_first_layer(_model("bn_cnn")).lead) == 2  # conv + eval BatchNorm absorbed
    assert split_first_layer(_model("unrecognised")) is None
    assert split_first_layer(nn.Sequential(nn.Tanh(), nn.Linear(3, 2))) is None


def test_fuse_true_on_unfusable_model_raises():
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="fuse_first_layer"):
        landscape(_model("scaled"), x, points=3, fuse_first_layer=True)
    with pytest.raises(ValueError, match="fuse_first_layer"):
        flatness(_model("scaled"), x, points=3, fuse_first_layer=True)
    reflect = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                            nn.Linear(70, 2)).double().eval()
    # reflect padding is linear: fused landscapes are exact; flatness lacks its adjoint
    ls = landscape(reflect, x, points=3, span=0.1, fuse_first_layer=True)
    ref = reference.landscape_ref(reflect, x, ls.d1, ls.d2, ls.alphas, ls.betas)
    torch.testing.assert_close(ls.values, ref, **TOL64)
    with pytest.raises(ValueError, match="zero-padded"):
        flatness(reflect, x, points=3, fuse_first_layer=True)


def test_top_level_names():
    model = _model("cnn")
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    import fastland.landscapes  # noqa: F401  (the submodule import must not break the call)

    ls = fastland.landscape(model, x, points=3, span=0.1)
    assert isinstance(ls, fastland.Landscape)
    assert fastland.flatness(model, x, points=1, n_dirs=1).phi.shape == (2,)


# --------------------------------------------------------------------------- argument errors


def test_errors_name_the_argument():
    model = _model("cnn")
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="points: expected an integer"):
        landscape(model, x, points=0)
    with pytest.raises(ValueError, match="span"):
        landscape(model, x, span=0.0)
    with pytest.raises(ValueError, match="span"):
        flatness(model, x, span=-1.0)
    with pytest.raises(ValueError, match="d1"):
        landscape(model, x, directions=(torch.zeros(2, 2, 6, 5), torch.zeros_like(x)))
    with pytest.raises(ValueError, match="directions"):
        landscape(model, x, directions="sideways")
    with pytest.raises(ValueError, match="y: FGSM"):
        landscape(model, x, directions="fgsm")
    with pytest.raises(ValueError, match="batch_size"):
        landscape(model, x, batch_size=0)
    with pytest.raises(ValueError, match="reduction"):
        flatness(model, x, reduction="max")
    with pytest.raises(ValueError, match="n_dirs"):
        flatness(model, x, n_dirs=0)
    with pytest.raises(ValueError, match="fuse_first_layer"):
        landscape(model, x, fuse_first_layer="yes")
    with pytest.warns(UserWarning, match=r"x: expected pixel values in \[0, 1\]"):
        landscape(model, x * 3, points=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        landscape(model, x, points=1)




class _TupleModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor):
        return self.inner(x), x


def test_bad_models_and_inputs_get_one_short_line():
    model = _model("cnn")
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    # a pair given to flatness: a short message naming what was received, no tensor contents
    with pytest.raises(ValueError, match="directions") as e:
        flatness(model, x, directions=(torch.zeros_like(x), torch.zeros_like(x)))
    assert len(str(e.value)) < 200 and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="directions") as e:
        landscape(model, x, directions=(torch.zeros_like(x),) * 3)
    assert len(str(e.value)) < 300 and "tensor(" not in str(e.value)
    # a model returning a tuple: one clear error everywhere
    for fn in (landscape, flatness, lambda m, v: ams_score(m, v)):
        with pytest.raises(TypeError, match="model: expected it to return logits"):
            fn(_TupleModel(model), x)
    # float32 inputs to a float64 model: named, with the remedy
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float64"):
        landscape(model, x.float())
    # a shape the model cannot take: the user's shape, not an internal probe's
    with pytest.raises(ValueError, match=r"x: the model cannot take inputs of shape \(2, 5, 6, 6\)"):
        landscape(model, torch.rand(2, 5, 6, 6, dtype=torch.float64))


def test_train_mode_policy_is_eval_and_restore_everywhere():
    """ams_score, like landscape and flatness, evaluates in eval mode and restores the modes."""
    m = tiny_bn_cnn(2, 3, 6).double().train()
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64)
    want = reference.ams_score(m.eval(), x)
    m.train()
    torch.testing.assert_close(ams_score(m, x), want, **TOL64)
    assert m.training and all(sub.training for sub in m.modules())
