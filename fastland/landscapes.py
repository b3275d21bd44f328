"""Likelihood landscapes, flatness Φ and log-likelihood histograms (paper §3.2–3.3).

* :func:`directions`, :func:`fgsm_direction` — the two axes of a neighbourhood
  ``N(x) = {x + a·d1 + b·d2}`` (DESIGN §1).
* :func:`landscape` — ``Δlog p`` on a regular grid around every sample,
  grid points of many samples batched through the model under inference
  mode, with first-layer linearity fusion (DESIGN §2) when the model allows.
* :func:`flatness` — ``φ(x) = (1/n) Σ_j Σ_{x'∈N_j(x)} s(x')`` (Eq. 7) and
  ``Φ = mean_i φ(x_i)`` (Eq. 8), AMS scores ``s`` batched over grid points.
* :func:`loglik_histogram` — ``log p`` of clean and randomly perturbed samples (Fig. 3).

``landscape`` and ``flatness`` also take a ``Dataset`` or ``DataLoader``: then
results are saved incrementally to ``checkpoint`` with a done-mask (an
interrupted run resumes), the samples are sharded across the processes of an
initialised ``torch.distributed`` group, and the directions of sample ``i``
come from a generator seeded with ``(seed, i)`` — so the result does not
depend on the number of processes, the batching or interruptions.

Shapes: ``N`` samples, ``S`` the per-sample input shape, ``Sa``/``Sb`` grid
steps along ``d1``/``d2``, ``G = Sa·Sb``, ``C`` classes, ``n`` direction pairs.
Grid points are not clipped to ``[0, 1]`` (clipping would break the
linearity that the fusion relies on, and the reference does not clip).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._batching import eval_mode, resolve_batch_size
from ._checks import check_in_unit_box, check_same_device, check_tensor
from ._fusion import FirstLayerSplit, split_first_layer, verify_split
from ._progress import progress_bar
from ._runner import DataLike, is_data, iter_batches, run_resumable, sample_generator
from .energy import ams_score_batch
from .reference import signed_orthogonal_directions

__all__ = [
    "DIRECTION_KINDS",
    "directions",
    "fgsm_direction",
    "grid_coordinates",
    "Landscape",
    "landscape",
    "Flatness",
    "flatness",
    "LoglikHistogram",
    "loglik_histogram",
]

DIRECTION_KINDS = ("rademacher", "gaussian", "fgsm")
LANDSCAPE_SPAN = 16 / 255
LANDSCAPE_STEPS = 41
FLATNESS_SPAN = 8 / 255
FLATNESS_STEPS = 5
FLATNESS_DIRS = 2

Directions = Union[str, Tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------- argument checks


def _check_span_steps(span: float, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if isinstance(span, bool) or not isinstance(span, (int, float)) or not math.isfinite(span) or span <= 0:
        raise ValueError(f"span: expected a finite number > 0 (half-width in pixel units, e.g. 8/255), got {span!r}")


def _check_inputs(x: Tensor) -> None:
    check_tensor("x", x, min_ndim=2, finite=True, nonempty=True)
    if not check_in_unit_box("x", x):
        warnings.warn(
            f"x: expected pixel values in [0, 1], got values in [{x.min().item():.4g}, "
            f"{x.max().item():.4g}]; fastland models normalise inside the model, pass unnormalised images",
            stacklevel=3,
        )


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def _check_fuse(fuse_first_layer: Union[bool, str]) -> None:
    if fuse_first_layer not in (True, False, "auto"):
        raise ValueError(f"fuse_first_layer: expected True, False or 'auto', got {fuse_first_layer!r}")


# --------------------------------------------------------------------------- directions


def _rescale(d: Tensor, norm: float) -> Tensor:
    """Rows of ``d`` ``[N, D]`` scaled to L2 norm ``norm``."""
    return d * (norm / d.norm(dim=1, keepdim=True))


def _gaussian_directions(x: Tensor, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """Orthogonal Gaussian directions with ``‖d1‖ = ‖d2‖ = sqrt(D)`` (RMS entry 1)."""
    N, D = x.shape[0], math.prod(x.shape[1:])
    g = torch.randn((2, N, D), generator=generator, device=x.device, dtype=torch.float64)
    u = g[0] / g[0].norm(dim=1, keepdim=True)
    v = g[1] - (g[1] * u).sum(dim=1, keepdim=True) * u
    scale = math.sqrt(D)
    d1 = _rescale(u, scale).to(x.dtype)
    d2 = _rescale(v, scale).to(x.dtype)
    return d1.view_as(x), d2.view_as(x)


def directions(
    x: Tensor, kind: str = "rademacher", generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """Two orthogonal random directions per sample (DESIGN §1).

    ``"rademacher"`` (default): ``d1 ∈ {±1}^D``; ``d2`` agrees with ``d1`` on a
    random half of the coordinates and disagrees on the other, so
    ``d1·d2 = 0`` exactly (for odd ``D`` one coordinate of ``d2`` is 0); a step
    ``a`` then moves every pixel by ``a`` (an L∞ step in pixel units).
    ``"gaussian"``: orthogonal Gaussian directions (Gram–Schmidt in float64)
    scaled to ``‖d‖₂ = sqrt(D)`` — orthonormal up to that scale, chosen so that
    a step ``a`` has the same L2 length as a Rademacher step.

    Args:
        x: ``[N, *S]``; only shape, dtype and device are used; ``D = prod(S) >= 2``.
        kind: ``"rademacher"`` or ``"gaussian"``.
        generator: on ``x``'s device, for reproducible draws.
    Returns:
        ``(d1, d2)``, each ``[N, *S]`` in ``x``'s dtype.
    """
    check_tensor("x", x, min_ndim=2)
    if math.prod(x.shape[1:]) < 2:
        raise ValueError(f"x: expected at least 2 features per sample, got shape {tuple(x.shape)}")
    if kind == "rademacher":
        return signed_orthogonal_directions(x, generator)
    if kind == "gaussian":
        return _gaussian_directions(x, generator)
    raise ValueError(
        f"kind: expected 'rademacher' or 'gaussian' (for 'fgsm' use fgsm_direction), got {kind!r}"
    )


def orthogonal_signs(d1: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random signed direction exactly orthogonal to the signed direction ``d1``.

    On the ``K`` non-zero coordinates of each row of ``d1``, ``d2 = d1·s`` with
    ``s`` a random balanced sign pattern (``K/2`` of each; one 0 for odd
    ``K``), so ``d1·d2 = Σ s = 0``; on the zero coordinates of ``d1``, ``d2`` is
    a random sign.

    Args:
        d1: ``[N, *S]`` with entries in ``{-1, 0, 1}``.
    Returns:
        ``[N, *S]`` in ``d1``'s dtype.
    """
    N, dev, dt = d1.shape[0], d1.device, d1.dtype
    flat = d1.reshape(N, -1)
    nz = flat != 0
    # Rank the non-zero coordinates of each row in a random order; the first
    # half (of that row's K) get +1, the next half -1, an odd last one 0.
    keys = torch.rand(flat.shape, generator=generator, device=dev)
    keys = torch.where(nz, keys, torch.full_like(keys, 2.0))  # zeros sort last
    rank = torch.empty_like(flat, dtype=torch.long).scatter_(
        1, keys.argsort(dim=1), torch.arange(flat.shape[1], device=dev).expand_as(flat).contiguous()
    )
    k = nz.sum(dim=1, keepdim=True)
    half = k // 2
    s = torch.where(rank < half, 1.0, torch.where(rank < 2 * half, -1.0, 0.0)).to(dt)
    free = torch.randint(0, 2, flat.shape, generator=generator, device=dev).to(dt) * 2 - 1
    d2 = torch.where(nz, flat * s, free)
    return d2.view_as(d1)


