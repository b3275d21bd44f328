"""The grid driver shared by :func:`fastland.landscape` and :func:`fastland.flatness`.

Both evaluate a model on the grid ``x + a·d1 + b·d2`` around every sample. This
module plans the work with **one probe forward** (on at most 8 samples): it
checks that the model returns logits ``[B, C]``, measures the activation bytes
of one point (for ``batch_size="auto"``: a budget of a quarter of the free CUDA
memory or :data:`CPU_BUDGET_BYTES` on the CPU, capped by :data:`MAX_AUTO_POINTS`)
and verifies the first-layer split (when the first layer is affine the grid is
formed after it: ``L(x + a·d1 + b·d2) = L(x) + a·L₀(d1) + b·L₀(d2)``, so it runs 3
times per sample instead of once per point). Then :func:`grid_chunks` yields the
grid points in model-call-sized chunks.

Shapes: ``N`` samples (or ``n·N`` rows for several direction pairs), ``S`` the
per-sample shape, ``H`` the first layer's output shape, ``G`` grid points.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._fusion import FirstLayerSplit, split_first_layer, verify_split

__all__ = ["CPU_BUDGET_BYTES", "MAX_AUTO_POINTS", "eval_mode", "check_logits", "GridPlan", "plan",
           "grid_axis", "flat_grid", "grid_chunks", "ams_scores", "chunk_ams_scores"]

CPU_BUDGET_BYTES = 512 * 2**20
MAX_AUTO_POINTS = 4096
PROBE_SAMPLES = 8


@contextlib.contextmanager
def module_mode(model: nn.Module, training: Optional[bool]) -> Iterator[nn.Module]:
    """Set ``model.train(training)`` (``None``: leave it); restore every submodule's own mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    if training is not None:
        model.train(training)
    try:
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training


def eval_mode(model: nn.Module) -> "contextlib.AbstractContextManager[nn.Module]":
    """Put ``model`` (every submodule) in eval mode; restore each module's mode on exit.

    The one train-mode policy of the library: functions that measure a model
    (landscapes, flatness, AMS scores, attacks) evaluate it in eval mode
    (BatchNorm running statistics, no dropout) and leave it as they found it.
    """
    return module_mode(model, False)


def check_logits(out: object, x: Tensor) -> Tensor:
    """``out = model(x)`` must be logits ``[B, C]`` for ``x`` ``[B, *S]``; else one clear error."""
    if not isinstance(out, Tensor):
        kind = type(out).__name__
        raise TypeError(f"model: expected it to return logits, a [B, C] tensor, got a {kind}; "
                        "wrap it so that forward returns the logits (e.g. lambda x: model(x)[0] in an nn.Module)")
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"model: expected logits of shape [{x.shape[0]}, C] for x of shape {tuple(x.shape)}, "
                         f"got {tuple(out.shape)}")
    return out


def _check_batch_size(batch_size: Union[int, str]) -> None:
    if isinstance(batch_size, bool) or not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size >= 1)):
        raise ValueError(f"batch_size: expected a positive int or 'auto', got {batch_size!r}")


def check_fuse(fuse_first_layer: Union[bool, str]) -> None:
    if fuse_first_layer not in (True, False, "auto"):
        raise ValueError(f"fuse_first_layer: expected True, False or 'auto', got {fuse_first_layer!r}")


def _budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 4
    return CPU_BUDGET_BYTES


