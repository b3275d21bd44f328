"""fastland.ops.grid_combine and grid_relative_loglik on every backend against the reference.

Backends: C++ (``cpp``), Triton under ``TRITON_INTERPRET=1`` (``triton``, CPU
tensors, a representative subset of sizes: the interpreter costs ~2 ms per
program instance) and the reference (through the custom ops and their fused
backward formulas).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastland.ops import grid_combine, grid_combine_backward, grid_relative_loglik
from fastland.reference import grid_combine_ref, grid_relative_loglik_ref
from fastland.testing import assert_close_to_reference, skip_if_unavailable, tolerance

DTYPES = (torch.float32, torch.float64)

# grid_combine: (N, G, S); grid_relative_loglik: (N, G, C)
COMBINE_FULL = [(n, g, s) for n, g, s in itertools.product((1, 3), (1, 5, 441), ((7,), (3, 5, 5), (1, 28, 28)))
                if n * g * math.prod(s) <= 400_000]
COMBINE_TRITON = [(1, 1, (7,)), (3, 5, (3, 5, 5)), (2, 441, (3,))]
LOGLIK_FULL = list(itertools.product((1, 7), (1, 5, 441), (1, 3, 10, 100, 1000)))
LOGLIK_TRITON = [(1, 1, 1), (7, 5, 3), (2, 441, 10), (3, 5, 100), (1, 5, 1000)]


def _combine_inputs(N, G, S, dtype, requires_grad=False):
    base, u, v = (torch.randn(N, *S, dtype=torch.float64).to(dtype).requires_grad_(requires_grad) for _ in range(3))
    a, b = (torch.randn(G, dtype=torch.float64).to(dtype).requires_grad_(requires_grad) for _ in range(2))
    return base, u, v, a, b


# --------------------------------------------------------------------------- grid_combine


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_combine_forward_matches_reference(backend, dtype):
    for N, G, S in COMBINE_TRITON if backend == "triton" else COMBINE_FULL:
        args = _combine_inputs(N, G, S, dtype)
        out = grid_combine(*args)
        assert out.shape == (N, G, *S) and out.dtype == dtype
        ref64 = grid_combine_ref(*(t.double() for t in args))
        if dtype == torch.float64:
            torch.testing.assert_close(out, ref64, **tolerance(dtype))
        else:
            assert_close_to_reference(out, grid_combine_ref(*args), ref64, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_combine_gradients_match_reference(backend, dtype):
    cases = COMBINE_TRITON if backend == "triton" else [(1, 1, (7,)), (3, 5, (3, 5, 5)), (2, 441, (3, 4))]
    for N, G, S in cases:
        args = _combine_inputs(N, G, S, dtype, requires_grad=True)
        out = grid_combine(*args)
        g_out = torch.randn_like(out)
        grads = torch.autograd.grad((out * g_out).sum(), args)
        args64 = [t.detach().double().requires_grad_(True) for t in args]
        ref = torch.autograd.grad((grid_combine_ref(*args64) * g_out.double()).sum(), args64)
        atol, rtol = tolerance(dtype).values()
        for name, got, want in zip(("base", "u", "v", "a", "b"), grads, ref):
            scale = 1.0 if name in ("base", "u", "v") else float(N * out[0, 0].numel())  # a, b sum over N·D
            torch.testing.assert_close(got.double(), want, atol=atol * 10 * scale ** 0.5, rtol=rtol * 10, msg=name)


def test_grid_combine_gradcheck_and_gradgradcheck(backend):
    fast = backend == "triton"
    args = _combine_inputs(2, 3, (2, 3), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(grid_combine, args, fast_mode=fast)
    assert torch.autograd.gradgradcheck(grid_combine, args, fast_mode=fast)
    g_out = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    a, b = args[3], args[4]
    assert torch.autograd.gradcheck(grid_combine_backward, (g_out, a, b), fast_mode=fast)


def test_grid_combine_backward_is_the_adjoint(backend):
    """⟨grid_combine(x, y, w, a, b), q⟩ = ⟨(x, y, w), grid_combine_backward(q, a, b)⟩ for all inputs."""
    base, u, v, a, b = _combine_inputs(3, 5, (4, 2), torch.float64)
    q = torch.randn(3, 5, 4, 2, dtype=torch.float64)
    lhs = (grid_combine(base, u, v, a, b) * q).sum()
    r0, r1, r2 = grid_combine_backward(q, a, b)
    rhs = (base * r0).sum() + (u * r1).sum() + (v * r2).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=1e-12)


def test_grid_combine_every_output_element_is_written(backend):
    N, G, S = (3, 441, (1, 6, 7)) if backend != "triton" else (2, 20, (1, 6, 7))
    args = _combine_inputs(N, G, S, torch.float32, requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(torch.empty(8)).all()
        out = grid_combine(*args)
        grads = torch.autograd.grad(out.sum(), args)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_grid_combine_non_contiguous_and_mixed_grid_dtype(backend):
    base = torch.randn(5, 4, dtype=torch.float64).t()  # [4, 5], transposed
    u = torch.randn(4, 10, dtype=torch.float64)[:, ::2]
    v = torch.randn(4, 5, dtype=torch.float64)
    a = torch.randn(6, dtype=torch.float32)  # cast to base's dtype, as the reference does
    b = torch.randn(12, dtype=torch.float64)[::2]
    torch.testing.assert_close(grid_combine(base, u, v, a, b), grid_combine_ref(base, u, v, a, b), **tolerance(torch.float64))


def test_grid_combine_empty_shapes(backend):
    assert grid_combine(*_combine_inputs(0, 4, (3,), torch.float32)).shape == (0, 4, 3)
    assert grid_combine(*_combine_inputs(2, 0, (3,), torch.float32)).shape == (2, 0, 3)
    assert grid_combine(*_combine_inputs(2, 4, (0,), torch.float32)).shape == (2, 4, 0)


def test_grid_combine_half_precision(backend):
    for dtype in (torch.bfloat16, torch.float16):
        args = _combine_inputs(2, 5, (9,), dtype)
        out = grid_combine(*args)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), grid_combine_ref(*(t.double() for t in args)), **tolerance(dtype))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(u=torch.randn(2, 4)), ValueError, r"u: expected shape \(2, 3\)"),
        (dict(v=torch.randn(2, 3, dtype=torch.float64)), TypeError, "v: expected dtype torch.float32"),
        (dict(a=torch.randn(4, 1)), ValueError, "a: expected 1 dimensions"),
        (dict(b=torch.randn(5)), ValueError, r"b: expected shape \(4,\)"),
        (dict(base=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "base: expected a floating-point"),
        (dict(a=torch.randn(4, device="meta")), ValueError, "one device"),
    ],
)
def test_grid_combine_bad_arguments_are_clear_errors(kwargs, err, match):
    args = dict(base=torch.randn(2, 3), u=torch.randn(2, 3), v=torch.randn(2, 3), a=torch.randn(4), b=torch.randn(4))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        grid_combine(**args)


# --------------------------------------------------------------------------- grid_relative_loglik


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_relative_loglik_forward_matches_reference(backend, dtype):
    for N, G, C in LOGLIK_TRITON if backend == "triton" else LOGLIK_FULL:
        logits = (torch.randn(N, G, C, dtype=torch.float64) * 3).to(dtype)
        base = torch.randn(N, dtype=torch.float64).to(dtype)
        out = grid_relative_loglik(logits, base)
        assert out.shape == (N, G) and out.dtype == dtype
        ref64 = grid_relative_loglik_ref(logits.double(), base.double())
        if dtype == torch.float64:
            torch.testing.assert_close(out, ref64, **tolerance(dtype))
        else:
            assert_close_to_reference(out, grid_relative_loglik_ref(logits, base), ref64, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_relative_loglik_gradients_match_reference(backend, dtype):
    for N, G, C in LOGLIK_TRITON if backend == "triton" else LOGLIK_FULL[::3]:
        logits = (torch.randn(N, G, C, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
        base = torch.randn(N, dtype=torch.float64).to(dtype).requires_grad_(True)
        out = grid_relative_loglik(logits, base)
        g_out = torch.randn_like(out)
        got = torch.autograd.grad((out * g_out).sum(), (logits, base))
        l64, b64 = (t.detach().double().requires_grad_(True) for t in (logits, base))
        ref = torch.autograd.grad((grid_relative_loglik_ref(l64, b64) * g_out.double()).sum(), (l64, b64))
        atol, rtol = tolerance(dtype).values()
        torch.testing.assert_close(got[0].double(), ref[0], atol=atol * 10, rtol=rtol * 10)
        torch.testing.assert_close(got[1].double(), ref[1], atol=atol * 10 * G ** 0.5, rtol=rtol * 10)


def test_grid_relative_loglik_large_magnitude_stays_finite(backend):
    N, G, C = (7, 441, 10) if backend != "triton" else (2, 30, 10)
    logits64 = (torch.rand(N, G, C, dtype=torch.float64) * 2 - 1) * 1e4
    logits64[0, 0] = -1e4  # ties at the extreme
    base64 = torch.logsumexp(logits64[:, 0], dim=-1)
    for dtype in DTYPES:
        logits = logits64.to(dtype).requires_grad_(True)
        out = grid_relative_loglik(logits, base64.to(dtype))
        assert torch.isfinite(out).all()
        ref = grid_relative_loglik_ref(logits.detach(), base64.to(dtype))
        ref64 = grid_relative_loglik_ref(logits.detach().double(), base64.to(dtype).double())
        assert_close_to_reference(out, ref, ref64, atol=4 * torch.finfo(dtype).eps * 1e4)
        (grad,) = torch.autograd.grad(out.sum(), logits)
        assert torch.isfinite(grad).all()


def test_grid_relative_loglik_gradcheck_and_gradgradcheck(backend):
    fast = backend == "triton"
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(grid_relative_loglik, (logits, base), fast_mode=fast)
    assert torch.autograd.gradgradcheck(grid_relative_loglik, (logits, base), fast_mode=fast)


def test_grid_relative_loglik_every_output_element_is_written(backend):
    N, G, C = (5, 441, 10) if backend != "triton" else (3, 100, 10)
    logits = torch.randn(N, G, C, requires_grad=True)
    base = torch.randn(N)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = grid_relative_loglik(logits, base)
        (grad,) = torch.autograd.grad(out.sum(), logits)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_grid_relative_loglik_non_contiguous_and_mixed_dtype(backend):
    logits = torch.randn(4, 10, 3, dtype=torch.float64).transpose(1, 2)  # [4, 3, 10] strided
    base = torch.randn(4, dtype=torch.float32)  # cast to the logits' dtype, as the reference does
    out = grid_relative_loglik(logits, base)
    torch.testing.assert_close(out, grid_relative_loglik_ref(logits, base), **tolerance(torch.float64))


def test_grid_relative_loglik_empty_shapes(backend):
    assert grid_relative_loglik(torch.randn(0, 3, 4), torch.randn(0)).shape == (0, 3)
    assert grid_relative_loglik(torch.randn(2, 0, 4), torch.randn(2)).shape == (2, 0)


@pytest.mark.parametrize(
    "logits, base, err, match",
    [
        (torch.randn(2, 3), torch.randn(2), ValueError, "logits: expected 3 dimensions"),
        (torch.randn(2, 3, 4), torch.randn(3), ValueError, r"base_lse: expected shape \[2\]"),
        (torch.randn(2, 3, 0), torch.randn(2), ValueError, "logits: expected at least one class"),
        (torch.randn(2, 3, 4), torch.randn(2, device="meta"), ValueError, "one device"),
        (torch.zeros(2, 3, 4, dtype=torch.int32), torch.randn(2), TypeError, "logits: expected a floating-point"),
    ],
)
def test_grid_relative_loglik_bad_arguments_are_clear_errors(logits, base, err, match):
    with pytest.raises(err, match=match):
        grid_relative_loglik(logits, base)


def test_grid_relative_loglik_short_rows_in_simd_lanes(monkeypatch):
    """The C++ kernel takes float rows of C <= 16 sixteen at a time (AVX-512 lanes where the
    CPU has them): full groups, partial tails and C just past the limit, with ±1e4 logits."""
    skip_if_unavailable("cpp")
    monkeypatch.setenv("FASTLAND_BACKEND", "cpp")
    for C in (1, 2, 7, 15, 16, 17):
        for G in (15, 16, 17, 33):
            logits = torch.randn(2, G, C) * 4
            logits.view(-1)[::5] += 1e4
            logits.view(-1)[::3] -= 1e4
            base = torch.randn(2)
            out = grid_relative_loglik(logits, base)
            ref = grid_relative_loglik_ref(logits, base)
            ref64 = grid_relative_loglik_ref(logits.double(), base.double())
            assert_close_to_reference(out, ref, ref64, atol=4 * torch.finfo(torch.float32).eps * 1e4)
