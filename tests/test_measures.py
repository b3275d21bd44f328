"""fastland.flatness and ams_score against the references."""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fastland import reference
from fastland._fusion import split_first_layer
from fastland._grid import plan
from fastland.energy import ams_score
from fastland.histograms import loglik_histogram
from fastland.landscapes import landscape
from fastland.measures import Flatness, flatness, flatness_values
from fastland.models import LeNet5
from fastland.neighbourhood import directions, fgsm_direction, grid_coordinates, orthogonal_signs
from fastland.testing import tiny_bn_cnn, tiny_cnn, tiny_mlp

TOL64 = dict(atol=1e-10, rtol=1e-10)
REPO = Path(__file__).resolve().parents[1]


from landscape_models import *  # noqa: F401,F403
from landscape_models import Classifier, FUSABLE, MODELS, Normalize, REPO, ScaledClassifier, Unrecognised, _model, _models, _shape  # noqa: F401


# --------------------------------------------------------------------------- flatness


@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "classifier", "strided", "scaled"])
@pytest.mark.parametrize("reduction,fuse", [("sum", "auto"), ("mean", False)])
def test_flatness_equals_reference(name, reduction, fuse):
    model = _model(name)
    x = torch.rand(3, *_shape(name), dtype=torch.float64)
    grid = grid_coordinates(0.1, 3, dtype=torch.float64)
    d1, d2 = directions(x.repeat(2, *[1] * (x.dim() - 1)), generator=torch.Generator().manual_seed(4))
    d1, d2 = d1.view(2, *x.shape), d2.view(2, *x.shape)
    p = plan(model, x, batch_size=5, fuse_first_layer=fuse, backward=True)
    phi = flatness_values(model, x, d1, d2, grid, grid, p, reduction=reduction)
    ref = reference.flatness_ref(model, x, d1, d2, grid, grid, reduction=reduction)
    torch.testing.assert_close(phi, ref, **TOL64)
    # the public function draws its n pairs as directions(x repeated n times)
    out = flatness(model, x, n_dirs=2, span=0.1, points=3, reduction=reduction, fuse_first_layer=fuse,
                   generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out.phi, ref, **TOL64)
    assert out.mean == pytest.approx(ref.mean().item(), rel=1e-12)
    assert out.stderr == pytest.approx((ref.std() / math.sqrt(3)).item(), rel=1e-10)
    assert (out.phi < 0).all()


def test_flatness_mean_is_sum_over_grid_size_and_single_sample_stderr_is_nan():
    model = _model("cnn")
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    kw = dict(n_dirs=1, span=0.05, points=4)
    s = flatness(model, x, reduction="sum", generator=torch.Generator().manual_seed(0), **kw)
    m = flatness(model, x, reduction="mean", generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(m.phi * 16, s.phi, **TOL64)
    assert math.isnan(s.stderr)
    assert isinstance(s, Flatness)


@pytest.mark.parametrize("batch_size", [None, 2, "auto"])
def test_ams_score_fast_path_equals_reference(batch_size):
    model = _model("bn_cnn")
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(ams_score(model, x, batch_size=batch_size),
                               reference.ams_score(model, x), **TOL64)
    # the library's one train-mode policy: evaluate in eval mode, restore the mode
    torch.testing.assert_close(ams_score(model.train(), x, batch_size=batch_size),
                               reference.ams_score(model.eval(), x), **TOL64)




# --------------------------------------------------------------------------- the path of x through flatness

# fastland modules that are kernels (plain tensors in and out, like torch): not followed into
_KERNELS = ("fastland.ops", "fastland.fast_conv", "fastland._conv_grad")


@functools.lru_cache(maxsize=None)
def _module_of(filename: str) -> "str | None":
    """``fastland.<module>`` of a source file of the package, else None."""
    import fastland

    root = Path(fastland.__file__).resolve().parent
    path = Path(filename)
    if path.suffix != ".py" or root not in path.resolve().parents:
        return None
    parts = path.resolve().relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_kernel(module: str) -> bool:
    return any(module == k or module.startswith(k + ".") for k in _KERNELS)


def module_entries(call) -> List["tuple[str, str | None]"]:
    """``(module entered, calling module or None)`` for each fastland module that ``call()`` enters, in order.

    See :func:`test_flatness_path_of_x` for what counts as entering a module.
    """
    entries: List["tuple[str, str | None]"] = []

    def profile(frame, event, _arg) -> None:
        if event != "call":
            return
        module = _module_of(frame.f_code.co_filename)
        if module is None:
            return
        chain = []  # the fastland modules of the calling frames, innermost first
        f = frame.f_back
        while f is not None:
            m = _module_of(f.f_code.co_filename)
            if m is not None:
                chain.append(m)
            f = f.f_back
        if _is_kernel(module) or any(_is_kernel(m) for m in chain):
            return
        if not chain or chain[0] != module:
            entries.append((module, chain[0] if chain else None))

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return entries


def path_counts(entries: List[str]) -> "tuple[int, int, dict]":
    """``(distinct modules, climbs back, {module: times entered})`` of the modules entered, in order."""
    times = {m: entries.count(m) for m in dict.fromkeys(entries)}
    return len(times), sum(1 for n in times.values() if n > 1), times


def test_path_counts_on_a_made_up_path():
    assert path_counts(["a", "b", "c", "b", "d", "b", "c"]) == (4, 2, {"a": 1, "b": 3, "c": 2, "d": 1})
    assert path_counts(["a"]) == (1, 0, {"a": 1})


def _lenet_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


def test_flatness_path_of_x():
    """Following ``x`` through ``fastland.flatness(model, x)`` (a LeNet-like model, fused first layer).

    What is counted: ``sys.setprofile`` records every Python call during one call of
    ``flatness(model, x)`` (after a first call, so that imports are not counted). A call
    *enters* a fastland module when its function is defined in that module and the nearest
    calling frame of fastland is in another module (or there is none: the entry itself);
    frames outside fastland (torch, the standard library, this test, the model) are
    transparent, and the kernels — ``fastland.ops`` (the fused ``torch.library`` ops) and
    ``fastland.fast_conv`` / ``fastland._conv_grad`` — count like torch: neither they nor
    anything they call is followed. The path is the sequence of modules entered. Counted:
    the distinct modules on the path (<= 5), and the *climbs back*: the modules entered
    again after the call had left them (the stack went A → B, back to the caller, and
    later into A again), each module once however often it is re-entered (<= 2). And the
    modules form a tree: each is entered from one calling module only (the checks from the
    entry, the first-layer split from the grid driver).
    """
    model = _lenet_like()
    x = torch.rand(3, 1, 12, 12)
    run = lambda: flatness(model, x, generator=torch.Generator().manual_seed(0))  # noqa: E731
    run()
    entries = module_entries(run)
    n_modules, climbs, times = path_counts([m for m, _ in entries])
    assert entries[0] == ("fastland.measures", None), entries
    assert "fastland._fusion" in times, "the fused path should be taken"
    assert n_modules <= 5, times
    assert climbs <= 2, times
    callers = {m: {c for mm, c in entries if mm == m} for m in times}
    assert all(len(c) == 1 for c in callers.values()), callers
