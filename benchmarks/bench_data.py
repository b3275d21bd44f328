"""Data benchmarks: parsing Fashion-MNIST, and one epoch of batches.

Needs Debian's dataset-fashion-mnist (skipped otherwise). Run::

    .venv/bin/python -m pytest benchmarks/bench_data.py --benchmark-only -q \
        --benchmark-min-rounds=3 --benchmark-json=/tmp/bench_data.json
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from fastland import data

BATCH = 128

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (data.DEBIAN_FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                       reason="Debian's dataset-fashion-mnist is not installed"),
]


@pytest.fixture(scope="module")
def unzipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision root with the four IDX files unzipped (what torchvision's reader needs)."""
    root = tmp_path_factory.mktemp("tv")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in data.DEBIAN_FMNIST_DIR.glob("*.gz"):
        with gzip.open(gz, "rb") as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def _torchvision_tensors(root: Path) -> torch.Tensor:
    import torchvision

    ds = torchvision.datasets.FashionMNIST(str(root), train=True)
    return ds.data.unsqueeze(1).float().div_(255.0)


@pytest.mark.benchmark(group="data-fmnist-train-load")
def test_load_torchvision_unzipped(benchmark, unzipped: Path) -> None:
    x = benchmark(_torchvision_tensors, unzipped)
    assert x.shape == (60000, 1, 28, 28)
    benchmark.extra_info["baseline"] = True


@pytest.mark.benchmark(group="data-fmnist-train-load")
def test_load_fastland_unzipped(benchmark, unzipped: Path) -> None:
    raw = unzipped / "FashionMNIST" / "raw"
    ds = benchmark(data.load_dataset, "fmnist", "train", data_dir=raw)
    assert len(ds) == 60000


@pytest.mark.benchmark(group="data-fmnist-train-load")
def test_load_fastland_gz(benchmark) -> None:
    ds = benchmark(data.load_dataset, "fmnist", "train")
    assert len(ds) == 60000


# --------------------------------------------------------------------------- one epoch (test split)


def _epoch(batches) -> int:
    n = 0
    for x, _ in batches:
        n += x.shape[0]
    return n


@pytest.mark.benchmark(group="data-fmnist-test-epoch")
def test_epoch_torchvision_pil(benchmark, unzipped: Path) -> None:
    """The common recipe: torchvision dataset, PIL + ToTensor per sample, DataLoader."""
    import torchvision

    ds = torchvision.datasets.FashionMNIST(
        str(unzipped), train=False, transform=torchvision.transforms.ToTensor()
    )
    n = benchmark(lambda: _epoch(DataLoader(ds, batch_size=BATCH, shuffle=True)))
    assert n == 10000
    benchmark.extra_info["baseline"] = True


@pytest.mark.benchmark(group="data-fmnist-test-epoch")
def test_epoch_dataloader_tensordataset(benchmark) -> None:
    ds = data.load_dataset("fmnist", "test")
    n = benchmark(lambda: _epoch(DataLoader(ds, batch_size=BATCH, shuffle=True)))
    assert n == 10000


@pytest.mark.benchmark(group="data-fmnist-test-epoch")
def test_epoch_tensor_batches(benchmark) -> None:
    ds = data.load_dataset("fmnist", "test")
    n = benchmark(lambda: _epoch(data.tensor_batches(ds, BATCH, shuffle=True)))
    assert n == 10000
