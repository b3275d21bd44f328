"""Attacks: projection invariants, agreement with an independent gradient step,
strength on a trained tiny model, gradients/modes left alone, and bad inputs."""
from __future__ import annotations

import copy
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastland import attacks
from fastland.testing import fitted_tiny_cnn, accuracy, assert_in_ball_and_box, devices, tiny_bn_cnn, tiny_cnn

SHAPE = (1, 8, 8)
N_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained() -> tuple:
    """A tiny CNN fitted to a synthetic set (clean accuracy checked where it matters)."""
    return fitted_tiny_cnn(N_CLASSES, SHAPE)


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("device", devices(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_ball_and_box(device: torch.device, dtype: torch.dtype, random_start: bool) -> None:
    model = tiny_bn_cnn(3, 5, size=7).to(device, dtype)
    x = torch.rand(9, 3, 7, 7, device=device, dtype=dtype)
    x[0] = 0.0  # corners of the box, where the ball sticks out of it
    x[1] = 1.0
    y = torch.randint(0, 5, (9,), device=device)
    eps = 0.1
    x_adv = attacks.pgd(model, x, y, eps, alpha=0.04, steps=7, random_start=random_start)
    assert x_adv.shape == x.shape and x_adv.dtype == dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert_in_ball_and_box(x_adv, x, eps)
    assert (x_adv - x).abs().max().item() > eps / 2  # it did move


@pytest.mark.parametrize("device", devices(), ids=str)
def test_fgsm_is_a_full_sign_step(device: torch.device) -> None:
    model = tiny_cnn(2, 3, size=5).to(device).double()
    x = torch.rand(6, 2, 5, 5, device=device, dtype=torch.float64) * 0.5 + 0.25
    y = torch.randint(0, 3, (6,), device=device)
    x_adv = attacks.fgsm(model, x, y, 0.1)
    # away from the box's edge every moved entry moved by exactly eps
    moved = (x_adv - x).abs()
    assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], 0.1), atol=1e-12)
    assert_in_ball_and_box(x_adv, x, 0.1)


def test_zero_eps_returns_x() -> None:
    model = tiny_cnn(1, 3, size=6)
    x, y = torch.rand(4, 1, 6, 6), torch.randint(0, 3, (4,))
    assert torch.equal(attacks.pgd(model, x, y, 0.0, 0.01, 3), x)
    assert torch.equal(attacks.fgsm(model, x, y, 0.0), x)


# --------------------------------------------------------------------------- against an independent computation


def manual_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
               steps: int, x0: torch.Tensor) -> torch.Tensor:
    """Textbook PGD with .backward() on a copy of the model, per-sample mean-free loss."""
    model = copy.deepcopy(model)
    x_adv = x0.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        model.zero_grad()
        F.cross_entropy(model(x_adv), y, reduction="sum").backward()
        step = x_adv.detach() + alpha * x_adv.grad.sign()
        x_adv = torch.clamp(torch.clamp(step, x - eps, x + eps), 0, 1).detach()
    return x_adv


