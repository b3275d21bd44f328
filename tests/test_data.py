"""Data: IDX and CIFAR-10 readers on tiny files written here, search order, errors,
synthetic sets, in-memory batches, and the real Fashion-MNIST when installed."""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fastland import data
from fastland.data import DataCorruptError, DataNotFoundError, load_dataset


pytestmark = pytest.mark.usefixtures("one_thread")


FMNIST_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in LeCun's IDX format (written independently of the reader)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    raw = idx_bytes(array)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_fmnist(folder: Path, split: str, n: int, *, gz: bool = True, seed: int = 0
                 ) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(folder / (FMNIST_STEMS[split][0] + ext), images)
    write_idx(folder / (FMNIST_STEMS[split][1] + ext), labels)
    return images, labels


def write_cifar(root: Path, n_per_batch: int = 3, seed: int = 0, protocol: int = 2
                ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        d = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": d, b"labels": lab}, f, protocol=protocol)
        out[name] = (d, np.array(lab))
    return out


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Debian folder and an empty default root: only what a test writes exists."""
    monkeypatch.setattr(data, "DEBIAN_FMNIST_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("FASTLAND_DATA", str(tmp_path / "default-root"))
    return tmp_path


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("shape", [(5, 3, 7), (11,), (1, 1, 1, 2)])
def test_read_idx_round_trip(tmp_path: Path, suffix: str, shape: tuple) -> None:
    arr = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    got = data.read_idx(write_idx(tmp_path / f"a{suffix}", arr), ndim=len(shape))
    assert got.shape == shape and got.dtype == np.uint8
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_fmnist_from_data_dir(isolated: Path, gz: bool, layout: str) -> None:
    root = isolated / "mine"
    folder = root if layout == "flat" else root / "FashionMNIST" / "raw"
    images, labels = write_fmnist(folder, "test", 7, gz=gz)
    x, y = load_dataset("fmnist", "test", data_dir=root).tensors
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (7,) and y.dtype == torch.int64
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255, atol=0, rtol=0)
    assert y.tolist() == labels.tolist()


def test_fmnist_search_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data_dir before the Debian folder before the default root."""
    mine, debian, default = isolated / "mine", isolated / "debian", isolated / "default-root"
    write_fmnist(mine, "train", 2, seed=1)
    write_fmnist(debian, "train", 3, seed=2)
    write_fmnist(default / "FashionMNIST" / "raw", "train", 4, seed=3)
    monkeypatch.setattr(data, "DEBIAN_FMNIST_DIR", debian)
    assert len(load_dataset("fmnist", data_dir=mine)) == 2
    assert len(load_dataset("fmnist")) == 3
    monkeypatch.setattr(data, "DEBIAN_FMNIST_DIR", isolated / "none")
    assert len(load_dataset("fmnist")) == 4


def test_fmnist_missing_lists_every_path_and_remedy(isolated: Path) -> None:
    mine = isolated / "mine"
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fmnist", "train", data_dir=mine)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for folder in (mine, mine / "FashionMNIST" / "raw", isolated / "no-debian",
                   isolated / "default-root", isolated / "default-root" / "FashionMNIST" / "raw"):
        assert str(folder / "train-images-idx3-ubyte[.gz]") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "--download" in msg
    assert len(info.value.tried) == 10


