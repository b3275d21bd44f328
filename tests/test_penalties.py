"""Tests of fastland.penalties: amsreg_loss, jacobian_loss, AMSReg, JacobianReg (values,
gradients, training, modules; bad input and reliability: test_penalties_inputs.py).

Every value is checked against an independent computation from the full
per-sample Jacobian (``torch.func.vmap(torch.func.jacrev(...))``), every
parameter gradient against ``torch.func.grad`` of that computation.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

import fastland
from fastland import _estimators, penalties
from fastland.penalties import AMSReg, JacobianReg, amsreg_loss, default_fd_step, jacobian_loss
from fastland.reference import amsreg_penalty_ref, jacobian_penalty_ref, unit_sphere_noise
from fastland.testing import tiny_bn_cnn, tiny_cnn, tiny_mlp

# --------------------------------------------------------------------------- helpers

# Odd shapes: batch 5, 3 or 7 classes, non-square inputs where the model allows.
MODELS: Dict[str, Callable[[], Tuple[nn.Module, Tuple[int, ...]]]] = {
    "mlp": lambda: (tiny_mlp((2, 3, 5), n_classes=7, hidden=9), (2, 3, 5)),
    "cnn": lambda: (tiny_cnn(in_channels=2, n_classes=3, size=5), (2, 5, 5)),
    "bn_cnn": lambda: (tiny_bn_cnn(in_channels=1, n_classes=7, size=6), (1, 6, 6)),
}
B = 5


def make(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tuple[nn.Module, Tensor]:
    """A tiny model in eval mode and a ``[B, *S]`` input batch (requires grad), drawn from ``seed``."""
    torch.manual_seed(seed)
    model, shape = MODELS[name]()
    model = model.to(dtype).eval()
    x = torch.rand(B, *shape, dtype=dtype, requires_grad=True)
    return model, x


def per_sample_jacobian(model: nn.Module, x: Tensor, params=None) -> Tuple[Tensor, Tensor]:
    """Independent ``(logits [B, C], J [B, C, D])`` via ``vmap(jacrev)`` of the one-sample map."""
    params = dict(model.named_parameters()) if params is None else params
    buffers = dict(model.named_buffers())

    def f(xi: Tensor) -> Tensor:
        return functional_call(model, (params, buffers), (xi.unsqueeze(0),))[0]

    J = vmap(jacrev(f))(x.detach())  # [B, C, *S]
    z = vmap(f)(x.detach())
    return z, J.flatten(2)


def ams_exact_from_jacobian(z: Tensor, J: Tensor) -> Tensor:
    """``Σ_c p_c² ‖J_c‖²``: ``[B]``."""
    p = torch.softmax(z, dim=-1)
    return (p.pow(2) * J.pow(2).sum(-1)).sum(-1)


def gradnorm_from_jacobian(z: Tensor, J: Tensor) -> Tensor:
    """``‖pᵀ J‖²``: ``[B]``."""
    p = torch.softmax(z, dim=-1)
    return torch.einsum("bc,bcd->bd", p, J).pow(2).sum(-1)


def projection_from_jacobian(z: Tensor, J: Tensor, v: Tensor, weight: str) -> Tensor:
    """``(C/P) Σ_p ‖(v_p ⊙ w)ᵀ J‖²`` for fixed unit vectors ``v [P, B, C]``: ``[B]``."""
    P, C = v.shape[0], z.shape[1]
    w = torch.softmax(z, dim=-1) if weight == "softmax" else torch.ones_like(z)
    proj = torch.einsum("pbc,bcd->pbd", v * w, J)
    return proj.pow(2).sum(-1).sum(0) * (C / P)


def unit_rows(noise: Tensor) -> Tensor:
    return noise / noise.norm(dim=-1, keepdim=True)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batched", [False, True])
def test_exact_and_gradnorm_equal_full_jacobian(name: str, batched: bool) -> None:
    model, x = make(name)
    logits = model(x)
    z, J = per_sample_jacobian(model, x)
    torch.testing.assert_close(logits, z, rtol=1e-12, atol=1e-12)
    tol = dict(rtol=1e-10, atol=1e-12)
    ams = amsreg_loss(logits, x, estimator="exact", reduction="none", batched=batched)
    torch.testing.assert_close(ams, ams_exact_from_jacobian(z, J), **tol)
    jac = jacobian_loss(logits, x, estimator="exact", reduction="none", batched=batched)
    torch.testing.assert_close(jac, J.pow(2).sum((1, 2)), **tol)
    gn = amsreg_loss(logits, x, estimator="gradnorm", reduction="none")
    torch.testing.assert_close(gn, gradnorm_from_jacobian(z, J), **tol)
    # the default reduction is the batch mean; "sum" sums
    torch.testing.assert_close(
        amsreg_loss(logits, x, estimator="exact", batched=batched), ams.mean(), **tol
    )
    torch.testing.assert_close(jacobian_loss(logits, x, estimator="exact", reduction="sum"), jac.sum(), **tol)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batched", [False, True])
def test_projection_equals_fixed_unit_vectors(name: str, batched: bool) -> None:
    model, x = make(name)
    logits = model(x)
    z, J = per_sample_jacobian(model, x)
    P = 3 if z.shape[1] > 3 else 2
    for weight, fn in (("softmax", amsreg_loss), ("uniform", jacobian_loss)):
        gen = torch.Generator().manual_seed(11)
        got = fn(logits, x, n_proj=P, generator=gen, reduction="none", batched=batched)
        v = unit_rows(unit_sphere_noise(P, z, torch.Generator().manual_seed(11)))
        torch.testing.assert_close(got, projection_from_jacobian(z, J, v, weight), rtol=1e-10, atol=1e-12)


def test_matches_reference_module() -> None:
    model, x = make("cnn")
    logits = model(x)
    for est in ("projection", "exact", "gradnorm"):
        got = amsreg_loss(logits, x, n_proj=2, estimator=est, generator=torch.Generator().manual_seed(4))
        ref = amsreg_penalty_ref(logits, x, n_proj=2, estimator=est, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(got, ref.mean(), rtol=1e-12, atol=1e-14)
    for est in ("projection", "exact"):
        got = jacobian_loss(logits, x, n_proj=2, estimator=est, generator=torch.Generator().manual_seed(4))
        ref = jacobian_penalty_ref(logits, x, n_proj=2, estimator=est, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(got, ref.mean(), rtol=1e-12, atol=1e-14)


def test_n_proj_at_least_classes_is_exact() -> None:
    model, x = make("mlp")  # C = 7
    logits = model(x)
    exact = amsreg_loss(logits, x, estimator="exact")
    for n in (7, 12):
        torch.testing.assert_close(amsreg_loss(logits, x, n_proj=n), exact, rtol=0, atol=0)
    torch.testing.assert_close(jacobian_loss(logits, x, n_proj=7), jacobian_loss(logits, x, estimator="exact"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("weight", ["softmax", "uniform"])
def test_projection_is_unbiased(weight: str) -> None:
    """Mean of N=600 one-projection estimates (seeds 0..599) vs exact.

    Stated tolerance: |mean - exact| < 4 standard errors (sample std / √N),
    and < 10 % of exact; with fixed seeds the test is deterministic.
    """
    model, x = make("mlp")
    logits = model(x)
    fn = amsreg_loss if weight == "softmax" else jacobian_loss
    exact = fn(logits, x, estimator="exact").item()
    draws = torch.tensor([
        fn(logits, x, n_proj=1, generator=torch.Generator().manual_seed(s)).item() for s in range(600)
    ], dtype=torch.float64)
    mean, se = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert abs(mean - exact) < 0.1 * exact, (mean, exact)
    assert draws.std() > 0  # the estimator is random: the test could have failed


@pytest.mark.parametrize("name", list(MODELS))
def test_prop_3_1_bound(name: str) -> None:
    """‖∇x log p‖² <= C · ‖diag(p) J‖²_F per sample (Cauchy–Schwarz)."""
    model, x = make(name)
    with torch.no_grad():  # spread the logits so that p is far from uniform
        x.mul_(3.0)
    logits = model(x)
    C = logits.shape[1]
    gn = amsreg_loss(logits, x, estimator="gradnorm", reduction="none")
    ex = amsreg_loss(logits, x, estimator="exact", reduction="none")
    assert (gn > 0).all()
    assert (gn <= C * ex * (1 + 1e-12)).all(), (gn, C * ex)


# --------------------------------------------------------------------------- parameter gradients


def _functional_penalty(model: nn.Module, x: Tensor, kind: str, v: Tensor = None,
                        u: Tensor = None, h: float = 0.0) -> Callable[[dict], Tensor]:
    """Batch-mean penalty as a function of the parameters, from ``vmap(jacrev)``."""

    def pen(params: dict) -> Tensor:
        z, J = per_sample_jacobian(model, x, params)
        if kind == "ams_exact":
            return ams_exact_from_jacobian(z, J).mean()
        if kind == "jac_exact":
            return J.pow(2).sum((1, 2)).mean()
        if kind == "gradnorm":
            return gradnorm_from_jacobian(z, J).mean()
        if kind == "ams_proj":
            return projection_from_jacobian(z, J, v, "softmax").mean()
        if kind == "jac_proj":
            return projection_from_jacobian(z, J, v, "uniform").mean()
        if kind == "fd":
            buffers = dict(model.named_buffers())
            zh = functional_call(model, (params, buffers), (x.detach() + h * u,))
            return ((torch.logsumexp(zh, -1) - torch.logsumexp(z, -1)) / h).pow(2).mean()
        raise AssertionError(kind)

    return pen


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kind", ["ams_exact", "jac_exact", "gradnorm", "ams_proj", "jac_proj", "fd"])
def test_parameter_gradients_match_torch_func(name: str, kind: str) -> None:
    model, x = make(name)
    params = {k: p.detach() for k, p in model.named_parameters()}
    logits = model(x)
    P, h = 2, 1e-3
    z = logits.detach()
    v = unit_rows(unit_sphere_noise(P, z, torch.Generator().manual_seed(5)))
    u = None
    if kind == "fd":
        (g,) = torch.autograd.grad(torch.logsumexp(logits, -1).sum(), x, retain_graph=True)
        u = g / g.flatten(1).norm(dim=1).view(-1, *[1] * (g.dim() - 1))
    gen = torch.Generator().manual_seed(5)
    ours = {
        "ams_exact": lambda: amsreg_loss(logits, x, estimator="exact"),
        "jac_exact": lambda: jacobian_loss(logits, x, estimator="exact"),
        "gradnorm": lambda: amsreg_loss(logits, x, estimator="gradnorm"),
        "ams_proj": lambda: amsreg_loss(logits, x, n_proj=P, generator=gen),
        "jac_proj": lambda: jacobian_loss(logits, x, n_proj=P, generator=gen),
        "fd": lambda: amsreg_loss(logits, x, estimator="finite_difference", model=model, h=h),
    }[kind]()
    # (the Jacobian does not depend on the last bias: allow unused, read as zero)
    got = torch.autograd.grad(ours, [p for _, p in model.named_parameters()], allow_unused=True)
    ref_fn = _functional_penalty(model, x, kind, v=v, u=u, h=h)
    torch.testing.assert_close(ours, ref_fn(params), rtol=1e-9, atol=1e-12)
    ref = grad(ref_fn)(params)
    for (k, p), g_ours in zip(model.named_parameters(), got):
        g_ours = torch.zeros_like(p) if g_ours is None else g_ours
        torch.testing.assert_close(g_ours, ref[k], rtol=1e-8, atol=1e-11, msg=lambda m: f"{k}: {m}")


def test_batched_and_loop_agree_in_value_and_gradient() -> None:
    model, x = make("bn_cnn")
    out = {}
    for batched in (False, True):
        model.zero_grad()
        logits = model(x)
        val = amsreg_loss(logits, x, n_proj=4, generator=torch.Generator().manual_seed(2), batched=batched)
        val.backward()
        out[batched] = (val.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-12, atol=1e-14)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "fn,estimator",
    [(amsreg_loss, "projection"), (amsreg_loss, "exact"), (amsreg_loss, "gradnorm"),
     (amsreg_loss, "finite_difference"), (jacobian_loss, "projection"), (jacobian_loss, "exact")],
)
def test_sgd_steps_lower_the_penalty(fn, estimator: str) -> None:
    torch.manual_seed(1)
    model = tiny_cnn(n_classes=4, size=5).double()
    x0 = torch.rand(8, 1, 5, 5, dtype=torch.float64)
    measure = "gradnorm" if estimator in ("gradnorm", "finite_difference") else "exact"

    def penalty(est: str, **kw) -> Tensor:
        x = x0.clone().requires_grad_(True)
        extra = {"model": model} if est == "finite_difference" else {}
        return fn(model(x), x, estimator=est, **extra, **kw)

    before = penalty(measure).item()
    opt = torch.optim.SGD(model.parameters(), lr=0.05 / before)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        kw = {"n_proj": 2, "generator": gen} if estimator == "projection" else {}
        loss = penalty(estimator, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = penalty(measure).item()
    assert after < 0.9 * before, (before, after)


def test_readme_drop_in_example_runs() -> None:
    model = fastland.testing.tiny_cnn(n_classes=4, size=6)
    x = torch.rand(8, 1, 6, 6)
    y = torch.randint(0, 4, (8,))
    lam = 0.5
    # --- the example of fastland/__init__.py, as written
    x = fastland.penalty_input(x)   # x, detached, requiring grad for the penalty alone
    logits = model(x)
    loss = F.cross_entropy(logits, y) + lam / 2 * fastland.amsreg_loss(logits, x)
    loss.backward()
    # ---
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert x.grad is None


# --------------------------------------------------------------------------- penalty_input

# (fn, estimator) of every double-backward and finite-difference drop-in
DROP_INS = [(amsreg_loss, "projection"), (amsreg_loss, "exact"), (amsreg_loss, "gradnorm"),
            (amsreg_loss, "finite_difference"), (jacobian_loss, "projection"), (jacobian_loss, "exact")]


def _drop_in_step(model: nn.Module, x0: Tensor, y: Tensor, fn, estimator: str, form: str) -> Tuple[list, Tensor]:
    """``CE + 0.25·penalty`` and a plain ``loss.backward()`` in one of the two forms:
    ``"penalty_input"`` (the README's) or ``"requires_grad"`` (the caller's own tensor).
    Returns the parameter gradients and ``x`` (to read ``x.grad``)."""
    model.zero_grad(set_to_none=True)
    x = fastland.penalty_input(x0) if form == "penalty_input" else x0.clone().requires_grad_(True)
    logits = model(x)
    kw = {"model": model} if estimator == "finite_difference" else {}
    if estimator == "projection":
        kw = {"n_proj": 2, "generator": torch.Generator().manual_seed(7)}
    loss = F.cross_entropy(logits, y) + 0.25 * fn(logits, x, estimator=estimator, **kw)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], x


@pytest.mark.parametrize("fn,estimator", DROP_INS)
@pytest.mark.parametrize("fast", [True, False])
def test_penalty_input_gives_the_old_forms_parameter_gradients(fn, estimator: str, fast: bool) -> None:
    """Both forms, plain ``loss.backward()``: equal parameter gradients (float64, 1e-13), held
    to ``torch.func.grad`` of the ``vmap(jacrev)`` reference; ``x.grad`` is None for
    ``penalty_input`` and ``∂loss/∂x`` for the caller's own tensor. ``fast``: the
    convolution takes fast_conv's path (the input gradient is then skipped)."""
    model, x = make("cnn")
    if fast:
        fastland.fast_conv.apply(model)
    x0 = x.detach()
    y = torch.tensor([0, 2, 1, 1, 0])
    new, xn = _drop_in_step(model, x0, y, fn, estimator, "penalty_input")
    old, xo = _drop_in_step(model, x0, y, fn, estimator, "requires_grad")
    assert xn.grad is None and xo.grad is not None and xo.grad.shape == x0.shape
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    # the reference: CE + 0.25 * penalty as a function of the parameters
    params = {k: p.detach() for k, p in model.named_parameters()}
    kind = {("projection", True): "ams_proj", ("exact", True): "ams_exact", ("gradnorm", True): "gradnorm",
            ("finite_difference", True): "fd", ("projection", False): "jac_proj",
            ("exact", False): "jac_exact"}[(estimator, fn is amsreg_loss)]
    logits = model(x0.clone().requires_grad_(True))
    v = unit_rows(unit_sphere_noise(2, logits.detach(), torch.Generator().manual_seed(7)))
    u = None
    if kind == "fd":
        xg = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.logsumexp(model(xg), -1).sum(), xg)
        u = g / g.flatten(1).norm(dim=1).view(-1, *[1] * (g.dim() - 1))
    pen = _functional_penalty(model, x0, kind, v=v, u=u, h=default_fd_step(torch.float64))
    buffers = dict(model.named_buffers())

    def objective(ps: dict) -> Tensor:
        return F.cross_entropy(functional_call(model, (ps, buffers), (x0,)), y) + 0.25 * pen(ps)

    ref = grad(objective)(params)
    for (k, _), g_new in zip(model.named_parameters(), new):
        torch.testing.assert_close(g_new, ref[k], rtol=1e-8, atol=1e-11, msg=lambda m: f"{k}: {m}")




