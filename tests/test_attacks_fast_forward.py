"""The gradient attacks' forward: for the recognised models its logits and input gradients
are the model's, bitwise (ties of a flat background included); anything else is called as it
is; and APGD, APGD-T and PGD give bitwise the same iterates and the same call counts with it
as with the model itself."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attack_models import Opaque, seeded_model
from fastland import models
from fastland.attacks import _fast_forward, apgd, apgd_targeted, pgd
from fastland.attacks._counting import CallCounter
from fastland.attacks._fast_forward import FastForward, fast_forward, forward_of

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [("lenet", "fmnist", (1, 28, 28)), ("ddnet", "fmnist", (1, 28, 28)), ("lenet", "cifar10", (3, 32, 32))]


def _images(n: int, shape, seed: int) -> torch.Tensor:
    """Images with a flat black border (equal convolution outputs: ties in the pools)."""
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))
    x[:, :, :8] = 0.0
    x[:, :, :, -6:] = 0.0
    return x


def _sequential() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3),
                         nn.MaxPool2d((2, 3)), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 1, 10)).eval()


def _logits_and_gradient(forward, x: torch.Tensor, y: torch.Tensor):
    x = x.clone().requires_grad_(True)
    logits = forward(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return logits.detach(), grad


@pytest.mark.parametrize("name,dataset,shape", MODELS, ids=str)
def test_logits_and_input_gradient_are_the_models(name, dataset, shape) -> None:
    model = seeded_model(name, dataset)
    forward = fast_forward(model)
    assert isinstance(forward, FastForward)
    x, y = _images(17, shape, 2), torch.arange(17) % 10
    got, want = _logits_and_gradient(forward, x, y), _logits_and_gradient(model, x, y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with torch.no_grad():
        assert torch.equal(forward(x), model(x))


def test_a_plain_sequential_and_a_counted_model() -> None:
    body = _sequential()
    x, y = _images(9, (1, 12, 12), 3), torch.arange(9)
    got, want = _logits_and_gradient(fast_forward(body), x, y), _logits_and_gradient(body, x, y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    hooked = seeded_model("lenet", "fmnist")
    seen = []
    hooked.body.pool1.register_forward_hook(lambda m, i, o: seen.append(o.shape))  # called as it is
    x = _images(5, (1, 28, 28), 4)
    with torch.no_grad():
        assert torch.equal(fast_forward(hooked)(x), hooked(x)) and len(seen) == 2
    counted = CallCounter(seeded_model("lenet", "fmnist"))
    forward = fast_forward(counted)
    assert forward is not None
    _logits_and_gradient(forward, _images(5, (1, 28, 28), 4), torch.arange(5))
    assert counted.counts["all"] == {"forward_calls": 1, "forward_rows": 5, "backward_calls": 1, "backward_rows": 5}


@pytest.mark.parametrize("build", [
    lambda: Opaque(seeded_model("lenet", "fmnist")),
    lambda: models.ResNet18(width=4),  # no max-pool: nothing to change
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
    lambda: _hooked(seeded_model("lenet", "fmnist")),
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, stride=1), nn.Flatten()),  # overlapping pool
], ids=["wrapper", "resnet", "no-pool", "hook", "overlapping-pool"])
def test_what_is_not_recognised_is_called_as_it_is(build) -> None:
    model = build()
    assert fast_forward(model) is None
    assert forward_of(model) is model


def _hooked(model: nn.Module) -> nn.Module:
    model.register_forward_hook(lambda m, i, o: None)
    return model


ATTACKS = {
    "apgd-ce": lambda m, x, y: apgd(m, x, y, 0.1, steps=12, generator=torch.Generator().manual_seed(5)),
    "apgd-t": lambda m, x, y: apgd_targeted(m, x, y, 0.1, n_target_classes=3, steps=8,
                                             generator=torch.Generator().manual_seed(6)),
    "pgd": lambda m, x, y: pgd(m, x, y, 0.1, 0.02, 6, generator=torch.Generator().manual_seed(7)),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_are_the_same_with_and_without_it(monkeypatch, attack) -> None:
    x, y = _images(24, (1, 28, 28), 8), torch.arange(24) % 10
    results = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(_fast_forward, "fast_forward", lambda model: None)
        counted = CallCounter(seeded_model("lenet", "fmnist"))
        results.append((ATTACKS[attack](counted, x, y), counted.counts))
    (x_fast, counts_fast), (x_plain, counts_plain) = results
    assert torch.equal(x_fast, x_plain)
    assert counts_fast == counts_plain
