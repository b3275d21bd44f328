"""The ``fastland`` command: help, one-line errors, and train → evaluate → flatness → landscape."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastland.experiments.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("train", "evaluate", "landscape", "flatness", "reproduce", "front", "demo")


def _run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastland", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(res_or_err: str, needle: str) -> None:
    lines = [l for l in res_or_err.splitlines() if l.strip()]
    assert len(lines) == 1, res_or_err
    assert "Traceback" not in res_or_err
    assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- through a subprocess


def test_help_through_subprocess_lists_subcommands_and_defaults():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    for sub in SUBCOMMANDS:
        assert sub in res.stdout
    res = _run("train", "--help")
    assert res.returncode == 0
    assert "--epochs EPOCHS" in res.stdout and "(default: 200)" in res.stdout


def test_bad_argument_through_subprocess_is_one_line_exit_2():
    res = _run("train", "--epochs", "0")
    assert res.returncode == 2
    _assert_one_line_error(res.stderr, "--epochs: expected an integer >= 1, got '0'")


def test_missing_data_through_subprocess_is_one_line_exit_2(tmp_path):
    res = _run("train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r"))
    assert res.returncode == 2
    _assert_one_line_error(res.stderr, "fastland train: error: CIFAR-10")
    assert str(tmp_path / "none") in res.stderr  # names where it looked


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_help_shows_defaults(sub, capsys):
    assert main([sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert "default:" in out and "--device" in out


@pytest.mark.parametrize("argv,needle", [
    (["train", "--defence", "mixup"], "argument --defence: invalid choice"),
    (["train", "--at-eps", "8/0"], "argument --at-eps: expected a number or a fraction"),
    (["train", "--batch-size", "many"], "argument --batch-size: expected an integer >= 1, got 'many'"),
    (["reproduce", "mnist-mlp"], "argument setting: invalid choice"),
    (["frobnicate"], "invalid choice"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, needle)


def test_impossible_settings_are_one_line_errors(tmp_path, capsys):
    rc = main(["train", "--dataset", "synthetic", "--defence", "jacobian", "--estimator", "gradnorm",
               "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    _assert_one_line_error(capsys.readouterr().err, "estimator: expected one of ('projection', 'exact')")
    assert main(["evaluate", str(tmp_path / "no-run")]) == 2
    _assert_one_line_error(capsys.readouterr().err, "run_dir: no model.pt or checkpoint.pt")
    assert main(["reproduce", "synthetic-lenet", "--defences", "none,magic", "--out", str(tmp_path / "p")]) == 2
    _assert_one_line_error(capsys.readouterr().err, "defences: expected a non-empty subset")


def test_reproduce_and_front_help_list_seeds_and_jobs(capsys):
    import os

    for sub in ("reproduce", "front"):
        assert main([sub, "--help"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "--seeds SEEDS" in out and "--jobs JOBS" in out
        assert f"the usable cores) (default: {len(os.sched_getaffinity(0))})" in out
    args = build_parser().parse_args(["reproduce", "synthetic-lenet"])
    assert (args.seeds, args.jobs) == (1, len(os.sched_getaffinity(0)))
    assert build_parser().parse_args(["front"]).seeds == 3
    assert main(["reproduce", "synthetic-lenet", "--seeds", "0"]) == 2
    _assert_one_line_error(capsys.readouterr().err, "argument --seeds: expected an integer >= 1, got '0'")


def test_failed_jobs_are_one_line_naming_the_run_and_its_log_exit_1(tmp_path, capsys):
    out = tmp_path / "p"
    for run in ("none", "amsreg"):  # folders of other settings: both jobs fail as soon as they start
        (out / run).mkdir(parents=True)
        (out / run / "config.json").write_text(json.dumps({"model": "lenet", "dataset": "synthetic", "lr": 0.5}))
    rc = main(["reproduce", "synthetic-lenet", "--defences", "none,amsreg", "--epochs", "1", "--out", str(out),
               "--jobs", "2", "--no-progress", "--no-figures"])
    assert rc == 1
    err = capsys.readouterr().err
    _assert_one_line_error(err, "fastland reproduce: error: run ")
    assert "written with other settings" in err and "job.log" in err and "also failed:" in err


def test_fractions_parse_as_pixel_units():
    args = build_parser().parse_args(["train", "--at-eps", "8/255", "--at-alpha", "0.01"])
    assert args.at_eps == pytest.approx(8 / 255) and args.at_alpha == 0.01


def test_train_then_resume_evaluate_flatness_landscape(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--dataset", "synthetic", "--model", "lenet", "--epochs", "2", "--train-size", "64",
            "--batch-size", "32", "--out", str(run), "--no-progress", "--defence", "amsreg"]
    assert main([*base, "--stop-after", "1"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["epochs_done"] == 1 and not first["complete"]
    assert main(base) == 2  # a checkpoint exists: --resume required
    assert "pass resume=True (--resume)" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["epochs_done"] == 2 and done["complete"]

    assert main(["evaluate", str(run), "--n-phi", "3", "--phi-points", "3", "--n-pgd", "16", "--steps", "2",
                 "--n-strong", "8", "--strong-steps", "2", "--n-queries", "10", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["complete"] and res["n_strong"] == 8 and res["worst_case_acc"] <= 100
    assert isinstance(res["masking_flags"], list) and set(res["broken_by"]) >= {"apgd-ce", "apgd-t", "square"}
    saved = json.loads((run / "eval.json").read_text())
    assert res == saved and res["defence"] == "amsreg" and res["n_pgd"] == 16 and res["n_phi"] == 3
    assert res["settings"]["eps"] == pytest.approx(25 / 255) and res["settings"]["steps"] == 2
    assert res["pgd_acc"] <= 100 and res["phi"] < 0

    assert main(["flatness", str(run), "--n-phi", "3", "--phi-points", "3", "--no-progress"]) == 0
    flat = json.loads(capsys.readouterr().out)
    assert flat["phi"] == pytest.approx(res["phi"], rel=1e-5)  # same subset, seed and grid as evaluate

    fig = tmp_path / "land.png"
    assert main(["landscape", str(run), str(run), "--grid-points", "5", "--out", str(fig), "--no-progress"]) == 0
    paths = json.loads(capsys.readouterr().out)["figures"]
    assert fig.exists() and fig.with_suffix(".pdf").exists() and str(fig) in paths
    assert main(["landscape", str(run), "--index", "100000", "--out", str(fig)]) == 2
    assert "--index: expected" in capsys.readouterr().err
