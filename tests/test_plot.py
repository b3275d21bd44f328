"""Every figure is written (PNG and PDF), non-empty and not blank; matplotlib stays lazy."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastland.histograms import LoglikHistogram, loglik_histogram
from fastland.landscapes import landscape
from fastland.testing import tiny_cnn

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from fastland.experiments import plot  # noqa: E402


@pytest.fixture(scope="module")
def landscapes():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 6, 6)
    out = {}
    for k, name in enumerate(["standard", "defended"]):
        torch.manual_seed(k)
        model = tiny_cnn(n_classes=4).eval()
        out[name] = landscape(model, x, span=8 / 255, points=9,
                              generator=torch.Generator().manual_seed(1))
    return out


def _assert_image(path: Path) -> None:
    """A PNG that exists, is non-empty and whose pixels vary (not blank)."""
    assert path.exists() and path.stat().st_size > 1000
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std(axis=0).max() > 0.05
    non_white = (rgb < 0.9).any(axis=1).mean()
    assert 0.01 < non_white < 0.99


def _assert_pdf(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 1000


@pytest.mark.parametrize("kind", ["surface", "contour"])
def test_landscape_panels(tmp_path, landscapes, kind):
    paths = [tmp_path / f"fig1_{kind}.png", tmp_path / f"fig1_{kind}.pdf"]
    fig = plot.plot_landscapes(landscapes, kind=kind, index=1, path=paths)
    assert len(fig.axes) >= 2
    _assert_image(paths[0])
    _assert_pdf(paths[1])
    single = tmp_path / "one.png"
    plot.plot_landscape(landscapes["standard"], kind=kind, title="standard", path=single)
    _assert_image(single)
    # axes in units of 1/255: the grid spans ±8 grey levels
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo <= -8 + 1e-6 and hi >= 8 - 1e-6 and hi < 20


def test_flat_landscape_still_draws(tmp_path, landscapes):
    flat = landscapes["standard"]
    flat = type(flat)(flat.alphas, flat.betas, torch.zeros_like(flat.values), flat.base_logp)
    path = tmp_path / "flat.png"
    plot.plot_landscapes([flat], kind="contour", path=path)
    assert path.stat().st_size > 1000


def test_histograms(tmp_path):
    torch.manual_seed(0)
    model = tiny_cnn(n_classes=4).eval()
    h = loglik_histogram(model, torch.rand(40, 1, 6, 6), eps=8 / 255, n_perturb=2)
    paths = [tmp_path / "fig3.png", tmp_path / "fig3.pdf"]
    plot.plot_loglik_histograms({"standard": h, "copy": LoglikHistogram(h.clean + 1, h.perturbed, h.eps, h.kind)},
                                bins=20, path=paths)
    _assert_image(paths[0])
    _assert_pdf(paths[1])


def test_flatness_vs_accuracy(tmp_path):
    paths = [tmp_path / "fig4.png", tmp_path / "fig4.pdf"]
    plot.plot_flatness_vs_accuracy([-2066.4, -1500.0, -1055.0], [45.7, 52.0, 57.5],
                                   labels=["ε=2", "ε=4", "ε=8"], title="AT", path=paths)
    _assert_image(paths[0])
    _assert_pdf(paths[1])


def test_flatness_vs_accuracy_joins_points_within_a_family_only():
    fig = plot.plot_flatness_vs_accuracy([-200.0, -60.0, -50.0, -40.0, -30.0, -12.0], [3.0, 45.0, 56.0, 30.0, 34.0, 40.0],
                                         groups=["none", "AT", "AT", "Jac", "Jac", "AMSReg"])
    lines = fig.axes[0].get_lines()
    assert [len(line.get_xdata()) for line in lines] == [1, 2, 2, 1]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["none", "AT", "Jac", "AMSReg"]
    with pytest.raises(ValueError, match="groups: expected 2"):
        plot.plot_flatness_vs_accuracy([1.0, 2.0], [3.0, 4.0], groups=["a"])


def test_plot_errors(tmp_path, landscapes):
    with pytest.raises(ValueError, match="path"):
        plot.plot_landscapes(landscapes, path=tmp_path / "fig.jpg")
    with pytest.raises(ValueError, match="kind"):
        plot.plot_landscapes(landscapes, kind="wireframe")
    with pytest.raises(ValueError, match="index"):
        plot.plot_landscapes(landscapes, index=5)
    with pytest.raises(ValueError, match="adv_accuracy"):
        plot.plot_flatness_vs_accuracy([1.0, 2.0], [3.0])
    with pytest.raises(ValueError, match="titles"):
        plot.plot_landscapes(list(landscapes.values()), titles=["one"])
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_import_fastland_does_not_import_matplotlib_or_select_a_backend():
    code = (
        "import sys, fastland, torch; from fastland.testing import tiny_cnn; "
        "fastland.landscape(tiny_cnn().eval(), torch.rand(1, 1, 6, 6), points=3); "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'; "
        "import fastland.experiments.plot; import matplotlib; "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def test_front_labels_keep_their_gap_near_each_other_and_stay_put_when_alone():
    xs, ys = [0.33, 0.33, 0.34, 1.0], [54.5, 54.0, 45.4, 54.5]
    ly = plot._spread_labels(xs, ys, gap=2.0, near=0.3)
    assert ly[0] == 54.5 and ly[3] == 54.5 and ly[2] == 45.4  # highest, far along x, already clear
    assert ly[1] == 52.5  # moved one gap below its neighbour's label
    near = [k for k in range(3)]
    assert all(abs(ly[i] - ly[j]) >= 2.0 - 1e-9 for i in near for j in near if i < j)
