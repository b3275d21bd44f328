"""The attacks' max-pool: the C++ kernel's values and first-maximum indices are PyTorch's
(odd shapes, ties, -inf and NaN, both dtypes, non-contiguous inputs), the values without a
gradient are PyTorch's, the gradient is PyTorch's bitwise and checks out in float64 (also
through a double backward), and without the extension PyTorch's kernel serves."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastland import _ext
from fastland.attacks import _max_pool
from fastland.attacks._max_pool import max_pool

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [((3, 4, 7, 9), (2, 2)), ((2, 3, 6, 6), (3, 3)), ((2, 2, 7, 8), (2, 3)), ((1, 1, 1, 5), (1, 2)),
          ((5, 6, 28, 28), (2, 2)), ((2, 16, 10, 10), (2, 2)), ((1, 2, 3, 3), (3, 1))]
DTYPES = [torch.float32, torch.float64]
needs_ext = pytest.mark.skipif(not _ext.extension_available(), reason="the C++ extension is not built")


def _input(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with ties: a flat block, a block of few integers, -inf and a NaN."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g, dtype=dtype)
    z[0, 0, : max(shape[2] // 2, 1)] = 0.5  # a flat background: every window ties
    z[-1] = torch.randint(-1, 2, z[-1].shape, generator=g).to(dtype)  # ties between few values
    z[0, -1, 0, 0] = float("-inf")
    return z


def _reference(z: torch.Tensor, kernel):
    return torch.ops.aten.max_pool2d_with_indices(z, list(kernel), list(kernel), [0, 0], [1, 1], False)


@needs_ext
@pytest.mark.parametrize("shape,kernel", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_gives_pytorch_values_and_indices(shape, kernel, dtype) -> None:
    from fastland import _C

    for seed in range(3):
        z = _input(shape, dtype, seed)
        if z.numel() > 4:
            z.view(-1)[3] = float("nan")  # NaN replaces, as in PyTorch
        values, index = _C.max_pool2d(z, *kernel)
        ref_values, ref_index = _reference(z, kernel)
        assert torch.equal(values, ref_values) or torch.allclose(values, ref_values, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(index, ref_index)


@needs_ext
def test_kernel_reads_non_contiguous_inputs_and_refuses_bad_ones() -> None:
    from fastland import _C

    z = _input((4, 3, 9, 8), torch.float32, 4).transpose(2, 3)  # [4, 3, 8, 9], non-contiguous
    values, index = _C.max_pool2d(z, 2, 2)
    ref_values, ref_index = _reference(z.contiguous(), (2, 2))
    assert torch.equal(values, ref_values) and torch.equal(index, ref_index)
    with pytest.raises(RuntimeError, match="z: expected shape"):
        _C.max_pool2d(torch.zeros(3, 4, 4), 2, 2)
    with pytest.raises(RuntimeError, match="z: expected float32 or float64"):
        _C.max_pool2d(torch.zeros(1, 1, 4, 4, dtype=torch.float16), 2, 2)


@pytest.mark.parametrize("shape,kernel", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_gradient_are_pytorch_bitwise(shape, kernel, dtype) -> None:
    g = torch.Generator().manual_seed(5)
    for seed in range(3):
        z = _input(shape, dtype, seed)
        with torch.no_grad():
            assert torch.equal(max_pool(z, *kernel), F.max_pool2d(z, kernel))
        z.requires_grad_(True)
        out, ref = max_pool(z, *kernel), F.max_pool2d(z, kernel)
        assert torch.equal(out, ref)
        cot = torch.randn(ref.shape, generator=g, dtype=dtype)
        (got,) = torch.autograd.grad(out, z, cot)
        (want,) = torch.autograd.grad(ref, z, cot)
        assert torch.equal(got, want)


def test_relu_after_the_pool_has_the_gradient_of_relu_before_it() -> None:
    z = _input((6, 4, 8, 8), torch.float32, 6).requires_grad_(True)
    cot = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    (got,) = torch.autograd.grad(torch.relu(max_pool(z, 2, 2)), z, cot)
    (want,) = torch.autograd.grad(F.max_pool2d(torch.relu(z), 2), z, cot)
    assert torch.equal(got, want)


def test_gradcheck_and_double_backward_in_float64() -> None:
    g = torch.Generator().manual_seed(8)
    z = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)  # no ties: smooth
    assert torch.autograd.gradcheck(lambda t: max_pool(t, 2, 2), (z,))
    cot = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: max_pool(t, 2, 2), (z,), (cot,))


@pytest.mark.parametrize("available", [True, False], ids=["extension", "no-extension"])
def test_without_the_extension_pytorch_serves(monkeypatch, available) -> None:
    if available and not _ext.extension_available():
        pytest.skip("the C++ extension is not built")
    calls = []
    real = torch.ops.aten.max_pool2d_with_indices

    monkeypatch.setattr(_max_pool, "extension_available", lambda: available)
    monkeypatch.setattr(_max_pool.torch.ops.aten, "max_pool2d_with_indices",
                        lambda *a: calls.append(1) or real(*a), raising=False)
    z = _input((3, 2, 6, 6), torch.float64, 9).requires_grad_(True)
    cot = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    (got,) = torch.autograd.grad(max_pool(z, 2, 2), z, cot)
    (want,) = torch.autograd.grad(F.max_pool2d(z, 2), z, cot)
    assert torch.equal(got, want)
    assert len(calls) == (0 if available else 1)
