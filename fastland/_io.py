"""Atomic file writes: nothing half-written on disk.

Every file fastland writes (checkpoints, metrics, reports, figures, benchmark
tables) goes through :func:`atomic_file`: the content is written to a temporary
file in the destination's folder, flushed to disk, given the permissions a plain
``open(path, "w")`` would give (``0o666`` minus the umask; ``mkstemp`` alone
would leave ``0o600``), and only then renamed onto the destination with
``os.replace`` — atomic on POSIX and Windows. On any error the temporary file
is removed and the destination is left as it was.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save"]


def _default_mode() -> int:
    """``0o666`` minus the process umask (read without changing it for good)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    The caller writes the temporary path by name (``fig.savefig(tmp)``) or
    through ``open(tmp, "wb")``; when the ``with`` block exits normally the file
    is fsynced and renamed onto ``path``. Missing parent folders are created.

    Args:
        path: the destination file.
        suffix: the temporary file's suffix (some writers pick the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
