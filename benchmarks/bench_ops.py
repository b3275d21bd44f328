"""Fused ops: on CPU the C++ kernels, on CUDA the Triton kernels (each through the public
``fastland.ops`` API, dispatch included) against the eager PyTorch reference.

CUDA cases (ids ending ``cuda``) run only where a GPU is present (benchmarks/gpu_check.sh).

Run: ``.venv/bin/python -m pytest benchmarks/bench_ops.py --benchmark-only -q
--benchmark-min-rounds=5 --benchmark-json=/tmp/bench_ops.json``. Prose and the
Triton (GPU, not measured) figures: ``benchmarks/notes/ops.md``.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastland import _ext
from fastland.ops import grid_combine, grid_relative_loglik, weighted_projection
from fastland.reference import grid_combine_ref, grid_relative_loglik_ref, weighted_projection_ref

needs_cpp = pytest.mark.skipif(not _ext.extension_available(), reason="fastland._C not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

WP_CASES = [(4096, 10, 8), (256, 1000, 1)]  # (B, C, P)
GC_CASES = [(8, 441, 784), (8, 441, 3072)]  # (N, G, D)
GRL_CASES = [(64, 441, 10)]  # (N, G, C)


# One thread for every row (reference and C++ alike): on a CPU with few cores shared
# by several processes, 2 OpenMP threads make the means measure the scheduler
# (a descheduled thread stalls the other at the barrier), not the kernels.
THREADS = int(os.environ.get("FASTLAND_BENCH_THREADS", "1"))


@pytest.fixture(autouse=True)
def _threads(benchmark):
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    benchmark.extra_info["threads"] = THREADS
    yield
    torch.set_num_threads(previous)


def _gbps(nbytes: int, benchmark) -> str:
    return f"{nbytes / benchmark.stats.stats.mean / 1e9:.1f} GB/s"


# --------------------------------------------------------------------------- weighted_projection


@needs_cpp
@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("B, C, P", WP_CASES)
def test_weighted_projection(benchmark, impl, B, C, P):
    benchmark.group = f"ops-weighted_projection-B{B}-C{C}-P{P}"
    logits, noise = torch.randn(B, C), torch.randn(P, B, C)
    fn = weighted_projection_ref if impl == "reference" else weighted_projection
    benchmark.extra_info["baseline"] = impl == "reference"
    benchmark(fn, logits, noise, "softmax")
    benchmark.extra_info["metric"] = _gbps(4 * (B * C + 2 * P * B * C + B), benchmark)


# --------------------------------------------------------------------------- grid_combine


@needs_cpp
@pytest.mark.parametrize("impl", ["clone", "copy_", "reference", "cpp"])
@pytest.mark.parametrize("N, G, D", GC_CASES)
def test_grid_combine(benchmark, impl, N, G, D):
    """Baseline: ``clone`` of a tensor of the output's size (allocates, as the op does)."""
    benchmark.group = f"ops-grid_combine-N{N}-G{G}-D{D}"
    base, u, v = torch.randn(3, N, D).unbind(0)
    a, b = torch.randn(G), torch.randn(G)
    benchmark.extra_info["baseline"] = impl == "clone"
    if impl in ("clone", "copy_"):
        src = torch.randn(N, G, D)
        dst = torch.empty_like(src)
        benchmark(src.clone) if impl == "clone" else benchmark(dst.copy_, src)
        nbytes = 2 * src.numel() * 4  # read + write
    else:
        fn = grid_combine_ref if impl == "reference" else grid_combine
        benchmark(fn, base, u, v, a, b)
        nbytes = (N * G * D + 3 * N * D + 2 * G) * 4  # write the grid, read base/u/v/a/b once
    benchmark.extra_info["metric"] = _gbps(nbytes, benchmark)


# --------------------------------------------------------------------------- grid_relative_loglik


@needs_cpp
@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("N, G, C", GRL_CASES)
def test_grid_relative_loglik(benchmark, impl, N, G, C):
    benchmark.group = f"ops-grid_relative_loglik-N{N}-G{G}-C{C}"
    logits, base = torch.randn(N, G, C) * 5, torch.randn(N)
    fn = grid_relative_loglik_ref if impl == "reference" else grid_relative_loglik
    benchmark.extra_info["baseline"] = impl == "reference"
    benchmark(fn, logits, base)
    benchmark.extra_info["metric"] = _gbps(4 * (N * G * C + N * G + N), benchmark)



# --------------------------------------------------------------------------- CUDA: Triton against the reference


def _synchronised(fn):
    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


@needs_cuda
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("B, C, P", WP_CASES)
def test_weighted_projection_cuda(benchmark, impl, B, C, P):
    benchmark.group = f"ops-weighted_projection-B{B}-C{C}-P{P}-cuda"
    logits, noise = torch.randn(B, C, device="cuda"), torch.randn(P, B, C, device="cuda")
    fn = weighted_projection_ref if impl == "reference" else weighted_projection
    benchmark.extra_info["baseline"] = impl == "reference"
    benchmark(_synchronised(fn), logits, noise, "softmax")
    benchmark.extra_info["metric"] = _gbps(4 * (B * C + 2 * P * B * C + B), benchmark)


@needs_cuda
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("N, G, D", GC_CASES)
def test_grid_combine_cuda(benchmark, impl, N, G, D):
    benchmark.group = f"ops-grid_combine-N{N}-G{G}-D{D}-cuda"
    base, u, v = torch.randn(3, N, D, device="cuda").unbind(0)
    a, b = torch.randn(G, device="cuda"), torch.randn(G, device="cuda")
    fn = grid_combine_ref if impl == "reference" else grid_combine
    benchmark.extra_info["baseline"] = impl == "reference"
    benchmark(_synchronised(fn), base, u, v, a, b)
    benchmark.extra_info["metric"] = _gbps((N * G * D + 3 * N * D + 2 * G) * 4, benchmark)


@needs_cuda
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("N, G, C", GRL_CASES)
def test_grid_relative_loglik_cuda(benchmark, impl, N, G, C):
    benchmark.group = f"ops-grid_relative_loglik-N{N}-G{G}-C{C}-cuda"
    logits, base = torch.randn(N, G, C, device="cuda") * 5, torch.randn(N, device="cuda")
    fn = grid_relative_loglik_ref if impl == "reference" else grid_relative_loglik
    benchmark.extra_info["baseline"] = impl == "reference"
    benchmark(_synchronised(fn), logits, base)
    benchmark.extra_info["metric"] = _gbps(4 * (N * G * C + N * G + N), benchmark)
