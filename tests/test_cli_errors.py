"""The ``fastland`` command's failure cases, one table: each ends with exit status 2 and one line on
stderr naming the culprit file or flag, no traceback, and the run folder exactly as it was."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

from fastland.experiments.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic", "--epochs", "1", "--train-size", "64", "--batch-size", "32", "--no-progress"]
FAST_EVAL = ["--n-phi", "2", "--phi-points", "3", "--n-pgd", "8", "--steps", "1", "--attack", "pgd", "--no-progress"]


def _can_write(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def _read_only(folder: Path) -> Optional[str]:
    """chmod ``folder`` to 0o500; the reason to skip when that does not stop writes (root)."""
    folder.chmod(0o500)
    return "running as root: chmod does not stop writes" if _can_write(folder) else None


class _Marker:
    """Unpickling it creates a file: a stand-in for code hidden in a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@dataclass
class Case:
    """``setup(tmp, runs)`` prepares the files and returns ``(argv, watched folder, skip reason)``;
    ``needles`` must all be in the error line ("{dir}" is the watched folder)."""

    setup: Callable[[Path, Dict[str, Path]], Tuple[List[str], Path, Optional[str]]]
    needles: Tuple[str, ...]
    forbidden: Tuple[str, ...] = ()
    max_s: Optional[float] = None


def _copy(runs: Dict[str, Path], name: str, tmp: Path) -> Path:
    return Path(shutil.copytree(runs[name], tmp / name))


