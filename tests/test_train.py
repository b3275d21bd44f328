"""The training loop: each defence's objective, the schedule, checkpoints, exact
resume, SIGKILL recovery and 2-process gloo DDP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastland.attacks import pgd
from fastland.data import synthetic_dataset
from fastland.reference import amsreg_penalty_ref, jacobian_penalty_ref
from fastland.testing import tiny_cnn, tiny_mlp
from fastland.defences import DEFENCES
from fastland.experiments.paper import paper_settings
from fastland.experiments.train import TrainConfig, fit, load_data, load_trained, train

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 6, 6)


def _data(n: int = 96, seed: int = 3):
    x, y = synthetic_dataset(n, shape=SHAPE, n_classes=3, seed=seed).tensors
    return x, y


def _cfg(**kw) -> TrainConfig:
    base = dict(dataset="synthetic", epochs=2, batch_size=32, synthetic_shape=SHAPE, synthetic_classes=3,
                at_steps=3)
    base.update(kw)
    return TrainConfig(**base)


def _dropout_model() -> nn.Module:
    """tiny_mlp with dropout: its training draws from the global torch RNG."""
    m = tiny_mlp(SHAPE, 3, hidden=8)
    return nn.Sequential(m[0], m[1], m[2], nn.Dropout(0.3), m[3])


def _strip_time(metrics):
    return [{k: v for k, v in m.items() if k != "time_s"} for m in metrics]


# --------------------------------------------------------------------------- config


def test_resolved_config_takes_the_papers_settings():
    f = paper_settings("fmnist")
    assert (f.eval_eps, f.eval_alpha, f.eval_steps) == (25 / 255, 6.25 / 255, 10)
    c = paper_settings("cifar10")
    assert (c.eval_eps, c.eval_alpha, c.eval_steps, c.at_eps) == (8 / 255, 2 / 255, 5, 3 / 255)
    at = TrainConfig(dataset="fmnist", defence="at").resolved()
    assert at.at_eps == 10 / 255 and at.at_steps == 10
    assert at.at_alpha == pytest.approx(2.5 * (10 / 255) / 10)
    assert TrainConfig(dataset="fmnist", defence="amsreg").resolved().lam == 0.5
    assert TrainConfig(dataset="fmnist", defence="jacobian").resolved().lam == 0.01
    assert TrainConfig(dataset="cifar10", defence="amsreg").resolved().lam == 1.0
    assert TrainConfig(dataset="cifar10", defence="jacobian").resolved().lam == 0.05
    assert TrainConfig(model="resnet18").resolved().lr == 0.1
    assert TrainConfig(model="lenet").resolved().lr == 0.01


@pytest.mark.parametrize("field,value,needle", [
    ("defence", "mixup", "defence: expected one of"),
    ("epochs", 0, "epochs: expected an integer >= 1"),
    ("lr", -1.0, "lr: expected a positive number"),
    ("estimator", "magic", "estimator: expected one of"),
    ("n_proj", 0, "n_proj: expected an integer >= 1"),
])
def test_bad_config_names_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**{field: value}).resolved()


def test_jacobian_refuses_the_gradnorm_estimator():
    with pytest.raises(ValueError, match="estimator: expected one of"):
        TrainConfig(defence="jacobian", estimator="gradnorm").resolved()


@pytest.mark.parametrize("defence", DEFENCES)
def test_each_defence_trains_a_few_steps(tmp_path, defence):
    torch.manual_seed(0)
    model = tiny_cnn(1, 3, 6)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data()
    r = fit(model, (x, y), _cfg(defence=defence), tmp_path, test_data=_data(40, 4), progress=False)
    assert r.epochs_done == 2 and r.complete and not r.model.training
    assert all(not torch.equal(a, b) for a, b in zip(before, r.model.parameters()))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in r.model.parameters())
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss", "ce", "penalty", "train_acc", "test_acc"))
        assert (m["penalty"] > 0) == (defence in ("jacobian", "amsreg", "attack_flat", "trades"))
        assert ("slice_pgd_acc" in m) == (defence == "fgsm_rs")  # the catastrophic-overfitting monitor
    assert json.loads((tmp_path / "config.json").read_text())["defence"] == defence


def test_training_learns_a_separable_problem(tmp_path):
    torch.manual_seed(0)
    x, y = _data(300, seed=7)
    r = fit(tiny_mlp(SHAPE, 3, hidden=16), (x[:240], y[:240]), _cfg(epochs=8, lr=0.1), tmp_path,
            test_data=(x[240:], y[240:]), progress=False)
    assert r.metrics[0]["test_acc"] < r.metrics[-1]["test_acc"]
    assert r.metrics[-1]["test_acc"] >= 0.9


def test_learning_rate_falls_tenfold_after_half_and_three_quarters(tmp_path):
    x, y = _data(32)
    r = fit(tiny_mlp(SHAPE, 3), (x, y), _cfg(epochs=8, lr=0.2), tmp_path, progress=False)
    lrs = [m["lr"] for m in r.metrics]
    assert lrs == pytest.approx([0.2] * 4 + [0.02] * 2 + [0.002] * 2)


def test_bad_training_data_is_a_clear_error(tmp_path):
    x, y = _data(8)
    with pytest.raises(ValueError, match="train_data: expected y as an int64"):
        fit(tiny_mlp(SHAPE, 3), (x, y.float()), _cfg(), tmp_path, progress=False)
    with pytest.raises(TypeError, match="train_data: expected"):
        fit(tiny_mlp(SHAPE, 3), x, _cfg(), tmp_path, progress=False)


# --------------------------------------------------------------------------- checkpoints and resume


def test_checkpoint_is_weights_only_loadable_and_complete(tmp_path):
    x, y = _data(64)
    fit(tiny_mlp(SHAPE, 3), (x, y), _cfg(defence="amsreg"), tmp_path, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 2 and len(ck["metrics"]) == 2
    assert set(ck["rng"]) == {"torch", "cuda", "numpy", "python", "generator"}
    assert set(ck) >= {"model", "optimizer", "scheduler", "config"}
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    for k, v in final["model"].items():
        assert torch.equal(v, ck["model"][k])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("defence,model_fn", [
    ("none", _dropout_model),  # global torch RNG (dropout) across the interruption
    ("amsreg", lambda: tiny_cnn(1, 3, 6)),  # the loop's generator (projections)
    ("at", lambda: tiny_cnn(1, 3, 6)),  # the loop's generator (PGD random starts)
    ("attack_flat", lambda: tiny_cnn(1, 3, 6)),  # the attack-direction penalty
])
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, defence, model_fn):
    x, y = _data(80)
    cfg = _cfg(defence=defence, epochs=3, batch_size=32, lr=0.05)

    torch.manual_seed(11)
    straight = fit(model_fn(), (x, y), cfg, tmp_path / "a", progress=False)

    torch.manual_seed(11)
    fit(model_fn(), (x, y), cfg, tmp_path / "b", progress=False, stop_after=2)
    assert not (tmp_path / "b" / "model.pt").exists()
    torch.manual_seed(999)  # a different global state before resuming: the checkpoint must restore it
    torch.rand(17)
    resumed = fit(model_fn(), (x, y), cfg, tmp_path / "b", progress=False, resume=True)

    assert resumed.epochs_done == 3
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert _strip_time(straight.metrics) == _strip_time(resumed.metrics)


def test_existing_checkpoint_needs_resume(tmp_path):
    x, y = _data(32)
    fit(tiny_mlp(SHAPE, 3), (x, y), _cfg(epochs=1), tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        fit(tiny_mlp(SHAPE, 3), (x, y), _cfg(epochs=1), tmp_path, progress=False)


def test_resume_with_other_settings_is_refused(tmp_path):
    x, y = _data(32)
    fit(tiny_mlp(SHAPE, 3), (x, y), _cfg(epochs=2), tmp_path, progress=False, stop_after=1)
    with pytest.raises(ValueError, match="epochs: saved 2, now 3"):
        fit(tiny_mlp(SHAPE, 3), (x, y), _cfg(epochs=3), tmp_path, progress=False, resume=True)


def test_train_by_name_and_load_trained(tmp_path):
    c = TrainConfig(model="lenet", dataset="synthetic", epochs=1, train_size=64, batch_size=32)
    r = train(c, tmp_path, progress=False)
    model, cfg = load_trained(tmp_path)
    assert cfg == c.resolved()
    x, _ = load_data(cfg, "test")
    torch.testing.assert_close(model(x[:5]), r.model(x[:5]), rtol=0, atol=0)
    again = train(c, tmp_path, progress=False, resume=True)  # finished: loaded, not retrained
    assert again.epochs_done == 1
    with pytest.raises(FileNotFoundError, match="run_dir: no model.pt or checkpoint.pt"):
        load_trained(tmp_path / "nowhere")


def test_synthetic_train_and_test_share_classes_but_not_samples():
    c = TrainConfig(dataset="synthetic", train_size=100, synthetic_shape=SHAPE, synthetic_classes=3)
    xtr, ytr = load_data(c, "train")
    xte, yte = load_data(c, "test")
    assert xtr.shape == (100, *SHAPE) and xte.shape[0] == 64
    # nearest class mean of the training set classifies the test set: same prototypes
    means = torch.stack([xtr[ytr == k].mean(0) for k in range(3)]).flatten(1)
    pred = torch.cdist(xte.flatten(1), means).argmin(1)
    assert (pred == yte).float().mean() > 0.95
    assert torch.cdist(xte.flatten(1), xtr.flatten(1)).min() > 0


# --------------------------------------------------------------------------- processes


def _cli(*args: str) -> list:
    return [sys.executable, "-m", "fastland", *args]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_sigkill_mid_epoch_loses_at_most_that_epoch(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--model", "lenet", "--epochs", "4", "--train-size", "6000",
            "--batch-size", "50", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(_cli(*args), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        time.sleep(0.2)  # into the next epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    done = int(ck["epoch"])
    assert 1 <= done < 4, "the run finished before the kill; make the epochs longer"
    kept = _strip_time(ck["metrics"])
    res = subprocess.run(_cli(*args, "--resume"), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert _strip_time(metrics[:done]) == kept  # epochs before the kill are kept, not retrained
    assert (out / "model.pt").exists()


@pytest.mark.parametrize("defence,extra", [
    ("amsreg", {"estimator": "exact"}),  # double backward under DDP
    ("attack_flat", {"variant": "difference"}),  # two forwards of the DDP module per step
])
def test_two_process_gloo_ddp_equals_one_process_with_the_double_batch(tmp_path, defence, extra):
    """DistributedSampler gives rank r the positions r, r+2, ... of the epoch's
    permutation, so 2 ranks × batch b see the same examples per step as one
    process with batch 2b; the averaged gradients agree (up to float order).
    Both defences are deterministic (exact estimator; the FGSM direction)."""
    flags = [a for k, v in extra.items() for a in (f"--{k}", v)]
    common = ["--dataset", "synthetic", "--model", "lenet", "--epochs", "2", "--train-size", "96",
              "--defence", defence, *flags, "--lr", "0.05", "--no-progress", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastland", "train", *common, "--batch-size", "16", "--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp_model, _ = load_trained(tmp_path / "ddp")
    c = TrainConfig(model="lenet", dataset="synthetic", epochs=2, train_size=96, defence=defence, **extra,
                    lr=0.05, batch_size=32)
    single = train(c, tmp_path / "single", progress=False, device="cpu")
    ddp_metrics = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp_metrics) == 2
    for (k, a), b in zip(single.model.state_dict().items(), ddp_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    assert ddp_metrics[-1]["loss"] == pytest.approx(single.metrics[-1]["loss"], rel=1e-4)
