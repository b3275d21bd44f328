"""The fast input-gradient path of :mod:`fastland.fast_conv`, off vs on, one thread.

Groups (``off`` is each group's baseline; LeNet-5 and DDNet, Fashion-MNIST shapes):

* ``conv-step-<model>-<defence>``: one ``fastland.train_step`` per defence
  (``none``, ``at`` = PGD-10, ``jacobian``, ``amsreg``; batch 128);
* ``conv-pgd10-<model>``: ``fastland.attacks.pgd``, 10 steps, batch 128;
* ``conv-flatness-<model>``: ``fastland.flatness`` on 32 images (paper grid); ``off``
  also takes the fused first layer's adjoint with ``torch.nn.grad.conv{n}d_input`` (as the
  library did before), ``on`` is the library's default (:func:`fastland.fast_conv.conv_input_grad`);
* ``conv-penalty-lenet``: a plain CE step (baseline) vs CE + AMSReg with
  ``n_proj`` 1 and 8 and ``estimator="exact"``, path on;
* ``conv-first-layer-input-grad``: LeNet-5's first layer alone, its input gradient by the
  flip route (baseline) and by the C++ one-input-channel kernel, and its forward;
* ``conv-first-layer-{forward,weight-grad}-{lenet,ddnet}``: the first layer's forward and its
  weight and bias gradients by aten (baseline) and by the C++ one-input-channel kernels;
* ``conv-pgd-torchattacks-lenet``: torchattacks' PGD on the plain model (baseline) and
  with the path, vs fastland's PGD with the path.

Full run (process CPU time; a few minutes)::

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_conv.py --benchmark-only -q \\
        --benchmark-timer=time.process_time --benchmark-min-rounds=3 \\
        --benchmark-json=/tmp/bench_conv.json

Smoke run (tiny sizes, seconds): prefix ``FASTLAND_BENCH_SMOKE=1`` and add
``--benchmark-disable`` (each benchmark runs once, untimed).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from fastland import _fusion, fast_conv, flatness, models
from fastland.attacks import pgd

try:
    from fastland.defences import Defence, train_step
except ImportError:  # pragma: no cover - before the defences module existed
    from fastland.train import Defence, train_step  # type: ignore[no-redef]

SMOKE = os.environ.get("FASTLAND_BENCH_SMOKE") == "1"
BATCH = 8 if SMOKE else 128
FLAT_N = 2 if SMOKE else 32
STEPS = 2 if SMOKE else 10
EPS = 10 / 255
MODELS = ("lenet", "ddnet")
DEFENCES = {
    "none": Defence("none"),
    "at": Defence("at", eps=EPS, steps=STEPS),
    "jacobian": Defence("jacobian", lam=0.01),
    "amsreg": Defence("amsreg", lam=0.5),
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> tuple:
    g = torch.Generator().manual_seed(0)
    return torch.rand(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def _model(name: str, path: str) -> nn.Module:
    """A seeded fastland model with the path on (``on``) or removed (``off``)."""
    torch.manual_seed(0)
    m = models.create(name, "fmnist")
    return fast_conv.apply(m) if path.startswith("on") else fast_conv.remove(m)


_TORCH_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


@contextlib.contextmanager
def _adjoint(path: str) -> Iterator[None]:
    """For ``off``: the fused first layer's adjoint through torch's own ``conv{n}d_input`` (the
    library's default is ``fast_conv.conv_input_grad``)."""
    if path != "off":
        yield
        return
    saved = dict(_fusion._CONV_INPUT_GRAD)
    _fusion._CONV_INPUT_GRAD.update(_TORCH_INPUT_GRAD)
    try:
        yield
    finally:
        _fusion._CONV_INPUT_GRAD.update(saved)


def _run(benchmark, group: str, path: str, fn: Callable[[], Tensor]) -> None:
    benchmark.group = group
    benchmark.extra_info["path"] = path
    if path == "off":
        benchmark.extra_info["baseline"] = True
    assert bool(torch.isfinite(benchmark(fn)).all())


@pytest.mark.parametrize("path", ["off", "on"])
@pytest.mark.parametrize("defence", list(DEFENCES))
@pytest.mark.parametrize("name", MODELS)
def test_step(benchmark, data, name, defence, path):
    model = _model(name, path).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    step = lambda: train_step(model, *data, DEFENCES[defence], opt, generator=gen, params=params)[0].detach()  # noqa: E731
    _run(benchmark, f"conv-step-{name}-{defence}", path, step)


@pytest.mark.parametrize("path", ["off", "on"])
@pytest.mark.parametrize("name", MODELS)
def test_pgd(benchmark, data, name, path):
    model = _model(name, path).eval()
    gen = torch.Generator().manual_seed(0)
    attack = lambda: pgd(model, *data, EPS, alpha=2.5 * EPS / STEPS, steps=STEPS, generator=gen)  # noqa: E731
    _run(benchmark, f"conv-pgd{STEPS}-{name}", path, attack)


@pytest.mark.parametrize("path", ["off", "on"])
@pytest.mark.parametrize("name", MODELS)
def test_flatness(benchmark, data, name, path):
    model = _model(name, path).eval()
    x = data[0][:FLAT_N]
    kwargs = dict(n_dirs=1, points=3) if SMOKE else {}

    def measure() -> Tensor:
        with _adjoint(path):
            return flatness(model, x, generator=torch.Generator().manual_seed(0), **kwargs).phi

    _run(benchmark, f"conv-flatness-{name}", path, measure)


PENALTIES = {"ce": None, "amsreg-n1": dict(n_proj=1), "amsreg-n8": dict(n_proj=8),
             "amsreg-exact": dict(estimator="exact")}


@pytest.mark.parametrize("penalty", list(PENALTIES))
def test_penalty_vs_ce(benchmark, data, penalty):
    """A plain CE step (``Defence("none")``, inputs not requiring grad) vs CE + AMSReg."""
    model = _model("lenet", "on").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    kw = PENALTIES[penalty]
    defence = Defence("none") if kw is None else Defence("amsreg", lam=0.5, **kw)
    gen = torch.Generator().manual_seed(0)
    params = list(model.parameters())
    benchmark.group = "conv-penalty-lenet"
    if kw is None:
        benchmark.extra_info["baseline"] = True
    step = lambda: train_step(model, *data, defence, opt, generator=gen, params=params)[0].detach()  # noqa: E731
    assert bool(torch.isfinite(benchmark(step)))


@pytest.mark.parametrize("impl", ["torchattacks-off", "torchattacks-on", "fastland-on"])
def test_pgd_vs_torchattacks(benchmark, data, impl):
    """torchattacks' PGD on the plain LeNet (baseline) and on the same model with the
    path, vs fastland's PGD with the path: the gain is the layer's, not the loop's."""
    model = _model("lenet", impl.split("-")[1]).eval()
    alpha = 2.5 * EPS / STEPS
    if impl.startswith("torchattacks"):
        torchattacks = pytest.importorskip("torchattacks")
        atk = torchattacks.PGD(model, eps=EPS, alpha=alpha, steps=STEPS, random_start=True)
        attack = lambda: atk(*data)  # noqa: E731
    else:
        gen = torch.Generator().manual_seed(0)
        attack = lambda: pgd(model, *data, EPS, alpha=alpha, steps=STEPS, generator=gen)  # noqa: E731
    benchmark.group = "conv-pgd-torchattacks-lenet"
    if impl == "torchattacks-off":
        benchmark.extra_info["baseline"] = True
    out = benchmark(attack)
    assert float((out - data[0]).abs().max()) <= EPS + 1e-6


FIRST_LAYER = ("flip", "one-channel", "forward")
# (output channels, kernel, padding) of the one-input-channel first layers
FIRST_LAYERS = {"lenet": (6, 5, 2), "ddnet": (32, 3, 0)}


@pytest.mark.parametrize("kernel", FIRST_LAYER)
def test_first_layer_input_grad(benchmark, monkeypatch, kernel):
    """LeNet-5's first layer alone (1 → 6 channels, 5×5, padding 2, batch 128): its input
    gradient by the flip route (baseline), by the C++ one-input-channel kernel, and the
    layer's forward convolution of the same size for scale."""
    from fastland import _conv_grad

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 1, 5, 5, generator=gen)
    g = torch.randn(BATCH, 6, 28, 28, generator=gen)
    x = torch.rand(BATCH, 1, 28, 28, generator=gen)
    spec = _conv_grad.make_spec(2, 1, 2)
    if kernel == "flip":
        monkeypatch.setattr(_conv_grad, "one_channel_kernels", lambda *args: False)
        benchmark.extra_info["baseline"] = True
    elif kernel == "one-channel" and not _conv_grad.one_channel_kernels(w, spec, g):
        pytest.skip("the C++ extension is not built")
    run = (lambda: torch.conv2d(x, w, None, 1, 2)) if kernel == "forward" else (  # noqa: E731
        lambda: _conv_grad._input_grad_kernel(g, w, x.shape, spec))
    benchmark.group = "conv-first-layer-input-grad"
    assert benchmark(run).shape[0] == BATCH


