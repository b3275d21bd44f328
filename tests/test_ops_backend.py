"""Backend choice (the dispatcher's, and FASTLAND_BACKEND's), the extension's loading,
torch.library registration (opcheck, fake tensors), torch.compile and the launch tables."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fastland import _ext
from fastland.ops import (
    backend_for,
    backend_refusal,
    forced_backend,
    grid_combine,
    grid_relative_loglik,
    refresh_backend,
    weighted_projection,
)
from fastland.ops._scaffold import LaunchConfig, ops, pick_config
from fastland.ops.utils import triton_available
from fastland.reference import grid_combine_ref, grid_relative_loglik_ref, weighted_projection_ref
from fastland.testing import skip_if_unavailable

OP_MODULES = ("weighted_projection", "grid_combine", "grid_relative_loglik")




@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    """Every test starts from FASTLAND_BACKEND unset (auto), and leaves it so."""
    monkeypatch.delenv("FASTLAND_BACKEND", raising=False)
    refresh_backend()
    yield
    monkeypatch.delenv("FASTLAND_BACKEND", raising=False)
    refresh_backend()


# --------------------------------------------------------------------------- backend choice


def test_auto_uses_the_cpp_kernels_on_cpu(monkeypatch):
    expected = "cpp" if _ext.extension_available() else "reference"
    assert backend_for(torch.zeros(1)) == expected
    monkeypatch.setenv("FASTLAND_BACKEND", "auto")
    assert refresh_backend() == "auto"
    assert backend_for(torch.zeros(1)) == expected


@pytest.mark.parametrize("value", ["reference", "REFERENCE", " cpp "])
def test_explicit_backends(value):
    skip_if_unavailable("cpp")
    with forced_backend(value) as got:
        assert got == value.strip().lower()
        assert backend_for(torch.zeros(1)) == got


def test_the_variable_is_read_at_refresh_not_at_every_call(monkeypatch):
    skip_if_unavailable("cpp")
    monkeypatch.setenv("FASTLAND_BACKEND", "reference")
    assert backend_for(torch.zeros(1)) == "cpp"  # cached: auto until the refresh
    refresh_backend()
    assert backend_for(torch.zeros(1)) == "reference"


def test_forced_reference_replaces_the_cpp_kernel_and_the_refresh_restores_it():
    """Bitwise: the forced reference gives the reference's numbers, auto the C++ kernel's again."""
    skip_if_unavailable("cpp")
    logits, base = torch.randn(3, 50, 10), torch.randn(3)
    cpp = grid_relative_loglik(logits, base)
    want = grid_relative_loglik_ref(logits, base)
    assert not torch.equal(cpp, want)  # the polynomial exp/log differ in the last bits
    with forced_backend("reference"):
        assert torch.equal(grid_relative_loglik(logits, base), want)
    assert torch.equal(grid_relative_loglik(logits, base), cpp)


def test_one_dispatcher_trip_per_call():
    """The public function calls fastland::<op> once; no second op (the C++ kernel sits under it)."""
    logits, base = torch.randn(2, 3, 4), torch.randn(2)
    with torch.autograd.profiler.profile() as prof:
        grid_relative_loglik(logits, base)
    names = [e.name for e in prof.function_events if e.name.startswith("fastland::")]
    assert names == ["fastland::grid_relative_loglik"]
    if _ext.extension_available():
        for name in ops():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastland::{name}", "CPU"), name


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    if not triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with forced_backend("triton"):
        assert backend_for(torch.zeros(1)) == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="FASTLAND_BACKEND=triton: expected CUDA tensors"):
            backend_for(torch.zeros(1))
        with pytest.raises(ValueError, match="FASTLAND_BACKEND=triton: expected CUDA tensors .*got a tensor on cpu"):
            grid_relative_loglik(torch.randn(2, 3, 4), torch.randn(2))


def test_unknown_backend_is_a_clear_error():
    with forced_backend("cuda-magic"):
        with pytest.raises(ValueError, match=r"FASTLAND_BACKEND: expected one of .*got 'cuda-magic'"):
            backend_for(torch.zeros(1))
        with pytest.raises(ValueError, match="FASTLAND_BACKEND: expected one of"):
            weighted_projection(torch.randn(2, 3), torch.randn(1, 2, 3))
    weighted_projection(torch.randn(2, 3), torch.randn(1, 2, 3))  # restored


def test_cpp_backend_refuses_non_cpu_tensors():
    with forced_backend("cpp"):
        with pytest.raises(ValueError, match="FASTLAND_BACKEND=cpp: expected CPU tensors, got a tensor on meta"):
            backend_for(torch.zeros(1, device="meta"))
    assert backend_refusal("cpp", torch.device("meta")).startswith("FASTLAND_BACKEND=cpp: expected CPU")
    assert backend_refusal("reference", torch.device("meta")) is None
    with pytest.raises(ValueError, match="backend: expected one of"):
        backend_refusal("auto", torch.device("cpu"))


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    if "FASTLAND_BACKEND" not in env:
        full_env.pop("FASTLAND_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


_WITHOUT_EXTENSION = (
    "import sys, json, warnings\n"
    "sys.modules['fastland._C'] = None  # makes `import fastland._C` fail, as when it is not built\n"
    "from fastland import _ext\n"
    "_ext._SKIP_MARKER = sys.argv[1]\n"
    "import torch\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    from fastland.ops import backend_for, grid_relative_loglik\n"
    "    from fastland.reference import grid_relative_loglik_ref\n"
    "    x, b = torch.randn(2, 3, 4), torch.randn(2)\n"
    "    backends = []\n"
    "    try:\n"
    "        backends = [backend_for(torch.zeros(1)) for _ in range(3)]\n"
    "        ok, error = torch.equal(grid_relative_loglik(x, b), grid_relative_loglik_ref(x, b)), None\n"
    "    except ValueError as err:\n"
    "        ok, error = None, str(err)\n"
    "print(json.dumps({'backends': backends, 'ok': ok, 'error': error,"
    " 'warnings': [str(m.message) for m in w if 'fastland._C' in str(m.message)]}))\n"
)


def _without_extension(tmp_path, marker: bool, **env) -> dict:
    path = tmp_path / "_C.skipped"
    if marker:
        path.write_text("skipped\n")
    code = _WITHOUT_EXTENSION.replace("sys.argv[1]", repr(str(path)))
    res = _run_python(code, **env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_missing_extension_falls_back_to_the_reference_with_one_warning(tmp_path):
    out = _without_extension(tmp_path, marker=False)
    assert out["backends"] == ["reference"] * 3
    assert out["ok"] is True
    assert len(out["warnings"]) == 1
    assert "import failed" in out["warnings"][0] and "build it with" in out["warnings"][0]


def test_a_deliberately_skipped_extension_is_named_so(tmp_path):
    """After a FASTLAND_SKIP_EXT=1 install the warning says so, and how to build it if wanted."""
    (message,) = _without_extension(tmp_path, marker=True)["warnings"]
    assert "installed with FASTLAND_SKIP_EXT=1" in message and "deliberate" in message
    assert "build it with" not in message and "reinstall with" in message


def test_forced_cpp_without_the_extension_is_a_clear_error(tmp_path):
    out = _without_extension(tmp_path, marker=False, FASTLAND_BACKEND="cpp")
    assert out["ok"] is None
    assert out["error"].startswith("FASTLAND_BACKEND=cpp: the C++ extension fastland._C is not available")


# --------------------------------------------------------------------------- launch tables


@pytest.mark.parametrize("op", OP_MODULES)
def test_every_op_has_its_launch_table_in_one_shape(op):
    module = importlib.import_module(f"fastland.ops.{op}")
    assert set(module.LAUNCH_CONFIGS) == {"forward", "backward"}
    for kind, table in module.LAUNCH_CONFIGS.items():
        assert table and all(isinstance(c, LaunchConfig) and len(c.block) == len(module.BLOCK_NAMES) for c in table)
        widths = [c.block[-1] for c in table]
        assert widths == sorted(widths)
        for dtype in (torch.float16, torch.float32, torch.float64):
            chosen = module.launch_configs(kind, dtype)
            assert chosen and set(chosen) <= set(table)
    assert pick_config(module.LAUNCH_CONFIGS["forward"], 1) == module.LAUNCH_CONFIGS["forward"][0]


def test_float64_rows_stop_where_they_would_spill():
    wp = importlib.import_module("fastland.ops.weighted_projection")

    assert max(c.block[-1] for c in wp.launch_configs("forward", torch.float64)) == 4096
    assert max(c.block[-1] for c in wp.launch_configs("forward", torch.float32)) == 8192


def test_plans_launch_the_table_entry_for_the_row_width():
    """A plan on meta tensors (nothing runs): the entry picked for C, its warps and stages."""
    if not triton_available():
        pytest.skip("triton not installed")
    grl = importlib.import_module("fastland.ops.grid_relative_loglik")

    logits, base = torch.empty(4, 7, 100, device="meta"), torch.empty(4, device="meta")
    out, (launch,) = grl.forward_plan(logits, base)
    cfg = pick_config(grl.LAUNCH_CONFIGS["forward"], 100)
    assert cfg.block == (8, 256) and out.shape == (4, 7)
    assert (launch.kwargs["BLOCK_R"], launch.kwargs["BLOCK_C"]) == cfg.block
    assert launch.kwargs["num_warps"] == cfg.num_warps and launch.kwargs["num_stages"] == cfg.num_stages
    assert launch.grid == (-(-28 // 8),) and launch.name == "_grid_relative_loglik_fwd_kernel"


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


def test_opcheck(backend):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of each op
    (the interpreted Triton path skips the slow AOT-dispatch check)."""
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    if backend == "triton" and torch.get_default_device().type == "cpu":
        utils.pop()
    samples = _op_samples()
    assert {op.name().split("::")[1] for op, _ in samples} == set(ops())  # every op is checked
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=tuple(utils))


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


