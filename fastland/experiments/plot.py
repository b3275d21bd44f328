"""The paper's figures: landscapes (Figs. 1, 2, 5), log p histograms (Fig. 3), Φ vs accuracy (Fig. 4),
and the robustness-cost front of ``fastland front``.

Headless by construction: figures are ``matplotlib.figure.Figure`` objects
built without ``pyplot``, so no GUI backend is selected, no global figure
state is touched, and the caller's backend (e.g. a notebook's) is left alone.
Every function returns its figure and, given ``path`` (one path or several,
e.g. ``["fig1.png", "fig1.pdf"]``), writes it atomically (temp file +
``os.replace``) in the format its suffix names (``.png`` or ``.pdf``).

Landscape axes are in units of 1/255 (one grey level), as in the paper.
This module imports matplotlib; ``import fastland`` does not import it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .._io import atomic_file
from ..histograms import LoglikHistogram
from ..landscapes import Landscape

__all__ = [
    "save_figure",
    "plot_landscape",
    "plot_landscapes",
    "plot_loglik_histograms",
    "plot_flatness_vs_accuracy",
    "plot_front",
]

PathLike = Union[str, os.PathLike]
Paths = Union[PathLike, Sequence[PathLike], None]
FORMATS = ("png", "pdf")
KINDS = ("surface", "contour")
PIXEL = 255.0  # landscape axes in units of 1/255


def save_figure(fig: Figure, path: Paths, *, dpi: int = 150) -> None:
    """Write ``fig`` to each path (``.png`` or ``.pdf``), atomically.

    Args:
        fig: the figure.
        path: one path or a sequence of paths; None writes nothing.
        dpi: resolution of PNG output.
    """
    if path is None:
        return
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    for p in paths:
        p = Path(p)
        fmt = p.suffix.lower().lstrip(".")
        if fmt not in FORMATS:
            raise ValueError(f"path: expected a .png or .pdf file name, got {str(p)!r}")
        with atomic_file(p, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")


# --------------------------------------------------------------------------- landscapes


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def _panel_data(ls: Landscape, index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A [Sb, Sa], B [Sb, Sa], Z [Sb, Sa])`` of sample ``index``, axes in 1/255 units."""
    if not isinstance(ls, Landscape):
        raise TypeError(f"landscape: expected a fastland.Landscape, got {type(ls).__name__}")
    n = ls.values.shape[0]
    if not -n <= index < n:
        raise ValueError(f"index: expected a sample index in [-{n}, {n}), got {index}")
    a = ls.alphas.detach().double().cpu() * PIXEL
    b = ls.betas.detach().double().cpu() * PIXEL
    B, A = torch.meshgrid(b, a, indexing="ij")
    return A, B, ls.values[index].detach().double().cpu()


def _axis_names(ls: Landscape, axis_labels: Optional[Tuple[str, str]]) -> Tuple[str, str]:
    if axis_labels is not None:
        return axis_labels
    if ls.meta.get("directions") == "fgsm":
        return "dir FGSM (1/255)", "dir 2 (1/255)"
    return "dir 1 (1/255)", "dir 2 (1/255)"


def _draw_landscape(ax: Axes, ls: Landscape, index: int, kind: str,
                    zlim: Optional[Tuple[float, float]], axis_labels: Optional[Tuple[str, str]],
                    title: Optional[str]) -> None:
    A, B, Z = _panel_data(ls, index)
    xl, yl = _axis_names(ls, axis_labels)
    lo, hi = zlim if zlim is not None else (float(Z.min()), float(Z.max()))
    if hi <= lo:  # a flat landscape: give the colour scale some room
        lo, hi = lo - 0.5, hi + 0.5
    if kind == "surface":
        ax.plot_surface(A.numpy(), B.numpy(), Z.numpy(), cmap="viridis", vmin=lo, vmax=hi,
                        linewidth=0, antialiased=True)
        ax.set_zlim(lo, hi)
        ax.set_zlabel("Δ log p")
    else:
        levels = MaxNLocator(nbins=15).tick_values(lo, hi)
        cs = ax.contourf(A.numpy(), B.numpy(), Z.numpy(), levels=levels, cmap="viridis", extend="both")
        ax.contour(A.numpy(), B.numpy(), Z.numpy(), levels=levels, colors="k", linewidths=0.3)
        ax.figure.colorbar(cs, ax=ax, label="Δ log p")
        ax.plot([0], [0], marker="+", color="w", markersize=10)  # the clean sample
        ax.set_aspect("equal")
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    if title:
        ax.set_title(title)


def plot_landscape(
    landscape: Landscape,
    *,
    index: int = 0,
    kind: str = "surface",
    title: Optional[str] = None,
    axis_labels: Optional[Tuple[str, str]] = None,
    path: Paths = None,
) -> Figure:
    """One sample's relative likelihood landscape as a 3D surface or a contour map (Fig. 1 panel).

    Args:
        landscape: from :func:`fastland.landscape`.
        index: which sample of the landscape.
        kind: ``"surface"`` (3D, as in the paper) or ``"contour"``.
        title: panel title.
        axis_labels: names of the two directions (default ``dir 1``/``dir 2``,
            ``dir FGSM`` for FGSM landscapes).
        path: file(s) to write (``.png``/``.pdf``).
    Returns:
        the figure.
    """
    return plot_landscapes([landscape], index=index, kind=kind,
                           titles=None if title is None else [title], axis_labels=axis_labels, path=path)


