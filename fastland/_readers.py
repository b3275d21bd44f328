"""Readers of the data sets' file formats: IDX (Fashion-MNIST) and CIFAR-10's batch pickles.

Both refuse damaged files with one :class:`DataCorruptError` naming the file; the
CIFAR-10 reader unpickles numpy arrays and plain containers only, so a malicious
pickle cannot run code. :mod:`fastland.data` finds the files and builds data sets.
"""
from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["DataNotFoundError", "DataCorruptError", "read_idx", "read_cifar_batch"]

CIFAR10_CLASSES = 10


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing; the message lists every path tried and the remedies.

    Attributes:
        tried: the paths looked at, in search order.
    """

    def __init__(self, message: str, tried: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.tried = list(tried)

    def __str__(self) -> str:  # FileNotFoundError would prefix an errno otherwise
        return str(self.args[0])


class DataCorruptError(ValueError):
    """A data file exists but is truncated, of the wrong format or inconsistent."""


_IDX_DTYPES = {0x08: np.dtype(np.uint8)}  # the only type Fashion-MNIST uses


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataCorruptError(
            f"{path}: cannot decompress ({exc}); the file is truncated or not gzip"
        ) from exc


def read_idx(path: Union[str, "os.PathLike[str]"], ndim: Optional[int] = None) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format, optionally gzipped) into a uint8 array.

    Checks the magic number (two zero bytes, type 0x08, number of dimensions),
    ``ndim`` when given, and that the payload is exactly ``prod(dims)`` bytes.

    Args:
        path: ``*-idx?-ubyte`` or ``*-idx?-ubyte.gz``.
        ndim: the number of dimensions expected (3 for images, 1 for labels), or None.
    Returns:
        a read-only ``np.ndarray`` of shape ``dims``, dtype uint8.
    Raises:
        DataCorruptError: naming the file and what is wrong.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataCorruptError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero0, zero1, type_code, nd = data[0], data[1], data[2], data[3]
    if zero0 or zero1 or type_code not in _IDX_DTYPES:
        raise DataCorruptError(
            f"{path}: bad IDX magic number {data[:4].hex()} "
            "(expected 0000 08 followed by the number of dimensions)"
        )
    if ndim is not None and nd != ndim:
        raise DataCorruptError(f"{path}: expected an IDX file of {ndim} dimensions, got {nd}")
    header = 4 + 4 * nd
    if len(data) < header:
        raise DataCorruptError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=nd, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * _IDX_DTYPES[type_code].itemsize
    if len(data) != expected:
        raise DataCorruptError(
            f"{path}: {len(data)} bytes, expected {expected} for dimensions {dims} "
            f"({'truncated' if len(data) < expected else 'trailing bytes'})"
        )
    return np.frombuffer(data, dtype=_IDX_DTYPES[type_code], offset=header).reshape(dims)


# The only globals a CIFAR-10 batch pickle may reference (numpy arrays): anything
# else is refused, so a malicious pickle cannot run code.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch pickle → (uint8 ``[n, 3, 32, 32]``, int64 ``[n]``)."""
    try:
        with open(path, "rb") as f:
            batch = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as exc:
        raise DataCorruptError(f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataCorruptError(f"{path}: expected a dict with keys b'data' and b'labels', got {keys}")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataCorruptError(f"{path}: expected b'data' uint8 of shape [N, 3072], got {what}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataCorruptError(
            f"{path}: expected {data.shape[0]} integer labels, got {labels.dtype} {labels.shape}"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= CIFAR10_CLASSES):
        raise DataCorruptError(f"{path}: labels out of range [0, {CIFAR10_CLASSES})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


