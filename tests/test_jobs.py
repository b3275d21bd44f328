"""The job scheduler: longest first, the same models in processes as in process, a failing job's one line."""
from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fastland.experiments.jobs as jb
from fastland.experiments.evaluate import EvalSettings
from fastland.experiments.train import TrainConfig
from fastland.experiments.train import Runtime

TINY_EVAL = EvalSettings(eps=25 / 255, alpha=6.25 / 255, steps=2, n_pgd=16, n_phi=2, phi_points=3, attack="pgd",
                         batch_size=64)


def _config(defence: str = "none", **kw) -> TrainConfig:
    base = dict(model="lenet", dataset="synthetic", defence=defence, epochs=2, batch_size=32, train_size=48)
    return TrainConfig(**{**base, **kw}).resolved()


def _job(tmp_path: Path, name: str, defence: str = "none", **kw) -> jb.Job:
    return jb.Job(name, _config(defence, **kw), tmp_path / name, TINY_EVAL)


def test_cost_is_step_cost_times_epochs_left_times_training_size(tmp_path):
    c = _config("at", epochs=5, train_size=100)
    assert jb.estimated_cost(c) == 10.0 * 5 * 100
    assert jb.estimated_cost(c, epochs_done=2) == 10.0 * 3 * 100
    assert jb.estimated_cost(replace(c, train_size=None)) == 10.0 * 5 * jb.TRAIN_SIZES["synthetic"]
    assert jb.estimated_cost(replace(c, dataset="fmnist", train_size=None)) == 10.0 * 5 * 60000
    assert jb.STEP_COST["trades"] > jb.STEP_COST["at"] > jb.STEP_COST["attack_flat"] > jb.STEP_COST["fgsm_rs"] \
        > jb.STEP_COST["amsreg"] == jb.STEP_COST["jacobian"] > jb.STEP_COST["none"] == 1.0


def test_schedule_runs_the_longest_first_counting_the_epochs_already_done(tmp_path):
    jobs = [_job(tmp_path, "none-long", "none", epochs=30),      # 30 × 1 = 30
            _job(tmp_path, "at", "at", epochs=2),                # 2 × 10 = 20
            _job(tmp_path, "amsreg", "amsreg", epochs=4),        # 4 × 2 = 8
            _job(tmp_path, "flat", "attack_flat", epochs=4),     # 4 × 4 = 16
            _job(tmp_path, "none", "none", epochs=2)]            # 2
    assert [j.name for j in jb.schedule(jobs)] == ["none-long", "at", "flat", "amsreg", "none"]
    # 25 of the 30 epochs done: 5 left, now behind amsreg's 8
    (tmp_path / "none-long").mkdir()
    (tmp_path / "none-long" / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(25)))
    assert [j.name for j in jb.schedule(jobs)] == ["at", "flat", "amsreg", "none-long", "none"]


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


def _numbers(run_dir: Path) -> dict:
    ev = json.loads((run_dir / "eval.json").read_text())
    return {k: v for k, v in ev.items() if k != "eval_time_s"}


def test_jobs_in_two_processes_give_the_models_of_one_thread_in_process_bit_for_bit(tmp_path):
    # a model's bits depend on the intra-op thread count; the processes use one thread, so compare with one
    names = (("none", "none"), ("amsreg", "amsreg"))
    one = [_job(tmp_path / "one", n, d) for n, d in names]
    two = [_job(tmp_path / "two", n, d) for n, d in names]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res1 = jb.run_jobs(one, n_jobs=1, runtime=Runtime(progress=False))
    finally:
        torch.set_num_threads(threads)
    log = io.StringIO()
    res2 = jb.run_jobs(two, n_jobs=2, stream=log)
    assert list(res2) == ["none", "amsreg"]  # the given order, whatever order they ran in
    for (name, _), j1, j2 in zip(names, one, two):
        s1, s2 = _state(j1.run_dir), _state(j2.run_dir)
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1), name
        assert _numbers(j1.run_dir) == _numbers(j2.run_dir)
        assert res1[name].eval["clean_acc"] == res2[name].eval["clean_acc"]
        assert res2[name].train_time_s > 0
        assert "job " + name in j2.log.read_text()  # the job's own output went to its log
    lines = log.getvalue().splitlines()  # not a terminal: a start and an end line per job
    assert len(lines) == 4 and sum("started" in l for l in lines) == 2 and sum("done in" in l for l in lines) == 2
    assert lines[0].startswith("[amsreg] started")  # the longer job first
    # finished and evaluated: read back without a process
    again = jb.run_jobs(two, n_jobs=2, stream=log)
    assert {n: r.eval for n, r in again.items()} == {n: r.eval for n, r in res2.items()}
    assert len(log.getvalue().splitlines()) == 4


def test_a_failing_job_lets_the_others_finish_then_names_its_run_and_log(tmp_path):
    good, bad = _job(tmp_path, "good"), _job(tmp_path, "bad")
    bad.run_dir.mkdir(parents=True)
    (bad.run_dir / "config.json").write_text(json.dumps({**bad.config.to_dict(), "lr": 0.5}))  # other settings
    with pytest.raises(jb.JobFailed) as e:
        jb.run_jobs([bad, good], n_jobs=2, runtime=Runtime(progress=False))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("run bad failed (ValueError: out:") and str(bad.log) in msg
    assert "Traceback" in bad.log.read_text()
    assert (good.run_dir / "model.pt").exists() and (good.run_dir / "eval.json").exists()


def test_in_process_errors_propagate_and_bad_job_lists_are_refused(tmp_path):
    bad = _job(tmp_path, "bad")
    bad.run_dir.mkdir(parents=True)
    (bad.run_dir / "config.json").write_text(json.dumps({**bad.config.to_dict(), "lr": 0.5}))
    with pytest.raises(ValueError, match="written with other settings"):
        jb.run_jobs([bad], n_jobs=1, runtime=Runtime(progress=False))
    with pytest.raises(ValueError, match="jobs: expected an integer >= 1, got 0"):
        jb.run_jobs([bad], n_jobs=0)
    with pytest.raises(ValueError, match="jobs: expected distinct names and run folders"):
        jb.run_jobs([bad, bad], n_jobs=2)


def test_a_running_jobs_line_shows_its_epoch_and_a_terminal_redraws_it_in_place(tmp_path):
    job = _job(tmp_path, "at", "at", epochs=20)
    job.run_dir.mkdir()
    rows = [{"epoch": 1, "loss": 2.0, "train_acc": 0.3, "test_acc": 0.25, "time_s": 4.0},
            {"epoch": 2, "loss": 1.5, "train_acc": 0.5, "test_acc": 0.45, "time_s": 4.2}]
    (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = jb._job_line(job, "training", 0.0)
    assert line.startswith("[at] epoch 2/20, loss 1.5000, train acc 0.500, test acc 0.450, 4.2 s/epoch")
    assert jb._job_line(job, "evaluating", 0.0).startswith("[at] evaluating")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    d = jb._Display(out)
    d.live(["[a] epoch 1/2", "[b] epoch 1/3"], force=True)
    d.event("[a] done")
    d.live(["[b] epoch 2/3"], force=True)
    text = out.getvalue()
    assert text.count("\x1b[2F\x1b[J") == 1 and text.endswith("[a] done\n[b] epoch 2/3\x1b[K\n")
