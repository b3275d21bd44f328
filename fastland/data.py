"""Data sets: Fashion-MNIST, CIFAR-10 and synthetic sets, held in memory.

Images are float32 ``[N, C, H, W]`` in pixel space ``[0, 1]``; labels int64
``[N]``. (Normalisation belongs to the model: see :mod:`fastland.models`.)
Whole sets live in memory as tensors, decoded once; :func:`tensor_batches`
iterates over them by slicing whole batches (no per-sample Python).

Fashion-MNIST is parsed from the IDX files (``.gz`` or unzipped) with
gzip + numpy, searched in this order (docs/design.md §4):

1. ``data_dir`` and ``data_dir/FashionMNIST/raw``,
2. ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``),
3. the torchvision root ``$FASTLAND_DATA`` (default ``~/.cache/fastland``) and its
   ``FashionMNIST/raw``;

``download=True`` fetches the files with torchvision into ``data_dir`` (or the
default root) when none is found. CIFAR-10 is read from
``<root>/cifar-10-batches-py`` for ``data_dir`` then the default root. Missing
files raise :class:`DataNotFoundError` listing every path tried and the
remedies; corrupt or truncated files raise :class:`DataCorruptError`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ._readers import DataCorruptError, DataNotFoundError, read_cifar_batch, read_idx

__all__ = [
    "DatasetInfo",
    "DATASETS",
    "DataNotFoundError",
    "DataCorruptError",
    "load_dataset",
    "read_idx",
    "default_root",
    "DEBIAN_FMNIST_DIR",
    "synthetic_info",
    "synthetic_dataset",
    "tensor_batches",
]

PathLike = Union[str, "os.PathLike[str]"]
SPLITS = ("train", "test")
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set.

    Attributes:
        name: short name (``"fmnist"``, ``"cifar10"``, ``"synthetic"``).
        shape: per-sample shape ``(C, H, W)``.
        n_classes: number of classes ``K``.
        mean: per-channel mean of the training images in ``[0, 1]`` units.
        std: per-channel standard deviation.
        classes: the ``K`` class names.
    """

    name: str
    shape: Tuple[int, int, int]
    n_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    classes: Tuple[str, ...]


FMNIST = DatasetInfo(
    name="fmnist",
    shape=(1, 28, 28),
    n_classes=10,
    mean=(0.2860,),
    std=(0.3530,),
    classes=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
)

CIFAR10 = DatasetInfo(
    name="cifar10",
    shape=(3, 32, 32),
    n_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    classes=(
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
)

DATASETS: Dict[str, DatasetInfo] = {"fmnist": FMNIST, "cifar10": CIFAR10}


def synthetic_info(shape: Sequence[int] = (1, 28, 28), n_classes: int = 10) -> DatasetInfo:
    """The :class:`DatasetInfo` of :func:`synthetic_dataset` (mean 0.5, std 0.25 per channel)."""
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) <= 0:
        raise ValueError(f"shape: expected (C, H, W) positive ints, got {tuple(shape)}")
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 1:
        raise ValueError(f"n_classes: expected a positive int, got {n_classes!r}")
    c = shape_t[0]
    return DatasetInfo(
        name="synthetic",
        shape=shape_t,  # type: ignore[arg-type]
        n_classes=n_classes,
        mean=(0.5,) * c,
        std=(0.25,) * c,
        classes=tuple(f"class {k}" for k in range(n_classes)),
    )


def synthetic_dataset(
    n: int, shape: Sequence[int] = (1, 28, 28), n_classes: int = 10, seed: int = 0
) -> TensorDataset:
    """A learnable synthetic set: class prototypes plus noise, clipped to ``[0, 1]``.

    Each class ``k`` has a fixed random prototype ``μ_k ∈ [0.2, 0.8]^D``; a sample
    of class ``k`` is ``clip(μ_k + 0.15·ε, 0, 1)`` with ``ε ~ N(0, I)``. Labels
    cycle through the classes in a random order, so every class appears
    ``⌊n/K⌋`` or ``⌈n/K⌉`` times. Deterministic given ``seed`` (its own generator;
    the global RNG is untouched).

    Returns:
        ``TensorDataset(images [n, *shape] float32, labels [n] int64)``.
    """
    info = synthetic_info(shape, n_classes)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    prototypes = 0.2 + 0.6 * torch.rand((n_classes, *info.shape), generator=gen)
    labels = torch.arange(n, dtype=torch.int64) % n_classes
    labels = labels[torch.randperm(n, generator=gen)]
    noise = torch.randn((n, *info.shape), generator=gen)
    images = (prototypes[labels] + 0.15 * noise).clamp_(0.0, 1.0)
    return TensorDataset(images, labels)


