"""fastland.ops.grid_combine (and its adjoint grid_combine_backward) on every backend and device
against the reference.

Backends: C++ (``cpp``, CPU), Triton (``triton``: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``, a representative subset of sizes: the interpreter costs ~2 ms per
program instance) and the reference (through the ops and their backward formulas).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastland.ops import grid_combine, grid_combine_backward
from fastland.reference import grid_combine_backward_ref, grid_combine_ref
from fastland.testing import assert_close_to_reference, tolerance

DTYPES = (torch.float32, torch.float64)

# (N, G, S)
COMBINE_FULL = [(n, g, s) for n, g, s in itertools.product((1, 3), (1, 5, 441), ((7,), (3, 5, 5), (1, 28, 28)))
                if n * g * math.prod(s) <= 400_000]
COMBINE_TRITON = [(1, 1, (7,)), (3, 5, (3, 5, 5)), (2, 441, (3,))]






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


def test_grid_combine_backward_op_matches_backward_reference(backend):
    for N, G, S in COMBINE_TRITON:
        grad_out = torch.randn(N, G, *S, dtype=torch.float64)
        a, b = torch.randn(G, dtype=torch.float64), torch.randn(G, dtype=torch.float64)
        for got, want in zip(grid_combine_backward(grad_out, a, b), grid_combine_backward_ref(grad_out, a, b)):
            torch.testing.assert_close(got, want, **tolerance(torch.float64))
