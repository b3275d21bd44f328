"""Landscapes, flatness, histograms and the data-set runner, against the references.

Every landscape is compared with :func:`fastland.reference.landscape_ref` (one
grid point at a time) and every flatness with :func:`flatness_ref`, in float64
(tolerance 1e-10), on odd shapes, for the fused and the unfused path alike.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fastland import reference
from fastland._fusion import split_first_layer
from fastland._runner import sample_generator
from fastland.energy import ams_score
from fastland.landscapes import (
    Flatness,
    directions,
    fgsm_direction,
    flatness,
    flatness_values,
    grid_coordinates,
    landscape,
    loglik_histogram,
    orthogonal_signs,
)
from fastland.models import LeNet5
from fastland.testing import tiny_bn_cnn, tiny_cnn, tiny_mlp

TOL64 = dict(atol=1e-10, rtol=1e-10)
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- models


class Normalize(nn.Module):
    """Same structure as fastland.models.Normalize: buffers [1, C, 1, 1]."""

    def __init__(self, mean: List[float], std: List[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``body(normalize(x))`` with a padded first conv (padding happens in normalised space)."""

    def __init__(self, channels: int = 3, size: int = 5, classes: int = 4) -> None:
        super().__init__()
        self.normalize = Normalize([0.4, 0.5, 0.6][:channels], [0.2, 0.3, 0.25][:channels])
        self.body = nn.Sequential(
            nn.Conv2d(channels, 4, 3, padding=1), nn.Softplus(), nn.Flatten(),
            nn.Linear(4 * size * 7, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.normalize(x))


class ScaledClassifier(Classifier):
    """Same attributes but another forward: fusion must notice and fall back."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * self.body(self.normalize(x)) + 1


class Unrecognised(nn.Module):
    """A model whose structure fusion does not know (a residual input term)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp((1, 4, 5), n_classes=3)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + x.flatten(1)[:, :3].sin()


def _models():
    """(name, model, input shape [S]) with odd shapes; all float64, eval mode."""
    return [
        ("mlp", tiny_mlp((1, 4, 5), n_classes=3), (1, 4, 5)),
        ("cnn", tiny_cnn(in_channels=2, n_classes=5, size=6), (2, 6, 6)),
        ("bn_cnn", tiny_bn_cnn(in_channels=1, n_classes=3, size=6), (1, 6, 6)),
        ("classifier", Classifier(), (3, 5, 7)),
        ("scaled", ScaledClassifier(), (3, 5, 7)),
        ("unrecognised", Unrecognised(), (1, 4, 5)),
        ("strided", nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Softplus(), nn.Flatten(),
                                  nn.Linear(3 * 4 * 3, 3)), (2, 7, 5)),
    ]


MODELS = _models()
FUSABLE = {"mlp", "cnn", "bn_cnn", "classifier", "strided"}


def _model(name: str) -> nn.Module:
    torch.manual_seed(1)
    for n, m, _ in _models():
        if n == name:
            return m.double().eval()
    raise KeyError(name)


def _shape(name: str):
    return next(s for n, _, s in MODELS if n == name)


# --------------------------------------------------------------------------- directions


