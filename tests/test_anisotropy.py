"""fastland.attack_flatness: the steepness of log p along attack directions, against per-point loops,
a closed form for linear models, and a trained model whose FGSM direction is steeper than random ones."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastland
from fastland.anisotropy import AttackFlatness, attack_flatness
from fastland.attacks import pgd
from fastland.data import synthetic_dataset
from fastland.neighbourhood import fgsm_direction, grid_coordinates
from fastland.testing import tiny_bn_cnn, tiny_cnn

SHAPE = (1, 6, 6)


def _data(n: int = 10, seed: int = 3):
    return synthetic_dataset(n, shape=SHAPE, n_classes=3, seed=seed).tensors


def _loop_steepness(model: nn.Module, x: torch.Tensor, d: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Per sample, per point: mean_a |lse f(x_i + a·d_i) − lse f(x_i)| (one forward per point)."""
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            base = torch.logsumexp(model(x[i:i + 1]), dim=-1)[0]
            diffs = [abs(float(torch.logsumexp(model(x[i:i + 1] + float(a) * d[i:i + 1]), dim=-1)[0] - base))
                     for a in grid]
            out.append(sum(diffs) / len(diffs))
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------- against independent computations


@pytest.mark.parametrize("directions", ["fgsm", "pgd", "random", "given"])
@pytest.mark.parametrize("fuse", [False, "auto"])
def test_equals_a_per_point_loop_in_float64(directions, fuse):
    torch.manual_seed(1)
    model = tiny_bn_cnn(1, 3, 6).double().train()  # eval mode must be used (BatchNorm running statistics)
    x, y = _data(5)
    x = x.double()
    given = torch.randn(x.shape, dtype=torch.float64)
    af = attack_flatness(model, x, y, directions=given if directions == "given" else directions, span=0.2,
                         points=6, n_random=3, keep_random=True, batch_size=7, fuse_first_layer=fuse,
                         generator=torch.Generator().manual_seed(0))
    assert model.training  # restored
    model.eval()
    grid = grid_coordinates(0.2, 6, dtype=torch.float64)
    torch.testing.assert_close(af.values, -_loop_steepness(model, x, af.direction, grid), rtol=1e-10, atol=1e-10)
    rand = torch.stack([_loop_steepness(model, x, r, grid) for r in af.random_directions]).mean(dim=0)
    torch.testing.assert_close(af.random, -rand, rtol=1e-10, atol=1e-10)
    assert af.mean == pytest.approx(float(af.values.mean()), rel=1e-12)
    assert af.stderr == pytest.approx(float(af.values.std() / math.sqrt(5)), rel=1e-10)
    assert af.anisotropy == pytest.approx(float(af.values.mean() / af.random.mean()), rel=1e-10)
    assert set(af.random_directions.unique().tolist()) == {-1.0, 1.0}


def test_the_directions_are_the_attacks():
    torch.manual_seed(2)
    model = tiny_cnn(1, 3, 6).double()
    x, y = _data(6)
    x = x.double()
    af = attack_flatness(model, x, y, directions="fgsm", n_random=0)
    torch.testing.assert_close(af.direction, fgsm_direction(model, x, y))
    assert af.random is None and math.isnan(af.anisotropy) and math.isnan(af.random_mean)
    ap = attack_flatness(model, x, y, directions="pgd", span=0.1, pgd_steps=3, n_random=0,
                         generator=torch.Generator().manual_seed(4))
    x_adv = pgd(model, x, y, 0.1, alpha=2.5 * 0.1 / 3, steps=3, random_start=True,
                generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ap.direction, (x_adv - x).sign())
    assert ap.meta["pgd_eps"] == 0.1 and ap.meta["pgd_steps"] == 3


