"""Tests of fastland.penalties: amsreg_loss, jacobian_loss, AMSReg, JacobianReg.

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
from fastland import penalties
from fastland.penalties import AMSReg, JacobianReg, amsreg_loss, default_fd_step, jacobian_loss
from fastland.reference import amsreg_penalty_ref, jacobian_penalty_ref, unit_sphere_noise
from fastland.testing import devices, tiny_bn_cnn, tiny_cnn, tiny_mlp

# --------------------------------------------------------------------------- helpers

# Odd shapes: batch 5, 3 or 7 classes, non-square inputs where the model allows.
MODELS: Dict[str, Callable[[], Tuple[nn.Module, Tuple[int, ...]]]] = {
    "mlp": lambda: (tiny_mlp((2, 3, 5), n_classes=7, hidden=9), (2, 3, 5)),
    "cnn": lambda: (tiny_cnn(in_channels=2, n_classes=3, size=5), (2, 5, 5)),
    "bn_cnn": lambda: (tiny_bn_cnn(in_channels=1, n_classes=7, size=6), (1, 6, 6)),
}
B = 5


def make(name: str, dtype: torch.dtype = torch.float64) -> Tuple[nn.Module, Tensor]:
    """A tiny model in eval mode and a fresh ``[B, *S]`` input batch (requires grad)."""
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


# --------------------------------------------------------------------------- finite difference


def test_finite_difference_close_to_gradnorm() -> None:
    model, x = make("bn_cnn")
    logits = model(x)
    gn = amsreg_loss(logits, x, estimator="gradnorm", reduction="none")
    fd = amsreg_loss(logits, x, estimator="finite_difference", model=model, h=1e-6, reduction="none")
    torch.testing.assert_close(fd, gn, rtol=1e-4, atol=1e-12)


def test_finite_difference_default_step_float32() -> None:
    """float32 at the default h (1e-2) within 3 % of the float64 gradient norm."""
    model, x64 = make("cnn")
    gn = amsreg_loss(model(x64), x64, estimator="gradnorm", reduction="none")
    model32 = model.float()
    x32 = x64.detach().float().requires_grad_(True)
    fd = amsreg_loss(model32(x32), x32, estimator="finite_difference", model=model32, reduction="none")
    assert default_fd_step(torch.float32) == 1e-2
    torch.testing.assert_close(fd.double(), gn.detach(), rtol=3e-2, atol=1e-7)


class _OnceDiffSoftplus(torch.autograd.Function):
    """softplus whose backward may run once only (any double backward raises),
    and which records whether grad mode was on in its backward (it is on
    exactly when a caller asked for create_graph=True)."""

    backward_grad_modes: list = []

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        _OnceDiffSoftplus.backward_grad_modes.append(torch.is_grad_enabled())
        return _once_diff_backward(ctx, g)


@torch.autograd.function.once_differentiable
def _once_diff_backward(ctx, g: Tensor) -> Tensor:
    (x,) = ctx.saved_tensors
    return g * torch.sigmoid(x)


class _OnceDiffNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_OnceDiffSoftplus.apply(self.fc1(x.flatten(1))))


def test_finite_difference_trains_without_double_backward() -> None:
    model = _OnceDiffNet().double()
    x0 = torch.rand(7, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    # The op really has no double backward: a double-backward estimator fails.
    x = x0.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable"):
        amsreg_loss(model(x), x, estimator="gradnorm").backward()

    def fd_penalty() -> Tensor:
        x = x0.clone().requires_grad_(True)
        return amsreg_loss(model(x), x, estimator="finite_difference", model=model)

    before = fd_penalty().item()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _OnceDiffSoftplus.backward_grad_modes.clear()
    for _ in range(5):
        x = x0.clone().requires_grad_(True)
        logits = model(x)
        loss = F.cross_entropy(logits, y) + 50.0 * amsreg_loss(
            logits, x, estimator="finite_difference", model=model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # every backward of the op ran with grad mode off: no create_graph, no double backward
    assert len(_OnceDiffSoftplus.backward_grad_modes) >= 5 * 3
    assert not any(_OnceDiffSoftplus.backward_grad_modes)
    assert fd_penalty().item() < before


def test_finite_difference_keeps_batchnorm_running_stats() -> None:
    model = tiny_bn_cnn(n_classes=4, size=5).double().train()
    x = torch.rand(6, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    bn = model[1]
    after_forward = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    amsreg_loss(logits, x, estimator="finite_difference", model=model).backward()
    for t, ref in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), after_forward):
        assert torch.equal(t, ref)


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
    x.requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y) + lam / 2 * fastland.amsreg_loss(logits, x)
    loss.backward()
    # ---
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------- modules


def test_jacobian_reg_on_fixed_unit_vectors() -> None:
    """JacobianReg(n)(x, logits) = ½·C·Σ_v ‖vᵀJ‖²/(n·B) (Hoffman et al.)."""
    model, x = make("mlp")  # C = 7
    logits = model(x)
    z, J = per_sample_jacobian(model, x)
    Bn, C = z.shape
    for n in (1, 3):
        got = JacobianReg(n)(x, logits, generator=torch.Generator().manual_seed(9))
        v = unit_rows(unit_sphere_noise(n, z, torch.Generator().manual_seed(9)))  # [n, B, C]
        vJ = torch.einsum("nbc,bcd->nbd", v, J)
        expected = 0.5 * C * vJ.pow(2).sum() / (n * Bn)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(JacobianReg(-1)(x, logits), 0.5 * J.pow(2).sum() / Bn, rtol=1e-10, atol=1e-14)


def test_amsreg_module_equals_function() -> None:
    model, x = make("cnn")
    logits = model(x)
    for est in ("projection", "exact", "gradnorm"):
        got = AMSReg(n_proj=2, estimator=est)(x, logits, generator=torch.Generator().manual_seed(1))
        ref = amsreg_loss(logits, x, n_proj=2, estimator=est, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    fd = AMSReg(estimator="finite_difference", h=1e-5)(x, logits, model=model)
    torch.testing.assert_close(fd, amsreg_loss(logits, x, estimator="finite_difference", model=model, h=1e-5))
    assert "finite_difference" in repr(AMSReg(estimator="finite_difference"))


# --------------------------------------------------------------------------- devices, generators, autocast


@pytest.mark.parametrize("device", devices(), ids=str)
def test_generator_reproducible_on_device(device: torch.device) -> None:
    model, x = make("cnn", torch.float32)
    model = model.to(device)
    x = x.detach().to(device).requires_grad_(True)
    logits = model(x)

    def draw(seed: int) -> Tensor:
        return amsreg_loss(logits, x, n_proj=2, generator=torch.Generator(device).manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert draw(3).device == x.device


def test_autocast_bfloat16_accumulates_in_float32() -> None:
    model, x = make("cnn", torch.float32)
    ref = amsreg_loss(model(x), x, estimator="exact")
    for est in ("exact", "gradnorm", "finite_difference", "projection"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            val = amsreg_loss(logits, x, estimator=est, model=model, n_proj=2)
        assert val.dtype == torch.float32 and torch.isfinite(val)
        val.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        if est == "exact":
            torch.testing.assert_close(val, ref, rtol=5e-2, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        jl = jacobian_loss(logits, x, estimator="exact")
    assert jl.dtype == torch.float32


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
    penalties._warned.clear()
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
    assert penalties._use_batched(torch.device("cpu"), None) is False
    assert penalties._use_batched(torch.device("cuda", 1), None) is True
    assert penalties._use_batched(torch.device("cpu"), True) is True


# --------------------------------------------------------------------------- errors


def test_errors_name_the_argument() -> None:
    model, x = make("cnn")
    logits = model(x)
    with pytest.raises(ValueError, match="inputs: .*requires_grad=False"):
        amsreg_loss(model(x.detach()), x.detach())
    other = x.detach().clone().requires_grad_(True)
    for batched in (False, True):
        with pytest.raises(ValueError, match="inputs: .*graph of logits"):
            amsreg_loss(logits, other, n_proj=2, batched=batched)
    with pytest.raises(ValueError, match="inputs: .*graph of logits"):
        amsreg_loss(logits, other, estimator="finite_difference", model=model)
    with pytest.raises(ValueError, match="logits: expected 2 dimensions"):
        amsreg_loss(logits.unsqueeze(0), x)
    with pytest.raises(ValueError, match="logits: expected a non-empty"):
        amsreg_loss(logits[:0], x[:0])
    with pytest.raises(ValueError, match="logits: expected a tensor computed from inputs"):
        amsreg_loss(logits.detach(), x)
    with pytest.raises(ValueError, match="inputs: expected batch size 5"):
        amsreg_loss(logits, x[:3])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_proj: expected an integer >= 1"):
            amsreg_loss(logits, x, n_proj=bad)
        with pytest.raises(ValueError, match="n_proj: expected an integer >= 1"):
            AMSReg(n_proj=bad)
    with pytest.raises(ValueError, match="estimator: expected one of"):
        amsreg_loss(logits, x, estimator="hutchinson")
    with pytest.raises(ValueError, match="estimator: expected one of"):
        jacobian_loss(logits, x, estimator="gradnorm")
    with pytest.raises(ValueError, match="estimator: expected one of"):
        AMSReg(estimator="nope")
    with pytest.raises(ValueError, match="model: .*needs model="):
        amsreg_loss(logits, x, estimator="finite_difference")
    with pytest.raises(ValueError, match="h: expected a finite step > 0"):
        amsreg_loss(logits, x, estimator="finite_difference", model=model, h=0.0)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        amsreg_loss(logits, x, reduction="avg")
    with pytest.raises(TypeError, match="generator: expected a torch.Generator"):
        amsreg_loss(logits, x, generator=3)
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor"):
        amsreg_loss(logits.tolist(), x)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="n: expected an integer >= 1, or -1"):
            JacobianReg(bad)


def test_finite_difference_refuses_active_dropout() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    x = torch.rand(4, 12, requires_grad=True)
    with pytest.raises(ValueError, match="model: .*Dropout in train mode"):
        amsreg_loss(model(x), x, estimator="finite_difference", model=model)
    model.eval()
    assert torch.isfinite(amsreg_loss(model(x), x, estimator="finite_difference", model=model))