@pytest.mark.parametrize("shape", [(3, 1, 5, 5), (2, 3, 4, 7), (4, 10)])
def test_rademacher_directions_are_signed_and_orthogonal(shape):
    x = torch.rand(shape)
    d1, d2 = directions(x, generator=torch.Generator().manual_seed(3))
    D = math.prod(shape[1:])
    assert d1.shape == d2.shape == x.shape
    assert set(d1.unique().tolist()) == {-1.0, 1.0}
    # exactly orthogonal, ±1 entries; for odd D exactly one zero in d2
    assert torch.equal((d1 * d2).flatten(1).sum(1), torch.zeros(shape[0]))
    zeros = (d2 == 0).flatten(1).sum(1)
    assert torch.equal(zeros, torch.full((shape[0],), D % 2))
    assert set(d2.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # samples get different directions; the generator makes them reproducible
    assert not torch.equal(d1[0], d1[1])
    e1, e2 = directions(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d1, e1) and torch.equal(d2, e2)


def test_gaussian_directions_orthogonal_with_sqrt_d_norm():
    x = torch.rand(3, 2, 5, 7, dtype=torch.float64)
    d1, d2 = directions(x, "gaussian", generator=torch.Generator().manual_seed(0))
    D = 70
    torch.testing.assert_close(d1.flatten(1).norm(dim=1), torch.full((3,), math.sqrt(D), dtype=torch.float64))
    torch.testing.assert_close(d2.flatten(1).norm(dim=1), torch.full((3,), math.sqrt(D), dtype=torch.float64))
    assert (d1 * d2).flatten(1).sum(1).abs().max() < 1e-10
    assert len(d1.unique()) > 60  # Gaussian, not signs


def test_orthogonal_signs_handles_zeros_in_d1():
    d1 = torch.randint(-1, 2, (5, 33)).double()  # about a third zeros
    d2 = orthogonal_signs(d1, torch.Generator().manual_seed(2))
    assert torch.equal((d1 * d2).sum(1), torch.zeros(5, dtype=torch.float64))
    # d2 is a sign vector except one 0 for each row with an odd number of non-zeros in d1
    odd = ((d1 != 0).sum(1) % 2).double()
    assert torch.equal((d2 == 0).sum(1).double(), odd)


def test_fgsm_direction_is_sign_of_loss_gradient_and_restores_mode():
    model = tiny_bn_cnn(in_channels=2, n_classes=4, size=5).double()
    model.train()
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    d = fgsm_direction(model, x, y)
    assert model.training and model[1].training
    model.eval()
    for i in range(3):  # independent per-sample gradient
        xi = x[i : i + 1].clone().requires_grad_(True)
        F.cross_entropy(model(xi), y[i : i + 1]).backward()
        assert torch.equal(d[i], xi.grad[0].sign())


# --------------------------------------------------------------------------- landscapes


def test_grid_coordinates():
    g = grid_coordinates(0.3, 7, dtype=torch.float64)
    torch.testing.assert_close(g, torch.linspace(-0.3, 0.3, 7, dtype=torch.float64))
    assert g[3].item() == 0.0
    assert grid_coordinates(0.3, 1).tolist() == [0.0]
    torch.testing.assert_close(grid_coordinates(1.0, 4), torch.tensor([-1, -1 / 3, 1 / 3, 1.0]))


@pytest.mark.parametrize("name", [n for n, _, _ in MODELS])
@pytest.mark.parametrize("fuse", ["auto", False])
@pytest.mark.parametrize("steps,batch_size", [(5, 7), (4, 40)])
def test_landscape_equals_per_point_loop(name, fuse, steps, batch_size):
    model = _model(name)
    x = torch.rand(3, *_shape(name), dtype=torch.float64)
    ls = landscape(model, x, span=0.2, steps=steps, fuse_first_layer=fuse, batch_size=batch_size,
                   generator=torch.Generator().manual_seed(5), progress=False)
    assert ls.values.shape == (3, steps, steps)
    assert ls.meta["fused"] == (fuse == "auto" and name in FUSABLE)
    ref = reference.landscape_ref(model, x, ls.d1, ls.d2, ls.alphas, ls.betas)
    torch.testing.assert_close(ls.values, ref, **TOL64)
    torch.testing.assert_close(ls.base_logp, torch.logsumexp(model(x), -1), **TOL64)
    if steps % 2:
        c = steps // 2
        assert ls.values[:, c, c].abs().max() < 1e-12  # Δlog p = 0 at the clean sample


def test_landscape_float32_fused_matches_reference_and_centre_is_zero():
    torch.manual_seed(2)
    model = LeNet5((1, 12, 12), num_classes=5, mean=[0.3], std=[0.4]).eval()
    x = torch.rand(4, 1, 12, 12)
    ls = landscape(model, x, span=8 / 255, steps=5, progress=False)
    assert ls.meta["fused"]
    ref = reference.landscape_ref(model, x, ls.d1, ls.d2, ls.alphas, ls.betas)
    torch.testing.assert_close(ls.values, ref, atol=2e-5, rtol=1e-4)
    assert ls.values[:, 2, 2].abs().max() < 2e-5


def test_landscape_directions_alphas_on_last_axis_and_given_pair():
    model = _model("cnn")
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    d1 = torch.zeros_like(x)
    d2 = torch.randn(2, 6, 6, dtype=torch.float64)  # shared by both samples
    ls = landscape(model, x, directions=(d1, d2), span=0.5, steps=3, progress=False)
    # moving along d1 = 0 changes nothing: constant along the last (alpha) axis
    torch.testing.assert_close(ls.values, ls.values[:, :, :1].expand_as(ls.values), **TOL64)
    assert ls.values[:, 0, 0].abs().min() > 1e-6
    assert torch.equal(ls.d2[1], d2)


def test_landscape_fgsm_directions():
    model = _model("classifier")
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    y = torch.tensor([1, 2])
    ls = landscape(model, x, y=y, directions="fgsm", span=0.1, steps=3, progress=False)
    assert torch.equal(ls.d1, fgsm_direction(model, x, y))
    assert torch.equal((ls.d1 * ls.d2).flatten(1).sum(1), torch.zeros(2, dtype=torch.float64))
    ref = reference.landscape_ref(model, x, ls.d1, ls.d2, ls.alphas, ls.betas)
    torch.testing.assert_close(ls.values, ref, **TOL64)


def test_landscape_restores_train_mode_and_uses_eval():
    model = _model("bn_cnn").train()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    ls = landscape(model, x, span=0.1, steps=3, progress=False)
    assert model.training and model[1].training
    model.eval()
    ref = reference.landscape_ref(model, x, ls.d1, ls.d2, ls.alphas, ls.betas)
    torch.testing.assert_close(ls.values, ref, **TOL64)


def test_fusion_split_structure():
    assert split_first_layer(_model("classifier")) is not None
    assert len(split_first_layer(_model("bn_cnn")).lead) == 2  # conv + eval BatchNorm absorbed
    assert split_first_layer(_model("unrecognised")) is None
    assert split_first_layer(nn.Sequential(nn.Tanh(), nn.Linear(3, 2))) is None


def test_fuse_true_on_unfusable_model_raises():
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="fuse_first_layer"):
        landscape(_model("scaled"), x, steps=3, fuse_first_layer=True, progress=False)
    with pytest.raises(ValueError, match="fuse_first_layer"):
        flatness(_model("scaled"), x, steps=3, fuse_first_layer=True, progress=False)
    reflect = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                            nn.Linear(70, 2)).double().eval()
    # reflect padding is linear: fused landscapes are exact; flatness lacks its adjoint
    ls = landscape(reflect, x, steps=3, span=0.1, fuse_first_layer=True, progress=False)
    ref = reference.landscape_ref(reflect, x, ls.d1, ls.d2, ls.alphas, ls.betas)
    torch.testing.assert_close(ls.values, ref, **TOL64)
    with pytest.raises(ValueError, match="zero-padded"):
        flatness(reflect, x, steps=3, fuse_first_layer=True, progress=False)


