"""The local prefix Square recomputes on a window's receptive field: the windowed features
equal the full ones for every window size and position (borders included), the split model
equals the model, what is not recognised falls back, and Square gives the same result with
and without the prefix."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attack_models import Opaque, seeded_model
from fastland import _ext, models
from fastland.attacks._counting import CallCounter
from fastland.attacks._local_prefix import local_prefix, run_forward
from fastland.attacks.square import _MIN_WINDOWED_ROWS, square_attack

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [("lenet", "fmnist", (1, 28, 28)), ("ddnet", "fmnist", (1, 28, 28)), ("lenet", "cifar10", (3, 32, 32))]


def _moved(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, side: int, g: torch.Generator) -> torch.Tensor:
    """``x`` with fresh values in each sample's ``side × side`` window at ``(top, left)``."""
    out = x.clone()
    for i in range(x.shape[0]):
        t, l = int(top[i]), int(left[i])
        out[i, :, t:t + side, l:l + side] = torch.rand(x.shape[1], side, side, generator=g, dtype=x.dtype)
    return out


@pytest.mark.parametrize("name,dataset,shape", MODELS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_windowed_update_equals_the_full_features(name, dataset, shape, dtype, tol) -> None:
    """Within ``tol``; bit for bit where the first layer has one input channel (fastland's models
    run fast_conv's C++ kernel there, in the whole forward and in the windows alike)."""
    model = seeded_model(name, dataset, dtype)
    if shape[0] == 1 and _ext.extension_available():
        tol = 0.0
    prefix = local_prefix(model)
    assert prefix is not None
    g = torch.Generator().manual_seed(1)
    n, (_, h, w) = 9, shape
    x = torch.rand(n, *shape, generator=g, dtype=dtype)
    with torch.no_grad():
        feat = prefix.features(x)
        torch.testing.assert_close(prefix.rest(feat), model(x), atol=tol, rtol=tol)
        for side in sorted({1, 2, 3, 5, 8, h // 2 + 1, h}):
            top = torch.randint(0, h - side + 1, (n,), generator=g)
            left = torch.randint(0, w - side + 1, (n,), generator=g)
            top[0], left[0], top[1], left[1] = 0, 0, h - side, w - side  # both corners
            x_new = _moved(x, top, left, side, g)
            got = prefix.update(feat, x_new, top, left, side)
            torch.testing.assert_close(got, prefix.features(x_new), atol=tol, rtol=tol)


def test_run_forward_equals_the_sequential() -> None:
    g = torch.Generator().manual_seed(3)
    body = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.MaxPool2d((2, 3)),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 1 * 1, 3))
    z = torch.randn(5, 2, 9, 11, generator=g)
    with torch.no_grad():
        assert torch.equal(run_forward(list(body), z), body(z))


def _hooked() -> nn.Module:
    model = models.create("lenet", "fmnist")
    model.body[0].register_forward_hook(lambda m, i, o: o * 2)
    return model


class _OwnForward(models.Classifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -super().forward(x)


@pytest.mark.parametrize("build", [
    lambda: models.create("resnet18", "cifar10"),
    _hooked,
    lambda: _OwnForward(models.Normalize([0.5], [0.5]), models.lenet5_body()),
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
    lambda: nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(10)),
    lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10)),
    lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(3, stride=2), nn.Flatten(), nn.LazyLinear(10)),
    lambda: Opaque(models.create("lenet", "fmnist")),
], ids=["resnet18", "hook", "own-forward", "no-conv", "strided-conv", "no-pool", "overlapping-pool", "wrapped"])
def test_what_is_not_recognised_falls_back(build) -> None:
    assert local_prefix(build()) is None


@pytest.mark.parametrize("name,dataset,shape", MODELS[:2], ids=["lenet", "ddnet"])
def test_square_is_the_same_with_and_without_the_prefix(name, dataset, shape) -> None:
    model = seeded_model(name, dataset, torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.5)  # logits that depend on the input more than at initialisation
    g = torch.Generator().manual_seed(4)
    x = torch.rand(400, *shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1)
    closest = (top2.values[:, 0] - top2.values[:, 1]).argsort()[::10][:40]  # a spread of margins: some break, some not
    x, y = x[closest], top2.indices[closest, 0]  # every sample starts correct
    runs = []
    for m in (CallCounter(model), CallCounter(Opaque(model))):
        out = square_attack(m, x, y, 0.1, n_queries=60, generator=torch.Generator().manual_seed(5))
        runs.append((out, m.counts))
    (x_a, broken_a), counts_a = runs[0]
    (x_b, broken_b), counts_b = runs[1]
    assert local_prefix(CallCounter(model)) is not None
    assert torch.equal(broken_a, broken_b) and torch.equal(x_a, x_b)
    assert counts_a == counts_b  # the windowed forwards are counted as model forwards
    assert 40 - int(broken_a.sum()) < _MIN_WINDOWED_ROWS  # the run also went on without the prefix
    assert 0 < int(broken_a.sum()) < 40  # some broken, some not: both branches ran
