"""Attack benchmarks: PGD with input-only gradients vs the textbook ``.backward()`` loop.

Run::

    .venv/bin/python -m pytest benchmarks/bench_attacks.py --benchmark-only -q \
        --benchmark-min-rounds=3 --benchmark-json=/tmp/bench_attacks.json
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastland import attacks, models

BATCH, STEPS, EPS = 64, 5, 25 / 255
ALPHA = 2.5 * EPS / STEPS


pytestmark = pytest.mark.usefixtures("one_thread")


def textbook_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loop found in many repositories: ``loss.backward()`` also fills every
    parameter's ``.grad`` (the weight-gradient products), then ``zero_grad``."""
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(STEPS):
        x_adv = x_adv.detach().requires_grad_(True)
        model.zero_grad()
        F.cross_entropy(model(x_adv), y, reduction="sum").backward()
        x_adv = torch.min(torch.max(x_adv + ALPHA * x_adv.grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    model.zero_grad()
    return x_adv.detach()


@pytest.fixture(scope="module", params=["ddnet", "lenet"])
def setup(request) -> tuple:
    torch.manual_seed(0)
    model = models.create(request.param, "fmnist").eval()
    x = torch.rand(BATCH, 1, 28, 28)
    y = torch.randint(0, 10, (BATCH,))
    return request.param, model, x, y


def test_pgd_textbook_backward(benchmark, setup) -> None:
    name, model, x, y = setup
    benchmark.group = f"attacks-pgd{STEPS}-{name}-b{BATCH}"
    out = benchmark(textbook_pgd, model, x, y)
    assert (out - x).abs().max() <= EPS + 1e-6
    benchmark.extra_info["baseline"] = True


def test_pgd_fastland(benchmark, setup) -> None:
    name, model, x, y = setup
    benchmark.group = f"attacks-pgd{STEPS}-{name}-b{BATCH}"
    out = benchmark(attacks.pgd, model, x, y, EPS, ALPHA, STEPS)
    assert (out - x).abs().max() <= EPS + 1e-6
