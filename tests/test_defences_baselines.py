"""The baseline defences ``fgsm_rs`` (fast adversarial training) and ``trades``: their objectives against
per-sample float64 loops written from the papers, the attacks' invariants and random starts, the training
loop (exact resume, 2-process DDP, the catastrophic-overfitting monitor) and the evaluation's flag."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastland.choices import DEFENCES, PAPER_DEFENCES
from fastland.data import synthetic_dataset
from fastland.defences import TRADES_BETA, Defence, defence_loss, trades_example
from fastland.experiments import evaluate as evaluate_module
from fastland.experiments.cli import main
from fastland.experiments.config import TrainConfig
from fastland.experiments.evaluate import (EvalSettings, OVERFITTING_GAP, evaluate, fgsm_accuracy,
                                           overfitting_flags)
from fastland.experiments.train import MONITOR_SIZE, fit, load_trained, overfitting_monitor
from fastland.testing import assert_in_ball_and_box, tiny_bn_cnn, tiny_cnn

REPO = Path(__file__).resolve().parents[1]
SHAPE = (2, 5, 5)  # odd: two channels, 5×5
N_CLASSES = 4
EPS = 0.09


def _data(n: int, seed: int = 3, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    x, y = synthetic_dataset(n, shape=SHAPE, n_classes=N_CLASSES, seed=seed).tensors
    return x.to(dtype), y


def _model(seed: int = 1, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    m = (tiny_bn_cnn if bn else tiny_cnn)(SHAPE[0], N_CLASSES, SHAPE[1])
    return m.double().train()


def _params(model: nn.Module) -> List[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """The reference's own projection: into [x − ε, x + ε], then into [0, 1]."""
    return torch.clamp(torch.max(torch.min(x_adv, x + eps), x - eps), 0.0, 1.0)


def _input_grad(fn, x: Tensor) -> Tensor:
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(xr), xr)
    return g


# --------------------------------------------------------------------------- per-sample references


def _fgsm_rs_examples_ref(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, seed: int) -> Tensor:
    """Wong et al.'s fast adversarial example, one sample at a time, model in eval mode:
    δ₀ ~ U(−ε, ε), x₀ = clip(x + δ₀, 0, 1), x' = Π(x₀ + α·sign(∇ CE(f(x₀), y)))."""
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    delta = (2 * u - 1) * eps
    was = model.training
    model.eval()
    out = []
    for i in range(x.shape[0]):
        xi, yi = x[i:i + 1], y[i:i + 1]
        x0 = torch.clamp(xi + delta[i:i + 1], 0.0, 1.0)
        g = _input_grad(lambda z: F.cross_entropy(model(z), yi), x0)
        out.append(_project(x0 + alpha * torch.sign(g), xi, eps))
    model.train(was)
    return torch.cat(out)


def _fgsm_rs_loss_ref(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, seed: int) -> Tensor:
    x_adv = _fgsm_rs_examples_ref(model, x, y, eps, alpha, seed)
    return torch.stack([F.cross_entropy(model(x_adv[i:i + 1]), y[i:i + 1]) for i in range(x.shape[0])]).mean()


def _kl_ref(z: Tensor, z_adv: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_c p_c (log p_c − log q_c) of one sample's logits ``[1, C]`` (TRADES' KLDivLoss form)."""
    p = torch.softmax(z, dim=1)
    return (p * (torch.log(p) - torch.log_softmax(z_adv, dim=1))).sum()


def _trades_examples_ref(model: nn.Module, x: Tensor, eps: float, alpha: float, steps: int, seed: int) -> Tensor:
    """TRADES' attack one sample at a time, model in eval mode: x'₀ = x + 0.001·N(0, I), then
    ``steps`` times x' ← Π(x' + α·sign(∇x' KL(p(·|x) ‖ p(·|x')))) with p(·|x) fixed."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    was = model.training
    model.eval()
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        with torch.no_grad():
            zi = model(xi)
        xa = xi + 0.001 * noise[i:i + 1]
        for _ in range(steps):
            g = _input_grad(lambda z: _kl_ref(zi, model(z)), xa)
            xa = _project(xa + alpha * torch.sign(g), xi, eps)
        out.append(xa)
    model.train(was)
    return torch.cat(out)


