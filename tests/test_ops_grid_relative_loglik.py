"""fastland.ops.grid_relative_loglik on every backend and device against the reference.

Backends: C++ (``cpp``, CPU), Triton (``triton``: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``, a representative subset of sizes) and the reference (through the
ops and their backward formulas).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fastland.ops import grid_relative_loglik
from fastland.reference import grid_relative_loglik_backward_ref, grid_relative_loglik_ref
from fastland.testing import assert_close_to_reference, skip_if_unavailable, tolerance

DTYPES = (torch.float32, torch.float64)

# (N, G, C)
LOGLIK_FULL = list(itertools.product((1, 7), (1, 5, 441), (1, 3, 10, 100, 1000)))
LOGLIK_TRITON = [(1, 1, 1), (7, 5, 3), (2, 441, 10), (3, 5, 100), (1, 5, 1000)]





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


def test_grid_relative_loglik_short_rows_in_simd_lanes():
    """The C++ kernel takes float rows of C <= 16 sixteen at a time (AVX-512 lanes where the
    CPU has them): full groups, partial tails and C just past the limit, with ±1e4 logits."""
    skip_if_unavailable("cpp")
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


def test_grid_relative_loglik_backward_op_matches_backward_reference(backend):
    for N, G, C in LOGLIK_TRITON:
        logits = torch.randn(N, G, C, dtype=torch.float64) * 3
        grad_out = torch.randn(N, G, dtype=torch.float64)
        got = torch.ops.fastland.grid_relative_loglik_backward(grad_out, logits)
        torch.testing.assert_close(got, grid_relative_loglik_backward_ref(grad_out, logits), **tolerance(torch.float64))
