"""Strong evaluation: fastland's worst case (APGD-CE → APGD-T → Square) vs torchattacks 3.5.1's
APGD(ce) → APGDT → Square chained the same way (each attack only on the samples still correct),
same settings, in one run. Robust accuracy and the model calls of every stage (forwards and
input backwards, calls and rows, counted by one :class:`CallCounter` wrapper for both
libraries) go to ``extra_info``.

Models: the trained run folders named in ``FASTLAND_BENCH_STRONG_RUNS`` (comma-separated,
loaded with :func:`fastland.experiments.train.load_trained`; one benchmark pair per folder, named
after it), else a LeNet-5 and a DDNet trained briefly here (Fashion-MNIST when Debian's files are
there, else the synthetic set; cached under ``$TMPDIR/fastland-bench-strong/``).

The real run (the AutoAttack budget: APGD-CE 100 steps, APGD-T 9 targets × 100 steps, Square
5000 queries, on the first 500 test images at ε = 25/255; about 10 minutes for none, AT and
AMSReg on one idle core, both libraries)::

    FASTLAND_BENCH_STRONG_RUNS=runs/none-s0,runs/at-s0,runs/amsreg-s0 OMP_NUM_THREADS=1 \\
        .venv/bin/python -m pytest benchmarks/bench_strong.py --benchmark-only -q \\
        --benchmark-timer=time.process_time --benchmark-json=benchmarks/results/strong.json

Smoke run with tiny sizes::

    FASTLAND_BENCH_STRONG="n=16,steps=5,queries=20,train=20" .venv/bin/python -m pytest \\
        benchmarks/bench_strong.py --benchmark-only -q

Keys of ``FASTLAND_BENCH_STRONG``: ``n`` (test images), ``steps``, ``queries``, ``targets``,
``train`` (Adam steps of the fallback models), ``eps255`` (ε in units of 1/255).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastland import attacks, data, models
from fastland.attacks._counting import CallCounter

torchattacks = pytest.importorskip("torchattacks")


def _settings() -> Dict[str, int]:
    out = {"n": 500, "steps": 100, "queries": 5000, "targets": 9, "train": 300, "eps255": 25}
    for item in filter(None, os.environ.get("FASTLAND_BENCH_STRONG", "").split(",")):
        key, value = item.split("=")
        out[key.strip()] = int(value)
    return out


S = _settings()
EPS = S["eps255"] / 255  # default 25/255, the paper's Fashion-MNIST radius
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
RUNS: List[str] = [p for p in os.environ.get("FASTLAND_BENCH_STRONG_RUNS", "").split(",") if p.strip()]
STAGES = ("apgd-ce", "apgd-t", "square")

pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(source, x_train [N, 1, 28, 28], y_train [N], x_test [n, ...], y_test [n])``."""
    if (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        train, test = data.load_dataset("fmnist", "train"), data.load_dataset("fmnist", "test")
        return "fmnist", *train.tensors, *test.tensors
    if RUNS:
        raise FileNotFoundError(f"FASTLAND_BENCH_STRONG_RUNS: the trained models need Fashion-MNIST in {FMNIST_DIR}")
    x, y = data.synthetic_dataset(4096 + 1024, (1, 28, 28), 10, seed=0).tensors
    return "synthetic", x[:4096], y[:4096], x[4096:], y[4096:]


def _briefly_trained(name: str, source: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
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


def _model(param: str, source: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    if param in ("lenet", "ddnet"):
        return _briefly_trained(param, source, x, y)
    from fastland.experiments.train import load_trained

    return load_trained(param)[0]


def torchattacks_worst_case(model: CallCounter, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``robust [n]`` bool after torchattacks' APGD(ce), APGDT and Square, each on the survivors;
    ``model``'s counts get one stage per attack (the survivors' checks count as ``"check"``)."""
    chain = [
        torchattacks.APGD(model, eps=EPS, steps=S["steps"], loss="ce", seed=0),
        torchattacks.APGDT(model, eps=EPS, steps=S["steps"], n_classes=S["targets"] + 1, seed=0),
        torchattacks.Square(model, eps=EPS, n_queries=S["queries"], seed=0),
    ]
    model.stage = "clean"
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    for name, attack in zip(STAGES, chain):
        todo = robust.nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        model.stage = name
        x_adv = attack(x[todo], y[todo])
        model.stage = "check"
        with torch.no_grad():
            robust[todo] = model(x_adv).argmax(1) == y[todo]
    return robust


def fastland_worst_case(model: CallCounter, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``robust [n]`` bool after fastland's worst case at the same settings (``model``'s counts
    get one stage per attack, named by ``worst_case``)."""
    res = attacks.worst_case(model, x, y, EPS, steps=S["steps"], n_queries=S["queries"],
                             n_target_classes=S["targets"], generator=torch.Generator().manual_seed(0))
    return res.robust


def _ids() -> List[str]:
    return RUNS if RUNS else ["lenet", "ddnet"]


@pytest.fixture(scope="module", params=_ids(), ids=lambda p: Path(p).name)
def setup(request) -> tuple:
    torch.manual_seed(0)
    source, x_tr, y_tr, x_te, y_te = _data()
    model = _model(request.param, source, x_tr, y_tr)
    x, y = x_te[: S["n"]], y_te[: S["n"]]
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    return Path(request.param).name, source, model, x, y, clean


def _short(counts: Dict[str, Dict[str, int]]) -> str:
    """``ce F/B rows 12k/11k · t … · sq …``: each attack stage's forward and backward rows."""
    def k(v: int) -> str:
        return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e3 else str(v)
    parts = []
    for name in STAGES:
        c = counts.get(name)
        if c:
            parts.append(f"{name} {k(c['forward_rows'])}/{k(c['backward_rows'])} in "
                         f"{c['forward_calls']}/{c['backward_calls']}")
    return "; ".join(parts)


def _run(benchmark, setup, fn) -> None:
    name, source, model, x, y, clean = setup
    benchmark.group = f"strong-{name}-eps{S['eps255']}-n{S['n']}-s{S['steps']}-q{S['queries']}"
    counted = CallCounter(model).eval()

    def once():
        counted.reset()
        return fn(counted, x, y)

    robust = benchmark.pedantic(once, rounds=1, iterations=1)
    acc = robust.float().mean().item()
    benchmark.extra_info.update(
        data=source, clean_accuracy=clean, robust_accuracy=acc, metric=f"robust acc {acc:.3f}",
        n=S["n"], steps=S["steps"], n_queries=S["queries"], n_target_classes=S["targets"], eps=EPS,
        counts=counted.counts, calls=_short(counted.counts),
    )


def test_strong_torchattacks(benchmark, setup) -> None:
    _run(benchmark, setup, torchattacks_worst_case)
    benchmark.extra_info["baseline"] = True


def test_strong_fastland(benchmark, setup) -> None:
    _run(benchmark, setup, fastland_worst_case)
