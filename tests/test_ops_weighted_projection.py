"""fastland.ops.weighted_projection on every backend and device against the reference (fastland.reference).

Backends: C++ (``cpp``, CPU), Triton (``triton``: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and the reference itself (``reference``, which runs through the
op and its backward op). The interpreter costs ~2 ms per program instance, so Triton
sees a representative subset of the size grid.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fastland.ops import weighted_projection
from fastland.reference import weighted_projection_backward_ref, weighted_projection_ref
from fastland.testing import assert_close_to_reference, tolerance

DTYPES = (torch.float32, torch.float64)
# (B, C, P): every value of each axis of the size grid, capped at 60k elements per
# case to keep the file fast; the largest shapes are covered by one forward case.
FULL_GRID = [c for c in itertools.product((1, 7, 513), (1, 3, 10, 100, 1000), (1, 4)) if c[0] * c[1] * c[2] <= 60_000]
LARGE_CASE = (513, 1000, 4)
TRITON_GRID = [(1, 1, 1), (7, 3, 4), (513, 10, 4), (7, 100, 1), (7, 1000, 4)]






def _cases(backend: str, large: bool = False):
    if backend == "triton":
        return TRITON_GRID
    return FULL_GRID + [LARGE_CASE] if large else FULL_GRID


def _inputs(B: int, C: int, P: int, dtype: torch.dtype, scale: float = 3.0):
    logits = torch.randn(B, C, dtype=torch.float64) * scale
    noise = torch.randn(P, B, C, dtype=torch.float64)
    return logits.to(dtype), noise.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", ("softmax", "uniform"))
def test_forward_matches_reference(backend, dtype, weight):
    for B, C, P in _cases(backend, large=backend == "cpp"):
        logits, noise = _inputs(B, C, P, dtype)
        cot, lse = weighted_projection(logits, noise, weight)
        ref_cot, ref_lse = weighted_projection_ref(logits, noise, weight)
        ref64_cot, ref64_lse = weighted_projection_ref(logits.double(), noise.double(), weight)
        assert cot.shape == (P, B, C) and lse.shape == (B,)
        assert cot.dtype == dtype and lse.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(cot, ref64_cot, **tolerance(dtype))
            torch.testing.assert_close(lse, ref64_lse, **tolerance(dtype))
        else:
            assert_close_to_reference(cot, ref_cot, ref64_cot, atol=1e-6)
            assert_close_to_reference(lse, ref_lse, ref64_lse, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", ("softmax", "uniform"))
def test_gradient_matches_reference(backend, dtype, weight):
    """VJP with random cotangents on both outputs, against autograd through the reference."""
    for B, C, P in _cases(backend):
        logits, noise = _inputs(B, C, P, dtype)
        logits.requires_grad_(True)
        cot, lse = weighted_projection(logits, noise, weight)
        g_cot, g_lse = torch.randn_like(cot), torch.randn_like(lse)
        (grad,) = torch.autograd.grad((cot * g_cot).sum() + (lse * g_lse).sum(), logits)
        z64 = logits.detach().double().requires_grad_(True)
        rc, rl = weighted_projection_ref(z64, noise.double(), weight)
        (ref,) = torch.autograd.grad((rc * g_cot.double()).sum() + (rl * g_lse.double()).sum(), z64)
        atol, rtol = tolerance(dtype).values()
        torch.testing.assert_close(grad.double(), ref, atol=atol * 10, rtol=rtol * 10)


@pytest.mark.parametrize("softmax", (True, False))
def test_backward_op_matches_backward_reference(backend, softmax):
    """The op fastland::weighted_projection_backward itself against its reference, float64."""
    for B, C, P in _cases(backend):
        logits, noise = _inputs(B, C, P, torch.float64)
        g_cot, g_lse = torch.randn(P, B, C, dtype=torch.float64), torch.randn(B, dtype=torch.float64)
        got = torch.ops.fastland.weighted_projection_backward(g_cot, g_lse, logits, noise, softmax)
        weight = "softmax" if softmax else "uniform"
        want = weighted_projection_backward_ref(g_cot, g_lse, logits, noise, weight)
        torch.testing.assert_close(got, want, **tolerance(torch.float64))


@pytest.mark.parametrize("weight", ("softmax", "uniform"))
def test_large_magnitude_logits_stay_finite(backend, weight):
    B, C, P = (513, 10, 4) if backend != "triton" else (33, 10, 2)
    logits = (torch.rand(B, C, dtype=torch.float64) * 2 - 1) * 1e4
    logits[0] = 1e4  # a row of ties at the extreme
    noise = torch.randn(P, B, C, dtype=torch.float64)
    for dtype in DTYPES:
        z = logits.to(dtype).requires_grad_(True)
        cot, lse = weighted_projection(z, noise.to(dtype), weight)
        assert torch.isfinite(cot).all() and torch.isfinite(lse).all()
        ref_cot, ref_lse = weighted_projection_ref(z.detach(), noise.to(dtype), weight)
        ref64_cot, ref64_lse = weighted_projection_ref(z.detach().double(), noise.to(dtype).double(), weight)
        eps = torch.finfo(dtype).eps
        assert_close_to_reference(cot, ref_cot, ref64_cot, atol=4 * eps)
        assert_close_to_reference(lse, ref_lse, ref64_lse, atol=2 * eps * 1e4)  # 2 ulp at 1e4
        (grad,) = torch.autograd.grad(cot.sum() + lse.sum(), z)
        assert torch.isfinite(grad).all()


def test_gradcheck_and_gradgradcheck(backend):
    """float64: first and second derivatives against finite differences, both weights.

    The Triton interpreter is slow, so it gets fast_mode (a random projection of the Jacobian).
    """
    fast = backend == "triton"
    for weight in ("softmax", "uniform"):
        for B, C, P in ((3, 4, 2), (2, 1, 1)):
            logits = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
            noise = torch.randn(P, B, C, dtype=torch.float64)

            def f(z, weight=weight, noise=noise):
                return weighted_projection(z, noise, weight)

            assert torch.autograd.gradcheck(f, (logits,), fast_mode=fast)
            assert torch.autograd.gradgradcheck(f, (logits,), fast_mode=fast)


def test_backward_of_backward_is_differentiable_again(backend):
    """Third order through the analytic double backward matches the reference's."""
    logits = torch.randn(4, 5, dtype=torch.float64)
    noise = torch.randn(2, 4, 5, dtype=torch.float64)

    def third(fn):
        z = logits.clone().requires_grad_(True)
        cot, lse = fn(z, noise, "softmax")
        (g,) = torch.autograd.grad((cot ** 2).sum() + lse.sum(), z, create_graph=True)
        (gg,) = torch.autograd.grad((g ** 2).sum(), z, create_graph=True)
        (ggg,) = torch.autograd.grad(gg.sin().sum(), z)
        return ggg

    torch.testing.assert_close(third(weighted_projection), third(weighted_projection_ref), atol=1e-10, rtol=1e-8)