# --------------------------------------------------------------------------- in-memory batches


def tensor_batches(
    dataset: TensorDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tuple[Tensor, ...]]:
    """Iterate over an in-memory ``TensorDataset`` one whole batch at a time.

    Equivalent to ``DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last)``
    but indexes each tensor once per batch instead of once per sample, then
    stacks nothing: no per-sample Python.

    Args:
        dataset: a ``TensorDataset`` of tensors ``[N, ...]`` (on any device).
        batch_size: ``b ≥ 1``.
        shuffle: draw a fresh permutation (from ``generator``) per call.
        drop_last: skip a final batch smaller than ``b``.
        generator: a CPU ``torch.Generator`` for the permutation, or None for the global one.
    Yields:
        tuples ``(t[idx] for t in dataset.tensors)``, each ``[b, ...]`` (the last may be smaller).
    """
    if not isinstance(dataset, TensorDataset):
        raise TypeError(f"dataset: expected a TensorDataset, got {type(dataset).__name__}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    tensors = dataset.tensors
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield tuple(t[start:start + batch_size] for t in tensors)
        else:
            idx = order[start:start + batch_size]
            yield tuple(_take_rows(t, idx) for t in tensors)


def _take_rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx]`` for ``t`` ``[N, *R]`` and ``idx`` ``[b]`` → ``[b, *R]``, gathered from the
    2-D view ``[N, prod(R)]``: one contiguous row copy per index (plain ``t[idx]`` on a
    4-D tensor was 8-20x slower on a loaded CPU with two cores, see benchmarks/notes/data.md)."""
    idx = idx.to(t.device)
    if t.dim() <= 2:
        return t.index_select(0, idx)
    return t.reshape(t.shape[0], -1).index_select(0, idx).view(idx.shape[0], *t.shape[1:])


# --------------------------------------------------------------------------- loading


def default_root() -> Path:
    """The torchvision-style data root: ``$FASTLAND_DATA``, else ``~/.cache/fastland``."""
    return Path(os.environ.get("FASTLAND_DATA", "~/.cache/fastland")).expanduser()


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: Optional[PathLike] = None,
    download: bool = False,
) -> TensorDataset:
    """Load a whole split into memory.

    Args:
        name: ``"fmnist"`` or ``"cifar10"`` (see :data:`DATASETS`).
        split: ``"train"`` or ``"test"``.
        data_dir: a folder searched first (and the download target).
        download: fetch the files with torchvision when they are not found.
    Returns:
        ``TensorDataset(images [N, C, H, W] float32 in [0, 1], labels [N] int64)``.
    Raises:
        DataNotFoundError: no files found (the message names every path tried).
        DataCorruptError: files found but truncated or malformed.
    """
    if name not in DATASETS:
        valid = ", ".join(repr(n) for n in DATASETS)
        raise ValueError(
            f"name: expected one of {valid}, got {name!r} "
            "(for synthetic data use fastland.data.synthetic_dataset)"
        )
    if split not in SPLITS:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if name == "fmnist":
        images, labels = _load_fmnist(split, root, download)
    else:
        images, labels = _load_cifar10(split, root, download)
    return TensorDataset(images, labels)


# --------------------------------------------------------------------------- IDX (Fashion-MNIST)

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    """``folder/stem.gz`` or ``folder/stem``, whichever exists first."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _fmnist_folders(root: Optional[Path]) -> List[Path]:
    """Folders to search, in order (docs/design.md §4)."""
    folders: List[Path] = []
    if root is not None:
        folders += [root, root / "FashionMNIST" / "raw"]
    folders.append(DEBIAN_FMNIST_DIR)
    torch_root = default_root()
    folders += [torch_root, torch_root / "FashionMNIST" / "raw"]
    unique: List[Path] = []
    for f in folders:
        if f not in unique:
            unique.append(f)
    return unique


def _locate_fmnist(split: str, folders: Sequence[Path]) -> Tuple[Optional[Tuple[Path, Path]], List[Path]]:
    """The first folder holding both files of ``split``, and every path tried."""
    tried: List[Path] = []
    for folder in folders:
        images, labels = (_find_idx(folder, stem) for stem in _FMNIST_FILES[split])
        if images is not None and labels is not None:
            return (images, labels), tried
        if images is not None or labels is not None:  # half a split is damage, not absence
            have, lack = (images, _FMNIST_FILES[split][1]) if images else (labels, _FMNIST_FILES[split][0])
            raise DataCorruptError(f"{folder}: has {have.name} but no {lack}[.gz]")
        tried += [folder / f"{stem}[.gz]" for stem in _FMNIST_FILES[split]]
    return None, tried


