"""The one progress helper: throttled on a terminal, a start and an end line in a log, silent when off."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastland import _progress
from fastland._progress import LOG_INTERVAL_S, TTY_INTERVAL_S, progress_bar

REPO = Path(__file__).resolve().parents[1]


class _FakeTty(io.StringIO):
    """A stream that says it is a terminal; counts the writes it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def test_log_bar_writes_one_start_and_one_end_line_and_no_postfix_redraws():
    log = io.StringIO()
    bar = progress_bar(10_000, "epoch 1/2 [none]", True, unit="batch", file=log)
    for i in range(10_000):
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
        bar.update(1)
    bar.close()
    bar.close()  # a second close writes nothing
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == "epoch 1/2 [none]: started, 10000 batch"
    assert lines[1].startswith("epoch 1/2 [none]: done, 10000/10000 batch (100%) in ")
    assert lines[1].endswith("loss=0.0001")  # the last postfix, on the end line only
    assert "\r" not in log.getvalue()


def test_log_bar_writes_a_line_per_interval_on_long_bars(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(_progress.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    with progress_bar(100, "eval", True, unit="img", file=log) as bar:
        for _ in range(100):
            clock[0] += LOG_INTERVAL_S / 10  # 100 updates over 10 intervals
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert LOG_INTERVAL_S >= 30
    assert len(lines) == 2 + 10, lines  # start, one a minute, end
    assert lines[1] == f"eval: 10/100 img (10%) in {LOG_INTERVAL_S:.1f} s"


def test_tty_bar_redraws_at_most_a_few_times_a_second():
    pytest.importorskip("tqdm")
    tty = _FakeTty()
    bar = progress_bar(5000, "epoch", True, unit="batch", file=tty)
    assert isinstance(bar, _progress._TtyBar) and bar.bar.mininterval == TTY_INTERVAL_S <= 0.5
    for i in range(5000):  # far under a second
        bar.set_postfix(loss=f"{i:.4f}")
        bar.update(1)
    bar.close()
    assert 0 < tty.writes <= 12, tty.writes  # first draw, a throttled few, the clearing at close
    assert "epoch" in tty.getvalue()


def test_disabled_bar_writes_nothing():
    log, tty = io.StringIO(), _FakeTty()
    for stream in (log, tty):
        with progress_bar(10, "x", False, file=stream) as bar:
            bar.set_postfix(a=1)
            bar.update(10)
    assert log.getvalue() == "" and tty.getvalue() == ""


def test_without_tqdm_a_terminal_gets_the_log_bar(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    tty = _FakeTty()
    with progress_bar(3, "x", True, file=tty) as bar:
        bar.update(3)
    assert tty.getvalue().splitlines()[0] == "x: started, 3 it"


def test_logged_training_writes_a_bounded_number_of_bytes_per_epoch(tmp_path):
    """A non-TTY ``fastland train`` (stdout and stderr to files): 32 batches an epoch, no per-batch
    output; at most 1 KB per epoch on both streams together (about 400 bytes today), where tqdm
    redraws wrote about 8 KB an epoch for these 32 batches."""
    epochs = 2
    with open(tmp_path / "out.log", "wb") as out, open(tmp_path / "err.log", "wb") as err:
        res = subprocess.run(
            [sys.executable, "-m", "fastland", "train", "--dataset", "synthetic", "--epochs", str(epochs),
             "--train-size", "512", "--batch-size", "16", "--out", str(tmp_path / "run")],
            cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=out, stderr=err, timeout=180)
    stdout, stderr = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert res.returncode == 0, stderr
    assert len(stdout.encode()) + len(stderr.encode()) < 1024 * epochs, (stdout, stderr)
    assert "\r" not in stderr and "batch/s" not in stderr
    err_lines = stderr.splitlines()
    assert len(err_lines) == 2 * epochs, err_lines  # a start and an end line per epoch
    assert err_lines[1].startswith("epoch 1/2 [none]: done, 32/32 batch (100%)") and "loss=" in err_lines[1]
    assert len(stdout.splitlines()) == epochs + 1  # one metrics line an epoch and the summary
