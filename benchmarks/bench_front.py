"""The front's step costs: one LeNet-5 training step (``fastland.train_step``, batch 128,
Fashion-MNIST shapes, random data, one intra-op thread) of every defence on the
robustness-cost front (``fastland front``): none, jacobian, amsreg, PGD-10 adversarial
training (the baseline: the front's costs are shares of its step), fgsm_rs, trades and
attack_flat with every variant of :data:`fastland.choices.ATTACK_PENALTY_VARIANTS`
(parametrised from the tuple, so a new variant joins by itself).

The ids (``none``, ``at``, ``trades``, ``attack_flat-<variant>``, ...) are what
``fastland.experiments.front.step_costs`` reads; each defence takes the settings of the
front's default point (ε = 10/255; λ from the paper or ``ATTACK_FLAT_LAM``, which does not
change the cost).

Expected (F = one forward of the batch, ≈ one input-gradient backward, ≈ one
weight-gradient backward): none ≈ 3F; fgsm_rs ≈ one FGSM step (2F) + the CE step (3F) ≈
5F, about 0.2 of PGD-10 ≈ 10·2F + 3F = 23F; trades (10 KL steps) ≈ one clean forward +
10·2F + two forwards and their backward (≈ 6F) ≈ 27F, a little above PGD-10 (its attack
is as long, its loss has two forwards); jacobian/amsreg (one projection) ≈ 8F.

Run (times with process CPU time, as the other step benchmarks)::

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_front.py --benchmark-only -q \
        --benchmark-timer=time.process_time --benchmark-min-rounds=5 \
        --benchmark-json=benchmarks/results/front.json

Smoke run (every case once, no timing)::

    .venv/bin/python -m pytest benchmarks/bench_front.py --benchmark-disable -q
"""
from __future__ import annotations

from typing import Dict

import pytest
import torch

from fastland import models
from fastland.attack_penalties import ATTACK_FLAT_EPS, ATTACK_FLAT_LAM
from fastland.choices import ATTACK_PENALTY_VARIANTS
from fastland.defences import Defence, train_step

BATCH = 128
EPS = 10 / 255  # Fashion-MNIST's training-time ε

pytestmark = pytest.mark.usefixtures("one_thread")

CASES: Dict[str, Defence] = {
    "none": Defence("none"),
    "jacobian": Defence("jacobian", lam=0.01, estimator="projection"),
    "amsreg": Defence("amsreg", lam=0.5, estimator="projection"),
    "at": Defence("at", eps=EPS, steps=10),
    "fgsm_rs": Defence("fgsm_rs", eps=EPS),
    "trades": Defence("trades", eps=EPS, steps=10),
    **{f"attack_flat-{v}": Defence("attack_flat", lam=ATTACK_FLAT_LAM.get(v, 1.0), eps=ATTACK_FLAT_EPS, variant=v)
       for v in ATTACK_PENALTY_VARIANTS},
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

    benchmark.group = "front-step-lenet-b128"
    if case == "at":
        benchmark.extra_info["baseline"] = True
    assert torch.isfinite(torch.tensor(benchmark(step)))
