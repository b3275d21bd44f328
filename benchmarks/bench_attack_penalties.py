"""Attack-direction penalties: the cost of one training step of each ``attack_flat`` variant
against the plain CE step (baseline), adversarial training (PGD-10) and AMSReg
(``projection``, one projection), on LeNet-5 with Fashion-MNIST shapes (batch 128,
random data), one intra-op thread.

Expected (F = one forward of the batch, ≈ one input-gradient backward, ≈ one
weight-gradient backward): CE ≈ 3F; ``difference`` ≈ CE + direction (2F) +
one forward and its backward (3F) ≈ 8F; ``directional`` ≈ direction (2F) + a
double backward (≈ 3-4× a backward) ≈ 9-10F; ``fgsm_amsreg`` ≈ one FGSM step
(2F) + an AMSReg step (≈ 8F) + the clean CE forward/backward ≈ 11-13F; PGD-10
≈ 10·2F + 3F = 23F; AMSReg ≈ 8F.

Run (a few minutes on one core)::

    .venv/bin/python -m pytest benchmarks/bench_attack_penalties.py --benchmark-only -q \
        --benchmark-min-rounds=5 --benchmark-json=/tmp/bench_attack_penalties.json

Smoke run (every case once, no timing)::

    .venv/bin/python -m pytest benchmarks/bench_attack_penalties.py --benchmark-disable -q
"""
from __future__ import annotations

import pytest
import torch

from fastland import models
from fastland.attack_penalties import ATTACK_FLAT_EPS, ATTACK_FLAT_LAM
from fastland.defences import Defence, train_step

BATCH = 128

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "ce": Defence("none"),
    "at-pgd10": Defence("at", eps=10 / 255, steps=10),
    "amsreg-projection": Defence("amsreg", lam=0.5, estimator="projection"),
    **{f"attack_flat-{v}": Defence("attack_flat", lam=ATTACK_FLAT_LAM[v], eps=ATTACK_FLAT_EPS, variant=v)
       for v in ("difference", "directional", "fgsm_amsreg")},
}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_step(benchmark, batch, case):
    torch.manual_seed(0)
    model = models.create("lenet", "fmnist").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    defence = CASES[case]

    def step() -> float:
        return float(train_step(model, *batch, defence, opt, generator=gen, params=params)[0].detach())

    benchmark.group = "attackflat-step-lenet-b128"
    if case == "ce":
        benchmark.extra_info["baseline"] = True
    assert torch.isfinite(torch.tensor(benchmark(step)))
