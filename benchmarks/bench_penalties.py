"""Penalty benchmarks: one training step of CE + penalty on LeNet-5, 28×28, batch 128.

Groups:

* ``penalties-estimators``: a plain CE step (baseline; inputs do not require
  grad, as in ordinary training) against CE + (λ/2)·penalty for every estimator.
* ``penalties-proj-n{1,4,8}``: AMSReg ``projection`` with ``n_proj`` projections as
  the JacobianReg-style Python loop (baseline, written here), as one batched
  backward (``is_grads_batched``), and fastland's per-device default.
* ``penalties-dropin``: the drop-ins as users paste them, each with a plain
  ``loss.backward()``: a plain CE step (baseline), fastland's README form
  (``x = fastland.penalty_input(x)``) for ``amsreg_loss`` and ``jacobian_loss``, the
  older form on the caller's own ``x.requires_grad_(True)`` (also fills ``x.grad``), and
  the Hoffman et al. peer (``benchmarks/peers/hoffman_jacobian.py``) in its users' form.

Run (process CPU time, one intra-op thread: on a shared CPU with few cores wall
time swings 2-3x with other processes' load, CPU time by a few percent; glibc's heap held
steady, ``benchmarks/heap.py``, unless ``FASTLAND_BENCH_HEAP=default``)::

    .venv/bin/python -m pytest benchmarks/bench_penalties.py --benchmark-only -q \
        --benchmark-timer=time.process_time --benchmark-json=/tmp/bench_penalties.json

and, for ratios from interleaved rounds, ``.venv/bin/python benchmarks/bench_penalties.py``.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastland import models
from fastland.penalties import amsreg_loss, jacobian_loss, penalty_input

try:
    from heap import steady
    from peers.hoffman_jacobian import JacobianReg as HoffmanJacobianReg
except ImportError:  # run from the repository root: benchmarks/ is not on the path
    from benchmarks.heap import steady
    from benchmarks.peers.hoffman_jacobian import JacobianReg as HoffmanJacobianReg

BATCH, LAM = 128, 0.5
Penalty = Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]]


THREADS = 1  # one intra-op thread: on a shared CPU with few cores, 2 OpenMP threads
#               stall on every barrier whenever another process holds a core.


@pytest.fixture(scope="module")
def heap() -> str:
    """glibc's heap held steady for the rest of the process (benchmarks/heap.py): no step pays
    the page faults of regrowing a trimmed heap. Returns the label recorded per benchmark."""
    return steady()


@pytest.fixture(autouse=True)
def _record_heap(benchmark, heap: str) -> None:
    benchmark.extra_info["heap"] = heap


@pytest.fixture(scope="module")
def setup(heap: str) -> Iterator[tuple]:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = models.create("lenet", "fmnist").train()
    x = torch.rand(BATCH, 1, 28, 28)
    y = torch.randint(0, 10, (BATCH,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    yield model, x, y, opt
    torch.set_num_threads(threads)


def train_step(model: nn.Module, x0: Tensor, y: Tensor, opt: torch.optim.Optimizer, penalty: Penalty,
               params_only: bool = False) -> float:
    """One SGD step of ``CE + λ/2 · penalty`` (plain CE when ``penalty`` is None).

    ``params_only``: ``loss.backward(inputs=params)``, which skips ``x.grad``
    (the drop-in example's ``loss.backward()`` also computes it).
    """
    x = x0.clone().requires_grad_(penalty is not None)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    if penalty is not None:
        loss = loss + LAM / 2 * penalty(model, logits, x)
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=list(model.parameters()) if params_only else None)
    opt.step()
    return loss.item()


def jacobianreg_style_loop(model: nn.Module, logits: Tensor, x: Tensor, n_proj: int) -> Tensor:
    """The loop of Hoffman et al.'s ``JacobianReg``, with AMSReg's cotangent ``v ⊙ p``:
    one double-backward VJP per projection, ``C·‖(v⊙p)ᵀJ‖²/(P·B)`` summed."""
    B, C = logits.shape
    p = torch.softmax(logits, dim=-1)
    total = logits.new_zeros(())
    for _ in range(n_proj):
        v = torch.randn(B, C)
        v = v / v.norm(dim=1, keepdim=True)
        (g,) = torch.autograd.grad(logits, x, grad_outputs=v * p, create_graph=True)
        total = total + C * g.pow(2).sum() / (n_proj * B)
    return total


def _projection(m: nn.Module, z: Tensor, x: Tensor) -> Tensor:
    return amsreg_loss(z, x)


def _finite_difference(m: nn.Module, z: Tensor, x: Tensor) -> Tensor:
    return amsreg_loss(z, x, estimator="finite_difference", model=m)


# name -> (penalty, params_only)
ESTIMATORS = {
    "plain_ce_step": (None, False),
    "amsreg_projection_n1": (_projection, False),
    "amsreg_gradnorm": (lambda m, z, x: amsreg_loss(z, x, estimator="gradnorm"), False),
    "amsreg_finite_difference": (_finite_difference, False),
    "amsreg_exact": (lambda m, z, x: amsreg_loss(z, x, estimator="exact"), False),
    "jacobian_projection_n1": (lambda m, z, x: jacobian_loss(z, x), False),
    "amsreg_projection_n1_backward_params_only": (_projection, True),
    "amsreg_finite_difference_backward_params_only": (_finite_difference, True),
}


@pytest.mark.benchmark(group="penalties-estimators")
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_step(benchmark, setup, name: str) -> None:
    model, x, y, opt = setup
    penalty, params_only = ESTIMATORS[name]
    loss = benchmark.pedantic(train_step, args=(model, x, y, opt, penalty, params_only),
                              rounds=7, iterations=1, warmup_rounds=1)
    assert loss == loss  # finite, not NaN
    if name == "plain_ce_step":
        benchmark.extra_info["baseline"] = True


PATHS = {
    "loop_jacobianreg_style": lambda n: (lambda m, z, x: jacobianreg_style_loop(m, z, x, n)),
    "batched_is_grads_batched": lambda n: (lambda m, z, x: amsreg_loss(z, x, n_proj=n, batched=True)),
    "fastland_default": lambda n: (lambda m, z, x: amsreg_loss(z, x, n_proj=n)),
}


@pytest.mark.parametrize("n_proj", [1, 4, 8])
@pytest.mark.parametrize("path", list(PATHS))
def test_projection_paths(benchmark, setup, n_proj: int, path: str) -> None:
    model, x, y, opt = setup
    benchmark.group = f"penalties-proj-n{n_proj}"
    loss = benchmark.pedantic(train_step, args=(model, x, y, opt, PATHS[path](n_proj)),
                              rounds=5, iterations=1, warmup_rounds=1)
    assert loss == loss
    if path == "loop_jacobianreg_style":
        benchmark.extra_info["baseline"] = True


# --------------------------------------------------------------------------- drop-ins as pasted

JAC_LAM = 0.01  # Table 2's Jacobian strength (the cost does not depend on it)
_hoffman = HoffmanJacobianReg(n=1)


def dropin_step(model: nn.Module, x0: Tensor, y: Tensor, opt: torch.optim.Optimizer, form: str) -> float:
    """One SGD step of a drop-in exactly as its users write it, plain ``loss.backward()``.

    ``form``: ``plain_ce`` (the baseline: ``x`` needs no grad), ``amsreg_penalty_input`` /
    ``jacobian_penalty_input`` (fastland's README form), ``amsreg_requires_grad`` /
    ``jacobian_requires_grad`` (the older form: the caller's ``x.requires_grad_(True)``),
    ``hoffman_peer`` (Hoffman et al.'s ``JacobianReg(n=1)(x, logits)``, added as ``λ·R``).
    """
    if form == "plain_ce":
        x = x0.clone()
    elif form.endswith("penalty_input"):
        x = penalty_input(x0)
    else:
        x = x0.clone().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    if form.startswith("amsreg"):
        loss = loss + LAM / 2 * amsreg_loss(logits, x)
    elif form.startswith("jacobian"):
        loss = loss + JAC_LAM / 2 * jacobian_loss(logits, x)
    elif form == "hoffman_peer":
        loss = loss + JAC_LAM * _hoffman(x, logits)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


# 21 rounds after 3 warm-up rounds: with 7 rounds after 1, one slow early round of the plain CE
# step (18.7 against a median of 13.3 ms) put its mean, the ratios' denominator, 7 % above its median.
DROPIN_ROUNDS, DROPIN_WARMUP = 21, 3
DROPINS = ("plain_ce", "amsreg_penalty_input", "amsreg_requires_grad", "jacobian_penalty_input",
           "jacobian_requires_grad", "hoffman_peer")


@pytest.mark.benchmark(group="penalties-dropin")
@pytest.mark.parametrize("form", DROPINS)
def test_dropin_step(benchmark, setup, form: str) -> None:
    model, x, y, opt = setup
    loss = benchmark.pedantic(dropin_step, args=(model, x, y, opt, form), rounds=DROPIN_ROUNDS,
                              iterations=1, warmup_rounds=DROPIN_WARMUP)
    assert loss == loss
    if form == "plain_ce":
        benchmark.extra_info["baseline"] = True


def interleaved(rounds: int = 15, only: str = "") -> None:
    """Load-robust ratios on a shared machine: every case once per round, in turn,
    so that a burst of load from other processes hits all cases alike; process
    CPU time (one thread); prints each case's median and min over the rounds
    and its ratio to the group's baseline, and the paired ratio: the median (and
    quartiles) over rounds of the case's time ÷ the baseline's time in the same
    round, which a slow drift of the machine's speed moves least.
    Run: ``.venv/bin/python benchmarks/bench_penalties.py [ROUNDS [GROUP]]`` (GROUP a word
    of the groups' titles, e.g. ``drop-ins``: that group alone)."""
    import time

    print(f"heap: {steady()}")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = models.create("lenet", "fmnist").train()
    x, y = torch.rand(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    groups = {"estimators (÷ plain_ce_step)": {k: v for k, v in ESTIMATORS.items()}}
    for n in (1, 4, 8):
        groups[f"proj-n{n} (÷ loop)"] = {p: (PATHS[p](n), False) for p in PATHS}
    groups = {"drop-ins as pasted (÷ plain_ce)": {f: f for f in DROPINS}, **groups}
    groups = {t: c for t, c in groups.items() if only in t}
    for title, cases in groups.items():
        times = {k: [] for k in cases}
        for r in range(rounds + 1):
            for k, case in cases.items():
                t = time.process_time()
                if isinstance(case, str):
                    dropin_step(model, x, y, opt, case)
                else:
                    train_step(model, x, y, opt, *case)
                if r:  # round 0 warms up
                    times[k].append(time.process_time() - t)
        base = next(iter(cases))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        print(f"\n{title}: {rounds} interleaved rounds, {THREADS} thread, CPU time")
        for k in cases:
            paired = sorted(t / b for t, b in zip(times[k], times[base]))
            q1, q2, q3 = (paired[(len(paired) - 1) * i // 4] for i in (1, 2, 3))
            print(f"  {k:48s} median {med[k] * 1e3:7.1f} ms ({med[k] / med[base]:.2f}x)"
                  f"   min {low[k] * 1e3:7.1f} ms ({low[k] / low[base]:.2f}x)"
                  f"   paired {q2:.2f}x [{q1:.2f}, {q3:.2f}]")


if __name__ == "__main__":
    import sys

    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 15, sys.argv[2] if len(sys.argv) > 2 else "")