def _trades_loss_ref(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, beta: float,
                     seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, mean CE, mean KL): mean_i CE(f(x_i), y_i) + β·mean_i KL(p(·|x_i) ‖ p(·|x'_i)), f(x_i) not detached."""
    x_adv = _trades_examples_ref(model, x, eps, alpha, steps, seed)
    ces, kls = [], []
    for i in range(x.shape[0]):
        zi = model(x[i:i + 1])
        ces.append(F.cross_entropy(zi, y[i:i + 1]))
        kls.append(_kl_ref(zi, model(x_adv[i:i + 1])))
    ce, kl = torch.stack(ces).mean(), torch.stack(kls).mean()
    return ce + beta * kl, ce, kl


def _close(a: Tensor, b: Tensor, msg: str = "") -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=msg)


# --------------------------------------------------------------------------- the objectives


@pytest.mark.parametrize("n,seed", [(7, 0), (13, 5)])
def test_fgsm_rs_loss_and_gradients_match_a_per_sample_loop(n, seed):
    model = _model(seed)
    x, y = _data(n, seed=seed + 10)
    d = Defence("fgsm_rs", eps=EPS)
    assert d.step_size == pytest.approx(1.25 * EPS)
    loss, ce, pen, logits = defence_loss(model, x, y, d, generator=torch.Generator().manual_seed(seed))
    want = _fgsm_rs_loss_ref(model, x, y, EPS, 1.25 * EPS, seed)
    _close(loss, want)
    _close(ce, want)
    assert float(pen.detach()) == 0.0 and logits.shape == (n, N_CLASSES)
    for (name, _), g, gw in zip(model.named_parameters(), torch.autograd.grad(loss, _params(model)),
                                torch.autograd.grad(want, _params(model))):
        _close(g, gw, name)
    assert loss.detach() > F.cross_entropy(model(x), y).detach()  # the step raised the loss


@pytest.mark.parametrize("n,steps,beta,seed", [(7, 3, TRADES_BETA, 0), (11, 2, 0.7, 4)])
def test_trades_loss_and_gradients_match_a_per_sample_loop(n, steps, beta, seed):
    model = _model(seed)
    x, y = _data(n, seed=seed + 20)
    d = Defence("trades", eps=EPS, steps=steps, beta=beta)
    assert d.step_size == pytest.approx(EPS / 4)
    loss, ce, pen, logits = defence_loss(model, x, y, d, generator=torch.Generator().manual_seed(seed))
    want, want_ce, want_kl = _trades_loss_ref(model, x, y, EPS, EPS / 4, steps, beta, seed)
    _close(loss, want)
    _close(ce, want_ce)
    _close(pen, want_kl)
    _close(logits, model(x))  # the logits of the clean batch
    assert float(pen.detach()) > 0
    g_lib = torch.autograd.grad(loss, _params(model))
    for (name, _), g, gw in zip(model.named_parameters(), g_lib, torch.autograd.grad(want, _params(model))):
        _close(g, gw, name)
    # the KL term reaches the parameters through f(x) as well as f(x'): detaching f(x) in it changes the gradient
    x_adv = _trades_examples_ref(model, x, EPS, EPS / 4, steps, seed)
    z = model(x)
    detached = F.cross_entropy(z, y) + beta * F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(z, 1).detach(),
                                                       reduction="batchmean")
    g_det = torch.autograd.grad(detached, _params(model))
    assert max(float((a - b).abs().max()) for a, b in zip(g_det, g_lib)) > 1e-8


@pytest.mark.parametrize("name", ["fgsm_rs", "trades"])
def test_the_attack_runs_in_eval_mode_and_the_loss_in_train_mode(name):
    """With BatchNorm: the attack (per sample, running statistics) against the batch's train-mode loss."""
    model = _model(2, bn=True)
    ref = copy.deepcopy(model)
    x, y = _data(9, seed=8)
    d = Defence(name, eps=EPS, steps=2)
    loss, _, _, _ = defence_loss(model, x, y, d, generator=torch.Generator().manual_seed(3))
    assert model.training and all(m.training for m in model.modules())
    if name == "fgsm_rs":
        x_adv = _fgsm_rs_examples_ref(ref, x, y, EPS, d.step_size, 3)
        want = F.cross_entropy(ref(x_adv), y)
    else:
        x_adv = _trades_examples_ref(ref, x, EPS, d.step_size, 2, 3)
        z = ref(x)
        want = F.cross_entropy(z, y) + TRADES_BETA * F.kl_div(F.log_softmax(ref(x_adv), 1), F.log_softmax(z, 1),
                                                              reduction="batchmean", log_target=True)
    _close(loss, want)


