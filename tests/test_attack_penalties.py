"""fastland.attack_flatness_loss: each variant against an independent float64 computation
(value and parameter gradient), the random start of ``fgsm_amsreg``, the first-order forms of the
decision variants (``margin``, ``kl``), their training effect, and bad input."""
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


# --------------------------------------------------------------------------- the decision variants


def _margin_of(z: torch.Tensor, label: int) -> torch.Tensor:
    """``z_y − max_{c≠y} z_c`` of one row ``z [C]``, by a Python loop over the classes."""
    return z[label] - max(z[c] for c in range(z.shape[0]) if c != label)


def _kl_of(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Σ_c p_c (log p_c − log q_c)``, ``p = softmax(z)``, ``q = softmax(w)``, rows ``[C]``, written out."""
    log_p = z - torch.log(torch.exp(z).sum())
    log_q = w - torch.log(torch.exp(w).sum())
    return sum(torch.exp(log_p[c]) * (log_p[c] - log_q[c]) for c in range(z.shape[0]))


def _decision_ref(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, variant: str) -> torch.Tensor:
    """Per-sample loop (a model without BatchNorm): each sample's own FGSM sign, the step clipped to
    [0, 1] by min/max, then ``relu(m(x) − m(x'))²`` or ``KL(p(x) ‖ p(x'))``; ``[B]``."""
    out = []
    for i in range(x.shape[0]):
        xi, yi = x[i:i + 1], y[i:i + 1]
        xa = torch.minimum(torch.maximum(xi + eps * _fgsm_sign(model, xi, yi), torch.zeros_like(xi)),
                           torch.ones_like(xi))
        z, w = model(xi)[0], model(xa)[0]
        if variant == "margin":
            drop = _margin_of(z, int(yi)) - _margin_of(w, int(yi))
            out.append(torch.where(drop > 0, drop, torch.zeros_like(drop)) ** 2)
        else:
            out.append(_kl_of(z, w))
    return torch.stack(out)


@pytest.mark.parametrize("variant", ["margin", "kl"])
def test_decision_variants_against_a_per_sample_loop_with_the_step_clipped(variant):
    torch.manual_seed(6)
    model = tiny_cnn(1, 4, 6).double()
    x, y = synthetic_dataset(9, shape=SHAPE, n_classes=4, seed=5).tensors
    x, eps = x.double(), 0.2
    d = _fgsm_sign(model, x, y)
    assert ((x + eps * d < 0) | (x + eps * d > 1)).any()  # the clipping matters on these inputs
    want = _decision_ref(model, x, y, eps, variant)
    got = attack_flatness_loss(model, x, y, eps=eps, variant=variant, reduction="none")
    assert (want > 0).sum() >= 5
    _assert_value_and_grad(model, got.sum(), want.sum())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("variant", ["margin", "kl"])
@pytest.mark.parametrize("pass_logits", [False, True])
def test_decision_variants_with_batchnorm_in_train_mode(variant, pass_logits):
    """The direction in eval mode, both penalty passes in train mode (batch statistics of each batch)."""
    torch.manual_seed(7)
    model = tiny_bn_cnn(1, 3, 6).double().train()
    model[1].momentum = 0.0
    x, y = _data()
    xa = (x + EPS * _fgsm_sign(model, x, y)).clamp(0, 1)
    z, w = model(x), model(xa)
    if variant == "margin":
        want = torch.stack([torch.relu(_margin_of(z[i], int(y[i])) - _margin_of(w[i], int(y[i]))) ** 2
                            for i in range(x.shape[0])]).mean()
    else:
        want = torch.stack([_kl_of(z[i], w[i]) for i in range(x.shape[0])]).mean()
    got = attack_flatness_loss(model, x, y, eps=EPS, variant=variant, logits=model(x) if pass_logits else None)
    assert model.training
    _assert_value_and_grad(model, got, want)


def _interior_data(n: int = 10, seed: int = 8):
    """Inputs in [0.05, 0.95], so a step below 0.05 is not clipped (``x' − x = ε·d``)."""
    x, y = synthetic_dataset(n, shape=SHAPE, n_classes=4, seed=seed).tensors
    return x.double().clamp(0.05, 0.95), y


def _logit_slopes(model: nn.Module, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``dᵀ∇x z_c`` per sample and class ``[B, C]`` by forward-mode AD."""
    return jvp(model, (x,), (d,))[1]


def test_margin_tends_to_the_squared_drop_of_its_directional_derivative():
    """Small ε: ``relu(m(x) − m(x + ε·d))`` = ``ε·relu(−dᵀ∇m)`` + O(ε²), the derivative by jvp."""
    torch.manual_seed(9)
    model = tiny_cnn(1, 4, 6).double()
    x, y = _interior_data()
    s = _logit_slopes(model, x, _fgsm_sign(model, x, y))
    z = model(x)
    runner_up = z.scatter(1, y[:, None], float("-inf")).argmax(1)
    slope_m = s.gather(1, y[:, None])[:, 0] - s.gather(1, runner_up[:, None])[:, 0]  # dᵀ∇m
    assert (slope_m < 0).sum() >= 5
    for eps in (1e-3, 1e-4):
        pen = attack_flatness_loss(model, x, y, eps=eps, variant="margin", reduction="none").detach()
        first = eps * torch.relu(-slope_m)
        assert ((pen.sqrt() - first).abs() <= 50 * eps * eps * slope_m.abs()).all()


def test_kl_tends_to_half_the_fisher_information_along_d():
    """Small ε: ``KL(p(x) ‖ p(x + ε·d))`` = ``(ε²/2)·dᵀFd`` + O(ε³), ``dᵀFd = Var_{c∼p}(dᵀ∇z_c)``; and
    ``directional`` is ``ε²·(E_{c∼p} dᵀ∇z_c)²``: the spread of the logit slopes against their mean."""
    torch.manual_seed(10)
    model = tiny_cnn(1, 4, 6).double()
    x, y = _interior_data()
    s = _logit_slopes(model, x, _fgsm_sign(model, x, y))
    p = torch.softmax(model(x), -1).detach()
    mean = (p * s).sum(-1)
    var = (p * (s - mean[:, None]) ** 2).sum(-1)
    assert (var > 1e-6).all()
    for eps in (1e-3, 1e-4):
        kl = attack_flatness_loss(model, x, y, eps=eps, variant="kl", reduction="none").detach()
        assert ((kl / (eps ** 2 / 2 * var) - 1).abs() < 50 * eps).all()
    dirl = attack_flatness_loss(model, x, y, eps=1e-3, variant="directional", reduction="none").detach()
    torch.testing.assert_close(dirl, (1e-3 * mean) ** 2, rtol=1e-10, atol=0)


class _CommonShift(nn.Module):
    """Logits ``b + (wᵀx)·1``: every class moves by the same amount, so log p changes and the decision does not."""

    def __init__(self, n_in: int, n_classes: int) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.randn(n_classes, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(n_in, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b + (x.flatten(1) @ self.w)[:, None]


def test_decision_variants_are_zero_where_only_log_p_moves():
    """The direction from another model (this one's CE has no input gradient): margin and kl are 0,
    difference is not."""
    torch.manual_seed(11)
    x, y = _data()
    model, attacker = _CommonShift(36, 3), tiny_cnn(1, 3, 6).double()
    kw = dict(eps=EPS, attack_model=attacker, reduction="none")
    assert float(attack_flatness_loss(model, x, y, variant="difference", **kw).detach().min()) > 1e-6
    assert float(attack_flatness_loss(model, x, y, variant="margin", **kw).detach().abs().max()) < 1e-28
    assert float(attack_flatness_loss(model, x, y, variant="kl", **kw).detach().abs().max()) < 1e-14


@pytest.mark.parametrize("variant,lam", [("margin", 3.0), ("kl", 100.0)])
def test_training_with_the_decision_penalty_lowers_it(variant, lam):
    """30 SGD steps on 96 synthetic images from one initialisation, CE alone against CE + (λ/2)·penalty:
    the penalty ends below a quarter of plain training's, and the model still classifies (≥ 90%; a
    much larger margin λ collapses the logits, which zeroes the penalty too)."""
    x, y = synthetic_dataset(96, shape=SHAPE, n_classes=3, seed=3).tensors
    x = x.double()
    torch.manual_seed(0)
    plain = tiny_cnn(1, 3, 6).double()
    defended = tiny_cnn(1, 3, 6).double()
    defended.load_state_dict(plain.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, defended)]
    for step in range(30):
        i = (step * 32) % 96
        xb, yb = x[i:i + 32], y[i:i + 32]
        for m, opt, w in zip((plain, defended), opts, (0.0, lam)):
            z = m(xb)
            loss = F.cross_entropy(z, yb)
            if w:
                loss = loss + w / 2 * attack_flatness_loss(m, xb, yb, eps=EPS, variant=variant, logits=z)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (defended(x).argmax(1) == y).double().mean()
    pen = [float(attack_flatness_loss(m, x, y, eps=EPS, variant=variant).detach()) for m in (plain, defended)]
    assert pen[1] < 0.25 * pen[0] and float(acc) >= 0.9


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
    (dict(variant="margin", logits=torch.zeros(7, 3)), ValueError, "model: expected logits of shape"),
    (dict(variant="kl", y=None), ValueError, "y: the attack direction sign"),
    (dict(variant="margin", eps=float("nan")), ValueError, "eps: expected a finite number > 0"),
])
def test_bad_input_names_the_argument(kwargs, exc, needle):
    x, y = _data()
    kwargs = {"y": y, **kwargs}
    y = kwargs.pop("y")
    with pytest.raises(exc, match=needle):
        attack_flatness_loss(tiny_cnn(1, 3, 6).double(), x, y, **kwargs)


def test_margin_refuses_a_single_class_model():
    x, y = _data()
    with pytest.raises(ValueError, match=r"model: the 'margin' variant needs logits of at least 2 classes, got shape \(8, 1\)"):
        attack_flatness_loss(tiny_cnn(1, 1, 6).double(), x, y.clamp(max=0), variant="margin")


def test_a_model_that_is_not_a_module_is_refused():
    x, y = _data()
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        attack_flatness_loss(lambda t: t, x, y)
