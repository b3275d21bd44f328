"""Training-loop benchmarks: in-memory index batches vs a DataLoader, and one
optimiser step per defence (LeNet-5, Fashion-MNIST shapes, batch 128).

Run::

    .venv/bin/python -m pytest benchmarks/bench_train.py --benchmark-only -q \
        --benchmark-min-rounds=3 --benchmark-json=/tmp/bench_train.json
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fastland import models
from fastland.defences import defence_loss, train_step
from fastland.experiments._state import Dist
from fastland.experiments.train import TrainConfig, _epoch_indices

N, BATCH = 10_000, 128


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, 1, 28, 28, generator=g), torch.randint(0, 10, (N,), generator=g)


def _dataloader_epoch(x, y) -> int:
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    seen = 0
    for xb, _ in loader:
        seen += xb.shape[0]
    return seen


def _index_epoch(x, y) -> int:
    order = torch.tensor(_epoch_indices(x.shape[0], 0, 0, Dist()), dtype=torch.long)
    seen = 0
    for i in range(0, order.numel(), BATCH):
        idx = order[i:i + BATCH]
        xb, _ = x.index_select(0, idx), y.index_select(0, idx)
        seen += xb.shape[0]
    return seen


def test_batches_dataloader(benchmark, data):
    benchmark.group = "train-batching-10k-b128"
    benchmark.extra_info["baseline"] = True
    assert benchmark(_dataloader_epoch, *data) == N


def test_batches_index_select(benchmark, data):
    benchmark.group = "train-batching-10k-b128"
    assert benchmark(_index_epoch, *data) == N


STEP_CASES = [
    ("none", {}),
    ("amsreg", {"estimator": "projection"}),
    ("amsreg", {"estimator": "gradnorm"}),
    ("amsreg", {"estimator": "finite_difference"}),
    ("jacobian", {"estimator": "projection"}),
    ("at", {}),
]


def _step_setup(data, defence: str, **extra):
    """A fresh LeNet-5 in train mode, its resolved config, SGD, a generator and one batch."""
    torch.manual_seed(0)
    model = models.create("lenet", "fmnist").train()
    cfg = TrainConfig(model="lenet", dataset="fmnist", defence=defence, **extra).resolved().defence_spec()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    return model, cfg, opt, gen, data[0][:BATCH], data[1][:BATCH]


@pytest.mark.parametrize("defence,extra", STEP_CASES,
                         ids=[f"{d}-{e.get('estimator', 'pgd10' if d == 'at' else 'ce')}" for d, e in STEP_CASES])
def test_step(benchmark, data, defence, extra):
    model, cfg, opt, gen, xb, yb = _step_setup(data, defence, **extra)

    def step() -> float:
        return float(train_step(model, xb, yb, cfg, opt, generator=gen)[0].detach())

    benchmark.group = "train-step-lenet-b128"
    if defence == "none":
        benchmark.extra_info["baseline"] = True
    assert torch.isfinite(torch.tensor(benchmark(step)))


@pytest.mark.parametrize("defence", ["amsreg", "jacobian"])
def test_step_backward_all(benchmark, data, defence):
    """The same step as ``test_step[<defence>-projection]`` but with ``loss.backward()``
    over every leaf (the input copy included), as before ``train_step``."""
    model, cfg, opt, gen, xb, yb = _step_setup(data, defence, estimator="projection")

    def step() -> float:
        loss = defence_loss(model, xb, yb, cfg, generator=gen)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    benchmark.group = "train-step-lenet-b128"
    assert torch.isfinite(torch.tensor(benchmark(step)))