def test_amsreg_style_double_backward_reaches_parameters(backend):
    """The penalty ``‖(v ⊙ p)ᵀ J‖²`` and its parameter gradient equal the reference's."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 7, 4, dtype=torch.float64)

    def penalty_grads(fn):
        logits = model(x)
        cot, _ = fn(logits, noise, "softmax")
        total = 0
        for k in range(cot.shape[0]):
            (g,) = torch.autograd.grad(logits, x, grad_outputs=cot[k], create_graph=True)
            total = total + g.pow(2).sum()
        return torch.autograd.grad(total, list(model.parameters()))

    for got, ref in zip(penalty_grads(weighted_projection), penalty_grads(weighted_projection_ref)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


def test_every_output_element_is_written(backend):
    """Uninitialised memory is NaN under deterministic mode: any unwritten element would show."""
    B, C, P = (513, 10, 4) if backend != "triton" else (130, 10, 3)
    logits, noise = _inputs(B, C, P, torch.float32)
    logits.requires_grad_(True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(torch.empty(8)).all()  # the poisoning is in effect
        for weight in ("softmax", "uniform"):
            cot, lse = weighted_projection(logits, noise, weight)
            (grad,) = torch.autograd.grad((cot * torch.randn_like(cot)).sum() + lse.sum(), logits)
            assert torch.isfinite(cot).all() and torch.isfinite(lse).all() and torch.isfinite(grad).all()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_non_contiguous_inputs(backend):
    B, C, P = 9, 6, 3
    logits = torch.randn(C, B, dtype=torch.float64).t()  # transposed view
    noise = torch.randn(P, B, 2 * C, dtype=torch.float64)[..., ::2]  # strided view
    assert not logits.is_contiguous() and not noise.is_contiguous()
    cot, lse = weighted_projection(logits, noise)
    ref_cot, ref_lse = weighted_projection_ref(logits.contiguous(), noise.contiguous())
    torch.testing.assert_close(cot, ref_cot, **tolerance(torch.float64))
    torch.testing.assert_close(lse, ref_lse, **tolerance(torch.float64))


def test_half_precision_inputs(backend):
    """bf16/fp16 logits (fp32 noise, as unit_sphere_noise draws it): fp32 accumulation inside."""
    for dtype in (torch.bfloat16, torch.float16):
        logits = torch.randn(7, 10).to(dtype)
        noise = torch.randn(2, 7, 10)
        cot, lse = weighted_projection(logits, noise)
        assert cot.dtype == dtype and lse.dtype == dtype
        ref_cot, ref_lse = weighted_projection_ref(logits.double(), noise.to(dtype).double())
        torch.testing.assert_close(cot.double(), ref_cot, **tolerance(dtype))
        torch.testing.assert_close(lse.double(), ref_lse, **tolerance(dtype))


def test_empty_batch_and_no_projection(backend):
    cot, lse = weighted_projection(torch.randn(0, 5), torch.randn(2, 0, 5))
    assert cot.shape == (2, 0, 5) and lse.shape == (0,)
    logits = torch.randn(3, 5)
    cot, lse = weighted_projection(logits, torch.randn(0, 3, 5))
    assert cot.shape == (0, 3, 5)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1))


@pytest.mark.parametrize(
    "logits, noise, weight, err, match",
    [
        (torch.randn(3, 4).long(), torch.randn(1, 3, 4), "softmax", TypeError, "logits: expected a floating-point"),
        (torch.randn(3, 4), torch.randn(3, 4), "softmax", ValueError, "noise: expected 3 dimensions"),
        (torch.randn(3, 4), torch.randn(1, 3, 5), "softmax", ValueError, r"noise: expected shape \[P, 3, 4\]"),
        (torch.randn(3, 4), torch.randn(1, 3, 4), "gauss", ValueError, "weight: expected one of"),
        (torch.randn(3, 0), torch.randn(1, 3, 0), "softmax", ValueError, "logits: expected at least one class"),
        (torch.randn(3, 4), torch.randn(1, 3, 4, device="meta"), "softmax", ValueError, "one device"),
        ([[1.0]], torch.randn(1, 1, 1), "softmax", TypeError, "logits: expected a torch.Tensor"),
    ],
)
def test_bad_arguments_are_clear_errors(logits, noise, weight, err, match):
    with pytest.raises(err, match=match):
        weighted_projection(logits, noise, weight)


def test_noise_that_requires_grad_is_refused():
    with pytest.raises(ValueError, match="noise: expected a tensor that does not require grad"):
        weighted_projection(torch.randn(2, 3), torch.randn(1, 2, 3, requires_grad=True))


@pytest.mark.parametrize("batched", (True, False))
@pytest.mark.parametrize("name", ("amsreg", "jacobian"))
def test_penalties_batched_and_looped_match_the_reference(backend, name, batched):
    """The penalties built on this op (one batched backward, or a loop) against the reference, and their
    parameter gradients: exact estimator (no sampling noise), float64, on the fixture's device."""
    from fastland.penalties import amsreg_loss, jacobian_loss
    from fastland.reference import amsreg_penalty_ref, jacobian_penalty_ref

    loss, ref_penalty = (amsreg_loss, amsreg_penalty_ref) if name == "amsreg" else (jacobian_loss, jacobian_penalty_ref)
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    got = loss(model(x), x, estimator="exact", reduction="none", batched=batched)
    want = ref_penalty(model(x), x, estimator="exact")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    g_got = torch.autograd.grad(got.sum(), list(model.parameters()), materialize_grads=True)
    g_want = torch.autograd.grad(want.sum(), list(model.parameters()), materialize_grads=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