def test_fmnist_download_fetches_into_data_dir(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(cls_name: str, root: Path) -> None:  # stands in for torchvision (no network)
        calls.append((cls_name, root))
        write_fmnist(root / "FashionMNIST" / "raw", "test", 5)

    monkeypatch.setattr(data, "_torchvision_download", fake_download)
    target = isolated / "dl"
    assert len(load_dataset("fmnist", "test", data_dir=target, download=True)) == 5
    assert calls == [("FashionMNIST", target)]


def corrupt_cases() -> Dict[str, Tuple[str, bytes]]:
    imgs = np.zeros((4, 28, 28), np.uint8)
    good = idx_bytes(imgs)
    return {
        "truncated gzip": (".gz", gzip.compress(good)[:-20]),
        "not gzip": (".gz", b"hello, this is not gzip data"),
        "truncated payload": ("", good[:-1]),
        "trailing bytes": ("", good + b"\0"),
        "bad magic": ("", b"\x00\x00\x09\x03" + good[4:]),
        "wrong ndim": ("", idx_bytes(np.zeros((4, 784), np.uint8))),
        "short header": ("", good[:10]),
        "empty": ("", b""),
        "wrong image size": ("", idx_bytes(np.zeros((4, 28, 27), np.uint8))),
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_corrupt_images_raise_naming_the_file(isolated: Path, case: str) -> None:
    suffix, payload = corrupt_cases()[case]
    root = isolated / "mine"
    write_fmnist(root, "test", 4)
    for p in root.iterdir():
        if p.name.startswith("t10k-images"):
            p.unlink()
    bad = root / ("t10k-images-idx3-ubyte" + suffix)
    bad.write_bytes(payload)
    with pytest.raises(DataCorruptError, match=str(bad)):
        load_dataset("fmnist", "test", data_dir=root)


def test_count_mismatch_and_label_range(isolated: Path) -> None:
    root = isolated / "mine"
    write_fmnist(root, "test", 4)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DataCorruptError, match="4 images but .* 3 labels"):
        load_dataset("fmnist", "test", data_dir=root)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 10, 2], np.uint8))
    with pytest.raises(DataCorruptError, match="label 10 out of range"):
        load_dataset("fmnist", "test", data_dir=root)


def test_half_a_split_is_an_error_not_a_fallback(isolated: Path) -> None:
    root = isolated / "mine"
    write_fmnist(root, "test", 4)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataCorruptError, match="no t10k-labels-idx1-ubyte"):
        load_dataset("fmnist", "test", data_dir=root)


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, 5])
def test_load_cifar10_layout(isolated: Path, protocol: int) -> None:
    written = write_cifar(isolated / "c", n_per_batch=3, protocol=protocol)
    x, y = load_dataset("cifar10", "train", data_dir=isolated / "c").tensors
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    d4, lab4 = written["data_batch_4"]
    i, c, h, w = 1, 2, 5, 30  # sample 1 of batch 4 -> row 3*3 + 1
    assert x[10, c, h, w].item() == pytest.approx(d4[i, c * 1024 + h * 32 + w] / 255)
    assert y[9:12].tolist() == lab4.tolist()
    xt, yt = load_dataset("cifar10", "test", data_dir=isolated / "c").tensors
    assert xt.shape == (3, 3, 32, 32)
    assert yt.tolist() == written["test_batch"][1].tolist()


def test_cifar10_from_default_root(isolated: Path) -> None:
    write_cifar(isolated / "default-root", n_per_batch=2)
    assert len(load_dataset("cifar10", "test")) == 2


def test_cifar10_missing(isolated: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", "test", data_dir=isolated / "c")
    msg = str(info.value)
    assert str(isolated / "c" / "cifar-10-batches-py") in msg
    assert str(isolated / "default-root" / "cifar-10-batches-py") in msg
    assert "--data-dir" in msg and "--download" in msg and "FASTLAND_DATA" in msg


class _Evil:
    def __reduce__(self):  # would run os.getcwd on load if globals were not restricted
        return (os.getcwd, ())


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x80\x02}q\x00(X", "not a readable CIFAR-10 batch"),  # truncated pickle
        (pickle.dumps([1, 2]), "expected a dict"),
        (pickle.dumps({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}), r"\[N, 3072\]"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 integer labels"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "out of range"),
        (pickle.dumps({b"data": _Evil(), b"labels": []}), "refusing to load global"),
    ],
)
def test_cifar10_corrupt(isolated: Path, payload: bytes, match: str) -> None:
    write_cifar(isolated / "c")
    bad = isolated / "c" / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(payload)
    with pytest.raises(DataCorruptError, match=match) as info:
        load_dataset("cifar10", "test", data_dir=isolated / "c")
    assert str(bad) in str(info.value)


def test_cifar10_partial_split(isolated: Path) -> None:
    write_cifar(isolated / "c")
    (isolated / "c" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataCorruptError, match="missing data_batch_3"):
        load_dataset("cifar10", "train", data_dir=isolated / "c")


def test_load_dataset_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"name: expected one of 'fmnist', 'cifar10', got 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match=r"split: expected 'train' or 'test', got 'val'"):
        load_dataset("fmnist", "val")


# --------------------------------------------------------------------------- real Fashion-MNIST