@pytest.mark.parametrize("layer", list(FIRST_LAYERS))
@pytest.mark.parametrize("op", ["forward", "weight-grad"])
@pytest.mark.parametrize("kernel", ["aten", "one-channel"])
def test_first_layer_forward_and_weight_grad(benchmark, layer, op, kernel):
    """A one-input-channel first layer alone (batch 128): its forward (with bias) and its weight
    and bias gradients by aten (oneDNN, the baseline) and by the C++ kernels
    (``fastland._C.conv_forward_1ch`` / ``conv_weight_grad_1ch``)."""
    from fastland import _conv_grad, _ext

    if kernel == "one-channel" and not _ext.extension_available():
        pytest.skip("the C++ extension is not built")
    o, k, p = FIRST_LAYERS[layer]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, 28, 28, generator=gen)
    w, b = torch.randn(o, 1, k, k, generator=gen), torch.randn(o, generator=gen)
    g = torch.randn(BATCH, o, 28 + 2 * p - k + 1, 28 + 2 * p - k + 1, generator=gen)
    if kernel == "aten":
        benchmark.extra_info["baseline"] = True
        run = (lambda: torch.conv2d(x, w, b, 1, p)) if op == "forward" else (  # noqa: E731
            lambda: torch.ops.aten.convolution_backward(g, x, w, [o], [1, 1], [p, p], [1, 1], False, [0, 0], 1,
                                                        [False, True, True])[1])
    else:
        from fastland import _C

        run = (lambda: _C.conv_forward_1ch(x, w, b, p, p)) if op == "forward" else (  # noqa: E731
            lambda: _C.conv_weight_grad_1ch(x, g, k, k, p, p, True)[0])
    benchmark.group = f"conv-first-layer-{op}-{layer}"
    assert benchmark(run).shape[0] in (BATCH, o)