@pytest.mark.parametrize("fn", [amsreg_loss, jacobian_loss])
def test_penalty_input_skips_the_first_layers_input_gradient(input_grad_calls, fn) -> None:
    """LeNet-5 (first convolution on fast_conv's path): the README form computes that layer's
    input gradient once (the penalty's VJP), the caller's own ``x.requires_grad_(True)`` twice
    (the VJP, then ``x.grad``), as ``backward(inputs=params)`` of that form does once."""
    torch.manual_seed(0)
    model = fastland.models.create("lenet", "fmnist")
    x0, y = torch.rand(3, 1, 28, 28), torch.tensor([1, 4, 9])
    calls = input_grad_calls
    counts = {}
    for form in ("penalty_input", "requires_grad", "params_only"):
        calls[0] = 0
        x = fastland.penalty_input(x0) if form == "penalty_input" else x0.clone().requires_grad_(True)
        logits = model(x)
        loss = F.cross_entropy(logits, y) + 0.25 * fn(logits, x)
        loss.backward(inputs=list(model.parameters()) if form == "params_only" else None)
        counts[form] = calls[0]
    assert counts == {"penalty_input": 1, "requires_grad": 2, "params_only": 1}


def test_penalty_input_twice_and_after_an_error() -> None:
    """Two penalties on one penalty input, a failed one in between: both still differentiate
    it, and a later backward still skips it (no request is left behind)."""
    from fastland import _conv_grad

    model, x = make("cnn")
    fastland.fast_conv.apply(model)
    xp = fastland.penalty_input(x.detach())
    logits = model(xp)
    with pytest.raises(ValueError, match="x: .*graph of logits"):
        amsreg_loss(model(x.detach().requires_grad_(True)), xp)
    assert not _conv_grad._requests.ids
    loss = amsreg_loss(logits, xp, estimator="exact") + jacobian_loss(logits, xp, estimator="exact")
    loss.backward()
    assert xp.grad is None and not _conv_grad._requests.ids
    z, J = per_sample_jacobian(model, xp)
    torch.testing.assert_close(loss, (ams_exact_from_jacobian(z, J) + J.pow(2).sum((1, 2))).mean(),
                               rtol=1e-12, atol=1e-14)


