"""fastland.defences: each defence's objective and one optimiser step, against direct computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastland.attack_penalties import attack_flatness_loss
from fastland.attacks import pgd
from fastland.data import synthetic_dataset
from fastland.choices import PAPER_DEFENCES
from fastland.defences import ATTACK_PENALTY_VARIANTS, DEFENCES, Defence, defence_loss, train_step
from fastland.reference import amsreg_penalty_ref, jacobian_penalty_ref
from fastland.testing import tiny_cnn

SHAPE = (1, 6, 6)


def _data(n: int = 96, seed: int = 3):
    x, y = synthetic_dataset(n, shape=SHAPE, n_classes=3, seed=seed).tensors
    return x, y


# --------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("defence,ref", [("amsreg", amsreg_penalty_ref), ("jacobian", jacobian_penalty_ref)])
def test_regularised_loss_is_ce_plus_half_lambda_penalty(defence, ref):
    torch.manual_seed(1)
    model = tiny_cnn(1, 3, 6).double()
    x, y = _data(7)
    x = x.double()
    c = Defence(defence, lam=0.3, estimator="exact")
    loss, ce, pen, logits = defence_loss(model, x, y, c)
    xg = x.clone().requires_grad_(True)
    lg = model(xg)
    want_pen = ref(lg, xg, estimator="exact").mean()
    want_ce = F.cross_entropy(lg, y)
    torch.testing.assert_close(pen, want_pen, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ce, want_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, want_ce + 0.15 * want_pen, rtol=1e-10, atol=1e-12)
    # the penalty's gradient reaches the parameters (double backward)
    g_loss = torch.autograd.grad(loss, list(model.parameters()))
    g_ce = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert any((a - b).abs().max() > 1e-9 for a, b in zip(g_loss, g_ce))


def test_adversarial_loss_is_ce_on_the_pgd_example():
    torch.manual_seed(2)
    model = tiny_cnn(1, 3, 6)
    x, y = _data(9)
    c = Defence("at", eps=0.1, steps=3)
    loss, ce, pen, _ = defence_loss(model, x, y, c, generator=torch.Generator().manual_seed(5))
    x_adv = pgd(model, x, y, eps=0.1, alpha=c.step_size, steps=3, random_start=True,
                generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, F.cross_entropy(model(x_adv), y))
    assert float(pen) == 0.0
    assert loss.detach() > F.cross_entropy(model(x), y).detach()  # the attack raised the loss
    assert model.training  # the attack restored the mode


@pytest.mark.parametrize("defence", DEFENCES)
def test_train_step_equals_a_plain_backward_and_step(defence):
    """train_step's backward(inputs=params) gives the parameters the same update
    as loss.backward() over everything, and leaves no gradient on the input."""
    x, y = _data(12)
    x = x.double()
    c = Defence(defence, lam=0.3, estimator="exact" if defence != "none" and defence != "at" else "projection", eps=0.1, steps=3)
    torch.manual_seed(4)
    a = tiny_cnn(1, 3, 6).double()
    b = tiny_cnn(1, 3, 6).double()
    b.load_state_dict(a.state_dict())
    init = {k: v.clone() for k, v in a.state_dict().items()}
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(2):
        loss_a, _, _, _ = train_step(a, x, y, c, opt_a, generator=torch.Generator().manual_seed(step))
        loss_b, _, _, _ = defence_loss(b, x, y, c, generator=torch.Generator().manual_seed(step))
        opt_b.zero_grad(set_to_none=True)
        loss_b.backward()
        opt_b.step()
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12, msg=name)
        assert not torch.equal(pa, init[name]), f"{name} did not move"
    assert x.grad is None


@pytest.mark.parametrize("kwargs,needle", [
    (dict(name="mixup"), "defence: expected one of"),
    (dict(name="amsreg", lam=-1.0), "lam: expected a number >= 0"),
    (dict(name="amsreg", n_proj=0), "n_proj: expected an integer >= 1"),
    (dict(name="amsreg", estimator="magic"), "estimator: expected one of"),
    (dict(name="jacobian", estimator="gradnorm"), "estimator: expected one of"),
    (dict(name="at", eps=-0.1), "eps: expected a number >= 0"),
    (dict(name="at", steps=0), "steps: expected an integer >= 1"),
])
def test_bad_defence_names_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Defence(**kwargs)


def test_defence_loss_refuses_a_config_that_is_not_a_defence():
    with pytest.raises(TypeError, match="defence: expected a fastland.Defence"):
        defence_loss(tiny_cnn(1, 3, 6), *_data(4), {"name": "none"})


def test_default_step_size_is_two_and_a_half_eps_over_steps():
    assert Defence("at", eps=0.1, steps=4).step_size == pytest.approx(2.5 * 0.1 / 4)
    assert Defence("at", eps=0.1, alpha=0.03).step_size == 0.03


# --------------------------------------------------------------------------- the attack-direction defence


@pytest.mark.parametrize("variant", ATTACK_PENALTY_VARIANTS)
def test_attack_flat_loss_is_ce_plus_half_lambda_attack_penalty(variant):
    torch.manual_seed(5)
    model = tiny_cnn(1, 3, 6).double()
    x, y = _data(7)
    x = x.double()
    c = Defence("attack_flat", lam=0.4, eps=0.05, variant=variant, estimator="exact")
    loss, ce, pen, logits = defence_loss(model, x, y, c, generator=torch.Generator().manual_seed(1))
    want_pen = attack_flatness_loss(model, x, y, eps=0.05, variant=variant, estimator="exact",
                                    generator=torch.Generator().manual_seed(1))
    want_ce = F.cross_entropy(model(x), y)
    torch.testing.assert_close(pen, want_pen, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ce, want_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, want_ce + 0.2 * want_pen, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, model(x))
    g_loss = torch.autograd.grad(loss, list(model.parameters()))
    g_ce = torch.autograd.grad(want_ce, list(model.parameters()))
    assert any((a - b).abs().max() > 1e-9 for a, b in zip(g_loss, g_ce))  # the penalty reaches the parameters


@pytest.mark.parametrize("variant", ATTACK_PENALTY_VARIANTS)
def test_attack_flat_train_step_equals_a_plain_backward_and_step(variant):
    x, y = _data(12)
    x = x.double()
    c = Defence("attack_flat", lam=0.5, eps=0.05, variant=variant, estimator="exact")
    torch.manual_seed(4)
    a, b = tiny_cnn(1, 3, 6).double(), tiny_cnn(1, 3, 6).double()
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        loss_a = train_step(a, x, y, c, opt_a, generator=torch.Generator().manual_seed(step))[0]
        loss_b = defence_loss(b, x, y, c, generator=torch.Generator().manual_seed(step))[0]
        opt_b.zero_grad(set_to_none=True)
        loss_b.backward()
        opt_b.step()
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)
    assert x.grad is None


@pytest.mark.parametrize("variant", ATTACK_PENALTY_VARIANTS)
def test_attack_flat_trains_and_its_loss_decreases(variant):
    """40 SGD steps on 96 synthetic images (seed 0): the mean objective of the last 5 steps is below
    that of the first 5, and the penalty stays finite and positive."""
    torch.manual_seed(0)
    model = tiny_cnn(1, 3, 6)
    x, y = _data(96)
    c = Defence("attack_flat", lam=1.0, eps=10 / 255, variant=variant)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    losses, pens = [], []
    for step in range(40):
        i = (step * 32) % 96
        loss, _, pen, _ = train_step(model, x[i:i + 32], y[i:i + 32], c, opt, generator=gen)
        losses.append(float(loss))
        pens.append(float(pen))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert all(p > 0 and p == p for p in pens)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(eps=0.0), "eps: expected a number > 0 for the 'attack_flat' defence"),
    (dict(eps=-0.1), "eps: expected a number >= 0"),
    (dict(lam=-1.0), "lam: expected a number >= 0"),
    (dict(variant="magic"), "variant: expected one of"),
])
def test_bad_attack_flat_defence_names_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Defence("attack_flat", **{"eps": 0.04, **kwargs})


def test_variant_is_validated_and_ignored_by_the_other_defences():
    with pytest.raises(ValueError, match="variant: expected one of"):
        Defence("amsreg", variant="magic")
    x, y = _data(6)
    model = tiny_cnn(1, 3, 6)
    a = defence_loss(model, x, y, Defence("amsreg", lam=0.5, estimator="exact"))[0]
    b = defence_loss(model, x, y, Defence("amsreg", lam=0.5, estimator="exact", variant="directional"))[0]
    torch.testing.assert_close(a, b)
    assert "attack_flat" in DEFENCES and "attack_flat" not in PAPER_DEFENCES


def test_attack_flat_needs_labels():
    x, _ = _data(4)
    with pytest.raises(ValueError, match="y: the 'attack_flat' defence needs labels"):
        defence_loss(tiny_cnn(1, 3, 6), x, None, Defence("attack_flat", eps=0.04))