class _Recorder:
    """Records the inputs of a model's forward passes in train mode (the loss) and in eval mode (the attack)."""

    def __init__(self, model: nn.Module) -> None:
        self.train: List[Tensor] = []
        self.eval: List[Tensor] = []
        model.register_forward_hook(self._hook)

    def _hook(self, m: nn.Module, inputs: tuple, _out: object) -> None:
        (self.train if m.training else self.eval).append(inputs[0].detach().clone())


@pytest.mark.parametrize("name", ["fgsm_rs", "trades"])
def test_the_adversarial_example_lies_in_the_ball_and_the_box(name):
    x, y = _data(40, seed=4)
    x = torch.cat([torch.zeros(3, *SHAPE, dtype=x.dtype), torch.ones(3, *SHAPE, dtype=x.dtype), x])  # box edges
    y = torch.cat([y[:6], y])
    model = _model(3)
    rec = _Recorder(model)
    d = Defence(name, eps=0.2, steps=4, alpha=0.15)  # big steps: the projection is active
    defence_loss(model, x, y, d, generator=torch.Generator().manual_seed(0))
    x_adv = rec.train[-1]  # the last train-mode forward is the one on x'
    assert_in_ball_and_box(x_adv, x, 0.2)
    assert (x_adv - x).abs().max() > 0.2 - 1e-9  # the ball's boundary is reached
    if name == "trades":
        assert_in_ball_and_box(trades_example(model, x, 0.2, 0.15, 4, torch.Generator().manual_seed(0)), x, 0.2)


def test_fgsm_rs_random_start_is_uniform_in_the_ball():
    """The start x₀ − x (the attack's first forward, on interior pixels: no clipping) is U(−ε, ε):
    mean within 5 standard errors of 0 (ε/√(3n)), variance within 3% of ε²/3, every |δ| ≤ ε, and the
    Kolmogorov–Smirnov distance to U(−ε, ε) below 1.63/√n (the 1% critical value); n = 400·50 draws, seed 7."""
    n_img = 400
    x = torch.full((n_img, *SHAPE), 0.5, dtype=torch.float64)
    y = torch.zeros(n_img, dtype=torch.long)
    model = _model(4)
    rec = _Recorder(model)
    defence_loss(model, x, y, Defence("fgsm_rs", eps=EPS), generator=torch.Generator().manual_seed(7))
    delta = (rec.eval[0] - x).flatten()
    n = delta.numel()
    assert delta.abs().max() <= EPS + 1e-15
    assert abs(float(delta.mean())) < 5 * EPS / math.sqrt(3 * n)
    assert float(delta.var()) == pytest.approx(EPS ** 2 / 3, rel=0.03)
    u = ((delta.sort().values + EPS) / (2 * EPS))
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum((grid - u).abs(), (u - (grid - 1 / n)).abs()).max())
    assert ks < 1.63 / math.sqrt(n)
    # drawn from the generator: the same seed gives the same start, another seed another one
    rec.eval.clear()
    defence_loss(model, x, y, Defence("fgsm_rs", eps=EPS), generator=torch.Generator().manual_seed(7))
    assert torch.equal(rec.eval[0] - x, delta.view_as(x))
    rec.eval.clear()
    defence_loss(model, x, y, Defence("fgsm_rs", eps=EPS), generator=torch.Generator().manual_seed(8))
    assert not torch.equal(rec.eval[0] - x, delta.view_as(x))


def test_trades_start_is_a_small_gaussian_step():
    x = torch.full((200, *SHAPE), 0.5, dtype=torch.float64)
    model = _model(5)
    rec = _Recorder(model.eval())
    trades_example(model, x, EPS, EPS / 4, 1, torch.Generator().manual_seed(2))
    start = rec.eval[1] - x  # eval[0] is the clean forward that fixes p(·|x)
    assert float(start.std()) == pytest.approx(0.001, rel=0.03)
    assert abs(float(start.mean())) < 5 * 0.001 / math.sqrt(start.numel())
    assert not model.training  # the mode is restored (eval stays eval)


# --------------------------------------------------------------------------- settings and bad input