def test_top_level_names():
    model = _model("cnn")
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    import fastland.landscapes  # noqa: F401  (the submodule import must not break the call)

    ls = fastland.landscape(model, x, steps=3, span=0.1, progress=False)
    assert isinstance(ls, fastland.Landscape)
    assert fastland.flatness(model, x, steps=1, n_dirs=1, progress=False).phi.shape == (2,)


# --------------------------------------------------------------------------- argument errors


def test_errors_name_the_argument():
    model = _model("cnn")
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="steps"):
        landscape(model, x, steps=0, progress=False)
    with pytest.raises(ValueError, match="span"):
        landscape(model, x, span=0.0, progress=False)
    with pytest.raises(ValueError, match="span"):
        flatness(model, x, span=-1.0, progress=False)
    with pytest.raises(ValueError, match="d1"):
        landscape(model, x, directions=(torch.zeros(2, 2, 6, 5), torch.zeros_like(x)), progress=False)
    with pytest.raises(ValueError, match="directions"):
        landscape(model, x, directions="sideways", progress=False)
    with pytest.raises(ValueError, match="y: FGSM"):
        landscape(model, x, directions="fgsm", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        landscape(model, x, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="reduction"):
        flatness(model, x, reduction="max", progress=False)
    with pytest.raises(ValueError, match="n_dirs"):
        flatness(model, x, n_dirs=0, progress=False)
    with pytest.raises(ValueError, match="fuse_first_layer"):
        landscape(model, x, fuse_first_layer="yes", progress=False)
    with pytest.warns(UserWarning, match=r"x: expected pixel values in \[0, 1\]"):
        landscape(model, x * 3, steps=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        landscape(model, x, steps=1, progress=False)


# --------------------------------------------------------------------------- flatness


@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "classifier", "strided", "scaled"])
@pytest.mark.parametrize("reduction,fuse", [("sum", "auto"), ("mean", False)])
def test_flatness_equals_reference(name, reduction, fuse):
    model = _model(name)
    x = torch.rand(3, *_shape(name), dtype=torch.float64)
    grid = grid_coordinates(0.1, 3, dtype=torch.float64)
    d1, d2 = directions(x.repeat(2, *[1] * (x.dim() - 1)), generator=torch.Generator().manual_seed(4))
    d1, d2 = d1.view(2, *x.shape), d2.view(2, *x.shape)
    phi = flatness_values(model, x, d1, d2, grid, grid, reduction=reduction, batch_size=5,
                          fuse_first_layer=fuse)
    ref = reference.flatness_ref(model, x, d1, d2, grid, grid, reduction=reduction)
    torch.testing.assert_close(phi, ref, **TOL64)
    # the public function draws its n pairs as directions(x repeated n times)
    out = flatness(model, x, n_dirs=2, span=0.1, steps=3, reduction=reduction, fuse_first_layer=fuse,
                   generator=torch.Generator().manual_seed(4), progress=False)
    torch.testing.assert_close(out.phi, ref, **TOL64)
    assert out.mean == pytest.approx(ref.mean().item(), rel=1e-12)
    assert out.stderr == pytest.approx((ref.std() / math.sqrt(3)).item(), rel=1e-10)
    assert (out.phi < 0).all()


