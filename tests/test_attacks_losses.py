"""Attack losses: against per-row loops in float64, their invariances, and bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

from fastland.attacks import losses

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(b: int = 7, c: int = 6, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (b,), generator=g)
    return z, y


def loop_dlr(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = []
    for zi, yi in zip(z.tolist(), y.tolist()):
        s = sorted(zi, reverse=True)
        other = max(v for j, v in enumerate(zi) if j != yi)
        out.append(-(zi[yi] - other) / (s[0] - s[2] + 1e-12))
    return torch.tensor(out, dtype=torch.float64)


def loop_targeted_dlr(z: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = []
    for zi, yi, ti in zip(z.tolist(), y.tolist(), t.tolist()):
        s = sorted(zi, reverse=True)
        out.append(-(zi[yi] - zi[ti]) / (s[0] - (s[2] + s[3]) / 2 + 1e-12))
    return torch.tensor(out, dtype=torch.float64)


def loop_margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.tensor([zi[yi] - max(v for j, v in enumerate(zi) if j != yi)
                         for zi, yi in zip(z.tolist(), y.tolist())], dtype=torch.float64)


def loop_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.tensor([math.log(sum(math.exp(v) for v in zi)) - zi[yi]
                         for zi, yi in zip(z.tolist(), y.tolist())], dtype=torch.float64)


@pytest.mark.parametrize("c", [4, 5, 10])
def test_losses_match_row_loops(c: int) -> None:
    z, y = rows(9, c, seed=c)
    t = (y + 1 + torch.randint(0, c - 1, (9,))) % c  # any class but y
    torch.testing.assert_close(losses.ce_loss(z, y), loop_ce(z, y), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(losses.dlr_loss(z, y), loop_dlr(z, y), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(losses.targeted_dlr_loss(z, y, t), loop_targeted_dlr(z, y, t),
                               atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(losses.margin_loss(z, y), loop_margin(z, y), atol=0, rtol=0)


def test_dlr_is_shift_and_scale_invariant() -> None:
    z, y = rows(11, 7)
    t = (y + 2) % 7
    for fn, args in ((losses.dlr_loss, ()), (losses.targeted_dlr_loss, (t,))):
        base = fn(z, y, *args)
        torch.testing.assert_close(fn(3.5 * z - 20.0, y, *args), base, atol=1e-9, rtol=1e-9)


def test_signs_tell_misclassification() -> None:
    z, y = rows(50, 5, seed=3)
    wrong = z.argmax(1) != y
    assert torch.equal(losses.dlr_loss(z, y) > 0, wrong)
    assert torch.equal(losses.margin_loss(z, y) < 0, wrong)
    # the targeted DLR is positive exactly when the target outranks the label
    t = (y + 1) % 5
    assert torch.equal(losses.targeted_dlr_loss(z, y, t) > 0, z.gather(1, t[:, None]).squeeze(1)
                       > z.gather(1, y[:, None]).squeeze(1))


def test_dlr_is_finite_on_ties() -> None:
    z = torch.zeros(3, 5)
    y = torch.tensor([0, 1, 4])
    assert torch.isfinite(losses.dlr_loss(z, y)).all()
    assert torch.isfinite(losses.targeted_dlr_loss(z, y, (y + 1) % 5)).all()


BAD = [
    (lambda: losses.dlr_loss(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)), ValueError, "logits: .*at least 3"),
    (lambda: losses.targeted_dlr_loss(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long),
                                      torch.ones(3, dtype=torch.long)), ValueError, "logits: .*at least 4"),
    (lambda: losses.margin_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long)), ValueError, "logits: .*2 dim"),
    (lambda: losses.ce_loss(torch.zeros(3, 4), torch.zeros(3)), TypeError, "y: "),
    (lambda: losses.dlr_loss(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long)), ValueError, r"y: .*\(3,\)"),
    (lambda: losses.targeted_dlr_loss(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long),
                                      torch.zeros(3, 1, dtype=torch.long)), ValueError, "target: "),
]


@pytest.mark.parametrize("call, error, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()