def test_defaults_step_sizes_and_beta():
    assert Defence("fgsm_rs", eps=0.1).step_size == pytest.approx(0.125)
    assert Defence("trades", eps=0.1).step_size == pytest.approx(0.025)
    assert Defence("at", eps=0.1, steps=4).step_size == pytest.approx(2.5 * 0.1 / 4)
    assert Defence("trades", eps=0.1, alpha=0.01).step_size == 0.01
    assert Defence("trades", eps=0.1).beta == TRADES_BETA == 6.0
    assert DEFENCES[-2:] == ("fgsm_rs", "trades") and PAPER_DEFENCES == ("none", "at", "jacobian", "amsreg")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(name="trades", eps=0.1, beta=-1.0), "beta: expected a finite number >= 0, got -1.0"),
    (dict(name="trades", eps=0.1, beta=math.nan), "beta: expected a finite number >= 0"),
    (dict(name="trades", eps=0.1, beta="6"), "beta: expected a finite number >= 0, got '6'"),
    (dict(name="fgsm_rs", eps=0.0), "eps: expected a number > 0 for the 'fgsm_rs' defence"),
    (dict(name="trades"), "eps: expected a number > 0 for the 'trades' defence"),
    (dict(name="trades", eps=0.1, steps=0), "steps: expected an integer >= 1"),
    (dict(name="fgsm_rs", eps=0.1, alpha=-0.1), "alpha: expected a number >= 0"),
])
def test_bad_baseline_defence_is_one_line_naming_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")) as e:
        Defence(**kwargs)
    assert "\n" not in str(e.value)


def test_trades_refuses_inputs_outside_the_box():
    x, y = _data(3)
    with pytest.raises(ValueError, match=r"x: expected values in \[0, 1\]"):
        defence_loss(_model(), x + 2, y, Defence("trades", eps=0.1))


def test_train_config_defaults_for_the_baselines():
    for name in ("fgsm_rs", "trades"):
        c = TrainConfig(dataset="fmnist", defence=name).resolved()
        assert c.at_eps == 10 / 255
    assert TrainConfig(defence="fgsm_rs").resolved().at_alpha == pytest.approx(1.25 * 10 / 255)
    assert TrainConfig(defence="trades").resolved().at_alpha == pytest.approx(10 / 255 / 4)
    assert TrainConfig(defence="trades").resolved().beta == 6.0
    assert TrainConfig(defence="trades", beta=1.5).resolved().defence_spec().beta == 1.5
    assert TrainConfig(defence="fgsm_rs").resolved().beta == 0.0
    with pytest.raises(ValueError, match="beta: expected a finite number >= 0"):
        TrainConfig(defence="trades", beta=-1.0).resolved()


# the resolved configs of the defences that existed before the baselines, as they were then (no beta field)
_BEFORE = {
    "none": dict(lam=0.0, at_eps=0.0, at_alpha=0.0),
    "at": dict(lam=0.0, at_eps=10 / 255, at_alpha=2.5 * (10 / 255) / 10),
    "jacobian": dict(lam=0.01, at_eps=0.0, at_alpha=0.0),
    "amsreg": dict(lam=0.5, at_eps=0.0, at_alpha=0.0),
    "attack_flat": dict(lam=5.0, at_eps=10 / 255, at_alpha=2.5 * (10 / 255) / 10),
}


@pytest.mark.parametrize("name", list(_BEFORE))
def test_the_existing_defences_resolve_as_before_and_old_configs_still_match(name):
    now = TrainConfig(dataset="fmnist", defence=name).resolved().to_dict()
    for k, v in _BEFORE[name].items():
        assert now[k] == v, k  # exactly: saved runs are matched against these numbers
    old = {k: v for k, v in now.items() if k != "beta"}  # a config.json written before beta existed
    assert TrainConfig.normalise(old) == now
    assert TrainConfig.normalise(now) == now


def test_an_old_run_folder_resumes_under_the_new_config(tmp_path):
    x, y = _data(32, dtype=torch.float32)
    cfg = _cfg(defence="at", epochs=2)
    fit(_model32(), (x, y), cfg, tmp_path, progress=False, stop_after=1)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved.pop("beta")
    path.write_text(json.dumps(saved))
    r = fit(_model32(), (x, y), cfg, tmp_path, progress=False, resume=True)
    assert r.complete