@pytest.mark.parametrize("points", [2, 5, 8, 9])
def test_linear_one_logit_model_has_the_closed_form(points):
    """log p of one logit f(x) = wᵀx + b is f itself: |Δ log p| = |a·wᵀd|, mean over a = |wᵀd|·mean|a|."""
    torch.manual_seed(3)
    D, span = math.prod(SHAPE), 0.3
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 1)).double()
    w = model[1].weight.detach()[0]
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    d = torch.randn(4, *SHAPE, dtype=torch.float64)
    af = attack_flatness(model, x, directions=d, span=span, points=points, n_random=2, keep_random=True,
                         generator=torch.Generator().manual_seed(0))
    grid = grid_coordinates(span, points, dtype=torch.float64)
    mean_abs_a = float(grid.abs().mean())
    if points % 2:  # the dense symmetric grid: mean|a| = span·(m+1)/(2m+1), m = (points−1)/2
        m = (points - 1) // 2
        assert mean_abs_a == pytest.approx(span * (m + 1) / (2 * m + 1), rel=1e-12)
    else:  # even: mean|a| = span·m/(2m−1), m = points/2
        m = points // 2
        assert mean_abs_a == pytest.approx(span * m / (2 * m - 1), rel=1e-12)
    torch.testing.assert_close(af.values, -(d.flatten(1) @ w).abs() * mean_abs_a, rtol=1e-10, atol=1e-12)
    rand = (af.random_directions.flatten(2) @ w).abs().mean(dim=0) * mean_abs_a
    torch.testing.assert_close(af.random, -rand, rtol=1e-10, atol=1e-12)


def test_a_shared_direction_broadcasts_and_float32_runs():
    torch.manual_seed(4)
    model = tiny_cnn(1, 3, 6)
    x, _ = _data(3)
    d = torch.ones(SHAPE)
    af = attack_flatness(model, x, directions=d, n_random=1)
    assert af.values.shape == (3,) and af.values.dtype == torch.float32 and (af.values <= 0).all()
    torch.testing.assert_close(af.direction, d.expand_as(x))
    assert isinstance(af, AttackFlatness) and fastland.attack_flatness is attack_flatness


# --------------------------------------------------------------------------- the claim: attacks find steep lines


def test_fgsm_direction_is_markedly_steeper_than_random_on_an_undefended_model():
    """Seed 0, 30 epochs of plain CE on 256 synthetic 6×6 images (under a second): the FGSM line
    is > 1.5× as steep as random signed lines (measured 5.0 here), PGD's too; random vs random ≈ 1."""
    torch.manual_seed(0)
    x, y = synthetic_dataset(256, shape=SHAPE, n_classes=3, seed=1).tensors
    model = tiny_cnn(1, 3, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        for i in range(0, 256, 32):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    g = torch.Generator().manual_seed(0)
    fg = attack_flatness(model, x[:64], y[:64], directions="fgsm", generator=g)
    pg = attack_flatness(model, x[:64], y[:64], directions="pgd", generator=g)
    rd = attack_flatness(model, x[:64], y[:64], directions="random", n_random=8, generator=g)
    assert fg.anisotropy > 1.5 and pg.anisotropy > 1.5
    assert fg.mean < fg.random_mean  # steeper = more negative
    assert 0.8 < rd.anisotropy < 1.25


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(directions="fgsm", y=None), ValueError, "y: directions='fgsm' needs labels"),
    (dict(directions="pgd", y=None), ValueError, "y: directions='pgd' needs labels"),
    (dict(directions="gaussian"), ValueError, "directions: expected one of"),
    (dict(directions=3), TypeError, "directions: expected one of"),
    (dict(directions=torch.ones(2, 3)), ValueError, "directions: expected a tensor of shape"),
    (dict(n_random=-1), ValueError, "n_random: expected an integer >= 0"),
    (dict(span=0.0), ValueError, "span: expected a finite number > 0"),
    (dict(points=0), ValueError, "points: expected an integer >= 1"),
    (dict(points=1), ValueError, "points: expected an integer >= 2"),
    (dict(directions="pgd", pgd_eps=-0.1), ValueError, "pgd_eps: expected a finite number > 0"),
    (dict(directions="pgd", pgd_steps=0), ValueError, "pgd_steps: expected an integer >= 1"),
])
def test_bad_input_names_the_argument(kwargs, exc, needle):
    x, y = _data(3)
    kwargs = {"y": y, **kwargs}
    with pytest.raises(exc, match=needle):
        attack_flatness(tiny_cnn(1, 3, 6), x, **kwargs)


def test_bad_images_and_models_are_refused():
    x, y = _data(3)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        attack_flatness(lambda t: t, x, y)
    with pytest.raises(ValueError, match="x: contains NaN or inf"):
        attack_flatness(tiny_cnn(1, 3, 6), x.clone().fill_(float("nan")), y)
    with pytest.raises(TypeError, match="x: expected dtype"):
        attack_flatness(tiny_cnn(1, 3, 6), x.double(), y)
