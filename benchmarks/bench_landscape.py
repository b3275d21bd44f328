"""Landscape and flatness throughput on the CPU.

Groups (each with one baseline; ratios are time ÷ baseline):

* ``landscape-lenet``: LeNet-5 (Fashion-MNIST shape 1×28×28), 16 samples,
  41×41 grid = 26 896 points: the model's own batched forward over the same
  (precomputed) points [baseline], ``fastland.landscape`` without and with
  first-layer fusion.
* ``landscape-ddnet``: DDNet (CIFAR-10 shape 3×32×32), 2 samples, 41×41 grid
  = 3 362 points, the same rows.
* ``landscape-{lenet,ddnet}-loop``: one sample, 41×41 grid: the per-point
  loop (``reference.landscape_ref``) [baseline] against ``fastland.landscape``
  (a per-point loop over 16 samples would take over ten minutes here).
* ``landscape-flatness-lenet`` / ``landscape-flatness-ddnet``: ``fastland.flatness`` (one
  direction pair, 11×11 grid; unfused and fused) against a batched
  forward+backward (input gradients of log p) over the same precomputed
  points [baseline].

Run::

    .venv/bin/python -m pytest benchmarks/bench_landscape.py --benchmark-only -q \\
        --benchmark-json=/tmp/bench_landscape.json
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

from fastland import ops, reference
from fastland._batching import resolve_batch_size
from fastland.landscapes import directions, flatness, grid_coordinates, landscape
from fastland.models import create

SPAN = 16 / 255
STEPS = 41
FLAT_STEPS = 11
CASES: Dict[str, Tuple[str, str, int]] = {  # name -> (model, dataset, samples)
    "lenet": ("lenet", "fmnist", 16),
    "ddnet": ("ddnet", "cifar10", 2),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(case: str, steps: int, n_samples: Optional[int] = None):
    """Model (eval), inputs [N, *S], directions, grid, and all grid points [N·G, *S]."""
    name, dataset, n = CASES[case]
    n = n_samples or n
    torch.manual_seed(0)
    model = create(name, dataset).eval()
    shape = model.input_shape
    x = torch.rand(n, *shape)
    d1, d2 = directions(x, generator=torch.Generator().manual_seed(1))
    grid = grid_coordinates(SPAN, steps)
    a, b = grid.repeat(steps), grid.repeat_interleave(steps)
    points = ops.grid_combine(x, d1, d2, a, b).flatten(0, 1).contiguous()
    return model, x, d1, d2, grid, points


def _run(benchmark, fn: Callable[[], object], rounds: int, *, baseline: bool = False,
         points: int = 0) -> None:
    benchmark.extra_info["baseline"] = baseline
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    if points:
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["metric"] = f"{points / mean:,.0f} points/s"
    return result


def _batched_forward(model: nn.Module, points: Tensor, per_call: int) -> Tensor:
    with torch.inference_mode():
        return torch.cat([torch.logsumexp(model(points[i : i + per_call]), -1)
                          for i in range(0, points.shape[0], per_call)])


def _batched_forward_backward(model: nn.Module, points: Tensor, per_call: int) -> Tensor:
    norms = []
    for i in range(0, points.shape[0], per_call):
        xs = points[i : i + per_call].detach().requires_grad_(True)
        lse = torch.logsumexp(model(xs), -1)
        (g,) = torch.autograd.grad(lse.sum(), xs)
        norms.append(g.flatten(1).norm(dim=1))
    return torch.cat(norms)


# --------------------------------------------------------------------------- landscapes


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("row", ["batched_forward", "landscape_unfused", "landscape_fused"])
def test_landscape(benchmark, case, row):
    benchmark.group = f"landscape-{case}"
    model, x, d1, d2, grid, points = _setup(case, STEPS)
    per_call = resolve_batch_size("auto", model, x[:1])
    n_points = points.shape[0]
    benchmark.extra_info["points_per_call"] = per_call
    if row == "batched_forward":
        _run(benchmark, lambda: _batched_forward(model, points, per_call), 3, baseline=True, points=n_points)
    else:
        fuse = row == "landscape_fused"
        out = _run(benchmark, lambda: landscape(model, x, directions=(d1, d2), span=SPAN, steps=STEPS,
                                                fuse_first_layer=fuse, progress=False), 3, points=n_points)
        assert out.meta["fused"] == fuse


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("row", ["per_point_loop", "landscape_fused"])
def test_landscape_vs_loop(benchmark, case, row):
    """One sample (41×41 = 1 681 points): a single-sample forward costs milliseconds here."""
    benchmark.group = f"landscape-{case}-loop"
    model, x, d1, d2, grid, points = _setup(case, STEPS, n_samples=1)
    n_points = points.shape[0]
    if row == "per_point_loop":
        _run(benchmark, lambda: reference.landscape_ref(model, x, d1, d2, grid, grid), 1, baseline=True,
             points=n_points)
    else:
        _run(benchmark, lambda: landscape(model, x, directions=(d1, d2), span=SPAN, steps=STEPS,
                                          progress=False), 2, points=n_points)


# --------------------------------------------------------------------------- flatness


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("row", ["batched_forward_backward", "flatness_unfused", "flatness_fused"])
def test_flatness(benchmark, case, row):
    benchmark.group = f"landscape-flatness-{case}"
    model, x, d1, d2, grid, points = _setup(case, FLAT_STEPS)
    per_call = resolve_batch_size("auto", model, x[:1], backward=True)
    n_points = points.shape[0]
    benchmark.extra_info["points_per_call"] = per_call
    if row == "batched_forward_backward":
        _run(benchmark, lambda: _batched_forward_backward(model, points, per_call), 5, baseline=True,
             points=n_points)
    else:
        fuse = row == "flatness_fused"
        _run(benchmark, lambda: flatness(model, x, n_dirs=1, span=SPAN, steps=FLAT_STEPS, progress=False,
                                         fuse_first_layer=fuse, generator=torch.Generator().manual_seed(1)),
             5, points=n_points)