def test_flatness_mean_is_sum_over_grid_size_and_single_sample_stderr_is_nan():
    model = _model("cnn")
    x = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    kw = dict(n_dirs=1, span=0.05, steps=4, progress=False)
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
    with pytest.raises(ValueError, match="eval mode"):
        ams_score(model.train(), x)


# --------------------------------------------------------------------------- histograms


class Recorder(nn.Module):
    """Wraps a model and records every input batch it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: List[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("kind,clip", [("rademacher", False), ("uniform", True)])
def test_loglik_histogram(kind, clip):
    inner = _model("mlp")
    x = torch.rand(7, 1, 4, 5, dtype=torch.float64)
    rec = Recorder(inner).eval()
    h = loglik_histogram(rec, TensorDataset(x, torch.zeros(7, dtype=torch.long)), eps=0.05,
                         n_perturb=3, kind=kind, clip=clip, batch_size=9, progress=False)
    torch.testing.assert_close(h.clean, torch.logsumexp(inner(x), -1), **TOL64)
    assert h.perturbed.shape == (7, 3)
    perturbed = torch.cat([s for s in rec.seen[1::2]])  # the model sees clean, perturbed, clean, ...
    xp = perturbed.view(7, 3, 1, 4, 5)
    dev = (xp - x[:, None]).abs()
    if kind == "rademacher":
        torch.testing.assert_close(dev, torch.full_like(dev, 0.05), **TOL64)
    else:
        assert dev.max() <= 0.05 + 1e-12 and dev.std() > 0.005
        assert xp.min() >= 0 and xp.max() <= 1
    torch.testing.assert_close(h.perturbed, torch.logsumexp(inner(perturbed), -1).view(7, 3), **TOL64)


# --------------------------------------------------------------------------- data sets


def _per_sample_reference(model, x, seed, span, steps):
    """Landscape reference with sample i's directions drawn from sample_generator(seed, i)."""
    pairs = [directions(x[i : i + 1], generator=sample_generator(seed, i, "cpu")) for i in range(x.shape[0])]
    d1 = torch.cat([p[0] for p in pairs])
    d2 = torch.cat([p[1] for p in pairs])
    g = grid_coordinates(span, steps, dtype=x.dtype)
    return reference.landscape_ref(model, x, d1, d2, g, g)


