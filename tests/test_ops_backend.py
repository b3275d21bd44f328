"""Backend choice, torch.library registration (opcheck, fake tensors) and torch.compile of the fused ops."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastland import _ext
from fastland.ops import backend_for, grid_combine, grid_relative_loglik, weighted_projection
from fastland.ops.utils import triton_available
from fastland.reference import grid_combine_ref, grid_relative_loglik_ref, weighted_projection_ref
from fastland.testing import skip_if_unavailable


# --------------------------------------------------------------------------- backend choice


def test_auto_uses_the_cpp_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTLAND_BACKEND", raising=False)
    expected = "cpp" if _ext.extension_available() else "reference"
    assert backend_for(torch.zeros(1)) == expected
    monkeypatch.setenv("FASTLAND_BACKEND", "auto")
    assert backend_for(torch.zeros(1)) == expected


@pytest.mark.parametrize("value", ["reference", "REFERENCE", " cpp "])
def test_explicit_backends(monkeypatch, value):
    skip_if_unavailable("cpp")
    monkeypatch.setenv("FASTLAND_BACKEND", value)
    assert backend_for(torch.zeros(1)) == value.strip().lower()


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    if not triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("FASTLAND_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for(torch.zeros(1)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="FASTLAND_BACKEND=triton: expected CUDA tensors"):
        backend_for(torch.zeros(1))


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTLAND_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match=r"FASTLAND_BACKEND: expected one of .*got 'cuda-magic'"):
        backend_for(torch.zeros(1))
    with pytest.raises(ValueError, match="FASTLAND_BACKEND"):
        weighted_projection(torch.randn(2, 3), torch.randn(1, 2, 3))


def test_cpp_backend_refuses_non_cpu_tensors(monkeypatch):
    monkeypatch.setenv("FASTLAND_BACKEND", "cpp")
    with pytest.raises(ValueError, match="FASTLAND_BACKEND=cpp: expected CPU tensors, got a tensor on meta"):
        backend_for(torch.zeros(1, device="meta"))


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("FASTLAND_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_missing_extension_falls_back_to_the_reference_with_one_warning():
    code = (
        "import sys, json, warnings\n"
        "sys.modules['fastland._C'] = None  # makes `import fastland._C` fail, as when it is not built\n"
        "import torch\n"
        "from fastland.ops import backend_for, grid_relative_loglik\n"
        "from fastland.reference import grid_relative_loglik_ref\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    backends = [backend_for(torch.zeros(1)) for _ in range(3)]\n"
        "    x, b = torch.randn(2, 3, 4), torch.randn(2)\n"
        "    ok = torch.equal(grid_relative_loglik(x, b), grid_relative_loglik_ref(x, b))\n"
        "print(json.dumps({'backends': backends, 'ok': ok,"
        " 'warnings': [str(m.message) for m in w if 'fastland._C' in str(m.message)]}))\n"
    )
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["backends"] == ["reference"] * 3
    assert out["ok"] is True
    assert len(out["warnings"]) == 1


# --------------------------------------------------------------------------- torch.library


def _op_samples():
    """(op, args) for every custom op, small float64 inputs that require grad where differentiable."""
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, 4, dtype=torch.float64)
    base, u, v = (torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a, b = (torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gout = torch.randn(2, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    base_lse = torch.randn(2, dtype=torch.float64, requires_grad=True)
    g_cot = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    g_lse = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g_rel = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    ops = torch.ops.fastland
    return [
        (ops.weighted_projection.default, (z, noise, True)),
        (ops.weighted_projection.default, (z, noise, False)),
        (ops.weighted_projection_backward.default, (g_cot, g_lse, z, noise, True)),
        (ops.grid_combine.default, (base, u, v, a, b)),
        (ops.grid_combine_backward.default, (gout, a, b)),
        (ops.grid_relative_loglik.default, (logits, base_lse)),
        (ops.grid_relative_loglik_backward.default, (g_rel, logits)),
    ]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(monkeypatch, backend):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of each op."""
    skip_if_unavailable(backend)
    monkeypatch.setenv("FASTLAND_BACKEND", backend)
    for op, args in _op_samples():
        torch.library.opcheck(
            op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        )


def test_opcheck_triton(monkeypatch):
    """The Triton path under the interpreter, fake-tensor and autograd-registration checks."""
    skip_if_unavailable("triton")
    monkeypatch.setenv("FASTLAND_BACKEND", "triton")
    for op, args in _op_samples():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_fake_tensors_give_shapes_without_computing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        cot, lse = weighted_projection(torch.empty(5, 7), torch.empty(3, 5, 7))
        out = grid_combine(torch.empty(2, 1, 4, 4), torch.empty(2, 1, 4, 4), torch.empty(2, 1, 4, 4),
                           torch.empty(9), torch.empty(9))
        rel = grid_relative_loglik(torch.empty(2, 9, 10), torch.empty(2))
    assert cot.shape == (3, 5, 7) and lse.shape == (5,)
    assert out.shape == (2, 9, 1, 4, 4)
    assert rel.shape == (2, 9)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_torch_compile_fullgraph_traces_every_op(monkeypatch, backend):
    """One function using all three ops, forward and backward, compiled with fullgraph=True."""
    skip_if_unavailable(backend)
    monkeypatch.setenv("FASTLAND_BACKEND", backend)
    torch._dynamo.reset()

    def f(z, noise, base, u, v, a, b, logits, base_lse):
        cot, lse = weighted_projection(z, noise, "softmax")
        grid = grid_combine(base, u, v, a, b)
        rel = grid_relative_loglik(logits, base_lse)
        return (cot ** 2).sum() + lse.sum() + grid.square().mean() + rel.sum()

    def ref(z, noise, base, u, v, a, b, logits, base_lse):
        cot, lse = weighted_projection_ref(z, noise, "softmax")
        grid = grid_combine_ref(base, u, v, a, b)
        rel = grid_relative_loglik_ref(logits, base_lse)
        return (cot ** 2).sum() + lse.sum() + grid.square().mean() + rel.sum()

    args = [
        torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64),
        torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64),
        torch.randn(2, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
        torch.randn(4, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64),
        torch.randn(2, dtype=torch.float64),
    ]
    diff = [0, 2, 3, 4, 5, 6, 7, 8]  # every argument but noise
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [t.clone().requires_grad_(i in diff) for i, t in enumerate(args)]
    ref_inputs = [t.clone().requires_grad_(i in diff) for i, t in enumerate(args)]
    out, want = compiled(*inputs), ref(*ref_inputs)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(out, [inputs[i] for i in diff])
    ref_grads = torch.autograd.grad(want, [ref_inputs[i] for i in diff])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


@pytest.mark.slow
def test_torch_compile_inductor(monkeypatch):
    """The default (inductor) backend also compiles a function using the ops (slow: C++ codegen)."""
    skip_if_unavailable("cpp")
    monkeypatch.setenv("FASTLAND_BACKEND", "cpp")
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(logits, base_lse, z, noise):
        return grid_relative_loglik(logits * 2, base_lse).sum() + weighted_projection(z, noise)[1].sum()

    logits, base_lse = torch.randn(3, 7, 10), torch.randn(3)
    z, noise = torch.randn(4, 10), torch.randn(2, 4, 10)
    want = grid_relative_loglik_ref(logits * 2, base_lse).sum() + weighted_projection_ref(z, noise)[1].sum()
    torch.testing.assert_close(f(logits, base_lse, z, noise), want)
