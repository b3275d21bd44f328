"""fastland.experiments.runs: data-set landscapes and flatness, resume, shards."""
from __future__ import annotations

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
from fastland.experiments.runs import flatness_dataset, landscape_dataset, sample_generator

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
    a = landscape_dataset(model, ds, span=0.1, points=3, seed=7, chunk_samples=2)
    b = landscape_dataset(model, DataLoader(ds, batch_size=3), span=0.1, points=3, seed=7,
                  checkpoint=tmp_path / "ls.pt")
    torch.testing.assert_close(a.values, ref, **TOL64)
    torch.testing.assert_close(b.values, ref, **TOL64)
    torch.testing.assert_close(a.base_logp, torch.logsumexp(model(x), -1), **TOL64)
    saved = torch.load(tmp_path / "ls.pt", weights_only=True)
    assert bool(saved["done"].all()) and torch.equal(saved["fields"]["values"], b.values)
    # a checkpoint of other settings is refused, naming the file
    with pytest.raises(ValueError, match="other settings"):
        landscape_dataset(model, ds, span=0.2, points=3, seed=7, checkpoint=tmp_path / "ls.pt")
    # limit: the first samples only
    c = landscape_dataset(model, ds, span=0.1, points=3, seed=7, limit=2)
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
    run = landscape_dataset if task == "landscape" else flatness_dataset
    kw = dict(span=0.1, points=3, seed=11, chunk_samples=2, batch_size=64)
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
    import landscape_models as T
    from fastland.experiments.runs import landscape_dataset, flatness_dataset
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if world > 1:
        dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.rand(9, 3, 5, 7, dtype=torch.float64)
    ds = TensorDataset(x)
    model = T._model("classifier")
    ls = landscape_dataset(model, ds, span=0.1, points=3, seed=5, chunk_samples=2,
                     checkpoint=out + ".ls.pt")
    fl = flatness_dataset(model, ds, span=0.1, points=2, n_dirs=2, seed=5, chunk_samples=2,
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