@pytest.mark.skipif(not (data.DEBIAN_FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_dataset("fmnist", split, data_dir=None).tensors
        assert x.shape == (n, 1, 28, 28) and y.shape == (n,)
        assert x.min().item() == 0.0 and x.max().item() == 1.0
        assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10
        if split == "train":  # the normalisation constants in DATASETS come from here
            assert x.mean().item() == pytest.approx(data.DATASETS["fmnist"].mean[0], abs=1e-4)
            assert x.std().item() == pytest.approx(data.DATASETS["fmnist"].std[0], abs=1e-4)


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("shape, k, n", [((1, 28, 28), 10, 53), ((3, 5, 7), 3, 10), ((2, 1, 1), 1, 4)])
def test_synthetic_dataset(shape: tuple, k: int, n: int) -> None:
    state = torch.random.get_rng_state()
    x, y = data.synthetic_dataset(n, shape, k, seed=3).tensors
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert x.shape == (n, *shape) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    counts = torch.bincount(y, minlength=k)
    assert counts.max() - counts.min() <= 1
    x2, y2 = data.synthetic_dataset(n, shape, k, seed=3).tensors
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = data.synthetic_dataset(n, shape, k, seed=4).tensors
    assert not torch.equal(x, x3)


def test_synthetic_is_learnable_by_nearest_class_mean() -> None:
    """Class means estimated on one draw classify a fresh draw (different noise) well above chance."""
    x, y = data.synthetic_dataset(500, (1, 8, 8), 10, seed=0).tensors
    means = torch.stack([x[y == k].mean(0) for k in range(10)]).flatten(1)
    xt, yt = data.synthetic_dataset(500, (1, 8, 8), 10, seed=0).tensors  # same prototypes
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (pred == yt).float().mean() > 0.9


def test_synthetic_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n: expected a non-negative int"):
        data.synthetic_dataset(-1)
    with pytest.raises(ValueError, match=r"shape: expected \(C, H, W\)"):
        data.synthetic_dataset(4, (28, 28))
    with pytest.raises(ValueError, match="n_classes: expected a positive int"):
        data.synthetic_dataset(4, n_classes=0)


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("n, b, drop_last", [(10, 3, False), (10, 3, True), (9, 3, True), (2, 5, False)])
def test_tensor_batches_match_dataloader(n: int, b: int, drop_last: bool) -> None:
    ds = TensorDataset(torch.randn(n, 2, 3), torch.arange(n))
    ours = list(data.tensor_batches(ds, b, drop_last=drop_last))
    theirs = list(DataLoader(ds, batch_size=b, drop_last=drop_last))
    assert len(ours) == len(theirs)
    for (xa, ya), (xb, yb) in zip(ours, theirs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_tensor_batches_shuffle_is_a_permutation() -> None:
    ds = TensorDataset(torch.arange(23).float().unsqueeze(1), torch.arange(23))
    batches = list(data.tensor_batches(ds, 5, shuffle=True, generator=torch.Generator().manual_seed(1)))
    ys = torch.cat([yb for _, yb in batches])
    xs = torch.cat([xb for xb, _ in batches])
    assert sorted(ys.tolist()) == list(range(23)) and ys.tolist() != list(range(23))
    assert torch.equal(xs[:, 0].long(), ys)  # rows stay paired
    again = list(data.tensor_batches(ds, 5, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(torch.cat([yb for _, yb in again]), ys)


def test_tensor_batches_bad_arguments() -> None:
    ds = TensorDataset(torch.zeros(3))
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        list(data.tensor_batches(ds, 0))
    with pytest.raises(TypeError, match="dataset: expected a TensorDataset"):
        list(data.tensor_batches([1, 2], 1))  # type: ignore[arg-type]


def test_cifar10_pickle_with_numpy1_module_names(isolated: Path) -> None:
    """The published CIFAR-10 files (Python 2, numpy 1.x) name numpy.core.multiarray."""
    write_cifar(isolated / "c", n_per_batch=2)
    d = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    payload = pickle.dumps({b"data": d, b"labels": [3, 4]}, protocol=2)
    payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in payload
    (isolated / "c" / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    x, y = load_dataset("cifar10", "test", data_dir=isolated / "c").tensors
    assert y.tolist() == [3, 4]
    assert x[1, 2, 31, 31].item() == pytest.approx(d[1, 3071] / 255)