def plot_landscapes(
    landscapes: Union[Sequence[Landscape], Mapping[str, Landscape]],
    *,
    index: int = 0,
    kind: str = "surface",
    titles: Optional[Sequence[str]] = None,
    share_z: bool = True,
    ncols: Optional[int] = None,
    axis_labels: Optional[Tuple[str, str]] = None,
    path: Paths = None,
) -> Figure:
    """Side-by-side landscape panels, one per model (Figs. 1, 2 and 5).

    Args:
        landscapes: a sequence of :class:`Landscape`, or a mapping panel title
            -> :class:`Landscape` (e.g. ``{"standard": ..., "AT ε=6/255": ...}``).
        index: which sample of each landscape (the same clean sample across
            models, so that the panels are comparable).
        kind: ``"surface"`` or ``"contour"``.
        titles: panel titles (default: the mapping's keys, or none).
        share_z: one ``Δ log p`` scale for all panels (flatness is then visible).
        ncols: panels per row (default: all in one row, at most 4).
        axis_labels, path: as in :func:`plot_landscape`.
    Returns:
        the figure.
    """
    _check_kind(kind)
    if isinstance(landscapes, Mapping):
        titles = list(landscapes.keys()) if titles is None else titles
        panels = list(landscapes.values())
    else:
        panels = list(landscapes)
    if not panels:
        raise ValueError("landscapes: expected at least one Landscape, got none")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"titles: expected {len(panels)} titles (one per panel), got {len(titles)}")
    data = [_panel_data(ls, index)[2] for ls in panels]
    zlim = (min(float(z.min()) for z in data), max(float(z.max()) for z in data)) if share_z else None
    ncols = ncols or min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.8 * nrows), layout="constrained")
    for k, ls in enumerate(panels):
        proj = "3d" if kind == "surface" else None
        ax = fig.add_subplot(nrows, ncols, k + 1, projection=proj)
        _draw_landscape(ax, ls, index, kind, zlim, axis_labels, None if titles is None else titles[k])
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- histograms (Fig. 3)