def _probe(model: nn.Module, x: Tensor, measure: bool) -> Tuple[Tensor, int]:
    """One forward of ``x[:PROBE_SAMPLES]``: ``(logits [k, C], activation bytes of one sample)``."""
    xp = x[:PROBE_SAMPLES]
    sizes: List[int] = [xp.numel() * xp.element_size()]

    def hook(_m: nn.Module, _inp: object, out: object) -> None:
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    leaves = [m for m in model.modules() if not list(m.children())] if measure else []
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            try:
                out = model(xp)
            except RuntimeError as e:  # name the user's input, not the probe's slice of it
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"x: the model cannot take inputs of shape {tuple(x.shape)} "
                                 f"(per sample {tuple(x.shape[1:])}): {first}") from None
            logits = check_logits(out, xp)
    finally:
        for h in handles:
            h.remove()
    return logits, max(1, sum(sizes) // xp.shape[0])


class GridPlan(NamedTuple):
    """How the grid goes through the model: points per call, the first-layer split, the layout."""

    per_call: int
    split: Optional[FirstLayerSplit]
    channels_last: bool


def _prefers_channels_last(model: nn.Module, x: Tensor) -> bool:
    """4-D grid points of more than one channel are laid out channels-last on the CPU
    when the model has convolutions (oneDNN measured 1.3–1.5× faster for DDNet)."""
    return x.device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def plan(model: nn.Module, x: Tensor, *, batch_size: Union[int, str], fuse_first_layer: Union[bool, str],
         backward: bool) -> GridPlan:
    """Plan a grid run over ``x`` ``[N, *S]`` with one probe forward (model in eval mode).

    Args:
        batch_size: grid points per model call, or ``"auto"``.
        fuse_first_layer: True, False or ``"auto"``.
        backward: the points also go through a backward pass (budget 3× the forward's bytes;
            the fusion then needs the first layer's adjoint).
    """
    _check_batch_size(batch_size)
    check_fuse(fuse_first_layer)
    if batch_size != "auto" and (fuse_first_layer is False or split_first_layer(model) is None):
        if fuse_first_layer is True:
            raise _unfusable(model)
        return GridPlan(int(batch_size), None, _prefers_channels_last(model, x))  # nothing to measure: no probe
    xp = x[:PROBE_SAMPLES]
    logits, per_point = _probe(model, x, measure=batch_size == "auto")
    if batch_size == "auto":
        per_call = int(max(1, min(MAX_AUTO_POINTS, _budget(x.device) // (per_point * (3 if backward else 1)))))
    else:
        per_call = int(batch_size)
    split = _fusion_split(model, xp, logits, fuse_first_layer)
    if split is not None and backward and not split.transposable():
        if fuse_first_layer is True:
            raise ValueError("fuse_first_layer: True needs zero-padded convolutions for flatness "
                             "(the adjoint of the first layer); use 'auto' or False")
        split = None
    return GridPlan(per_call, split, _prefers_channels_last(model, x))


def _fusion_split(model: nn.Module, xp: Tensor, logits: Tensor, fuse: Union[bool, str]
                  ) -> Optional[FirstLayerSplit]:
    """The first-layer split to use, verified against the probe's ``logits = model(xp)``."""
    if fuse is False:
        return None
    split = split_first_layer(model)
    atol, rtol = (1e-10, 1e-8) if xp.dtype == torch.float64 else (1e-4, 1e-4)
    with torch.no_grad():
        ok = split is not None and verify_split(split, xp, logits, atol=atol, rtol=rtol)
    if fuse is True and not ok:
        raise _unfusable(model)
    return split if ok else None


def _unfusable(model: nn.Module) -> ValueError:
    return ValueError(
        "fuse_first_layer: True needs a model whose first layer is affine (an nn.Sequential starting "
        "with [Normalize, Flatten] Conv/Linear, or a fastland Classifier), got "
        f"{type(model).__name__} whose structure was not recognised; use 'auto' or False"
    )


def grid_axis(span: float, points: int, dtype: torch.dtype = torch.float32,
              device: Union[str, torch.device, None] = None) -> Tensor:
    """``points`` evenly spaced values on ``[-span, span]`` (``[0]`` for one point), unchecked: ``[points]``.

    Computed in float64, then cast; the centre is exactly 0 for odd ``points``.
    """
    if points == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    half = (points - 1) / 2
    k = torch.arange(points, dtype=torch.float64, device=device) - half
    return (k * (span / half)).to(dtype)


def flat_grid(alphas: Tensor, betas: Tensor) -> Tuple[Tensor, Tensor]:
    """Grid points ``(a [G], b [G])``, ``G = Sb·Sa``, alphas varying fastest."""
    return alphas.repeat(betas.shape[0]), betas.repeat_interleave(alphas.shape[0])


def _chunks(n_samples: int, n_points: int, per_call: int) -> Iterator[Tuple[int, int, int, int]]:
    """``(i0, i1, g0, g1)`` blocks of (samples, grid points), ≤ ``per_call`` points each (at least one)."""
    nb = max(1, per_call // n_points)
    gb = min(n_points, per_call) if nb == 1 else n_points
    for i0 in range(0, n_samples, nb):
        for g0 in range(0, n_points, gb):
            yield i0, min(i0 + nb, n_samples), g0, min(g0 + gb, n_points)


def sample_blocks(n_samples: int, n_points: int, per_call: int, min_block: int = 64) -> Iterator[Tuple[int, int]]:
    """``(i0, i1)`` blocks of samples: whole model calls' worth, at least ``min_block`` samples
    (they bound the memory of the first-layer outputs)."""
    step = max(min_block, per_call // n_points)
    for i0 in range(0, n_samples, step):
        yield i0, min(i0 + step, n_samples)


def _synthesize(h0: Tensor, hu: Tensor, hv: Tensor, a: Tensor, b: Tensor, channels_last: bool) -> Tensor:
    """Grid points ``h0 + a·hu + b·hv`` flattened to ``[n·g, *H]``; channels-last for 4-D points of
    more than one channel when asked (written directly in that layout by ``grid_combine``).

    Args:
        h0, hu, hv: ``[n, *H]``; a, b: ``[g]``.
    """
    from . import ops  # here, not at import: the attacks and defences use this module without the ops

    if not (channels_last and h0.dim() == 4 and h0.shape[1] > 1):
        return ops.grid_combine(h0, hu, hv, a, b).flatten(0, 1)
    nhwc = [t.permute(0, 2, 3, 1).contiguous() for t in (h0, hu, hv)]
    out = ops.grid_combine(nhwc[0], nhwc[1], nhwc[2], a, b)  # [n, g, H, W, C]
    return out.permute(0, 1, 4, 2, 3).flatten(0, 1)  # [n·g, C, H, W], channels-last strides


def grid_chunks(
    p: GridPlan, base: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor,
    block: Optional[Iterator[Tuple[int, int]]] = None,
) -> Iterator[Tuple[int, int, int, int, Tensor]]:
    """The grid points ``base[i] + a[g]·u[i] + b[g]·v[i]`` in model-call-sized chunks.

    Args:
        p: the :func:`plan`; base, u, v: ``[M, *S]``; a, b: ``[G]``.
    Yields:
        ``(i0, i1, g0, g1, pts)`` with ``pts`` ``[(i1-i0)·(g1-g0), *H]`` — inputs of
        ``p.split.rest`` when fused, else of the model.
    """
    M, G = base.shape[0], a.shape[0]
    for s0, s1 in sample_blocks(M, G, p.per_call):
        with torch.no_grad():
            if p.split is not None:
                h0, hu, hv = p.split.affine(base[s0:s1]), p.split.linear(u[s0:s1]), p.split.linear(v[s0:s1])
            else:
                h0, hu, hv = base[s0:s1], u[s0:s1], v[s0:s1]
        for j0, j1, g0, g1 in _chunks(s1 - s0, G, p.per_call):
            with torch.no_grad():
                pts = _synthesize(h0[j0:j1], hu[j0:j1], hv[j0:j1], a[g0:g1], b[g0:g1], p.channels_last)
            yield s0 + j0, s0 + j1, g0, g1, pts


def ams_scores(model: nn.Module, x: Tensor) -> Tensor:
    """``s(x) = -‖∇x log p(x)‖₂`` for one batch that fits in memory (no checks; model in eval mode).

    Args:
        x: ``[B, *S]``.
    Returns:
        ``[B]``, detached.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        lse = torch.logsumexp(check_logits(model(xg), xg), dim=-1)
        (grad,) = torch.autograd.grad(lse.sum(), xg)
    return -grad.flatten(1).norm(dim=1)


def fused_ams_scores(split: FirstLayerSplit, h: Tensor, sample_shape: Tuple[int, ...]) -> Tensor:
    """AMS scores of the points whose first-layer outputs are ``h`` ``[B, *H]``: ``[B]``.

    ``∇x log p = L₀ᵀ ∇h log p``: autograd through the rest of the model, then the
    first layer's adjoint (the same input-gradient kernel autograd would run).
    """
    with torch.enable_grad():
        hg = h.detach().requires_grad_(True)
        lse = torch.logsumexp(split.rest(hg), dim=-1)
        (gh,) = torch.autograd.grad(lse.sum(), hg)
    with torch.no_grad():
        return -split.linear_transpose(gh, sample_shape).flatten(1).norm(dim=1)


def chunk_ams_scores(p: GridPlan, model: nn.Module, pts: Tensor, sample_shape: Tuple[int, ...]) -> Tensor:
    """AMS scores of one chunk ``pts`` of :func:`grid_chunks` (first-layer outputs when ``p`` fuses): ``[B]``."""
    return fused_ams_scores(p.split, pts, sample_shape) if p.split is not None else ams_scores(model, pts)
