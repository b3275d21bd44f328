"""fastland.attack_flatness_loss: each variant against an independent float64 computation
(value and parameter gradient), the random start of ``fgsm_amsreg``, and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

import fastland
from fastland.attack_penalties import ATTACK_FLAT_LAM, ATTACK_PENALTY_VARIANTS, attack_flatness_loss
from fastland.data import synthetic_dataset
from fastland.reference import amsreg_penalty_ref
from fastland.testing import tiny_bn_cnn, tiny_cnn

SHAPE = (1, 6, 6)
EPS = 0.05


def _data(n: int = 8, seed: int = 3):
    x, y = synthetic_dataset(n, shape=SHAPE, n_classes=3, seed=seed).tensors
    return x.double(), y


def _fgsm_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sign(∇x Σ CE) with the model in eval mode, by plain autograd (mode restored)."""
    was = model.training
    model.eval()
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    model.train(was)
    return g.sign()


def _params(model: nn.Module):
    return [p for p in model.parameters()]


def _assert_value_and_grad(model, got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got, _params(model), retain_graph=True)
    g_want = torch.autograd.grad(want, _params(model), retain_graph=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(float(a.abs().max()) > 0 for a in g_got)


# --------------------------------------------------------------------------- each variant


@pytest.mark.parametrize("pass_logits", [False, True])
def test_difference_is_the_squared_height_change_of_one_fgsm_step(pass_logits):
    """BatchNorm in train mode: the direction is drawn in eval mode, the penalty's passes in train mode."""
    torch.manual_seed(0)
    model = tiny_bn_cnn(1, 3, 6).double().train()
    model[1].momentum = 0.0  # running statistics frozen: the eval-mode direction is the same for every call
    x, y = _data()
    d = _fgsm_sign(model, x, y)
    want = (torch.logsumexp(model(x + EPS * d), -1) - torch.logsumexp(model(x), -1)).square().mean()
    logits = model(x) if pass_logits else None
    got = attack_flatness_loss(model, x, y, eps=EPS, variant="difference", logits=logits)
    assert model.training
    _assert_value_and_grad(model, got, want)


def test_directional_is_eps_times_the_directional_derivative_squared():
    """Against forward-mode AD: d/dt lse f(x + t·d) at t = 0 by torch.func.jvp, parameter
    gradient by torch.func.grad through it (reverse-over-forward, not double backward)."""
    torch.manual_seed(1)
    model = tiny_cnn(1, 3, 6).double()
    x, y = _data()
    d = _fgsm_sign(model, x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def pen(p):
        lse = lambda t: torch.logsumexp(functional_call(model, p, (t,)), -1)  # noqa: E731
        _, dd = jvp(lse, (x,), (d,))
        return (EPS * dd).square().mean()

    got = attack_flatness_loss(model, x, y, eps=EPS, variant="directional")
    torch.testing.assert_close(got, pen(params), rtol=1e-10, atol=1e-12)
    g_got = dict(zip([k for k, _ in model.named_parameters()], torch.autograd.grad(got, _params(model))))
    for k, g in grad(pen)(params).items():
        torch.testing.assert_close(g_got[k], g, rtol=1e-9, atol=1e-12, msg=k)


def test_difference_tends_to_directional_for_small_steps():
    torch.manual_seed(2)
    model = tiny_cnn(1, 3, 6).double()
    x, y = _data()
    for eps in (1e-3, 1e-4):
        diff = attack_flatness_loss(model, x, y, eps=eps, variant="difference", reduction="none")
        dirl = attack_flatness_loss(model, x, y, eps=eps, variant="directional", reduction="none")
        rel = ((diff.sqrt() - dirl.sqrt()).abs() / dirl.sqrt()).max()
        assert rel < 50 * eps  # first order: |Δ| = ε|dᵀ∇| + O(ε²)


def _fgsm_point(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """Wong et al.'s random-start FGSM point, written out: uniform start, a 1.25·ε sign step, projection."""
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    x0 = torch.minimum(torch.maximum(x + (2 * noise - 1) * eps, x - eps), x + eps).clamp(0, 1)
    x1 = x0 + 1.25 * eps * _fgsm_sign(model, x0, y)
    return torch.minimum(torch.maximum(x1, x - eps), x + eps).clamp(0, 1)


def test_fgsm_amsreg_is_amsreg_at_the_random_start_fgsm_point():
    torch.manual_seed(3)
    model = tiny_cnn(1, 3, 6).double()
    x, y = _data()
    xa = _fgsm_point(model, x, y, EPS, seed=7).requires_grad_(True)
    assert 0 < float((xa - x).detach().abs().max()) <= EPS + 1e-15
    want = amsreg_penalty_ref(model(xa), xa, estimator="exact").mean()
    got = attack_flatness_loss(model, x, y, eps=EPS, variant="fgsm_amsreg", estimator="exact",
                               generator=torch.Generator().manual_seed(7))
    _assert_value_and_grad(model, got, want)
    other = attack_flatness_loss(model, x, y, eps=EPS, variant="fgsm_amsreg", estimator="exact",
                                 generator=torch.Generator().manual_seed(8))
    assert float((other - got).abs()) > 1e-8  # a new start, a new point


def test_fgsm_amsreg_projection_estimate_is_unbiased_over_seeds():
    """Seed s fixes the start (drawn first), then the projections: per seed the exact penalty at the
    same point; the mean of (projection − exact) over 300 seeds is 0 within 4 standard errors."""
    torch.manual_seed(4)
    model = tiny_cnn(1, 3, 6).double()
    x, y = _data(4)
    diffs = []
    for s in range(300):
        kw = dict(eps=EPS, variant="fgsm_amsreg", reduction="none")
        p = attack_flatness_loss(model, x, y, estimator="projection", generator=torch.Generator().manual_seed(s), **kw)
        e = attack_flatness_loss(model, x, y, estimator="exact", generator=torch.Generator().manual_seed(s), **kw)
        diffs.append((p - e).detach())
    diffs = torch.stack(diffs)  # [300, B]
    mean, se = diffs.mean(0), diffs.std(0) / 300 ** 0.5
    assert (mean.abs() < 4 * se).all() and (se > 0).all()


@pytest.mark.parametrize("variant", ATTACK_PENALTY_VARIANTS)
def test_reductions_and_float32(variant):
    torch.manual_seed(5)
    model = tiny_cnn(1, 3, 6)
    x, y = _data()
    x = x.float()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (the same random start each call)
    per = attack_flatness_loss(model, x, y, variant=variant, estimator="exact", reduction="none", generator=g())
    assert per.shape == (8,) and per.dtype == torch.float32 and (per >= 0).all()
    s = attack_flatness_loss(model, x, y, variant=variant, estimator="exact", reduction="sum", generator=g())
    m = attack_flatness_loss(model, x, y, variant=variant, estimator="exact", generator=g())
    torch.testing.assert_close(s, per.sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m, per.mean(), rtol=1e-5, atol=1e-7)
    assert fastland.attack_flatness_loss is attack_flatness_loss and variant in ATTACK_FLAT_LAM


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(eps=0.0), ValueError, "eps: expected a finite number > 0"),
    (dict(eps=-0.1), ValueError, "eps: expected a finite number > 0"),
    (dict(eps=float("inf")), ValueError, "eps: expected a finite number > 0"),
    (dict(variant="magic"), ValueError, "variant: expected one of"),
    (dict(reduction="max"), ValueError, "reduction: expected one of"),
    (dict(y=None), ValueError, "y: the attack direction sign"),
    (dict(y=torch.zeros(3)), ValueError, "y: expected integer labels of shape"),
    (dict(variant="fgsm_amsreg", estimator="magic"), ValueError, "estimator: expected one of"),
    (dict(logits=torch.zeros(8, 3, 1)), ValueError, "model: expected logits of shape"),
])
def test_bad_input_names_the_argument(kwargs, exc, needle):
    x, y = _data()
    kwargs = {"y": y, **kwargs}
    y = kwargs.pop("y")
    with pytest.raises(exc, match=needle):
        attack_flatness_loss(tiny_cnn(1, 3, 6).double(), x, y, **kwargs)


def test_a_model_that_is_not_a_module_is_refused():
    x, y = _data()
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        attack_flatness_loss(lambda t: t, x, y)
