"""Fused ops on this CPU: the C++ kernels (through the public ``fastland.ops`` API,
custom-op dispatch included) against the eager PyTorch reference.

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

pytestmark = pytest.mark.skipif(not _ext.extension_available(), reason="fastland._C not built")

WP_CASES = [(4096, 10, 8), (256, 1000, 1)]  # (B, C, P)
GC_CASES = [(8, 441, 784), (8, 441, 3072)]  # (N, G, D)
GRL_CASES = [(64, 441, 10)]  # (N, G, C)


# One thread for every row (reference and C++ alike): this 2-core machine is shared
# by several processes, and with 2 OpenMP threads the means measure the scheduler
# (a descheduled thread stalls the other at the barrier), not the kernels.
THREADS = int(os.environ.get("FASTLAND_BENCH_THREADS", "1"))


@pytest.fixture(autouse=True)
def _cpp_backend_and_threads(monkeypatch, benchmark):
    monkeypatch.setenv("FASTLAND_BACKEND", "cpp")
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    benchmark.extra_info["threads"] = THREADS
    yield
    torch.set_num_threads(previous)


def _gbps(nbytes: int, benchmark) -> str:
    return f"{nbytes / benchmark.stats.stats.mean / 1e9:.1f} GB/s"


# --------------------------------------------------------------------------- weighted_projection


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


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("N, G, C", GRL_CASES)
def test_grid_relative_loglik(benchmark, impl, N, G, C):
    benchmark.group = f"ops-grid_relative_loglik-N{N}-G{G}-C{C}"
    logits, base = torch.randn(N, G, C) * 5, torch.randn(N)
    fn = grid_relative_loglik_ref if impl == "reference" else grid_relative_loglik
    benchmark.extra_info["baseline"] = impl == "reference"
    benchmark(fn, logits, base)
    benchmark.extra_info["metric"] = _gbps(4 * (N * G * C + N * G + N), benchmark)

