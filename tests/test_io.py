"""fastland._io: atomic writes leave either the old file or the new one, never a part."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from fastland._io import atomic_file, atomic_torch_save, atomic_write_bytes, atomic_write_text


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_text_creates_parents_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "note.txt"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second ✓\n")
    assert path.read_text(encoding="utf-8") == "second ✓\n"
    assert _leftovers(path.parent) == []


def test_error_inside_the_block_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_torch_save_round_trips_with_weights_only(tmp_path: Path) -> None:
    obj = {"w": torch.randn(3, 5, dtype=torch.float64), "epoch": 7}
    path = tmp_path / "ckpt.pt"
    atomic_torch_save(obj, path)
    back = torch.load(path, weights_only=True)
    assert back["epoch"] == 7 and torch.equal(back["w"], obj["w"])


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_mode_follows_the_umask_like_open(tmp_path: Path) -> None:
    """mkstemp makes 0o600 files; the written file must get what open() would give."""
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o640


def test_suffix_reaches_the_temporary_file(tmp_path: Path) -> None:
    seen = []
    with atomic_file(tmp_path / "fig.png", suffix=".png") as tmp:
        seen.append(tmp.suffix)
        tmp.write_bytes(b"\x89PNG")
    assert seen == [".png"] and (tmp_path / "fig.png").read_bytes() == b"\x89PNG"