def test_penalty_input_shares_storage_and_cuts_the_graph() -> None:
    x = torch.rand(2, 3, requires_grad=True)
    xp = fastland.penalty_input(x * 1.0)
    assert xp.is_leaf and xp.requires_grad and xp.grad_fn is None
    base = torch.rand(2, 3)
    assert fastland.penalty_input(base).data_ptr() == base.data_ptr()


# --------------------------------------------------------------------------- modules


def hoffman_jacobian_reg(logits: Tensor, x: Tensor, n: int, generator) -> Tensor:
    """Hoffman et al.'s ``JacobianReg(n).forward(x, y)`` as published (jacobian.py of
    facebookresearch/jacobian_regularizer), with the unit vectors drawn by ``generator``
    through :func:`unit_sphere_noise` so that ours can reproduce them; ``n = -1``:
    the C one-hot vectors. Returns ``½·‖J‖²_F`` (batch mean)."""
    Bn, C = logits.shape
    if n == -1:
        num_proj, vs = C, torch.eye(C, dtype=logits.dtype).unsqueeze(1).expand(C, Bn, C)
    else:
        num_proj, vs = n, unit_rows(unit_sphere_noise(n, logits.detach(), generator))
    J2 = 0.0
    for ii in range(num_proj):
        (Jv,) = torch.autograd.grad(logits, x, vs[ii], retain_graph=True, create_graph=True)
        J2 = J2 + C * torch.norm(Jv) ** 2 / (num_proj * Bn)
    return 0.5 * J2