def plot_loglik_histograms(
    histograms: Union[Sequence[LoglikHistogram], Mapping[str, LoglikHistogram]],
    *,
    bins: int = 50,
    titles: Optional[Sequence[str]] = None,
    path: Paths = None,
) -> Figure:
    """Histograms of ``log p`` of clean (blue) and randomly perturbed (orange) samples, one panel per model (Fig. 3).

    The x axes are shifted by each model's unknown ``log Z``, so each panel
    has its own range (as in the paper).

    Args:
        histograms: from :func:`fastland.loglik_histogram`; a sequence or a
            mapping panel title -> histogram.
        bins: number of bins (shared edges for clean and perturbed in a panel).
        titles, path: panel titles; file(s) to write.
    Returns:
        the figure.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins: expected a positive int, got {bins!r}")
    if isinstance(histograms, Mapping):
        titles = list(histograms.keys()) if titles is None else titles
        panels = list(histograms.values())
    else:
        panels = list(histograms)
    if not panels:
        raise ValueError("histograms: expected at least one LoglikHistogram, got none")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"titles: expected {len(panels)} titles (one per panel), got {len(titles)}")
    fig = Figure(figsize=(4.0 * len(panels), 3.2), layout="constrained")
    for k, h in enumerate(panels):
        if not isinstance(h, LoglikHistogram):
            raise TypeError(f"histograms: expected LoglikHistogram items, got {type(h).__name__}")
        clean = h.clean.detach().double().flatten().cpu()
        pert = h.perturbed.detach().double().flatten().cpu()
        both = torch.cat([clean, pert])
        lo, hi = float(both.min()), float(both.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = torch.linspace(lo, hi, bins + 1).tolist()
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.hist(clean.numpy(), bins=edges, alpha=0.6, color="tab:blue", label="clean", density=True)
        ax.hist(pert.numpy(), bins=edges, alpha=0.6, color="tab:orange",
                label=f"perturbed (ε={h.eps * PIXEL:.3g}/255)", density=True)
        ax.set_xlabel("log p(x) + log Z")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
        if titles is not None:
            ax.set_title(titles[k])
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- Φ vs accuracy (Fig. 4)


def plot_flatness_vs_accuracy(
    phi: Sequence[float],
    adv_accuracy: Sequence[float],
    *,
    labels: Optional[Sequence[str]] = None,
    groups: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    xlabel: str = "Φ flatness (higher is flatter)",
    ylabel: str = "adversarial accuracy (%)",
    path: Paths = None,
) -> Figure:
    """Adversarial accuracy against Φ (Fig. 4): one line per family of models.

    Args:
        phi: ``Φ`` of each model (e.g. ``[-2066.4, -1055.0]``).
        adv_accuracy: each model's adversarial accuracy (same length).
        labels: a label per point (e.g. ``["ε=2/255", "ε=4/255"]``).
        groups: a family name per point (e.g. ``["AT", "AT", "Jacobian"]``): points
            of one family share a colour and a legend entry and are joined in the
            given order; points of different families are never joined. None: all
            points are one family, joined in the given order.
        title, xlabel, ylabel: texts.
        path: file(s) to write.
    Returns:
        the figure.
    """
    xs = [float(v) for v in phi]
    ys = [float(v) for v in adv_accuracy]
    if not xs:
        raise ValueError("phi: expected at least one value, got none")
    if len(ys) != len(xs):
        raise ValueError(f"adv_accuracy: expected {len(xs)} values (one per phi), got {len(ys)}")
    if labels is not None and len(labels) != len(xs):
        raise ValueError(f"labels: expected {len(xs)} labels (one per phi), got {len(labels)}")
    if groups is not None and len(groups) != len(xs):
        raise ValueError(f"groups: expected {len(xs)} names (one per phi), got {len(groups)}")
    if not all(math.isfinite(v) for v in xs + ys):
        raise ValueError("phi, adv_accuracy: expected finite numbers")
    fig = Figure(figsize=(4.6, 3.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    names = [str(g) for g in groups] if groups is not None else [""] * len(xs)
    for name in dict.fromkeys(names):  # first-seen order
        idx = [k for k, g in enumerate(names) if g == name]
        ax.plot([xs[k] for k in idx], [ys[k] for k in idx], "-o", label=name or None)
    for k, lab in enumerate(labels or []):
        ax.annotate(str(lab), (xs[k], ys[k]), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.margins(x=0.2, y=0.15)  # room for the labels inside the axes
    if groups is not None:
        ax.legend(fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- the robustness-cost front


def _spread_labels(xs: Sequence[float], ys: Sequence[float], *, gap: float, near: float) -> List[float]:
    """The height of each point's label: its own, moved down (from the highest point on) until
    it is ``gap`` from every label already placed within ``near`` along x."""
    out = [0.0] * len(xs)
    placed: List[Tuple[float, float]] = []
    for k in sorted(range(len(xs)), key=lambda i: -ys[i]):
        ly = ys[k]
        while clashes := [py for px, py in placed if abs(xs[k] - px) < near and abs(ly - py) < gap]:
            ly = min(clashes) - gap
        placed.append((xs[k], ly))
        out[k] = ly
    return out


def plot_front(
    cost: Sequence[float],
    robust: Sequence[float],
    robust_std: Sequence[float],
    *,
    labels: Sequence[str],
    on_front: Sequence[bool],
    title: Optional[str] = None,
    xlabel: str = "training step cost (share of PGD-AT's step)",
    ylabel: str = "worst-case accuracy (%)",
    path: Paths = None,
) -> Figure:
    """Robust accuracy against training cost, one point per defence, the non-dominated ones marked
    and joined (``fastland front``).

    Args:
        cost: each point's cost (e.g. its step time over PGD-AT's).
        robust: each point's robust accuracy (the mean over seeds); robust_std: its error bar (0: none).
        labels: a label per point (e.g. ``"at: clean 80.1%"``).
        on_front: whether each point is non-dominated (drawn filled, joined in cost order).
        title, xlabel, ylabel: texts; path: file(s) to write.
    Returns:
        the figure.
    """
    xs, ys, es = [float(v) for v in cost], [float(v) for v in robust], [float(v) for v in robust_std]
    if not xs:
        raise ValueError("cost: expected at least one value, got none")
    for name, seq in (("robust", ys), ("robust_std", es), ("labels", labels), ("on_front", on_front)):
        if len(seq) != len(xs):
            raise ValueError(f"{name}: expected {len(xs)} values (one per cost), got {len(seq)}")
    if not all(math.isfinite(v) for v in xs + ys + es) or min(es) < 0:
        raise ValueError("cost, robust, robust_std: expected finite numbers (robust_std >= 0)")
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for front, style in ((False, dict(mfc="white", color="tab:gray")), (True, dict(color="tab:red"))):
        idx = [k for k in range(len(xs)) if bool(on_front[k]) == front]
        if idx:
            ax.errorbar([xs[k] for k in idx], [ys[k] for k in idx], yerr=[es[k] for k in idx], fmt="o", capsize=3,
                        label="on the front" if front else "dominated", **style)
    line = sorted((xs[k], ys[k]) for k in range(len(xs)) if on_front[k])
    if len(line) > 1:
        ax.plot([p[0] for p in line], [p[1] for p in line], "--", color="tab:red", alpha=0.6)
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    for k, ly in enumerate(_spread_labels(xs, ys, gap=0.045 * span_y, near=0.3 * span_x)):
        moved = abs(ly - ys[k]) > 1e-9
        ax.annotate(str(labels[k]), (xs[k], ys[k]), xytext=(xs[k] + 0.02 * span_x, ly + 0.01 * span_y),
                    fontsize="x-small", va="bottom",
                    arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5) if moved else None)
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    if title:
        ax.set_title(title)
    save_figure(fig, path)
    return fig