def _locate_or_download(
    split: str,
    root: Optional[Path],
    download: bool,
    locate: Callable[[str, Sequence[Path]], Tuple[Any, List[Path]]],
    folders: List[Path],
    torchvision_name: str,
    downloaded_folder: Callable[[Path], Path],
) -> Tuple[Any, List[Path]]:
    """Look for ``split`` in ``folders``; when absent and ``download``, fetch it with torchvision
    into ``root`` (or :func:`default_root`) and look again in ``downloaded_folder(target)``.

    Returns:
        ``locate``'s find (None: not found) and every place tried.
    """
    found, tried = locate(split, folders)
    if found is None and download:
        target = root if root is not None else default_root()
        _torchvision_download(torchvision_name, target)
        found, more = locate(split, [downloaded_folder(target)])
        tried += more
    return found, tried


def _load_fmnist(split: str, root: Optional[Path], download: bool) -> Tuple[Tensor, Tensor]:
    found, tried = _locate_or_download(split, root, download, _locate_fmnist, _fmnist_folders(root),
                                       "FashionMNIST", lambda target: target / "FashionMNIST" / "raw")
    if found is None:
        raise DataNotFoundError(
            f"Fashion-MNIST ({split}) not found. Looked for the IDX files at:\n"
            + "".join(f"  {p}\n" for p in tried)
            + "Remedies: install Debian's package (apt-get install dataset-fashion-mnist), "
            "or pass --data-dir / data_dir= a folder holding the four IDX files (.gz or unzipped), "
            "or pass --download / download=True to fetch them with torchvision.",
            tried,
        )
    image_path, label_path = found
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise DataCorruptError(f"{image_path}: expected 28x28 images, got dimensions {images.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataCorruptError(
            f"{image_path} holds {images.shape[0]} images but {label_path} {labels.shape[0]} labels"
        )
    _check_labels(label_path, labels, FMNIST.n_classes)
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)  # one pass, writable
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _check_labels(path: Path, labels: np.ndarray, n_classes: int) -> None:
    if labels.size and int(labels.max()) >= n_classes:
        raise DataCorruptError(f"{path}: label {int(labels.max())} out of range [0, {n_classes})")


def _torchvision_download(cls_name: str, root: Path) -> None:
    """Fetch a data set with torchvision (needs internet)."""
    import torchvision.datasets as tvd  # heavy: imported only here

    try:
        getattr(tvd, cls_name)(root=str(root), train=True, download=True)
        getattr(tvd, cls_name)(root=str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataNotFoundError(
            f"{cls_name}: download into {root} failed ({type(exc).__name__}: {exc})", [root]
        ) from exc


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
def _cifar_roots(root: Optional[Path]) -> List[Path]:
    roots = ([root] if root is not None else []) + [default_root()]
    return list(dict.fromkeys(roots))


def _locate_cifar(split: str, roots: Sequence[Path]) -> Tuple[Optional[List[Path]], List[Path]]:
    tried: List[Path] = []
    for r in roots:
        folder = r / _CIFAR_DIR
        paths = [folder / name for name in _CIFAR_FILES[split]]
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return paths, tried
        if len(missing) < len(paths):  # a partial copy is damage, not absence
            raise DataCorruptError(
                f"{folder}: incomplete CIFAR-10 {split} split, missing "
                + ", ".join(p.name for p in missing)
            )
        tried.append(folder)
    return None, tried


def _load_cifar10(split: str, root: Optional[Path], download: bool) -> Tuple[Tensor, Tensor]:
    found, tried = _locate_or_download(split, root, download, _locate_cifar, _cifar_roots(root),
                                       "CIFAR10", lambda target: target)
    if found is None:
        raise DataNotFoundError(
            f"CIFAR-10 ({split}) not found. Looked for {', '.join(_CIFAR_FILES[split])} in:\n"
            + "".join(f"  {p}\n" for p in tried)
            + f"Remedies: pass --data-dir / data_dir= a torchvision root holding {_CIFAR_DIR}/, "
            "set FASTLAND_DATA to one, or pass --download / download=True to fetch it with torchvision.",
            tried,
        )
    parts = [read_cifar_batch(p) for p in found]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(images).float().div_(255.0)
    return x, torch.from_numpy(labels)