def _truncated_model(tmp, runs):
    run = _copy(runs, "done", tmp)
    data = (run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(data[: len(data) // 2])
    return ["evaluate", str(run), *FAST_EVAL], run, None


def _empty_model(tmp, runs):
    run = _copy(runs, "done", tmp)
    (run / "model.pt").write_bytes(b"")
    return ["evaluate", str(run), *FAST_EVAL], run, None


def _truncated_checkpoint(tmp, runs):
    run = _copy(runs, "half", tmp)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    return ["train", "--out", str(run), "--resume", "--no-progress"], run, None


def _plain_state_dict(tmp, runs):
    run = tmp / "plain"
    run.mkdir()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    torch.save(model.state_dict(), run / "model.pt")
    return ["evaluate", str(run), *FAST_EVAL], run, None


def _code_pickle(tmp, runs, legacy: bool = False):
    run = tmp / "evil"
    run.mkdir()
    marker = tmp / "marker"
    if legacy:
        with open(run / "model.pt", "wb") as f:
            pickle.dump({"config": {}, "model": _Marker(marker)}, f)
    else:
        torch.save({"config": {}, "model": _Marker(marker)}, run / "model.pt")
    return ["evaluate", str(run), *FAST_EVAL], run, None


def _foreign_bytes(tmp, runs, data: bytes):
    run = _copy(runs, "done", tmp)
    (run / "model.pt").write_bytes(data)
    return ["evaluate", str(run), *FAST_EVAL], run, None


def _truncated_code_pickle(tmp, runs):
    run = tmp / "evil"
    run.mkdir()
    data = pickle.dumps({"config": {}, "model": _Marker(tmp / "marker")})
    (run / "model.pt").write_bytes(data[:-3])
    return ["evaluate", str(run), *FAST_EVAL], run, None


def _read_only_out(tmp, runs):
    out = tmp / "ro"
    out.mkdir()
    return ["train", *FAST, "--out", str(out)], out, _read_only(out)


def _read_only_eval_out(tmp, runs):
    run = _copy(runs, "done", tmp)
    ro = tmp / "ro"
    ro.mkdir()
    return ["evaluate", str(run), "--out", str(ro / "eval.json"), *FAST_EVAL], ro, _read_only(ro)


def _out_under_a_file(tmp, runs):
    (tmp / "file").write_text("not a folder")
    return ["train", *FAST, "--out", str(tmp / "file" / "run")], tmp, None


def _evaluate_out_under_a_file(tmp, runs):
    run = _copy(runs, "done", tmp)
    (tmp / "file").write_text("not a folder")
    return ["evaluate", str(run), "--out", str(tmp / "file" / "eval.json"), "--no-progress"], tmp, None


def _cuda(tmp, runs):
    out = tmp / "cuda"
    out.mkdir()
    skip = "CUDA is present" if torch.cuda.is_available() else None
    return ["train", *FAST, "--out", str(out), "--device", "cuda"], out, skip


def _device(tmp, runs, device: str):
    out = tmp / "dev"
    out.mkdir()
    return ["train", *FAST, "--out", str(out), "--device", device], out, None


def _evaluate_device(tmp, runs, device: str):
    run = _copy(runs, "done", tmp)
    return ["evaluate", str(run), *FAST_EVAL, "--device", device], run, None


def _other_settings(tmp, runs):
    run = _copy(runs, "done", tmp)
    return ["train", *FAST, "--lr", "0.05", "--out", str(run)], run, None


def _resume_disagrees(tmp, runs):
    run = _copy(runs, "half", tmp)
    return ["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"], run, None


def _evaluate_read_only_run(tmp, runs):
    run = _copy(runs, "done", tmp)
    return ["evaluate", str(run), "--no-progress"], run, _read_only(run)  # full defaults: slow if it ran


def _evaluate_no_run(tmp, runs):
    empty = tmp / "empty"
    empty.mkdir()
    return ["evaluate", str(empty), *FAST_EVAL], empty, None


CASES = {
    "truncated model.pt": Case(_truncated_model, ("model.pt", "truncated or corrupt")),
    "empty model.pt": Case(_empty_model, ("model.pt", "empty")),
    "truncated checkpoint.pt with --resume": Case(_truncated_checkpoint, ("checkpoint.pt", "truncated or corrupt")),
    "plain state_dict as model.pt": Case(_plain_state_dict, ("model.pt", "not a fastland run file")),
    "code in a torch.save pickle": Case(_code_pickle, ("model.pt", "refused", "possibly code"),
                                        forbidden=("weights_only=False", "weights_only")),
    "code in a legacy pickle": Case(lambda t, r: _code_pickle(t, r, legacy=True), ("model.pt", "refused"),
                                    forbidden=("weights_only=False", "weights_only")),
    "zero bytes as model.pt": Case(lambda t, r: _foreign_bytes(t, r, b"\x00" * 10),
                                   ("model.pt", "truncated or corrupt"), forbidden=("code",)),
    "text as model.pt": Case(lambda t, r: _foreign_bytes(t, r, b"hello, not a pickle\n"),
                             ("model.pt", "truncated or corrupt"), forbidden=("code",)),
    "a truncated pickle with code": Case(_truncated_code_pickle, ("model.pt", "refused", "possibly code")),
    "read-only --out of train": Case(_read_only_out, ("out: cannot write to {dir}",)),
    "read-only --out of evaluate": Case(_read_only_eval_out, ("out: cannot write to {dir}",)),
    "train --out beneath a file": Case(_out_under_a_file, ("out: cannot write to {dir}/file/run",)),
    "evaluate --out beneath a file": Case(_evaluate_out_under_a_file, ("out: cannot write to {dir}/file",),
                                          max_s=5.0),
    "--device cuda without CUDA": Case(_cuda, ("device", "'cuda'", "no CUDA device")),
    "--device meta (not one training runs on)": Case(lambda t, r: _device(t, r, "meta"),
                                                     ("device: expected auto, cpu, cuda or cuda:N, got 'meta'",)),
    "--device cuda:64 (past the visible devices)": Case(lambda t, r: _device(t, r, "cuda:64"),
                                                        ("device: 'cuda:64' requested but",)),
    "evaluate --device xla": Case(lambda t, r: _evaluate_device(t, r, "xla"), ("device:", "'xla'")),
    "other settings into a finished run's --out": Case(_other_settings, ("out: {dir}", "lr: saved 0.01, now 0.05",
                                                                         "--overwrite")),
    "--resume with a disagreeing flag": Case(_resume_disagrees, ("--epochs", "saved with 2", "drop the flag")),
    "evaluate a read-only run folder": Case(_evaluate_read_only_run, ("out: cannot write to {dir}",), max_s=5.0),
    "evaluate a folder without a run": Case(_evaluate_no_run, ("no model.pt or checkpoint.pt in {dir}",)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Dict[str, Path]:
    """A finished 1-epoch run and a run stopped after 1 of 2 epochs (templates, copied per case)."""
    base = tmp_path_factory.mktemp("runs")
    assert main(["train", *FAST, "--out", str(base / "done")]) == 0
    assert main(["train", *FAST, "--epochs", "2", "--stop-after", "1", "--out", str(base / "half")]) == 0
    return {"done": base / "done", "half": base / "half"}


def _snapshot(folder: Path) -> Dict[str, Tuple[int, int]]:
    """Every file under ``folder`` but the lock, with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


@pytest.mark.parametrize("name", list(CASES))
def test_failure_is_one_line_exit_2_and_leaves_the_folder_as_it_was(name, runs, tmp_path, capsys):
    case = CASES[name]
    argv, folder, skip = case.setup(tmp_path, runs)
    try:
        if skip:
            pytest.skip(skip)
        before = _snapshot(folder)
        capsys.readouterr()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # each would be more lines on stderr
            warnings.simplefilter("always")
            rc = main(argv)
        elapsed = time.perf_counter() - t0
        assert not caught, [str(w.message) for w in caught]
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2, err
        assert len(lines) == 1, err
        assert "Traceback" not in err
        line = lines[0]
        assert line.startswith(f"fastland {argv[0]}: error: "), line
        for needle in case.needles:
            assert needle.format(dir=folder) in line, line
        for word in case.forbidden:
            assert word not in line, line
        assert _snapshot(folder) == before  # nothing written, no temporary file left
        assert not (tmp_path / "marker").exists()  # no code ran
        if case.max_s is not None:
            assert elapsed < case.max_s, f"{name}: took {elapsed:.1f} s, refused only after working"
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("legacy", [False, True], ids=["torch.save", "pickle.dump"])
def test_code_pickle_through_a_subprocess_runs_no_code(legacy, tmp_path):
    """The real entry point: one line (no traceback, no warning), no marker, no ``weights_only`` advice."""
    argv, folder, _ = _code_pickle(tmp_path, {}, legacy=legacy)
    res = subprocess.run([sys.executable, "-m", "fastland", *argv], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"{folder / 'model.pt'}: refused" in res.stderr and "weights_only" not in res.stderr
    assert not (tmp_path / "marker").exists()