def fgsm_direction(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``sign(∇x CE(f(x), y))`` per sample: the direction of an FGSM attack.

    The model is evaluated in eval mode (restored afterwards).

    Args:
        model: ``[N, *S] -> [N, C]``.
        x: ``[N, *S]``.
        y: ``[N]`` integer labels.
    Returns:
        ``[N, *S]`` in ``x``'s dtype, entries in ``{-1, 0, 1}``.
    """
    _check_model(model)
    check_tensor("x", x, min_ndim=2, finite=True, nonempty=True)
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y: expected integer labels of shape [{x.shape[0]}], got {got}")
    check_same_device(("x", "y"), (x, y))
    with eval_mode(model), torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    return grad.sign().to(x.dtype)


def _draw_pairs(
    model: nn.Module,
    x: Tensor,
    y: Optional[Tensor],
    kind: str,
    n: int,
    generator: Optional[torch.Generator],
) -> Tuple[Tensor, Tensor]:
    """``n`` direction pairs per sample of kind ``kind``: ``(d1, d2)`` each ``[n, N, *S]``."""
    if kind not in DIRECTION_KINDS:
        raise ValueError(f"directions: expected one of {DIRECTION_KINDS} or a (d1, d2) pair, got {kind!r}")
    N = x.shape[0]
    if kind == "fgsm":
        if y is None:
            raise ValueError("y: FGSM directions need labels; pass y=[N] integer labels (or a dataset of (x, y))")
        return _fgsm_pairs(fgsm_direction(model, x, y), n, generator)
    rep = x.unsqueeze(0).expand(n, *x.shape).reshape(n * N, *x.shape[1:])
    d1, d2 = directions(rep, kind, generator)
    return d1.view(n, *x.shape), d2.view(n, *x.shape)


def _fgsm_pairs(d1: Tensor, n: int, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """``n`` pairs ``(d1, d2_j)``, ``d2_j`` random signs orthogonal to ``d1`` ``[N, *S]``: each ``[n, N, *S]``."""
    d2 = torch.stack([orthogonal_signs(d1, generator) for _ in range(n)])
    return d1.unsqueeze(0).expand_as(d2).contiguous(), d2


def _given_pair(x: Tensor, pair: Any) -> Tuple[Tensor, Tensor]:
    """User directions ``(d1, d2)``, each ``[N, *S]`` or ``[*S]`` (shared), as ``[N, *S]``."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise ValueError(
            f"directions: expected one of {DIRECTION_KINDS} or a pair (d1, d2), got {type(pair).__name__}"
        )
    out = []
    for name, d in zip(("d1", "d2"), pair):
        check_tensor(name, d, finite=True)
        if tuple(d.shape) == tuple(x.shape[1:]):
            d = d.unsqueeze(0).expand_as(x).contiguous()
        if d.shape != x.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(x.shape)} (that of x) or {tuple(x.shape[1:])}, got {tuple(d.shape)}"
            )
        check_same_device(("x", name), (x, d))
        out.append(d.to(x.dtype))
    return out[0], out[1]