def test_jacobian_reg_is_twice_hoffman() -> None:
    """JacobianReg(n_proj)(logits, x) = 2 × Hoffman et al.'s JacobianReg(n)(x, y): the
    full ‖J‖²_F, so that both modules go into CE + (λ/2)·reg with the paper's λ."""
    model, x = make("mlp")  # C = 7
    logits = model(x)
    z, J = per_sample_jacobian(model, x)
    for n in (1, 3):
        got = JacobianReg(n)(logits, x, generator=torch.Generator().manual_seed(9))
        theirs = hoffman_jacobian_reg(logits, x, n, torch.Generator().manual_seed(9))
        torch.testing.assert_close(got, 2 * theirs, rtol=1e-10, atol=1e-14)
    exact = JacobianReg(estimator="exact")(logits, x)
    torch.testing.assert_close(exact, 2 * hoffman_jacobian_reg(logits, x, -1, None), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(exact, J.pow(2).sum() / z.shape[0], rtol=1e-10, atol=1e-14)
    assert "n_proj=1" in repr(JacobianReg())


def test_modules_equal_functions_on_one_scale() -> None:
    model, x = make("cnn")
    logits = model(x)
    for est in ("projection", "exact", "gradnorm"):
        got = AMSReg(n_proj=2, estimator=est)(logits, x, generator=torch.Generator().manual_seed(1))
        ref = amsreg_loss(logits, x, n_proj=2, estimator=est, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for est in ("projection", "exact"):
        got = JacobianReg(n_proj=2, estimator=est)(logits, x, generator=torch.Generator().manual_seed(1))
        ref = jacobian_loss(logits, x, n_proj=2, estimator=est, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    fd = AMSReg(estimator="finite_difference", h=1e-5)(logits, x, model=model)
    torch.testing.assert_close(fd, amsreg_loss(logits, x, estimator="finite_difference", model=model, h=1e-5))
    per = AMSReg(estimator="exact", reduction="none")(logits, x)
    assert per.shape == (B,)
    torch.testing.assert_close(per.mean(), AMSReg(estimator="exact")(logits, x), rtol=1e-12, atol=0)
    assert "finite_difference" in repr(AMSReg(estimator="finite_difference"))


def test_one_vocabulary() -> None:
    """(logits, x) and n_proj in functions and modules alike; one ESTIMATORS."""
    import inspect

    for fn in (amsreg_loss, jacobian_loss, AMSReg.forward, JacobianReg.forward):
        names = [n for n in inspect.signature(fn).parameters if n != "self"]
        assert names[:2] == ["logits", "x"], (fn, names)
    for cls in (AMSReg, JacobianReg):
        assert list(inspect.signature(cls).parameters)[0] == "n_proj"
    assert penalties.ESTIMATORS == ("projection", "exact", "gradnorm", "finite_difference")
    assert set(penalties.JACOBIAN_ESTIMATORS) < set(penalties.ESTIMATORS)
    assert set(fastland.reference.PENALTY_ESTIMATORS) <= set(penalties.ESTIMATORS)


# --------------------------------------------------------------------------- batched fallback


class _ItemInBackward(torch.autograd.Function):
    """Identity whose backward calls ``.item()``: there is no way to vmap it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        scale = 1.0 if g.abs().max().item() >= 0 else 0.0
        return g * scale


def test_batched_falls_back_to_loop_with_one_warning() -> None:
    model, x = make("mlp")
    logits = _ItemInBackward.apply(model(x))
    _estimators._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = amsreg_loss(logits, x, n_proj=3, generator=torch.Generator().manual_seed(1), batched=True)
        b = amsreg_loss(logits, x, n_proj=3, generator=torch.Generator().manual_seed(1), batched=True)
    ours = [w for w in caught if "falling back to a loop" in str(w.message)]
    assert len(ours) == 1
    loop = amsreg_loss(logits, x, n_proj=3, generator=torch.Generator().manual_seed(1), batched=False)
    torch.testing.assert_close(a, loop, rtol=0, atol=0)
    torch.testing.assert_close(b, loop, rtol=0, atol=0)


def test_default_path_per_device() -> None:
    assert _estimators.use_batched(torch.device("cpu"), None) is False
    assert _estimators.use_batched(torch.device("cuda", 1), None) is True
    assert _estimators.use_batched(torch.device("cpu"), True) is True


# --------------------------------------------------------------------------- dropped zero gradients

# (node name, a layer that makes it, whether it needs a 3-D input): every entry of
# _estimators.ZERO_SECOND_DERIVATIVE, made by an ordinary layer of a small model.
ZERO_LAYERS = [
    ("ThresholdBackwardBackward0", lambda: nn.ReLU(), False),
    ("HardtanhBackwardBackward0", lambda: nn.ReLU6(), False),
    ("LeakyReluBackwardBackward0", lambda: nn.LeakyReLU(0.1), False),
    ("MaxPool2DWithIndicesBackwardBackward0", lambda: nn.MaxPool2d(2), False),
    ("MaxPool3DWithIndicesBackwardBackward0", lambda: nn.MaxPool3d(2), True),
    ("AdaptiveMaxPool2DBackwardBackward0", lambda: nn.AdaptiveMaxPool2d(3), False),
    ("AvgPool2DBackwardBackward0", lambda: nn.AvgPool2d(2), False),
    ("AvgPool3DBackwardBackward0", lambda: nn.AvgPool3d(2), True),
]


def test_zero_layers_cover_the_dropped_nodes() -> None:
    assert {name for name, _, _ in ZERO_LAYERS} == _estimators.ZERO_SECOND_DERIVATIVE


def _zero_layer_model(layer: nn.Module, three_d: bool) -> Tuple[nn.Module, Tensor]:
    """conv -> layer -> (ReLU) -> flatten -> linear (7 classes), float64, odd sizes; ``[5, 2, *S]`` input."""
    torch.manual_seed(3)
    conv, size = (nn.Conv3d(2, 3, 3, padding=1), (6, 5, 7)) if three_d else (nn.Conv2d(2, 3, 3, padding=1), (7, 6))
    with torch.no_grad():
        features = nn.Sequential(conv, layer)(torch.zeros(1, 2, *size)).numel()
    model = nn.Sequential(conv, layer, nn.Flatten(), nn.Linear(features, 7)).double()
    return model, torch.rand(5, 2, *size, dtype=torch.float64) - 0.3


def _ce_plus_penalty_grads(model: nn.Module, x0: Tensor, fn, alone: bool = False) -> list:
    """Parameter gradients of ``CE + 0.25·penalty`` (of the penalty alone: ``alone``), plain
    ``backward()``, fixed projections; None where a parameter gets no gradient."""
    model.zero_grad(set_to_none=True)
    x = fastland.penalty_input(x0)
    logits = model(x)
    pen = fn(logits, x, n_proj=2, generator=torch.Generator().manual_seed(5))
    loss = pen if alone else F.cross_entropy(logits, torch.arange(5) % 7) + 0.25 * pen
    loss.backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("fn", [amsreg_loss, jacobian_loss])
@pytest.mark.parametrize("name,layer,three_d", ZERO_LAYERS, ids=[n for n, _, _ in ZERO_LAYERS])
def test_dropped_zero_gradients_change_no_gradient(monkeypatch, fn, name: str, layer, three_d: bool) -> None:
    """Each listed double-backward node is in the penalty's VJP graph, its dropped gradient is
    exactly zero, and the parameter gradients (CE + penalty, and the penalty alone) are bitwise
    those computed with the zeros kept, None for the same parameters (none)."""
    model, x0 = _zero_layer_model(layer(), three_d)
    dropped = []
    real_hook = _estimators._drop_zero_input

    def checking_drop(grad_inputs, grad_outputs):
        dropped.append(grad_inputs[1])
        return real_hook(grad_inputs, grad_outputs)

    names = []
    real_drop = _estimators.drop_zero_gradients

    def recording(g: Tensor, logits: Tensor) -> None:
        stack, seen = [g.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is not None and node not in seen:
                seen.add(node)
                names.append(node.name())
                stack.extend(f for f, _ in node.next_functions)
        real_drop(g, logits)

    monkeypatch.setattr(_estimators, "_drop_zero_input", checking_drop)
    monkeypatch.setattr(_estimators, "drop_zero_gradients", recording)
    new = [_ce_plus_penalty_grads(model, x0, fn, alone) for alone in (False, True)]
    assert name in names
    assert dropped and all(d is not None and not d.any() for d in dropped)
    monkeypatch.setattr(_estimators, "drop_zero_gradients", lambda g, logits: None)
    kept = [_ce_plus_penalty_grads(model, x0, fn, alone) for alone in (False, True)]
    for grads_new, grads_kept in zip(new, kept):
        assert [g is None for g in grads_new] == [g is None for g in grads_kept] == [False] * len(grads_kept)
        for a, b in zip(grads_new, grads_kept):
            assert torch.equal(a, b)


def test_dropped_zero_gradients_on_lenet_match_the_reference() -> None:
    """LeNet-5 (ReLU and max-pooling) in float64: ``CE + 0.25·AMSReg`` with the zeros dropped
    against ``torch.func.grad`` of the ``vmap(jacrev)`` penalty (1e-9 relative)."""
    torch.manual_seed(0)
    model = fastland.models.create("lenet", "fmnist").double()
    x0, y = torch.rand(3, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 4, 9])
    model.zero_grad(set_to_none=True)
    x = fastland.penalty_input(x0)
    logits = model(x)
    (F.cross_entropy(logits, y) + 0.25 * amsreg_loss(logits, x, estimator="exact")).backward()
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    pen = _functional_penalty(model, x0, "ams_exact")

    def objective(ps: dict) -> Tensor:
        return F.cross_entropy(functional_call(model, (ps, buffers), (x0,)), y) + 0.25 * pen(ps)

    ref = grad(objective)(params)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")
