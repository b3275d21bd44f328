"""A run folder belongs to one run: the lock between two writers, settings that cannot mix,
``--resume`` with ``--out`` alone, and ``--overwrite``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from fastland.experiments.cli import main
from fastland.experiments.run_folder import (CHECKPOINT, CONFIG, FINAL, RunFolderBusy, load_run_file, locked,
                                             saved_config)

REPO = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic", "--train-size", "64", "--batch-size", "32", "--no-progress"]
FAST_EVAL = ["--n-phi", "2", "--phi-points", "3", "--n-pgd", "8", "--steps", "1", "--attack", "pgd", "--no-progress"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
ENV.pop("WORLD_SIZE", None)


def _configs(run: Path) -> Dict[str, Any]:
    """The settings each run file of ``run`` was written with."""
    out = {CONFIG: saved_config(run)}
    for name in (CHECKPOINT, FINAL):
        if (run / name).exists():
            out[name] = load_run_file(run / name)["config"]
    return out


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _last_json(out: str) -> Dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the lock


def _train_process(out: Path, defence: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fastland", "train", "--dataset", "synthetic", "--epochs", "3", "--train-size",
            "512", "--batch-size", "32", "--defence", defence, "--out", str(out), "--no-progress"]
    return subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_writers_started_at_once_one_finishes_the_other_is_refused_naming_the_holder(tmp_path, capsys):
    """Two ``fastland train`` processes of different defences race for one ``--out`` (about 15 s)."""
    out = tmp_path / "run"
    procs = {"amsreg": _train_process(out, "amsreg"), "jacobian": _train_process(out, "jacobian")}
    results = {d: (p.wait(timeout=240), *p.communicate()) for d, p in procs.items()}
    finished = [d for d, (rc, _, _) in results.items() if rc == 0]
    assert len(finished) == 1, results
    winner = finished[0]
    loser = next(d for d in results if d != winner)
    rc, _, err = results[loser]
    assert rc == 2, results[loser]
    line = _one_error_line(err)
    assert line.startswith(f"fastland train: error: out: {out} is being written by pid {procs[winner].pid} "), line
    assert "wait for that run to finish or choose another folder" in line

    configs = _configs(out)
    assert set(configs) == {CONFIG, CHECKPOINT, FINAL}
    assert all(c == configs[CONFIG] for c in configs.values()), configs  # one run's files only
    assert configs[CONFIG]["defence"] == winner
    assert _last_json(results[winner][1])["complete"]
    capsys.readouterr()
    assert main(["evaluate", str(out), *FAST_EVAL]) == 0
    assert json.loads(capsys.readouterr().out)["defence"] == winner


def _holder(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s lock until it is killed (returns once it holds it)."""
    code = ("import sys, time; from pathlib import Path; from fastland.experiments.run_folder import locked\n"
            "with locked(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_train_into_a_folder_another_process_writes_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        capsys.readouterr()
        assert main(["train", *FAST, "--epochs", "1", "--out", str(out)]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(f"fastland train: error: out: {out} is being written by pid {holder.pid} "), line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)


def test_lock_names_its_holder_and_is_released_when_the_holder_is_killed(tmp_path):
    folder = tmp_path / "run"
    holder = _holder(folder)
    try:
        with pytest.raises(RunFolderBusy, match=f"out: {folder} is being written by pid {holder.pid} on "):
            with locked(folder):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with locked(folder):  # the kernel released the dead holder's lock: no stale lock
        assert (folder / ".lock").read_text().startswith(f"pid {os.getpid()} ")


def test_the_lock_refuses_a_second_writer_in_the_same_process(tmp_path):
    with locked(tmp_path):
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            with locked(tmp_path):
                pass
    with locked(tmp_path):  # released on exit
        pass


# --------------------------------------------------------------------------- settings that cannot mix


def _train(argv: List[str], capsys) -> tuple:
    capsys.readouterr()
    rc = main(["train", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_another_setting_after_a_finished_run_without_its_checkpoint_needs_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train([*FAST, "--epochs", "1", "--out", str(run)], capsys)[0] == 0
    (run / CHECKPOINT).unlink()  # only config.json and model.pt speak for the first run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}

    rc, _, err = _train([*FAST, "--epochs", "1", "--defence", "amsreg", "--out", str(run)], capsys)
    assert rc == 2
    line = _one_error_line(err)
    assert f"out: {run / CONFIG} was written with other settings (" in line
    assert "defence: saved 'none', now 'amsreg'" in line
    assert "--overwrite" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"} == before

    rc, _, err = _train([*FAST, "--epochs", "1", "--out", str(run)], capsys)  # the same settings again
    assert rc == 2 and "already holds a finished run" in _one_error_line(err)

    rc, out, _ = _train([*FAST, "--epochs", "1", "--defence", "amsreg", "--out", str(run), "--overwrite"], capsys)
    assert rc == 0 and _last_json(out)["complete"]
    configs = _configs(run)
    assert set(configs) == {CONFIG, CHECKPOINT, FINAL}
    assert all(c["defence"] == "amsreg" and c == configs[CONFIG] for c in configs.values()), configs
    assert main(["evaluate", str(run), *FAST_EVAL]) == 0
    assert json.loads(capsys.readouterr().out)["defence"] == "amsreg"


def test_overwrite_retrains_a_finished_run_of_the_same_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train([*FAST, "--epochs", "1", "--out", str(run)], capsys)[0] == 0
    first = (run / FINAL).stat().st_mtime_ns
    rc, _, err = _train([*FAST, "--epochs", "1", "--out", str(run)], capsys)
    assert rc == 2 and "pass resume=True (--resume)" in _one_error_line(err)
    rc, out, _ = _train([*FAST, "--epochs", "1", "--out", str(run), "--overwrite"], capsys)
    assert rc == 0 and _last_json(out)["epochs_done"] == 1
    assert (run / FINAL).stat().st_mtime_ns != first


def test_overwrite_replaces_a_run_whose_files_are_unreadable(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train([*FAST, "--epochs", "1", "--out", str(run)], capsys)[0] == 0
    (run / CHECKPOINT).write_bytes(b"\x00" * 10)
    rc, _, err = _train([*FAST, "--epochs", "1", "--out", str(run)], capsys)
    assert rc == 2 and f"{run / CHECKPOINT}: truncated or corrupt" in _one_error_line(err)
    rc, out, _ = _train([*FAST, "--epochs", "1", "--out", str(run), "--overwrite"], capsys)
    assert rc == 0 and _last_json(out)["complete"]
    assert load_run_file(run / CHECKPOINT)["epoch"] == 1


# --------------------------------------------------------------------------- --resume


def test_resume_with_out_alone_finishes_the_run_with_its_saved_settings(tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, _ = _train([*FAST, "--defence", "amsreg", "--epochs", "2", "--stop-after", "1", "--out", str(run)],
                        capsys)
    assert rc == 0 and not _last_json(out)["complete"]
    saved = saved_config(run)

    rc, out, err = _train(["--out", str(run), "--resume", "--no-progress"], capsys)
    assert rc == 0, err
    done = _last_json(out)
    assert done["complete"] and done["epochs_done"] == 2
    assert "no checkpoint" not in err
    configs = _configs(run)
    assert all(c == saved for c in configs.values()), configs  # the saved settings, not the flags' defaults
    assert saved["dataset"] == "synthetic" and saved["defence"] == "amsreg" and saved["epochs"] == 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]

    rc, out, _ = _train(["--out", str(run), "--resume", "--no-progress"], capsys)  # finished: loaded
    assert rc == 0 and _last_json(out)["epochs_done"] == 2


def test_resume_without_a_checkpoint_says_so_and_starts_afresh(tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = _train([*FAST, "--epochs", "1", "--out", str(run), "--resume"], capsys)
    assert rc == 0
    assert f"no checkpoint in {run}; starting a fresh run" in err
    assert _last_json(out)["complete"]


def test_a_run_saved_before_a_config_field_existed_still_matches(tmp_path):
    """A field added to TrainConfig later (its default in force) must not make an old run 'other settings'."""
    import json as _json

    from fastland.experiments.config import TrainConfig
    from fastland.experiments.train import train

    c = TrainConfig(dataset="synthetic", epochs=1, train_size=32, batch_size=16, synthetic_shape=(1, 12, 12),
                    synthetic_classes=3, model="lenet")
    r = train(c, tmp_path / "old", progress=False, eval_test=False)
    assert r.complete
    cfg_path = tmp_path / "old" / "config.json"
    saved = _json.loads(cfg_path.read_text())
    saved.pop("variant")  # as written before the field existed
    cfg_path.write_text(_json.dumps(saved))
    again = train(c, tmp_path / "old", progress=False, eval_test=False, resume=True)
    assert again.complete and again.epochs_done == 1