def grid_coordinates(span: float, steps: int, *, dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device, None] = None) -> Tensor:
    """``steps`` evenly spaced points on ``[-span, span]``; the centre is exactly 0 for odd ``steps``.

    ``steps = 1`` gives ``[0]``. Returns ``[steps]``.
    """
    _check_span_steps(span, steps)
    if steps == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    half = (steps - 1) / 2
    k = torch.arange(steps, dtype=torch.float64, device=device) - half
    return (k * (span / half)).to(dtype)


def _flat_grid(alphas: Tensor, betas: Tensor) -> Tuple[Tensor, Tensor]:
    """Grid points ``(a [G], b [G])``, ``G = Sb·Sa``, alphas varying fastest."""
    return alphas.repeat(betas.shape[0]), betas.repeat_interleave(alphas.shape[0])


# --------------------------------------------------------------------------- landscapes


@dataclass
class Landscape:
    """``Δlog p`` on the grid ``x + a·d1 + b·d2`` around ``N`` samples.

    Attributes:
        alphas: ``[Sa]`` steps along ``d1`` (pixel units).
        betas: ``[Sb]`` steps along ``d2``.
        values: ``[N, Sb, Sa]`` ``Δlog p`` (alphas along the last axis).
        base_logp: ``[N]`` ``log p(x) + log Z`` of the clean samples.
        d1, d2: ``[N, *S]`` the directions, or None for data-set runs (whose
            directions are re-drawn from ``(seed, index)``).
    """

    alphas: Tensor
    betas: Tensor
    values: Tensor
    base_logp: Tensor
    d1: Optional[Tensor] = None
    d2: Optional[Tensor] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.values.shape[0]

    def sample(self, i: int) -> "Landscape":
        """The landscape of sample ``i`` alone (``N = 1``)."""
        sl = slice(i, i + 1)
        return Landscape(
            self.alphas, self.betas, self.values[sl], self.base_logp[sl],
            None if self.d1 is None else self.d1[sl], None if self.d2 is None else self.d2[sl],
            dict(self.meta),
        )


def _fusion_split(model: nn.Module, probe: Tensor, fuse: Union[bool, str]) -> Optional[FirstLayerSplit]:
    """The first-layer split to use, verified against ``model(probe)`` (a few clean samples)."""
    if fuse is False:
        return None
    split = split_first_layer(model)
    atol, rtol = (1e-10, 1e-8) if probe.dtype == torch.float64 else (1e-4, 1e-4)
    ok = split is not None and verify_split(split, probe, model(probe), atol=atol, rtol=rtol)
    if fuse is True and not ok:
        raise ValueError(
            "fuse_first_layer: True needs a model whose first layer is affine (an nn.Sequential starting "
            "with [Normalize, Flatten] Conv/Linear, or a fastland Classifier), got "
            f"{type(model).__name__} whose structure was not recognised; use 'auto' or False"
        )
    return split if ok else None


