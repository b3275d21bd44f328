"""The references (fastland/reference.py) against independent computations."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from fastland import reference as R
from fastland.testing import tiny_bn_cnn, tiny_cnn, tiny_mlp

MODELS = {
    "mlp": lambda: tiny_mlp((1, 4, 4), n_classes=3),
    "cnn": lambda: tiny_cnn(1, n_classes=5, size=6),
    "bn_cnn": lambda: tiny_bn_cnn(1, n_classes=4, size=6),
}
SHAPES = {"mlp": (1, 4, 4), "cnn": (1, 6, 6), "bn_cnn": (1, 6, 6)}


def _model_and_x(name: str, batch: int = 3, dtype=torch.float64):
    model = MODELS[name]().to(dtype).eval()
    x = torch.rand(batch, *SHAPES[name], dtype=dtype)
    return model, x


def _full_jacobian(model, x):
    """Per-sample Jacobians ``[B, C, D]`` via torch.autograd.functional.jacobian."""
    out = []
    for i in range(x.shape[0]):
        J = jacobian(lambda xi: model(xi.unsqueeze(0))[0], x[i])  # [C, *S]
        out.append(J.reshape(J.shape[0], -1))
    return torch.stack(out)


# ----------------------------------------------------------------------------- energy


@pytest.mark.parametrize("name", list(MODELS))
def test_input_score_matches_jacobian_of_logsumexp(name):
    model, x = _model_and_x(name)
    score = R.input_score(model, x)
    expected = torch.stack(
        [jacobian(lambda xi: torch.logsumexp(model(xi.unsqueeze(0))[0], 0), x[i]) for i in range(len(x))]
    )
    torch.testing.assert_close(score, expected, atol=1e-12, rtol=1e-10)
    # and Jᵀ softmax(z), Eq. 6
    J = _full_jacobian(model, x)
    p = torch.softmax(model(x), -1)
    torch.testing.assert_close(score.flatten(1), torch.einsum("bc,bcd->bd", p, J), atol=1e-12, rtol=1e-10)


def test_ams_score_is_minus_norm_of_input_score():
    model, x = _model_and_x("cnn")
    s = R.ams_score(model, x)
    assert s.shape == (3,)
    torch.testing.assert_close(s, -R.input_score(model, x).flatten(1).norm(dim=1))
    assert (s <= 0).all()


def test_input_score_needs_eval_mode():
    model, x = _model_and_x("bn_cnn")
    model.train()
    with pytest.raises(ValueError, match="model: expected a model in eval mode"):
        R.input_score(model, x)


def test_log_likelihood_and_relative_stable_for_large_logits():
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4 + 1, -1e4]], dtype=torch.float32)
    lse = R.log_likelihood(z)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(lse, torch.tensor([1e4, -1e4 + 1 + math.log(1 + 2 * math.exp(-1))]))
    rel = R.relative_log_likelihood(z + 5.0, z)
    assert torch.isfinite(rel).all()
    torch.testing.assert_close(rel, torch.full((2,), 5.0))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: R.log_likelihood(torch.zeros(3)), "logits: expected 2 dimensions"),
        (lambda: R.log_likelihood(torch.zeros(3, 4, dtype=torch.long)), "logits: expected a floating-point"),
        (lambda: R.log_likelihood(torch.tensor([[0.0, float("nan")]])), "logits: contains NaN"),
        (lambda: R.relative_log_likelihood(torch.zeros(2, 3), torch.zeros(2, 4)), "base_logits: expected shape"),
        (lambda: R.signed_orthogonal_directions(torch.zeros(2, 1)), "x: expected at least 2 features"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_input_score_rejects_integer_and_nan_inputs():
    model, x = _model_and_x("mlp")
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        R.input_score(model, (x * 255).long())
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: contains NaN"):
        R.input_score(model, x)


# ----------------------------------------------------------------------------- fused-op references


@pytest.mark.parametrize("C", [1, 3, 10])
@pytest.mark.parametrize("weight", ["softmax", "uniform"])
def test_weighted_projection_ref(C, weight):
    B, P = 5, 3
    z = torch.randn(B, C, dtype=torch.float64) * 3
    noise = torch.randn(P, B, C, dtype=torch.float64)
    cot, lse = R.weighted_projection_ref(z, noise, weight)
    assert cot.shape == (P, B, C) and lse.shape == (B,)
    p = torch.softmax(z, -1) if weight == "softmax" else torch.ones_like(z)
    v = cot / p
    if C == 1:
        torch.testing.assert_close(v, torch.ones_like(v))
    else:
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(P, B, dtype=torch.float64))
        # v points along the noise
        torch.testing.assert_close(v * noise.norm(dim=-1, keepdim=True), noise)
    for b in range(B):
        assert lse[b].item() == pytest.approx(math.log(sum(math.exp(t) for t in z[b].tolist())), rel=1e-12)


@pytest.mark.parametrize("weight", ["softmax", "uniform"])
@pytest.mark.parametrize("C", [1, 5])
def test_weighted_projection_backward_ref_is_the_gradient_of_the_forward(weight, C):
    logits = torch.randn(4, C, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 4, C, dtype=torch.float64)
    g_cot, g_lse = torch.randn(3, 4, C, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    cot, lse = R.weighted_projection_ref(logits, noise, weight)
    (want,) = torch.autograd.grad((cot * g_cot).sum() + (lse * g_lse).sum(), logits)
    got = R.weighted_projection_backward_ref(g_cot, g_lse, logits.detach(), noise, weight)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_grid_combine_backward_ref_is_the_gradient_of_the_forward():
    base, u, v = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    g_out = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    want = torch.autograd.grad((R.grid_combine_ref(base, u, v, a, b) * g_out).sum(), (base, u, v))
    for got, w in zip(R.grid_combine_backward_ref(g_out, a, b), want):
        torch.testing.assert_close(got, w, atol=1e-12, rtol=1e-12)


def test_grid_relative_loglik_backward_ref_is_the_gradient_of_the_forward():
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    base, g_out = torch.randn(2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    (want,) = torch.autograd.grad((R.grid_relative_loglik_ref(logits, base) * g_out).sum(), logits)
    got = R.grid_relative_loglik_backward_ref(g_out, logits.detach())
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_grid_combine_ref_matches_loop():
    base, u, v = (torch.randn(3, 2, 5) for _ in range(3))
    a, b = torch.randn(7), torch.randn(7)
    out = R.grid_combine_ref(base, u, v, a, b)
    assert out.shape == (3, 7, 2, 5)
    for n in range(3):
        for g in range(7):
            torch.testing.assert_close(out[n, g], base[n] + a[g] * u[n] + b[g] * v[n])


def test_grid_relative_loglik_ref_matches_loop():
    logits = torch.randn(4, 6, 3, dtype=torch.float64) * 100
    base = torch.randn(4, dtype=torch.float64)
    out = R.grid_relative_loglik_ref(logits, base)
    for n in range(4):
        for g in range(6):
            assert out[n, g].item() == pytest.approx(torch.logsumexp(logits[n, g], 0).item() - base[n].item(), abs=1e-10)


# ----------------------------------------------------------------------------- penalties


def _penalty_inputs(name, dtype=torch.float64):
    model, x = _model_and_x(name, batch=4, dtype=dtype)
    x.requires_grad_(True)
    return model, x, model(x)


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_penalties_equal_frobenius_norms(name):
    model, x, logits = _penalty_inputs(name)
    J = _full_jacobian(model, x.detach())  # [B, C, D]
    p = torch.softmax(logits.detach(), -1)
    jac = R.jacobian_penalty_ref(logits, x, estimator="exact")
    ams = R.amsreg_penalty_ref(logits, x, estimator="exact")
    torch.testing.assert_close(jac, J.pow(2).sum((1, 2)), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ams, (p.unsqueeze(-1) * J).pow(2).sum((1, 2)), atol=1e-12, rtol=1e-10)
    grad = R.amsreg_penalty_ref(logits, x, estimator="gradnorm")
    torch.testing.assert_close(grad, torch.einsum("bc,bcd->bd", p, J).pow(2).sum(1), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("penalty", [R.jacobian_penalty_ref, R.amsreg_penalty_ref])
def test_projection_estimator_is_unbiased(penalty):
    """Mean of K single-projection estimates within 4 standard errors of exact.

    Fixed seed; the test's false-alarm rate under a correct estimator is about
    6e-5 per sample (a 4-sigma two-sided z-test, K = 800 so the CLT applies).
    """
    model, x, logits = _penalty_inputs("mlp")
    exact = penalty(logits, x, estimator="exact").detach()
    gen = torch.Generator().manual_seed(1234)
    K = 800
    draws = torch.stack([penalty(logits, x, n_proj=1, generator=gen).detach() for _ in range(K)])  # [K, B]
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(K)
    assert (draws.std(0) > 1e-3 * exact).all(), "the estimator should be noisy at n_proj=1"
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)


def test_projection_estimator_averages_projections():
    """n_proj=P equals the mean of P single projections drawn from the same stream."""
    model, x, logits = _penalty_inputs("cnn")
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    many = R.amsreg_penalty_ref(logits, x, n_proj=5, generator=g1)
    noise = R.unit_sphere_noise(5, logits, g2)
    cot, _ = R.weighted_projection_ref(logits, noise, "softmax")
    singles = torch.stack(
        [torch.autograd.grad(logits, x, c, retain_graph=True)[0].flatten(1).pow(2).sum(1) for c in cot]
    )
    torch.testing.assert_close(many, logits.shape[1] * singles.mean(0))


@pytest.mark.parametrize("seed", range(5))
def test_proposition_3_1_bound(seed):
    torch.manual_seed(seed)
    model, x, logits = _penalty_inputs("cnn")
    lhs = R.amsreg_penalty_ref(logits, x, estimator="gradnorm")
    rhs = logits.shape[1] * R.amsreg_penalty_ref(logits, x, estimator="exact")
    assert (lhs <= rhs * (1 + 1e-12)).all()


def test_penalty_gradient_flows_to_parameters():
    model, x, logits = _penalty_inputs("mlp")
    R.amsreg_penalty_ref(logits, x, estimator="exact").sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_penalty_errors():
    model, x, logits = _penalty_inputs("mlp")
    with pytest.raises(ValueError, match="estimator: expected one of"):
        R.amsreg_penalty_ref(logits, x, estimator="bogus")
    with pytest.raises(ValueError, match="n_proj: expected an integer >= 1"):
        R.amsreg_penalty_ref(logits, x, n_proj=0)
    with pytest.raises(ValueError, match="inputs: expected a tensor that requires grad"):
        R.amsreg_penalty_ref(logits, x.detach())
    other = torch.rand_like(x).requires_grad_(True)
    with pytest.raises(ValueError, match="inputs: logits do not depend on inputs"):
        R.amsreg_penalty_ref(logits, other)
    with pytest.raises(ValueError, match="gradnorm"):
        R.jacobian_penalty_ref(logits, x, estimator="gradnorm")
    with pytest.raises(ValueError, match="weight: expected one of"):
        R.penalty_ref(logits, x, weight="bogus")


@pytest.mark.parametrize("weight,named", [("uniform", R.jacobian_penalty_ref), ("softmax", R.amsreg_penalty_ref)])
def test_named_penalties_are_penalty_ref_with_their_weight(weight, named):
    """The two named references are ``penalty_ref`` with one weight: same numbers for the same draws."""
    model, x, logits = _penalty_inputs("cnn")
    for estimator in ("exact", "projection"):
        want = R.penalty_ref(logits, x, weight=weight, estimator=estimator, n_proj=3,
                             generator=torch.Generator().manual_seed(5))
        got = named(logits, x, estimator=estimator, n_proj=3, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------- directions, landscapes, flatness


@pytest.mark.parametrize("shape", [(4, 1, 5, 5), (3, 3, 4, 4), (2, 2), (2, 7)])
def test_signed_orthogonal_directions(shape):
    x = torch.zeros(shape)
    d1, d2 = R.signed_orthogonal_directions(x, torch.Generator().manual_seed(0))
    assert d1.shape == d2.shape == x.shape
    f1, f2 = d1.flatten(1), d2.flatten(1)
    assert ((f1 == 1) | (f1 == -1)).all()
    D = f1.shape[1]
    zeros = (f2 == 0).sum(1)
    assert (zeros == D % 2).all()
    assert ((f2 == 1) | (f2 == -1) | (f2 == 0)).all()
    assert ((f1 * f2).sum(1) == 0).all()
    # different samples get different directions
    assert not torch.equal(f1[0], f1[1])


def test_landscape_ref_centre_is_zero_and_matches_definition():
    model, x = _model_and_x("cnn", batch=2)
    d1, d2 = R.signed_orthogonal_directions(x)
    alphas = torch.tensor([-0.1, 0.0, 0.05], dtype=torch.float64)
    betas = torch.tensor([0.0, 0.2], dtype=torch.float64)
    out = R.landscape_ref(model, x, d1, d2, alphas, betas)
    assert out.shape == (2, 2, 3)
    assert out[:, 0, 1].abs().max() < 1e-12
    xp = x[1] + 0.05 * d1[1] + 0.2 * d2[1]
    with torch.no_grad():
        expected = torch.logsumexp(model(xp[None]), -1) - torch.logsumexp(model(x[1:2]), -1)
    assert out[1, 1, 2].item() == pytest.approx(expected.item(), abs=1e-12)


def test_flatness_ref_matches_closed_form_for_linear_model():
    """For f(x) = W x + c, ∇x log p(x) = Wᵀ softmax(W x + c): an independent formula."""
    torch.manual_seed(3)
    D, C, N, n = 6, 4, 3, 2
    lin = torch.nn.Linear(D, C).double().eval()
    W, c = lin.weight.detach(), lin.bias.detach()
    x = torch.rand(N, D, dtype=torch.float64)
    d1 = torch.randn(n, N, D, dtype=torch.float64)
    d2 = torch.randn(n, N, D, dtype=torch.float64)
    alphas = torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64)
    betas = torch.tensor([-0.25, 0.25], dtype=torch.float64)
    phi_sum = R.flatness_ref(lin, x, d1, d2, alphas, betas, "sum")
    phi_mean = R.flatness_ref(lin, x, d1, d2, alphas, betas, "mean")
    expected = torch.zeros(N, dtype=torch.float64)
    for j in range(n):
        for a in alphas:
            for b in betas:
                xp = x + a * d1[j] + b * d2[j]
                score = torch.softmax(xp @ W.T + c, -1) @ W
                expected -= score.norm(dim=1) / n
    torch.testing.assert_close(phi_sum, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(phi_mean, expected / 6, atol=1e-12, rtol=1e-10)


def test_reference_gathers_every_subject_module():
    """``fastland.reference`` exports every public name of its four subject modules, the same objects."""
    from fastland import reference_energy, reference_landscapes, reference_ops, reference_penalties

    for sub in (reference_energy, reference_ops, reference_penalties, reference_landscapes):
        for name in sub.__all__:
            assert name in R.__all__ and getattr(R, name) is getattr(sub, name), (sub.__name__, name)