def test_cli_takes_beta_and_refuses_a_negative_one(tmp_path, capsys):
    assert main(["train", "--beta", "-1"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "--beta" in err[0]
    run = tmp_path / "r"
    assert main(["train", "--dataset", "synthetic", "--model", "lenet", "--epochs", "1", "--train-size", "32",
                 "--batch-size", "16", "--defence", "trades", "--beta", "2.5", "--at-steps", "2", "--out", str(run),
                 "--no-progress"]) == 0
    _, cfg = load_trained(run)
    assert cfg.beta == 2.5 and cfg.defence == "trades" and cfg.at_steps == 2


# --------------------------------------------------------------------------- the training loop


def _cfg(**kw) -> TrainConfig:
    base = dict(dataset="synthetic", epochs=2, batch_size=16, synthetic_shape=SHAPE, synthetic_classes=N_CLASSES,
                at_steps=2, lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def _model32(seed: int = 11) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_cnn(SHAPE[0], N_CLASSES, SHAPE[1])


def _strip_time(metrics):
    return [{k: v for k, v in m.items() if k != "time_s"} for m in metrics]


@pytest.mark.parametrize("name", ["fgsm_rs", "trades"])
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, name):
    x, y = _data(64, dtype=torch.float32)
    test = _data(40, seed=9, dtype=torch.float32)
    cfg = _cfg(defence=name, at_eps=EPS)
    straight = fit(_model32(), (x, y), cfg, tmp_path / "a", test_data=test, progress=False)
    fit(_model32(), (x, y), cfg, tmp_path / "b", test_data=test, progress=False, stop_after=1)
    torch.manual_seed(999)  # another global state before resuming: the checkpoint restores it
    resumed = fit(_model32(), (x, y), cfg, tmp_path / "b", test_data=test, progress=False, resume=True)
    assert resumed.epochs_done == 2
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert _strip_time(straight.metrics) == _strip_time(resumed.metrics)
    assert ("slice_pgd_acc" in straight.metrics[-1]) == (name == "fgsm_rs")
    if name == "trades":
        assert all(m["penalty"] > 0 for m in straight.metrics)


def test_the_monitor_does_not_change_the_training(tmp_path):
    """An fgsm_rs run with test data (monitor on) trains the same weights as one without."""
    x, y = _data(64, dtype=torch.float32)
    cfg = _cfg(defence="fgsm_rs", at_eps=EPS)
    with_test = fit(_model32(), (x, y), cfg, tmp_path / "a", test_data=_data(40, 9, torch.float32), progress=False)
    without = fit(_model32(), (x, y), cfg, tmp_path / "b", progress=False)
    for (k, a), b in zip(with_test.model.state_dict().items(), without.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert "slice_pgd_acc" in with_test.metrics[0] and "slice_pgd_acc" not in without.metrics[0]


@pytest.mark.parametrize("name", ["none", "at", "trades", "fgsm_rs"])
def test_the_overfitting_monitor_is_recorded_for_fgsm_rs_only(tmp_path, name):
    x, y = _data(48, dtype=torch.float32)
    r = fit(_model32(), (x, y), _cfg(defence=name, epochs=1, at_eps=EPS), tmp_path, progress=False,
            test_data=_data(24, 9, torch.float32))
    m = r.metrics[0]
    assert ("slice_pgd_acc" in m and "slice_fgsm_acc" in m) == (name == "fgsm_rs")
    if name == "fgsm_rs":
        assert 0 <= m["slice_pgd_acc"] <= 1 and 0 <= m["slice_fgsm_acc"] <= 1


def test_the_overfitting_monitor_is_pgd10_and_fgsm_on_a_fixed_slice():
    """Against a direct computation: the first 512 of the seed-0 permutation of the test set (sorted),
    PGD-10 with step ε/4 and a random start of seed 0, FGSM at ε; no global RNG drawn; modes restored."""
    from fastland.attacks import fgsm, pgd

    x, y = _data(700, seed=6, dtype=torch.float32)
    model = _model32(3).train()
    rng = torch.get_rng_state()
    got = overfitting_monitor(model, x, y, eps=EPS)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    idx = torch.randperm(700, generator=torch.Generator().manual_seed(0))[:MONITOR_SIZE].sort().values
    xs, ys = x[idx], y[idx]
    model.eval()
    x_pgd = pgd(model, xs, ys, EPS, alpha=EPS / 4, steps=10, random_start=True,
                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_pgd = (model(x_pgd).argmax(1) == ys).double().mean().item()
        want_fgsm = (model(fgsm(model, xs, ys, EPS)).argmax(1) == ys).double().mean().item()
    assert got == {"slice_pgd_acc": pytest.approx(want_pgd), "slice_fgsm_acc": pytest.approx(want_fgsm)}
    assert overfitting_monitor(model, x, y, eps=EPS) == got  # the same every epoch


def _simulated_ddp(cfg: TrainConfig, world: int) -> nn.Module:
    """The training loop's DDP run, simulated in one process: each rank's DistributedSampler share and its own
    generator, the ranks' gradients averaged (DDP's all-reduce), one SGD step."""
    from fastland.experiments._state import Dist, seed_everything
    from fastland.experiments.config import build_model, load_data
    from fastland.experiments.train import _epoch_indices, _make_optimizer

    c = cfg.resolved()
    seed_everything(c.seed)
    model = build_model(c).train()
    opt, sched = _make_optimizer(model, c)
    x, y = load_data(c, "train")
    gens = [torch.Generator().manual_seed(c.seed * 7919 + r + 1) for r in range(world)]
    params = _params(model)
    defence = c.defence_spec()
    for epoch in range(c.epochs):
        orders = [_epoch_indices(x.shape[0], epoch, c.seed, Dist(rank=r, world=world)) for r in range(world)]
        for i in range(0, len(orders[0]), c.batch_size):
            grads = []
            for r in range(world):
                idx = torch.tensor(orders[r][i:i + c.batch_size])
                loss = defence_loss(model, x[idx], y[idx], defence, generator=gens[r])[0]
                grads.append(torch.autograd.grad(loss, params))
            for p, *gs in zip(params, *grads):
                p.grad = torch.stack(gs).mean(0)
            opt.step()
        sched.step()
    return model


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.parametrize("name", ["fgsm_rs", pytest.param("trades", marks=pytest.mark.slow)])
def test_two_process_gloo_ddp_equals_its_one_process_simulation(tmp_path, name):
    """Two gloo ranks, each with its own random starts, against the same steps simulated in one process
    (which differs from one process with the double batch by ~1e-3 in the weights: the tolerance is tight
    enough to tell the ranks' generators apart). About 30 s each (two torchrun launches)."""
    common = ["--dataset", "synthetic", "--model", "lenet", "--epochs", "2", "--train-size", "64",
              "--defence", name, "--at-steps", "2", "--lr", "0.05", "--no-progress", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastland", "train", *common, "--batch-size", "16", "--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp_model, cfg = load_trained(tmp_path / "ddp")
    assert cfg.defence == name
    metrics = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and ("slice_pgd_acc" in metrics[-1]) == (name == "fgsm_rs")
    sim = _simulated_ddp(TrainConfig(model="lenet", dataset="synthetic", epochs=2, train_size=64, defence=name,
                                     at_steps=2, lr=0.05, batch_size=16), world=2)
    for (k, a), b in zip(sim.state_dict().items(), ddp_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------------- the evaluation's flag


def test_overfitting_flag_is_one_sentence_past_the_gap():
    assert OVERFITTING_GAP == 20.0
    (flag,) = overfitting_flags(71.0, 12.5)
    assert flag == ("FGSM accuracy (71.0%) exceeds PGD-10 accuracy (12.5%) by 58.5 points: "
                    "the model looks catastrophically overfitted to FGSM")
    assert overfitting_flags(40.0, 20.0) == []  # exactly the gap: not flagged
    assert overfitting_flags(30.0, 35.0) == []
    assert "PGD-5 accuracy" in overfitting_flags(90.0, 10.0, steps=5)[0]


def test_evaluate_flags_a_model_whose_fgsm_accuracy_far_exceeds_pgd(monkeypatch):
    x, y = _data(30, dtype=torch.float32)
    model = _model32().eval()
    s = EvalSettings(eps=EPS, alpha=EPS / 4, steps=3, n_pgd=20, attack="pgd")
    clean = evaluate(model, x, y, s, progress=False, phi=False)
    assert clean["overfitting_flags"] == overfitting_flags(clean["fgsm_acc"], clean["pgd_acc"], 3)
    monkeypatch.setattr(evaluate_module, "fgsm_accuracy", lambda *a, **k: 0.9)
    monkeypatch.setattr(evaluate_module, "pgd_accuracy", lambda *a, **k: 0.3)
    res = evaluate(model, x, y, s, progress=False, phi=False)
    assert res["fgsm_acc"] == pytest.approx(90.0) and res["pgd_acc"] == pytest.approx(30.0)
    assert res["overfitting_flags"] == [
        "FGSM accuracy (90.0%) exceeds PGD-3 accuracy (30.0%) by 60.0 points: "
        "the model looks catastrophically overfitted to FGSM"]


def test_fgsm_accuracy_is_the_accuracy_on_fastland_fgsm():
    from fastland.attacks import fgsm

    x, y = _data(23, dtype=torch.float32)
    model = _model32(4).train()
    got = fgsm_accuracy(model, x, y, eps=EPS, batch_size=7)
    assert model.training
    model.eval()
    with torch.no_grad():
        want = (model(fgsm(model, x, y, EPS)).argmax(1) == y).double().mean().item()
    assert got == pytest.approx(want)
