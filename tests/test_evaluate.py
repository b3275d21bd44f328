"""fastland.evaluate: clean accuracy, PGD accuracy and Φ against independent computations."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from fastland.attacks import pgd
from fastland.data import synthetic_dataset
from fastland.experiments.evaluate import (
    EvalSettings, accuracy, default_eval_settings, evaluate, flatness_of, pgd_accuracy,
)
from fastland.measures import flatness
from fastland.testing import tiny_cnn

SHAPE = (1, 6, 6)


@functools.lru_cache(maxsize=1)
def _fitted():
    """A tiny CNN fitted by a few full-batch gradient steps (so accuracies are not trivial)."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(0)
        x, y = synthetic_dataset(150, shape=SHAPE, n_classes=3, seed=1).tensors
        m = tiny_cnn(1, 3, 6)
        for _ in range(30):
            grads = torch.autograd.grad(torch.nn.functional.cross_entropy(m(x[:100]), y[:100]), list(m.parameters()))
            with torch.no_grad():
                for p, gp in zip(m.parameters(), grads):
                    p -= 0.5 * gp
    return m.eval(), x[100:], y[100:]


def _trained_model():
    m, x, y = _fitted()
    return copy.deepcopy(m), x, y


def test_defaults_are_the_papers_attacks():
    f = default_eval_settings("fmnist")
    assert (f.eps, f.alpha, f.steps) == (25 / 255, 6.25 / 255, 10)
    c = default_eval_settings("cifar10", n_phi=7)
    assert (c.eps, c.alpha, c.steps, c.n_phi) == (8 / 255, 2 / 255, 5, 7)
    with pytest.raises(ValueError, match="bogus: not an evaluation setting"):
        default_eval_settings("fmnist", bogus=1)


def test_accuracy_matches_argmax_count():
    m, x, y = _trained_model()
    want = (m(x).argmax(1) == y).float().mean().item()
    assert accuracy(m, x, y, batch_size=7) == pytest.approx(want)
    assert want > 0.6  # the model learned something: the count is not trivially 0 or chance


def test_pgd_accuracy_matches_a_direct_attack_and_does_not_exceed_clean():
    m, x, y = _trained_model()
    eps, alpha, steps = 0.3, 0.1, 5
    got = pgd_accuracy(m, x, y, eps=eps, alpha=alpha, steps=steps, batch_size=1000, seed=4)
    x_adv = pgd(m, x, y, eps=eps, alpha=alpha, steps=steps, random_start=True,
                generator=torch.Generator().manual_seed(4))
    want = (m(x_adv).argmax(1) == y).float().mean().item()
    assert got == pytest.approx(want)
    assert got < accuracy(m, x, y)
    # ε = 0 leaves the inputs where they are
    assert pgd_accuracy(m, x, y, eps=0.0, alpha=0.0, steps=2) == pytest.approx(accuracy(m, x, y))


def test_flatness_of_is_fastland_flatness_with_the_same_seed():
    m, x, _ = _trained_model()
    s = EvalSettings(eps=0.1, alpha=0.02, steps=1, phi_dirs=2, phi_span=0.05, phi_points=3, seed=6, attack="pgd")
    got = flatness_of(m, x[:5], s)
    f = flatness(m, x[:5], n_dirs=2, span=0.05, points=3, reduction="sum",
                 generator=torch.Generator().manual_seed(7))
    assert got["phi"] == pytest.approx(f.mean, rel=1e-6)
    assert got["phi_stderr"] == pytest.approx(f.stderr, rel=1e-6)
    assert got["phi"] < 0


def test_evaluate_reports_percentages_on_fixed_subsets():
    m, x, y = _trained_model()
    s = EvalSettings(eps=0.3, alpha=0.1, steps=3, n_clean=20, n_pgd=10, n_phi=3, phi_points=3, seed=2, attack="pgd")
    a = evaluate(m, x, y, s, progress=False)
    b = evaluate(m, x, y, s, progress=False)
    assert a == b  # deterministic given the seed
    assert (a["n_clean"], a["n_pgd"], a["n_phi"]) == (20, 10, 3)
    assert 0 <= a["pgd_acc"] <= 100 and 0 <= a["clean_acc"] <= 100
    assert a["clean_acc"] * 20 / 100 == pytest.approx(round(a["clean_acc"] * 20 / 100))  # k/20 in percent
    assert a["settings"]["eps"] == 0.3
    full = evaluate(m, x, y, EvalSettings(eps=0.3, alpha=0.1, steps=3, n_phi=3, phi_points=3, attack="pgd"), progress=False,
                    phi=False)
    assert "phi" not in full and full["clean_acc"] == pytest.approx(100 * accuracy(m, x, y))


def test_evaluate_rejects_bad_labels():
    m, x, y = _trained_model()
    with pytest.raises(ValueError, match="y: expected an int64 tensor"):
        evaluate(m, x, y.float(), default_eval_settings("fmnist"), progress=False)


def test_evaluate_reports_fgsm_accuracy_on_the_pgd_images_and_the_overfitting_flags():
    from fastland.attacks import fgsm
    from fastland.experiments.evaluate import overfitting_flags, subset_indices

    m, x, y = _trained_model()
    s = EvalSettings(eps=0.05, alpha=0.02, steps=3, n_pgd=17, seed=5, attack="pgd")
    a = evaluate(m, x, y, s, progress=False, phi=False)
    idx = subset_indices(x.shape[0], 17, 5)
    with torch.no_grad():
        want = 100 * (m(fgsm(m, x[idx], y[idx], 0.05)).argmax(1) == y[idx]).double().mean().item()
    assert a["fgsm_acc"] == pytest.approx(want)
    assert 0 < a["fgsm_acc"] < 100  # not a trivial count
    assert a["overfitting_flags"] == overfitting_flags(a["fgsm_acc"], a["pgd_acc"], 3)
