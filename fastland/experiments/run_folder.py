"""A run folder belongs to one run: a lock while it is written, files that must agree, safe loading.

Files: ``config.json`` (the settings), ``checkpoint.pt`` (the latest epoch),
``metrics.jsonl``, ``model.pt`` (config + final weights, when all epochs are
done), ``eval.json``, and ``.lock`` while a run writes the folder.

* **Lock.** :func:`locked` takes an exclusive ``flock`` on ``.lock`` (released
  by the kernel when the process dies, so a killed run never leaves a stale
  lock); a second writer is refused with one line naming the holder's pid.
* **Agreement.** :func:`check_folder` refuses a folder whose ``config.json``,
  ``checkpoint.pt`` or ``model.pt`` was written with other settings, unless the
  caller asks to ``overwrite`` it (then those files are removed first).
* **Loading.** :func:`load_run_file` loads with ``weights_only=True`` and turns
  every failure into one :class:`RunFileError` line: a truncated or empty file,
  a file that is not fastland's (e.g. a plain ``state_dict``), or one that holds
  code or other objects (refused as such; never retried without ``weights_only``).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

__all__ = ["CHECKPOINT", "FINAL", "METRICS", "CONFIG", "EVAL", "LOCK", "RunFileError", "RunFolderBusy",
           "locked", "check_writable", "load_run_file", "saved_config", "check_folder", "clear_run",
           "is_complete"]

CHECKPOINT = "checkpoint.pt"
FINAL = "model.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
EVAL = "eval.json"
LOCK = ".lock"
_RUN_FILES = (CHECKPOINT, FINAL, METRICS, CONFIG, EVAL)


class RunFileError(ValueError):
    """A run file that cannot be used: truncated, not fastland's, or holding code."""


class RunFolderBusy(RuntimeError):
    """Another process is writing the run folder."""


def check_writable(folder: Path) -> None:
    """Create ``folder`` and check that files can be written there, before any work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"out: cannot write to {folder} ({e.strerror or e}); choose another folder "
                              "or fix its permissions") from None


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's exclusive lock while the body writes it (POSIX ``flock``)."""
    import fcntl

    check_writable(folder)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunFolderBusy(f"out: {folder} is being written by {holder}; wait for that run to finish "
                                "or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def load_run_file(path: Path, *, need: tuple = ("config", "model")) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one clear error for every way it can fail.

    Args:
        need: keys the file must hold (a fastland run file has ``config`` and ``model``).
    """
    import torch

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise RunFileError(f"{path}: the file is empty (an interrupted write?); retrain or restore it")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4" on a foreign file: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or _pickle_holds_objects(path):
            raise RunFileError(f"{path}: refused, it holds objects other than tensors and plain containers "
                               "(possibly code); a fastland run file never does, so it was not loaded") from None
        raise RunFileError(f"{path}: truncated or corrupt (not a pickle torch can load); "
                           "retrain or restore it") from None
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise RunFileError(f"{path}: cannot read it ({e.strerror or type(e).__name__}); fix its permissions "
                               "or restore it") from None
        raise RunFileError(f"{path}: truncated or corrupt ({type(e).__name__}); retrain or restore it") from None
    except Exception as e:  # torch.load fails in many ways on bytes it did not write
        raise RunFileError(f"{path}: truncated or corrupt ({type(e).__name__}); retrain or restore it") from None
    missing = [k for k in need if not (isinstance(state, dict) and k in state)]
    if missing:
        raise RunFileError(f"{path}: not a fastland run file (no {', '.join(map(repr, missing))}); "
                           "fastland writes model.pt with `fastland train`")
    if not (isinstance(state["config"], dict) and isinstance(state["model"], dict)):
        raise RunFileError(f"{path}: not a fastland run file (its config and model are not mappings); "
                           "fastland writes model.pt with `fastland train`")
    return state


# pickle opcodes that name a global or call one: a file holding them holds objects or code
_CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1",
                           "EXT2", "EXT4"})


def _pickle_holds_objects(path: Path) -> bool:
    """True when the pickle in ``path`` (raw, or a torch zip archive's ``data.pkl``) references globals.

    Reads the opcodes with :mod:`pickletools` only: nothing in the file is run.
    """
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return False
                data = z.read(name)
        else:
            data = path.read_bytes()
        for op, _, _ in pickletools.genops(data):
            if op.name in _CODE_OPCODES:
                return True
    except Exception:  # unreadable from here on: what was read named no global
        pass
    return False


def saved_config(folder: Path) -> Optional[Dict[str, Any]]:
    """The settings in ``folder/config.json``, or None when there is none."""
    path = folder / CONFIG
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise RunFileError(f"{path}: not readable JSON ({e}); remove the folder or pass --overwrite") from None


def _differences(saved: Dict[str, Any], now: Dict[str, Any]) -> str:
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    return ", ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in keys)


def clear_run(folder: Path) -> None:
    """Remove the run files of ``folder`` (the user asked to replace the run there)."""
    for f in _RUN_FILES:
        (folder / f).unlink(missing_ok=True)


def check_folder(folder: Path, config: Dict[str, Any], *, overwrite: bool = False,
                 normalise: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> None:
    """Refuse a folder whose files were written with settings other than ``config``.

    With ``overwrite`` those files are removed instead (the user asked to replace the run).
    ``normalise`` maps a saved config to the current format first (e.g. a field added since
    it was written takes its default), so that an older run of the same settings still matches.
    """
    sources = [(CONFIG, saved_config(folder))]
    for name in (CHECKPOINT, FINAL):
        if (folder / name).exists():
            sources.append((name, load_run_file(folder / name)["config"]))
    for name, saved in sources:
        if saved is not None and normalise is not None:
            saved = normalise(saved)
        if saved is not None and saved != config:
            if overwrite:
                clear_run(folder)
                return
            raise ValueError(f"out: {folder / name} was written with other settings ({_differences(saved, config)}); "
                             "resume with the saved settings (--resume alone), choose another folder, "
                             "or pass --overwrite to replace that run")


def is_complete(run_dir: os.PathLike | str) -> bool:
    """True when ``run_dir`` holds a finished run (``model.pt``)."""
    return (Path(run_dir) / FINAL).exists()