def test_pgd_matches_manual_loop_without_random_start() -> None:
    model = tiny_bn_cnn(2, 5, size=5).double().eval()
    x = torch.rand(7, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    ours = attacks.pgd(model, x, y, 0.07, 0.02, 5, random_start=False)
    torch.testing.assert_close(ours, manual_pgd(model, x, y, 0.07, 0.02, 5, x), atol=1e-12, rtol=0)


def test_pgd_random_start_uses_the_generator() -> None:
    model = tiny_cnn(1, 3, size=6).double()
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    a = attacks.pgd(model, x, y, 0.05, 0.01, 2, generator=torch.Generator().manual_seed(3))
    b = attacks.pgd(model, x, y, 0.05, 0.01, 2, generator=torch.Generator().manual_seed(3))
    c = attacks.pgd(model, x, y, 0.05, 0.01, 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the start is x + U(-eps, eps) clipped: replay it and run the manual loop from there
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    x0 = (x + (2 * noise - 1) * 0.05).clamp(0, 1)
    torch.testing.assert_close(a, manual_pgd(model, x, y, 0.05, 0.01, 2, x0), atol=1e-12, rtol=0)


def test_one_pgd_step_of_size_eps_is_fgsm() -> None:
    model = tiny_cnn(1, 3, size=6).double()
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    torch.testing.assert_close(
        attacks.pgd(model, x, y, 0.1, 0.1, 1, random_start=False), attacks.fgsm(model, x, y, 0.1),
        atol=0, rtol=0,
    )


def test_rows_are_attacked_independently() -> None:
    model = tiny_bn_cnn(1, 4, size=5).double().eval()
    x = torch.rand(6, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    batched = attacks.pgd(model, x, y, 0.1, 0.03, 4, random_start=False)
    single = torch.cat([attacks.pgd(model, x[i:i + 1], y[i:i + 1], 0.1, 0.03, 4, random_start=False)
                        for i in range(6)])
    torch.testing.assert_close(batched, single, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- strength


def test_pgd_lowers_accuracy_at_least_as_much_as_fgsm(trained: tuple) -> None:
    model, x, y = trained
    clean = accuracy(model, x, y)
    eps = 0.1  # FGSM leaves ~69% here, PGD-10 ~61%, sign noise ~100% (seed 0)
    acc_fgsm = accuracy(model, attacks.fgsm(model, x, y, eps), y)
    acc_pgd = accuracy(model, attacks.pgd(model, x, y, eps, 2.5 * eps / 10, 10,
                                          generator=torch.Generator().manual_seed(0)), y)
    assert clean > 0.9
    assert acc_fgsm < clean - 0.1  # the attack works at all
    assert acc_pgd <= acc_fgsm
    # and a random perturbation of the same size barely hurts (the attacks are not noise)
    noisy = (x + eps * torch.randn_like(x).sign()).clamp(0, 1)
    assert accuracy(model, noisy, y) > acc_fgsm


# --------------------------------------------------------------------------- side effects


class ModeRecorder(nn.Module):
    """Records ``self.training`` at each forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: List[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return self.inner(x)


@pytest.mark.parametrize("mode, start, expect", [
    ("eval", True, False), ("eval", False, False), ("train", False, True),
    ("keep", True, True), ("keep", False, False),
])
def test_mode_used_and_restored(mode: str, start: bool, expect: bool) -> None:
    model = ModeRecorder(tiny_bn_cnn(1, 3, size=4))
    model.train(start)
    model.inner[1].eval()  # a mixed-mode model: one submodule differs from its parent
    before = {name: m.training for name, m in model.named_modules()}
    x, y = torch.rand(4, 1, 4, 4), torch.randint(0, 3, (4,))
    attacks.pgd(model, x, y, 0.1, 0.05, 2, mode=mode)
    attacks.fgsm(model, x, y, 0.1, mode=mode)
    assert model.seen == [expect] * 3
    assert {name: m.training for name, m in model.named_modules()} == before


def test_mode_restored_after_an_error() -> None:
    model = tiny_cnn(1, 3, size=4).train()
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 3])  # label 3 is out of range
    with pytest.raises(ValueError, match=r"y: expected class indices in \[0, 3\), got range \[0, 3\]"):
        attacks.pgd(model, x, y, 0.1, 0.05, 2)
    assert model.training


def test_no_gradient_left_on_parameters_and_no_stats_update() -> None:
    model = tiny_bn_cnn(1, 3, size=4)
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])  # a gradient the caller accumulated
    stats = copy.deepcopy(model[1].state_dict())
    x, y = torch.rand(4, 1, 4, 4), torch.randint(0, 3, (4,))
    attacks.pgd(model, x, y, 0.1, 0.05, 3)
    attacks.fgsm(model, x, y, 0.1)
    assert torch.equal(params[0].grad, torch.ones_like(params[0]))
    assert all(p.grad is None for p in params[1:])
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, stats[k]), k


def test_runs_inside_no_grad_and_leaves_x_alone() -> None:
    model = tiny_cnn(1, 3, size=4)
    x, y = torch.rand(3, 1, 4, 4), torch.randint(0, 3, (3,))
    x_copy = x.clone()
    with torch.no_grad():
        x_adv = attacks.pgd(model, x, y, 0.1, 0.05, 2)
    assert torch.equal(x, x_copy) and not x.requires_grad
    assert (x_adv - x).abs().max() > 0


def test_progress_bar_runs() -> None:
    model = tiny_cnn(1, 3, size=4)
    x, y = torch.rand(2, 1, 4, 4), torch.randint(0, 3, (2,))
    assert attacks.pgd(model, x, y, 0.1, 0.05, 2, progress=True).shape == x.shape


# --------------------------------------------------------------------------- bad inputs


def bad_calls():
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = float("nan")
    return [
        (dict(x=x.mul(255).to(torch.uint8)), TypeError, r"x: expected a floating-point dtype, got torch.uint8"),
        (dict(x=nan_x), ValueError, r"x: contains NaN or inf"),
        (dict(x=x + 1.5), ValueError, r"x: expected values in \[0, 1\]"),
        (dict(x=torch.rand(0, 1, 4, 4), y=torch.zeros(0, dtype=torch.long)), ValueError, r"x: expected a non-empty batch"),
        (dict(y=y.float()), TypeError, r"y: expected an integer dtype .* got torch.float32"),
        (dict(y=y.bool()), TypeError, r"y: expected an integer dtype .* got torch.bool"),
        (dict(y=torch.tensor([0, 1, 2])), ValueError, r"y: expected shape \(2,\) .* got \(3,\)"),
        (dict(y=y.view(2, 1)), ValueError, r"y: expected 1 dimensions"),
        (dict(y=torch.tensor([0, -1])), ValueError, r"y: expected class indices in \[0, 3\)"),
        (dict(eps=-0.1), ValueError, r"eps: expected a finite number >= 0, got -0.1"),
        (dict(eps=float("nan")), ValueError, r"eps: expected a finite number >= 0, got nan"),
        (dict(eps="0.1"), TypeError, r"eps: expected a number >= 0, got '0.1'"),
        (dict(alpha=-1.0), ValueError, r"alpha: expected a finite number >= 0"),
        (dict(steps=0), ValueError, r"steps: expected a finite int >= 1, got 0"),
        (dict(steps=2.0), TypeError, r"steps: expected a int >= 1, got 2.0"),
        (dict(mode="test"), ValueError, r"mode: expected one of 'eval', 'train', 'keep', got 'test'"),
        (dict(model=lambda t: t), TypeError, r"model: expected a torch.nn.Module, got function"),
        (dict(generator=3), TypeError, r"generator: expected a torch.Generator or None, got int"),
    ]


@pytest.mark.parametrize("kwargs, exc, match", bad_calls(),
                         ids=[m.split(":")[0] + str(i) for i, (_, _, m) in enumerate(bad_calls())])
def test_bad_inputs_name_the_argument(kwargs: dict, exc: type, match: str) -> None:
    call = dict(model=tiny_cnn(1, 3, size=4), x=torch.rand(2, 1, 4, 4), y=torch.tensor([0, 1]),
                eps=0.1, alpha=0.05, steps=2)
    call.update(kwargs)
    with pytest.raises(exc, match=match):
        attacks.pgd(**call)
    if not {"alpha", "steps", "generator"} & set(kwargs):
        fgsm_call = {k: v for k, v in call.items() if k not in ("alpha", "steps")}
        with pytest.raises(exc, match=match):
            attacks.fgsm(**fgsm_call)