def test_dataset_landscape_equals_reference_for_dataset_and_loader(tmp_path):
    model = _model("classifier")
    x = torch.rand(5, 3, 5, 7, dtype=torch.float64)
    ds = TensorDataset(x, torch.arange(5) % 4)
    ref = _per_sample_reference(model, x, 7, 0.1, 3)
    a = landscape(model, ds, span=0.1, steps=3, seed=7, chunk_samples=2, progress=False)
    b = landscape(model, DataLoader(ds, batch_size=3), span=0.1, steps=3, seed=7, progress=False,
                  checkpoint=tmp_path / "ls.pt")
    torch.testing.assert_close(a.values, ref, **TOL64)
    torch.testing.assert_close(b.values, ref, **TOL64)
    torch.testing.assert_close(a.base_logp, torch.logsumexp(model(x), -1), **TOL64)
    saved = torch.load(tmp_path / "ls.pt", weights_only=True)
    assert bool(saved["done"].all()) and torch.equal(saved["fields"]["values"], b.values)
    # a checkpoint of other settings is refused, naming the file
    with pytest.raises(ValueError, match="other settings"):
        landscape(model, ds, span=0.2, steps=3, seed=7, progress=False, checkpoint=tmp_path / "ls.pt")
    # limit: the first samples only
    c = landscape(model, ds, span=0.1, steps=3, seed=7, limit=2, progress=False)
    torch.testing.assert_close(c.values, ref[:2], **TOL64)


class Flaky(nn.Module):
    """Raises after ``fail_after`` forward calls (an interrupted run); counts calls."""

    def __init__(self, inner: nn.Module, fail_after: int = -1) -> None:
        super().__init__()
        self.inner = inner
        self.fail_after = fail_after
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_after:
            raise RuntimeError("interrupted")
        return self.inner(x)


@pytest.mark.parametrize("task", ["landscape", "flatness"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, task):
    torch.manual_seed(3)
    x = torch.rand(7, 1, 4, 5, dtype=torch.float64)
    ds = TensorDataset(x)
    run = landscape if task == "landscape" else flatness
    kw = dict(span=0.1, steps=3, seed=11, chunk_samples=2, batch_size=64, progress=False)
    if task == "flatness":
        kw["n_dirs"] = 2
    full = run(Flaky(_model("mlp")), ds, **kw)
    ckpt = tmp_path / f"{task}.pt"
    flaky = Flaky(_model("mlp"), fail_after=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(flaky, ds, checkpoint=ckpt, save_interval=0, **kw)
    saved = torch.load(ckpt, weights_only=True)
    n_done = int(saved["done"].sum())
    assert 0 < n_done < 7 and bool(saved["done"][:n_done].all())
    healthy = Flaky(_model("mlp"))
    resumed = run(healthy, ds, checkpoint=ckpt, save_interval=0, **kw)
    fresh = Flaky(_model("mlp"))
    run(fresh, ds, **kw)
    assert 0 < healthy.calls < fresh.calls  # done samples were not recomputed
    if task == "landscape":
        torch.testing.assert_close(resumed.values, full.values, **TOL64)
        torch.testing.assert_close(resumed.base_logp, full.base_logp, **TOL64)
    else:
        torch.testing.assert_close(resumed.phi, full.phi, **TOL64)


WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.utils.data import TensorDataset
    sys.path.insert(0, {tests!r})
    import test_landscape as T
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if world > 1:
        dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.rand(9, 3, 5, 7, dtype=torch.float64)
    ds = TensorDataset(x)
    model = T._model("classifier")
    ls = T.landscape(model, ds, span=0.1, steps=3, seed=5, chunk_samples=2, progress=False,
                     checkpoint=out + ".ls.pt")
    fl = T.flatness(model, ds, span=0.1, steps=2, n_dirs=2, seed=5, chunk_samples=2, progress=False,
                    checkpoint=out + ".fl.pt")
    torch.save({{"values": ls.values, "base": ls.base_logp, "phi": fl.phi}}, out + ".rank%d" % rank)
    if world > 1:
        dist.destroy_process_group()
    """
)


def test_two_gloo_processes_equal_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    subprocess.run([sys.executable, str(script), "0", "1", "", one], check=True, env=env, timeout=300)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(tmp_path / "init"), two],
                              env=env) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ref = torch.load(one + ".rank0", weights_only=True)
    for r in range(2):
        got = torch.load(f"{two}.rank{r}", weights_only=True)
        for k in ("values", "base", "phi"):
            torch.testing.assert_close(got[k], ref[k], **TOL64)
    # rank 0 wrote the gathered result; each rank kept its own part
    final = torch.load(two + ".ls.pt", weights_only=True)
    assert bool(final["done"].all())
    torch.testing.assert_close(final["fields"]["values"], ref["values"], **TOL64)
    assert Path(two + ".ls.pt.rank1-of-2").exists()
