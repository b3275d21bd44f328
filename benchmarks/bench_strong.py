"""Strong evaluation: fastland's worst case (APGD-CE → APGD-T → Square) vs torchattacks 3.5.1's
APGD(ce) → APGDT → Square chained the same way (each attack only on the samples still correct),
same settings, on a LeNet-5 and a DDNet trained briefly (Fashion-MNIST when Debian's files are
there, else the synthetic set). One run each; robust accuracies go to ``extra_info``.

Run (the full run; about 10-20 min on one busy CPU core)::

    .venv/bin/python -m pytest benchmarks/bench_strong.py --benchmark-only -q \
        --benchmark-json=/tmp/bench_strong.json

Smoke run with tiny sizes::

    FASTLAND_BENCH_STRONG="n=16,steps=5,queries=20,train=20" .venv/bin/python -m pytest \
        benchmarks/bench_strong.py --benchmark-only -q

Keys of ``FASTLAND_BENCH_STRONG``: ``n`` (test images), ``steps``, ``queries``, ``targets``,
``train`` (Adam steps), ``eps255`` (ε in units of 1/255). Weights are cached under
``$TMPDIR/fastland-bench-strong/``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastland import attacks, data, models

torchattacks = pytest.importorskip("torchattacks")


def _settings() -> Dict[str, int]:
    out = {"n": 128, "steps": 50, "queries": 1000, "targets": 9, "train": 300, "eps255": 25}
    for item in filter(None, os.environ.get("FASTLAND_BENCH_STRONG", "").split(",")):
        key, value = item.split("=")
        out[key.strip()] = int(value)
    return out


S = _settings()
EPS = S["eps255"] / 255  # default 25/255, the paper's Fashion-MNIST radius
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(source, x_train [N, 1, 28, 28], y_train [N], x_test [n, ...], y_test [n])``."""
    if (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        train, test = data.load_dataset("fmnist", "train"), data.load_dataset("fmnist", "test")
        return "fmnist", *train.tensors, *test.tensors
    x, y = data.synthetic_dataset(4096 + 1024, (1, 28, 28), 10, seed=0).tensors
    return "synthetic", x[:4096], y[:4096], x[4096:], y[4096:]


def _trained(name: str, source: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """``name`` trained for ``S["train"]`` Adam steps of batch 128, cached by settings."""
    model = models.create(name, "fmnist")
    cache = Path(tempfile.gettempdir()) / "fastland-bench-strong" / f"{name}-{source}-{S['train']}.pt"
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(S["train"]):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval()


def torchattacks_worst_case(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``robust [n]`` bool after torchattacks' APGD(ce), APGDT and Square, each on the survivors."""
    chain = [
        torchattacks.APGD(model, eps=EPS, steps=S["steps"], loss="ce", seed=0),
        torchattacks.APGDT(model, eps=EPS, steps=S["steps"], n_classes=S["targets"] + 1, seed=0),
        torchattacks.Square(model, eps=EPS, n_queries=S["queries"], seed=0),
    ]
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    for attack in chain:
        todo = robust.nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        x_adv = attack(x[todo], y[todo])
        with torch.no_grad():
            robust[todo] = model(x_adv).argmax(1) == y[todo]
    return robust


def fastland_worst_case(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``robust [n]`` bool after fastland's worst case at the same settings."""
    res = attacks.worst_case(model, x, y, EPS, steps=S["steps"], n_queries=S["queries"],
                             n_target_classes=S["targets"], generator=torch.Generator().manual_seed(0))
    return res.robust


@pytest.fixture(scope="module", params=["lenet", "ddnet"])
def setup(request) -> tuple:
    torch.manual_seed(0)
    source, x_tr, y_tr, x_te, y_te = _data()
    model = _trained(request.param, source, x_tr, y_tr)
    x, y = x_te[: S["n"]], y_te[: S["n"]]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    return request.param, source, model, x, y, clean


def _record(benchmark, setup, robust: torch.Tensor) -> None:
    name, source, _, _, _, clean = setup
    acc = robust.float().mean().item()
    benchmark.extra_info.update(
        data=source, clean_accuracy=clean, robust_accuracy=acc, metric=f"robust acc {acc:.3f}",
        n=S["n"], steps=S["steps"], n_queries=S["queries"], n_target_classes=S["targets"], eps=EPS,
    )


def _group(name: str) -> str:
    return f"strong-{name}-eps{S['eps255']}-n{S['n']}-s{S['steps']}-q{S['queries']}"


def test_strong_torchattacks(benchmark, setup) -> None:
    name, _, model, x, y, _ = setup
    benchmark.group = _group(name)
    robust = benchmark.pedantic(torchattacks_worst_case, args=(model, x, y), rounds=1, iterations=1)
    _record(benchmark, setup, robust)
    benchmark.extra_info["baseline"] = True


def test_strong_fastland(benchmark, setup) -> None:
    name, _, model, x, y, _ = setup
    benchmark.group = _group(name)
    robust = benchmark.pedantic(fastland_worst_case, args=(model, x, y), rounds=1, iterations=1)
    _record(benchmark, setup, robust)
