"""Tests of fastland.penalties on bad input and for reliability: argument errors,
non-finite inputs, compiled models, and the finite-difference estimator (its step
floor, autocast, a wrong ``model=``, models without double backward).

Values are checked against float64 autograd (``gradnorm``, whose own exactness
test_penalties.py holds to ``vmap(jacrev)``).
"""
from __future__ import annotations

import time
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastland import _estimators
from fastland.penalties import (
    AMSReg, JacobianReg, amsreg_loss, default_fd_step, fd_step_floor, jacobian_loss,
)
from fastland.testing import devices, tiny_bn_cnn, tiny_cnn, tiny_mlp

B = 5


def make(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tuple[nn.Module, Tensor]:
    """A tiny model in eval mode and a ``[B, *S]`` batch that requires grad."""
    torch.manual_seed(seed)
    model, shape = {
        "mlp": (tiny_mlp((2, 3, 5), n_classes=7, hidden=9), (2, 3, 5)),
        "cnn": (tiny_cnn(in_channels=2, n_classes=3, size=5), (2, 5, 5)),
        "bn_cnn": (tiny_bn_cnn(in_channels=1, n_classes=7, size=6), (1, 6, 6)),
    }[name]
    return model.to(dtype).eval(), torch.rand(B, *shape, dtype=dtype, requires_grad=True)


def sharp_cnn(seed: int = 0) -> nn.Module:
    """A float32 tiny CNN with weights scaled up: ‖∇x log p‖² of order 50."""
    torch.manual_seed(seed)
    m = tiny_cnn(in_channels=3, n_classes=10, size=8)
    with torch.no_grad():
        m[0].weight.mul_(8)
        m[3].weight.mul_(8)
    return m.eval()


# --------------------------------------------------------------------------- argument errors


def test_errors_name_the_argument() -> None:
    model, x = make("cnn")
    logits = model(x)
    with pytest.raises(ValueError, match="x: .*requires_grad=False"):
        amsreg_loss(model(x.detach()), x.detach())
    other = x.detach().clone().requires_grad_(True)
    for batched in (False, True):
        with pytest.raises(ValueError, match="x: .*graph of logits"):
            amsreg_loss(logits, other, n_proj=2, batched=batched)
    with pytest.raises(ValueError, match="x: .*graph of logits"):
        amsreg_loss(logits, other, estimator="finite_difference", model=model)
    with pytest.raises(ValueError, match=r"logits: expected 2 dimensions .*\(logits, x\)"):
        amsreg_loss(logits.unsqueeze(0), x)
    with pytest.raises(ValueError, match=r"logits: expected 2 dimensions .*\(logits, x\)"):
        AMSReg()(x, logits)  # the old argument order
    with pytest.raises(ValueError, match="logits: expected a non-empty"):
        amsreg_loss(logits[:0], x[:0])
    with pytest.raises(ValueError, match="logits: expected a tensor computed from x"):
        amsreg_loss(logits.detach(), x)
    with pytest.raises(ValueError, match="x: expected batch size 5"):
        amsreg_loss(logits, x[:3])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_proj: expected an integer >= 1"):
            amsreg_loss(logits, x, n_proj=bad)
        with pytest.raises(ValueError, match="n_proj: expected an integer >= 1"):
            AMSReg(n_proj=bad)
        with pytest.raises(ValueError, match="n_proj: expected an integer >= 1 .*estimator='exact'"):
            JacobianReg(n_proj=bad)
    with pytest.raises(ValueError, match="estimator: expected one of"):
        amsreg_loss(logits, x, estimator="hutchinson")
    for bad in ("gradnorm", "finite_difference"):
        with pytest.raises(ValueError, match="estimator: expected one of"):
            jacobian_loss(logits, x, estimator=bad)
        with pytest.raises(ValueError, match="estimator: expected one of"):
            JacobianReg(estimator=bad)
    with pytest.raises(ValueError, match="estimator: expected one of"):
        AMSReg(estimator="nope")
    with pytest.raises(ValueError, match="reduction: expected one of"):
        AMSReg(reduction="avg")
    with pytest.raises(ValueError, match="model: .*needs model="):
        amsreg_loss(logits, x, estimator="finite_difference")
    with pytest.raises(ValueError, match="h: expected a finite step > 0"):
        amsreg_loss(logits, x, estimator="finite_difference", model=model, h=0.0)
    with pytest.raises(TypeError, match="h: expected a float step"):
        amsreg_loss(logits, x, estimator="finite_difference", model=model, h="0.1")
    with pytest.raises(ValueError, match="reduction: expected one of"):
        amsreg_loss(logits, x, reduction="avg")
    with pytest.raises(TypeError, match="generator: expected a torch.Generator"):
        amsreg_loss(logits, x, generator=3)
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor"):
        amsreg_loss(logits.tolist(), x)
    with pytest.raises(TypeError, match="model: expected a callable"):
        amsreg_loss(logits, x, estimator="finite_difference", model=3)


# --------------------------------------------------------------------------- non-finite input


@pytest.mark.parametrize("where", ["x", "logits"])
def test_non_finite_input_is_refused(where: str) -> None:
    """One NaN pixel: no estimator returns a number. (A linear model's Jacobian does
    not depend on x: jacobian_loss would otherwise return a finite mean.)"""
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    x = torch.rand(3, 1, 3, 4, dtype=torch.float64)
    if where == "x":
        x[1, 0, 2, 3] = float("nan")
    x.requires_grad_(True)
    logits = linear(x)
    if where == "logits":
        logits = logits + torch.tensor([0.0, float("inf"), 0.0], dtype=torch.float64).unsqueeze(1)
    msg = f"{where}: expected finite values, got a tensor containing NaN or inf"
    for est in ("projection", "exact", "gradnorm", "finite_difference"):
        with pytest.raises(ValueError, match=msg):
            amsreg_loss(logits, x, estimator=est, model=linear)
    for est in ("projection", "exact"):
        with pytest.raises(ValueError, match=msg):
            jacobian_loss(logits, x, estimator=est)
    if where == "x":  # the same model on finite input: a finite value (the check is what refuses)
        x2 = torch.nan_to_num(x.detach()).requires_grad_(True)
        assert torch.isfinite(jacobian_loss(linear(x2), x2, estimator="exact"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype: torch.dtype) -> None:
    """The sum-first check equals ``isfinite(t).all()``: a NaN, +inf, -inf or both infs
    anywhere are caught; the largest finite values (whose float32 sum overflows) are not."""
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(3, 5, 7, generator=gen).to(dtype)
    assert bool(_estimators.all_finite(t))
    big = torch.full((4, 1000), torch.finfo(dtype).max, dtype=dtype)
    assert bool(_estimators.all_finite(big)) and bool(_estimators.all_finite(-big))
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        u = t.clone()
        u.view(-1)[torch.randperm(u.numel(), generator=gen)[:len(bad)]] = torch.tensor(bad, dtype=dtype)
        assert not bool(_estimators.all_finite(u)), bad
    assert bool(_estimators.all_finite(torch.arange(5)))


def test_penalty_input_bad_input() -> None:
    from fastland.penalties import penalty_input

    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        penalty_input([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x: expected a floating-point dtype, got torch.int64"):
        penalty_input(torch.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="x: expected at least 1"):
        penalty_input(torch.tensor(1.0))


def test_require_is_asynchronous_on_cuda_only() -> None:
    """CPU: a plain ValueError; the CUDA branch is torch._assert_async (no host sync)."""
    _estimators.require(torch.tensor(True), "never")
    with pytest.raises(ValueError, match="^x: bad$"):
        _estimators.require(torch.tensor(False), "x: bad")


# --------------------------------------------------------------------------- compiled models


def test_compiled_model_gets_the_remedy() -> None:
    """torch.compile (aot_eager: the same AOTAutograd backward as inductor, no C++
    compile) has no double backward: the double-backward estimators say so up front,
    finite_difference trains through it."""
    torch.manual_seed(0)
    model = tiny_mlp((1, 3, 4), n_classes=3, hidden=6)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.rand(4, 1, 3, 4, requires_grad=True)
    t0 = time.perf_counter()
    logits = compiled(x)
    assert logits.grad_fn.name() == "CompiledFunctionBackward"
    # the check walks the graph only once this module is loaded: it must define the node's Function
    assert logits.grad_fn._forward_cls.__module__ == _estimators._AOT_RUNTIME
    for est in ("projection", "exact", "gradnorm"):
        with pytest.raises(ValueError, match="logits: computed by a torch.compile'd model.*finite_difference"):
            amsreg_loss(logits, x, estimator=est)
    with pytest.raises(ValueError, match="torch.compile'd model"):
        JacobianReg()(logits, x)
    fd = amsreg_loss(logits, x, estimator="finite_difference", model=compiled)
    fd.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    x_eager = x.detach().clone().requires_grad_(True)
    ref = amsreg_loss(model(x_eager), x_eager, estimator="finite_difference", model=model)
    torch.testing.assert_close(fd, ref, rtol=1e-5, atol=1e-9)
    assert time.perf_counter() - t0 < 30


def test_compiled_message_names_the_remedy() -> None:
    msg = _estimators.compiled_model_message("exact")
    assert msg.startswith("logits: ") and "estimator='exact'" in msg
    assert "estimator='finite_difference', model=" in msg and "double backward" in msg


# --------------------------------------------------------------------------- finite difference: step


def test_step_below_floor_is_refused() -> None:
    """Today's h=1e-9 in float32 gave 0.0 (x + h·u == x): refused, naming the floor."""
    model, x = sharp_cnn(), torch.rand(4, 3, 8, 8, requires_grad=True)
    logits = model(x)
    with pytest.raises(ValueError, match=r"h: expected a step >= 0.00035 for log p evaluated in torch.float32"):
        amsreg_loss(logits, x, estimator="finite_difference", model=model, h=1e-9)
    floor = fd_step_floor(torch.float32)
    assert floor == pytest.approx(2 ** -11.5)
    at_floor = amsreg_loss(logits, x, estimator="finite_difference", model=model, h=floor)
    gn = amsreg_loss(logits, x, estimator="gradnorm")
    torch.testing.assert_close(at_floor, gn, rtol=5e-2, atol=0)  # usable, if noisier than the default
    assert fd_step_floor(torch.float64) < 1e-7 < 1e-4 == default_fd_step(torch.float64)
    for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert fd_step_floor(dt) < default_fd_step(dt)


# --------------------------------------------------------------------------- finite difference: values and training


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


# --------------------------------------------------------------------------- finite difference: autocast


def test_finite_difference_under_autocast_is_the_float32_estimate() -> None:
    """bfloat16 autocast logits: log p is re-evaluated with autocast off, so the estimate
    is float32's (to rounding) and within 3 % of the float64 gradient norm."""
    model = sharp_cnn()
    x = torch.rand(8, 3, 8, 8, requires_grad=True)
    fd32 = amsreg_loss(model(x), x, estimator="finite_difference", model=model, reduction="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        fd = amsreg_loss(logits, x, estimator="finite_difference", model=model, reduction="none")
    assert fd.dtype == torch.float32
    torch.testing.assert_close(fd, fd32, rtol=1e-3, atol=0)  # float32 rounding of the difference
    m64, x64 = model.double(), x.detach().double().requires_grad_(True)
    gn64 = amsreg_loss(m64(x64), x64, estimator="gradnorm", reduction="none")
    assert gn64.mean() > 10  # a model with a large input score, where bfloat16 rounding matters
    torch.testing.assert_close(fd.double(), gn64.detach(), rtol=3e-2, atol=0)


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


# --------------------------------------------------------------------------- finite difference: model=


@pytest.mark.parametrize("autocast", [False, True])
def test_wrong_model_is_caught(autocast: bool) -> None:
    """model= another network than the one of logits: refused (today 0.32 for ~4e-4)."""
    model, other = sharp_cnn(seed=0), sharp_cnn(seed=1)
    x = torch.rand(8, 3, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
        assert torch.isfinite(amsreg_loss(logits, x, estimator="finite_difference", model=model))
        with pytest.raises(ValueError, match="model: .*(not the module that computed logits|pass the model)"):
            amsreg_loss(logits, x, estimator="finite_difference", model=other)


class _TupleNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(12, 3)

    def forward(self, x: Tensor):
        z = self.fc(x.flatten(1))
        return (z, z.detach()) if self.kind == "tuple" else {"logits": z}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("autocast", [False, True])
def test_model_returning_a_container_gets_a_clear_error(kind: str, autocast: bool) -> None:
    net = _TupleNet(kind)
    x = torch.rand(4, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = net(x)
        logits = out[0] if kind == "tuple" else out["logits"]
        name = r"model\(x\)" if autocast else r"model\(x \+ h·u\)"
        with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor, got {kind}"):
            amsreg_loss(logits, x, estimator="finite_difference", model=net)


def test_finite_difference_refuses_active_dropout() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    x = torch.rand(4, 12, requires_grad=True)
    with pytest.raises(ValueError, match="model: .*Dropout in train mode"):
        amsreg_loss(model(x), x, estimator="finite_difference", model=model)
    model.eval()
    assert torch.isfinite(amsreg_loss(model(x), x, estimator="finite_difference", model=model))


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("device", devices(), ids=str)
def test_generator_reproducible_on_device(device: torch.device) -> None:
    model, x = make("cnn", torch.float32)
    model = model.to(device)
    x = x.detach().to(device).requires_grad_(True)
    logits = model(x)

    def draw(seed: int, fn=amsreg_loss) -> Tensor:
        return fn(logits, x, n_proj=2, generator=torch.Generator(device).manual_seed(seed))

    for fn in (amsreg_loss, jacobian_loss):
        assert torch.equal(draw(3, fn), draw(3, fn))
        assert not torch.equal(draw(3, fn), draw(4, fn))
    reg = JacobianReg(n_proj=2)
    assert torch.equal(reg(logits, x, generator=torch.Generator(device).manual_seed(3)), draw(3, jacobian_loss))
    assert draw(3).device == x.device