def test_torch_compile_fullgraph_traces_every_op(backend):
    """One function using all three ops, forward and backward, compiled with fullgraph=True."""
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
def test_torch_compile_inductor():
    """The default (inductor) backend also compiles a function using the ops (slow: C++ codegen)."""
    skip_if_unavailable("cpp")
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(logits, base_lse, z, noise):
        return grid_relative_loglik(logits * 2, base_lse).sum() + weighted_projection(z, noise)[1].sum()

    logits, base_lse = torch.randn(3, 7, 10), torch.randn(3)
    z, noise = torch.randn(4, 10), torch.randn(2, 4, 10)
    want = grid_relative_loglik_ref(logits * 2, base_lse).sum() + weighted_projection_ref(z, noise)[1].sum()
    torch.testing.assert_close(f(logits, base_lse, z, noise), want)


# --------------------------------------------------------------------------- the GPU check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_without_a_gpu_is_one_line_and_exit_0(tmp_path):
    """Here (no GPU, or one pretended absent) benchmarks/gpu_check.sh says so in one line, does nothing."""
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    envs = [{"FASTLAND_GPU_CHECK_NO_GPU": "1"}]
    if subprocess.run("command -v nvidia-smi", shell=True, capture_output=True).returncode != 0:
        envs.append({})  # no nvidia-smi at all: the plain call skips too
    for extra in envs:
        res = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True,
                             env={**os.environ, **extra}, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ["gpu_check: no NVIDIA GPU found (nvidia-smi lists none); nothing to do"]
        assert res.stderr == "" and not (tmp_path / "out").exists()


def test_gpu_check_summary_reads_steps_tests_and_benchmarks(tmp_path):
    (tmp_path / "steps.txt").write_text("install 0 120\ntests 1 60\n")
    (tmp_path / "gpu.txt").write_text("GPU 0: NVIDIA H100 (UUID: x)\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_ops_grid_combine" name="test_a[triton-cuda]"><failure/></testcase>'
        '<testcase classname="t" name="b"/><testcase classname="t" name="c"><skipped/></testcase>'
        '</testsuite></testsuites>')
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": [
        {"name": "test_grid_combine_cuda[8-441-784-triton]", "group": "g", "extra_info": {"metric": "900 GB/s"},
         "stats": {"mean": 2e-5, "min": 1e-5, "rounds": 10}}]}))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check_summary.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1  # a step failed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["tests"]["failed"] == ["tests.test_ops_grid_combine::test_a[triton-cuda]"]
    assert summary["benchmarks"][0]["mean_us"] == pytest.approx(20.0)
    md = (tmp_path / "summary.md").read_text()
    assert "| tests | 1 | 60 |" in md and "3 tests: 1 failed, 0 errors, 1 skipped" in md and "900 GB/s" in md