def _chunks(n_samples: int, n_points: int, per_call: int) -> Iterator[Tuple[int, int, int, int]]:
    """Yield ``(i0, i1, g0, g1)`` blocks of ``(samples, grid points)`` with ≤ ``per_call`` points each
    (at least one point)."""
    nb = max(1, per_call // n_points)
    gb = min(n_points, per_call) if nb == 1 else n_points
    for i0 in range(0, n_samples, nb):
        for g0 in range(0, n_points, gb):
            yield i0, min(i0 + nb, n_samples), g0, min(g0 + gb, n_points)


def _sample_blocks(n_samples: int, n_points: int, per_call: int, min_block: int = 64
                   ) -> Iterator[Tuple[int, int]]:
    """Yield ``(i0, i1)`` blocks of samples: whole model calls' worth, at least ``min_block`` samples."""
    step = max(min_block, per_call // n_points)
    for i0 in range(0, n_samples, step):
        yield i0, min(i0 + step, n_samples)


def _prefers_channels_last(model: nn.Module, x: Tensor) -> bool:
    """Whether 4-D grid points should be laid out channels-last for ``model``.

    On the CPU, oneDNN convolutions on channels-last inputs were measured
    1.3-1.5x faster for DDNet (benchmarks/notes/landscape.md); on CUDA the
    layout is left to the user.
    """
    return x.device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _synthesize(h0: Tensor, hu: Tensor, hv: Tensor, a: Tensor, b: Tensor, channels_last: bool) -> Tensor:
    """Grid points ``h0 + a·hu + b·hv`` flattened to ``[n·g, *H]``, channels-last when asked,
    4-D and of more than one channel (with one channel the layout gained nothing for the
    forward and slowed the input gradient of LeNet's first convolution).

    For channels-last the operands are permuted to ``[n, H, W, C]`` first, so
    that :func:`fastland.ops.grid_combine` writes the points directly in that
    layout (no extra transposing copy of the ``n·g`` points).

    Args:
        h0, hu, hv: ``[n, *H]``; a, b: ``[g]``.
    """
    if not (channels_last and h0.dim() == 4 and h0.shape[1] > 1):
        return ops.grid_combine(h0, hu, hv, a, b).flatten(0, 1)
    nhwc = [t.permute(0, 2, 3, 1).contiguous() for t in (h0, hu, hv)]
    out = ops.grid_combine(nhwc[0], nhwc[1], nhwc[2], a, b)  # [n, g, H, W, C]
    return out.permute(0, 1, 4, 2, 3).flatten(0, 1)  # [n·g, C, H, W], channels-last strides


def _base_logits(model: nn.Module, x: Tensor, per_call: int) -> Tensor:
    """``model(x)`` in chunks of ``per_call``: ``[N, C]``."""
    return torch.cat([model(x[i : i + per_call]) for i in range(0, x.shape[0], per_call)])


class GridResult(NamedTuple):
    """Output of :func:`landscape_values`."""

    values: Tensor  # [N, Sb, Sa]
    base_lse: Tensor  # [N]
    fused: bool  # whether the first-layer fusion was used


def landscape_values(
    model: nn.Module,
    x: Tensor,
    d1: Tensor,
    d2: Tensor,
    alphas: Tensor,
    betas: Tensor,
    *,
    batch_size: Union[int, str] = "auto",
    fuse_first_layer: Union[bool, str] = "auto",
    progress: bool = False,
) -> GridResult:
    """The landscape kernel: no argument checks, model already in eval mode.

    Args:
        x, d1, d2: ``[N, *S]``; alphas ``[Sa]``; betas ``[Sb]`` (x's dtype and device).
    Returns:
        :class:`GridResult` ``(values [N, Sb, Sa], base_lse [N], fused)``.
    """
    N, Sa, Sb = x.shape[0], alphas.shape[0], betas.shape[0]
    G = Sa * Sb
    a, b = _flat_grid(alphas, betas)
    with torch.inference_mode():
        per_call = resolve_batch_size(batch_size, model, x[:1])
        split = _fusion_split(model, x[:8], fuse_first_layer)
        forward = split.rest if split is not None else model
        channels_last = _prefers_channels_last(model, x)
        out = x.new_empty((N, G))
        base_lse = x.new_empty(N)
        bar = progress_bar(N * G, "landscape", progress, unit="pt")
        # Sample blocks bound the memory of the first-layer outputs h0, hu, hv.
        for i0, i1 in _sample_blocks(N, G, per_call):
            xb = x[i0:i1]
            base_lse[i0:i1] = torch.logsumexp(_base_logits(model, xb, per_call), dim=-1)
            if split is not None:
                h0, hu, hv = split.affine(xb), split.linear(d1[i0:i1]), split.linear(d2[i0:i1])
            else:
                h0, hu, hv = xb, d1[i0:i1], d2[i0:i1]
            for j0, j1, g0, g1 in _chunks(i1 - i0, G, per_call):
                pts = _synthesize(h0[j0:j1], hu[j0:j1], hv[j0:j1], a[g0:g1], b[g0:g1], channels_last)
                z = forward(pts).view(j1 - j0, g1 - g0, -1)
                out[i0 + j0 : i0 + j1, g0:g1] = ops.grid_relative_loglik(z, base_lse[i0 + j0 : i0 + j1])
                bar.update((j1 - j0) * (g1 - g0))
        bar.close()
    return GridResult(out.view(N, Sb, Sa).clone(), base_lse.clone(), split is not None)


def landscape(
    model: nn.Module,
    x: Union[Tensor, DataLike],
    *,
    y: Optional[Tensor] = None,
    directions: Directions = "rademacher",
    span: float = LANDSCAPE_SPAN,
    steps: int = LANDSCAPE_STEPS,
    batch_size: Union[int, str] = "auto",
    fuse_first_layer: Union[bool, str] = "auto",
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    checkpoint: Optional[Union[str, Path]] = None,
    seed: int = 0,
    limit: Optional[int] = None,
    chunk_samples: int = 64,
    save_interval: float = 30.0,
) -> Landscape:
    """Relative likelihood landscapes ``Δlog p(x + a·d1 + b·d2)`` (paper §3.2, Figs. 1, 2, 5).

    ``a`` and ``b`` run over ``steps`` evenly spaced values in ``[-span, span]``.
    The model is put in eval mode (and restored); the grid points of many
    samples go through it in batches of ``batch_size`` under inference mode.
    When the model's first layer is affine (a Conv/Linear, input
    normalisation folded in), the grid is formed after that layer, which then
    runs 3 times per sample instead of once per point (``fuse_first_layer``).

    Args:
        model: ``[B, *S] -> [B, C]``.
        x: ``[N, *S]`` in ``[0, 1]`` — or a ``Dataset``/``DataLoader`` of ``x``
            or ``(x, y, ...)`` items (see the module doc: checkpointed,
            resumable, sharded; ``generator`` not allowed, ``seed`` used).
        y: ``[N]`` labels, needed for ``directions="fgsm"``.
        directions: ``"rademacher"``, ``"gaussian"``, ``"fgsm"`` (d1 the FGSM
            direction, d2 a random sign vector orthogonal to it) or a pair
            ``(d1, d2)`` of ``[N, *S]`` (or ``[*S]``) tensors.
        span: half-width of the grid in pixel units (> 0).
        steps: grid points per axis (>= 1; odd puts the clean sample at the centre).
        batch_size: grid points per model call, or ``"auto"`` (memory budget).
        fuse_first_layer: True, False or ``"auto"`` (fuse when the structure
            is recognised and reproduces ``model(x)``).
        generator: for the random directions (tensor input only).
        progress: show a tqdm bar.
        checkpoint, seed, limit, chunk_samples, save_interval: data-set runs
            only: result file (resumed when present), direction seed, number
            of samples to use (first ``limit``), samples per unit of work,
            seconds between checkpoint writes.
    Returns:
        :class:`Landscape` with ``values [N, Sb, Sa]``.
    """
    _check_model(model)
    _check_span_steps(span, steps)
    _check_fuse(fuse_first_layer)
    if is_data(x):
        if generator is not None:
            raise ValueError("generator: not used for data sets; pass seed= (directions of sample i come from (seed, i))")
        return _landscape_dataset(
            model, x, directions=directions, span=span, steps=steps, batch_size=batch_size,
            fuse_first_layer=fuse_first_layer, progress=progress, checkpoint=checkpoint, seed=seed,
            limit=limit, chunk_samples=chunk_samples, save_interval=save_interval,
        )
    _check_inputs(x)
    if y is not None:
        check_same_device(("x", "y"), (x, y))
    if isinstance(directions, str):
        d1s, d2s = _draw_pairs(model, x, y, directions, 1, generator)
        d1, d2 = d1s[0], d2s[0]
    else:
        d1, d2 = _given_pair(x, directions)
    alphas = grid_coordinates(span, steps, dtype=x.dtype, device=x.device)
    betas = alphas.clone()
    with eval_mode(model):
        res = landscape_values(
            model, x, d1, d2, alphas, betas, batch_size=batch_size,
            fuse_first_layer=fuse_first_layer, progress=progress,
        )
    kind = directions if isinstance(directions, str) else "given"
    return Landscape(alphas, betas, res.values, res.base_lse, d1, d2,
                     {"directions": kind, "span": float(span), "steps": steps, "fused": res.fused})


# --------------------------------------------------------------------------- flatness


@dataclass
class Flatness:
    """Flatness of the likelihood landscape (Eq. 7, 8); higher (closer to 0) is flatter.

    Attributes:
        phi: ``[N]`` per-sample ``φ(x_i)``.
        mean: ``Φ = mean_i φ(x_i)``.
        stderr: standard error of ``Φ`` over samples (``std/sqrt(N)``; NaN for ``N = 1``).
        meta: the settings (``n_dirs``, ``span``, ``steps``, ``reduction``, ``directions``).
    """

    phi: Tensor
    mean: float
    stderr: float
    meta: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_phi(cls, phi: Tensor, meta: Dict[str, Any]) -> "Flatness":
        """Summary statistics of ``phi`` ``[N]``."""
        n = phi.shape[0]
        phi = phi.detach()
        mean = float(phi.double().mean())
        stderr = float(phi.double().std() / math.sqrt(n)) if n > 1 else float("nan")
        return cls(phi, mean, stderr, meta)


def _fused_ams_scores(split: FirstLayerSplit, h: Tensor, sample_shape: Tuple[int, ...]) -> Tensor:
    """AMS scores of the points whose first-layer outputs are ``h`` ``[B, *H]``: ``[B]``.

    ``∇x log p = L₀ᵀ ∇h log p``: autograd through the rest of the model, then
    the first layer's adjoint (the same input-gradient kernel autograd would run).
    """
    with torch.enable_grad():
        hg = h.detach().requires_grad_(True)
        lse = torch.logsumexp(split.rest(hg), dim=-1)
        (gh,) = torch.autograd.grad(lse.sum(), hg)
    with torch.no_grad():
        return -split.linear_transpose(gh, sample_shape).flatten(1).norm(dim=1)


def flatness_values(
    model: nn.Module,
    x: Tensor,
    d1: Tensor,
    d2: Tensor,
    alphas: Tensor,
    betas: Tensor,
    *,
    reduction: str = "sum",
    batch_size: Union[int, str] = "auto",
    fuse_first_layer: Union[bool, str] = "auto",
    progress: bool = False,
) -> Tensor:
    """The flatness kernel: no argument checks, model already in eval mode.

    With first-layer fusion the grid is formed after the first layer and the
    input gradient is ``L₀ᵀ ∇h log p`` (the first layer's forward runs 3 times
    per sample instead of once per point).

    Args:
        x: ``[N, *S]``; d1, d2: ``[n, N, *S]``; alphas ``[Sa]``; betas ``[Sb]``.
    Returns:
        ``phi`` ``[N]``.
    """
    n, N = d1.shape[0], x.shape[0]
    a, b = _flat_grid(alphas, betas)
    G = a.shape[0]
    base = x.unsqueeze(0).expand_as(d1).reshape(n * N, *x.shape[1:])
    u, v = d1.reshape(base.shape), d2.reshape(base.shape)
    per_call = resolve_batch_size(batch_size, model, x[:1], backward=True)
    with torch.no_grad():
        split = _fusion_split(model, x[:8], fuse_first_layer)
    if split is not None and not split.transposable():
        if fuse_first_layer is True:
            raise ValueError("fuse_first_layer: True needs zero-padded convolutions for flatness "
                             "(the adjoint of the first layer); use 'auto' or False")
        split = None
    channels_last = _prefers_channels_last(model, x)
    totals = torch.zeros(n * N, dtype=torch.float64, device=x.device)
    bar = progress_bar(n * N * G, "flatness", progress, unit="pt")
    for i0, i1 in _sample_blocks(n * N, G, per_call):
        with torch.no_grad():
            if split is not None:
                h0, hu, hv = split.affine(base[i0:i1]), split.linear(u[i0:i1]), split.linear(v[i0:i1])
            else:
                h0, hu, hv = base[i0:i1], u[i0:i1], v[i0:i1]
        for j0, j1, g0, g1 in _chunks(i1 - i0, G, per_call):
            with torch.no_grad():
                pts = _synthesize(h0[j0:j1], hu[j0:j1], hv[j0:j1], a[g0:g1], b[g0:g1], channels_last)
            if split is not None:
                s = _fused_ams_scores(split, pts, x.shape[1:])
            else:
                s = ams_score_batch(model, pts)
            totals[i0 + j0 : i0 + j1] += s.view(j1 - j0, g1 - g0).sum(dim=1, dtype=torch.float64)
            bar.update((j1 - j0) * (g1 - g0))
    bar.close()
    phi = totals.view(n, N).mean(dim=0)
    if reduction == "mean":
        phi = phi / G
    return phi.to(x.dtype)


def flatness(
    model: nn.Module,
    x: Union[Tensor, DataLike],
    *,
    y: Optional[Tensor] = None,
    n_dirs: int = FLATNESS_DIRS,
    span: float = FLATNESS_SPAN,
    steps: int = FLATNESS_STEPS,
    reduction: str = "sum",
    directions: str = "rademacher",
    batch_size: Union[int, str] = "auto",
    fuse_first_layer: Union[bool, str] = "auto",
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    checkpoint: Optional[Union[str, Path]] = None,
    seed: int = 0,
    limit: Optional[int] = None,
    chunk_samples: int = 64,
    save_interval: float = 30.0,
) -> Flatness:
    """Φ-flatness (Eq. 7, 8): AMS scores ``-‖∇x log p‖`` summed over ``n_dirs`` grids.

    ``φ(x) = (1/n) Σ_j Σ_{a,b} s(x + a·d1_j + b·d2_j)`` with ``steps × steps``
    points ``a, b ∈ [-span, span]`` and ``n = n_dirs`` random direction pairs
    per sample; ``reduction="mean"`` divides by the number of grid points
    (comparable across grid sizes). Grid points go through forward and
    backward in batches (one VJP per batch, input gradients only).

    Args:
        model: ``[B, *S] -> [B, C]``; evaluated in eval mode (restored).
        x: ``[N, *S]`` in ``[0, 1]``, or a ``Dataset``/``DataLoader`` (see :func:`landscape`).
        y: ``[N]`` labels (``directions="fgsm"`` only).
        n_dirs: direction pairs per sample (>= 1).
        span, steps: the grid, as in :func:`landscape`.
        reduction: ``"sum"`` (the paper's) or ``"mean"``.
        directions: ``"rademacher"``, ``"gaussian"`` or ``"fgsm"``.
        batch_size: grid points per forward+backward, or ``"auto"``.
        fuse_first_layer: as in :func:`landscape` (needs zero-padded convolutions).
        generator, progress, checkpoint, seed, limit, chunk_samples, save_interval: as in :func:`landscape`.
    Returns:
        :class:`Flatness` with ``phi [N]``, ``mean`` (Φ) and ``stderr``.
    """
    _check_model(model)
    _check_span_steps(span, steps)
    if isinstance(n_dirs, bool) or not isinstance(n_dirs, int) or n_dirs < 1:
        raise ValueError(f"n_dirs: expected an integer >= 1, got {n_dirs!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction: expected 'sum' or 'mean', got {reduction!r}")
    _check_fuse(fuse_first_layer)
    if not isinstance(directions, str) or directions not in DIRECTION_KINDS:
        raise ValueError(f"directions: expected one of {DIRECTION_KINDS}, got {directions!r}")
    meta = {"n_dirs": n_dirs, "span": float(span), "steps": steps, "reduction": reduction,
            "directions": directions}
    if is_data(x):
        if generator is not None:
            raise ValueError("generator: not used for data sets; pass seed= (directions of sample i come from (seed, i))")
        phi = _flatness_dataset(
            model, x, n_dirs=n_dirs, span=span, steps=steps, reduction=reduction,
            directions=directions, batch_size=batch_size, fuse_first_layer=fuse_first_layer,
            progress=progress, checkpoint=checkpoint,
            seed=seed, limit=limit, chunk_samples=chunk_samples, save_interval=save_interval,
        )
        return Flatness.from_phi(phi, meta)
    _check_inputs(x)
    grid = grid_coordinates(span, steps, dtype=x.dtype, device=x.device)
    with eval_mode(model):
        d1, d2 = _draw_pairs(model, x, y, directions, n_dirs, generator)
        phi = flatness_values(model, x, d1, d2, grid, grid, reduction=reduction, batch_size=batch_size,
                              fuse_first_layer=fuse_first_layer, progress=progress)
    return Flatness.from_phi(phi, meta)


# --------------------------------------------------------------------------- data-set runs


def _per_sample_pairs(
    model: nn.Module, x: Tensor, y: Optional[Tensor], idx: Tensor, kind: str, n: int, seed: int
) -> Tuple[Tensor, Tensor]:
    """Direction pairs ``[n, B, *S]`` with sample ``idx[k]``'s drawn from generator ``(seed, idx[k])``."""
    fgsm = fgsm_direction(model, x, y) if kind == "fgsm" and y is not None else None
    pairs = []
    for k, i in enumerate(idx.tolist()):
        gen = sample_generator(seed, int(i), x.device)
        if fgsm is not None:
            pairs.append(_fgsm_pairs(fgsm[k : k + 1], n, gen))
        else:
            pairs.append(_draw_pairs(model, x[k : k + 1], None, kind, n, gen))
    return torch.cat([p[0] for p in pairs], dim=1), torch.cat([p[1] for p in pairs], dim=1)


def _landscape_dataset(
    model: nn.Module, data: DataLike, *, directions: Directions, span: float, steps: int,
    batch_size: Union[int, str], fuse_first_layer: Union[bool, str], progress: bool,
    checkpoint: Optional[Union[str, Path]], seed: int, limit: Optional[int], chunk_samples: int,
    save_interval: float,
) -> Landscape:
    if not isinstance(directions, str):
        raise ValueError("directions: data-set runs draw their own; pass 'rademacher', 'gaussian' or 'fgsm'")
    if directions not in DIRECTION_KINDS:
        raise ValueError(f"directions: expected one of {DIRECTION_KINDS}, got {directions!r}")
    device = _model_device(model)
    dtype = _model_dtype(model)
    grid = grid_coordinates(span, steps, dtype=dtype, device=device)

    def compute(idx: Tensor, x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        _check_inputs(x)
        d1, d2 = _per_sample_pairs(model, x, y, idx, directions, 1, seed)
        res = landscape_values(model, x, d1[0], d2[0], grid, grid, batch_size=batch_size,
                               fuse_first_layer=fuse_first_layer)
        return {"values": res.values, "base_logp": res.base_lse}

    config = {"task": "landscape", "directions": directions, "span": float(span), "steps": steps,
              "seed": seed}
    with eval_mode(model):
        res = run_resumable(
            data, compute, {"values": (steps, steps), "base_logp": ()}, config, model=model,
            device=device, dtype=dtype, checkpoint=checkpoint, limit=limit, chunk=chunk_samples,
            progress=progress, desc="landscape", save_interval=save_interval,
            need_labels=directions == "fgsm",
        )
    return Landscape(grid.cpu(), grid.cpu().clone(), res["values"], res["base_logp"], None, None, config)


def _flatness_dataset(
    model: nn.Module, data: DataLike, *, n_dirs: int, span: float, steps: int, reduction: str,
    directions: str, batch_size: Union[int, str], fuse_first_layer: Union[bool, str], progress: bool,
    checkpoint: Optional[Union[str, Path]], seed: int, limit: Optional[int], chunk_samples: int,
    save_interval: float,
) -> Tensor:
    device = _model_device(model)
    dtype = _model_dtype(model)
    grid = grid_coordinates(span, steps, dtype=dtype, device=device)

    def compute(idx: Tensor, x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        _check_inputs(x)
        d1, d2 = _per_sample_pairs(model, x, y, idx, directions, n_dirs, seed)
        return {"phi": flatness_values(model, x, d1, d2, grid, grid, reduction=reduction,
                                       batch_size=batch_size, fuse_first_layer=fuse_first_layer)}

    config = {"task": "flatness", "directions": directions, "span": float(span), "steps": steps,
              "n_dirs": n_dirs, "reduction": reduction, "seed": seed}
    with eval_mode(model):
        res = run_resumable(
            data, compute, {"phi": ()}, config, model=model, device=device, dtype=dtype,
            checkpoint=checkpoint, limit=limit, chunk=chunk_samples, progress=progress,
            desc="flatness", save_interval=save_interval, need_labels=directions == "fgsm",
        )
    return res["phi"]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


# --------------------------------------------------------------------------- histograms


@dataclass
class LoglikHistogram:
    """``log p + log Z`` of clean samples and of random perturbations of them (Fig. 3).

    Attributes:
        clean: ``[N]``.
        perturbed: ``[N, n_perturb]``.
        eps: the perturbation size (pixel units); kind: ``"rademacher"`` or ``"uniform"``.
    """

    clean: Tensor
    perturbed: Tensor
    eps: float
    kind: str


def loglik_histogram(
    model: nn.Module,
    data: Union[Tensor, DataLike],
    *,
    eps: float = 8 / 255,
    n_perturb: int = 1,
    kind: str = "rademacher",
    clip: bool = False,
    batch_size: Union[int, str] = "auto",
    generator: Optional[torch.Generator] = None,
    limit: Optional[int] = None,
    progress: bool = True,
) -> LoglikHistogram:
    """``log p`` (up to ``log Z``) of clean samples and of randomly perturbed ones (Fig. 3).

    Each sample gets ``n_perturb`` perturbations ``x + eps·d``, ``d`` a random
    sign vector (``kind="rademacher"``: every pixel moves by ``±eps``) or
    uniform in ``[-1, 1]^D`` (``"uniform"``); ``clip`` clamps the perturbed
    inputs to ``[0, 1]``.

    Args:
        model: ``[B, *S] -> [B, C]``, evaluated in eval mode (restored).
        data: ``[N, *S]`` tensor in ``[0, 1]``, a ``Dataset`` or a ``DataLoader``.
        eps: perturbation size in pixel units (> 0).
        n_perturb: perturbations per sample (>= 1).
        batch_size: inputs per model call or ``"auto"``.
        generator: for the perturbations (on the model's device).
        limit: use the first ``limit`` samples only.
    Returns:
        :class:`LoglikHistogram` with ``clean [N]``, ``perturbed [N, n_perturb]`` (on the CPU).
    """
    _check_model(model)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: expected a finite number > 0 (pixel units), got {eps!r}")
    if isinstance(n_perturb, bool) or not isinstance(n_perturb, int) or n_perturb < 1:
        raise ValueError(f"n_perturb: expected an integer >= 1, got {n_perturb!r}")
    if kind not in ("rademacher", "uniform"):
        raise ValueError(f"kind: expected 'rademacher' or 'uniform', got {kind!r}")
    device = _model_device(model)
    if isinstance(data, Tensor):
        _check_inputs(data)
        device = data.device
    elif not is_data(data):
        raise TypeError(f"data: expected a Tensor, Dataset or DataLoader, got {type(data).__name__}")
    clean, perturbed = [], []
    with eval_mode(model), torch.inference_mode():
        per_call: Optional[int] = None
        for _idx, x, _y in iter_batches(data, 256, limit=limit, progress=progress, desc="log p"):
            x = x.to(device)
            if per_call is None:
                per_call = max(1, resolve_batch_size(batch_size, model, x[:1]) // n_perturb)
            for i in range(0, x.shape[0], per_call):
                xb = x[i : i + per_call]
                rep = xb.unsqueeze(1).expand(-1, n_perturb, *xb.shape[1:])
                if kind == "rademacher":
                    d = torch.randint(0, 2, rep.shape, generator=generator, device=device).to(xb.dtype) * 2 - 1
                else:
                    d = torch.rand(rep.shape, generator=generator, device=device, dtype=xb.dtype) * 2 - 1
                xp = rep + eps * d
                if clip:
                    xp = xp.clamp(0, 1)
                clean.append(torch.logsumexp(model(xb), dim=-1).cpu())
                lp = torch.logsumexp(model(xp.flatten(0, 1)), dim=-1)
                perturbed.append(lp.view(-1, n_perturb).cpu())
    if not clean:
        raise ValueError("data: expected at least one sample, got none")
    return LoglikHistogram(torch.cat(clean), torch.cat(perturbed), float(eps), kind)
