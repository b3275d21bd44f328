"""First-layer linearity fusion (docs/design.md §2).

For a model ``f = rest ∘ L`` whose leading layers ``L`` are affine (input
normalisation, flatten, one ``Conv{1,2,3}d``/``Linear``, eval-mode BatchNorm),

    ``L(x + a·d1 + b·d2) = L(x) + a·L₀(d1) + b·L₀(d2)``

with ``L₀`` the linear part of ``L`` (biases and shifts dropped, zero padding
of the convolution applied to ``d`` — exact, because padding is linear). A
landscape then runs ``L`` three times per sample (``x``, ``d1``, ``d2``)
instead of once per grid point, and synthesises the grid in ``L``'s output
space with :func:`fastland.ops.grid_combine`.

Recognised structures (anything else: no fusion):

* a fastland ``Classifier`` (attributes ``normalize`` with ``mean``/``std``
  buffers and ``body``, an ``nn.Sequential``) — ``forward(x) = body(normalize(x))``;
* an ``nn.Sequential`` whose leading modules are a ``Normalize``-like module,
  ``nn.Flatten``/``nn.Identity``, then a ``Conv``/``Linear``.

Because a subclass may override ``forward``, callers verify the split against
``model(x)`` on the clean inputs before trusting it (:func:`verify_split`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fast_conv

__all__ = ["FirstLayerSplit", "split_first_layer", "verify_split"]

_AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RESHAPE = (nn.Flatten, nn.Identity)


@dataclass(frozen=True)
class FirstLayerSplit:
    """``model(x) == rest(affine(x))`` with ``affine(x + d) == affine(x) + linear(d)``.

    Attributes:
        lead: the leading affine modules, in order.
        rest: the remainder of the model, ``[B, *H] -> [B, C]``.
    """

    lead: Sequence[nn.Module]
    rest: nn.Module

    def affine(self, x: Tensor) -> Tensor:
        """``L(x)``: ``[B, *S] -> [B, *H]``."""
        for m in self.lead:
            x = m(x)
        return x

    def linear(self, d: Tensor) -> Tensor:
        """``L₀(d)``, the linear part of ``L``: ``[B, *S] -> [B, *H]``."""
        for m in self.lead:
            d = _linear_part(m, d)
        return d

    def transposable(self) -> bool:
        """True when :meth:`linear_transpose` knows every leading module (zero-padded convs only)."""
        return all(_transpose_known(m) for m in self.lead)

    def linear_transpose(self, g: Tensor, sample_shape: Sequence[int]) -> Tensor:
        """``L₀ᵀ g``, the adjoint of :meth:`linear` (the input gradient through ``L``).

        Args:
            g: ``[B, *H]``, a gradient w.r.t. ``L``'s output.
            sample_shape: ``S``, the per-sample input shape.
        Returns:
            ``[B, *S]``.
        """
        shapes = self._input_shapes(tuple(sample_shape), g.dtype, g.device)
        for m, shape in zip(reversed(self.lead), reversed(shapes)):
            g = _transpose_part(m, g, (g.shape[0], *shape))
        return g

    def _input_shapes(self, sample_shape: Tuple[int, ...], dtype: torch.dtype,
                      device: torch.device) -> List[Tuple[int, ...]]:
        """Per-sample input shape of each leading module (one probe of one sample)."""
        shapes = []
        d = torch.zeros((1, *sample_shape), dtype=dtype, device=device)
        with torch.no_grad():
            for m in self.lead:
                shapes.append(tuple(d.shape[1:]))
                d = _linear_part(m, d)
        return shapes


def _is_normalize(m: nn.Module) -> bool:
    """A per-channel ``(x - mean) / std`` module (fastland.models.Normalize or alike)."""
    return (
        type(m).__name__ == "Normalize"
        and isinstance(getattr(m, "mean", None), Tensor)
        and isinstance(getattr(m, "std", None), Tensor)
    )


def _is_eval_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, _BATCHNORM) and not m.training and m.running_var is not None


def _channel_shape(d: Tensor) -> List[int]:
    """``[1, C, 1, ...]`` broadcasting a per-channel vector over ``d`` ``[B, C, ...]``."""
    return [1, -1] + [1] * (d.dim() - 2)


def _linear_part(m: nn.Module, d: Tensor) -> Tensor:
    """Apply the linear part of the affine module ``m`` to ``d``."""
    if _is_normalize(m):
        return d / m.std  # type: ignore[operator]
    if isinstance(m, _RESHAPE):
        return m(d)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return m._conv_forward(d, m.weight, None)
    if isinstance(m, nn.Linear):
        return F.linear(d, m.weight)
    if _is_eval_batchnorm(m):
        scale = torch.rsqrt(m.running_var + m.eps)  # type: ignore[operator]
        if m.weight is not None:
            scale = scale * m.weight
        return d * scale.view(_channel_shape(d))
    raise TypeError(f"no linear part known for {type(m).__name__}")  # pragma: no cover


def _transpose_known(m: nn.Module) -> bool:
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return True


# the first layer's adjoint: the fast exact input gradient of fastland.fast_conv (same arguments as
# torch.nn.grad.conv{n}d_input), which routes around the slow oneDNN kernel for few input channels
_CONV_INPUT_GRAD = {n: fast_conv.conv_input_grad for n in (1, 2, 3)}


def _transpose_part(m: nn.Module, g: Tensor, in_shape: Tuple[int, ...]) -> Tensor:
    """The adjoint of :func:`_linear_part` for module ``m``: ``g`` -> gradient w.r.t. its input ``in_shape``."""
    if _is_normalize(m):
        return g / m.std  # type: ignore[operator]
    if isinstance(m, _RESHAPE):
        return g.reshape(in_shape)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        grad = _CONV_INPUT_GRAD[m.weight.dim() - 2]
        return grad(in_shape, m.weight, g, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, nn.Linear):
        return g @ m.weight
    if _is_eval_batchnorm(m):
        return _linear_part(m, g)  # a diagonal map is its own adjoint
    raise TypeError(f"no adjoint known for {type(m).__name__}")  # pragma: no cover


def _split_sequence(modules: Sequence[nn.Module]) -> Optional[int]:
    """Number of leading affine modules (prefix, one Conv/Linear, eval BatchNorms), or None."""
    i = 0
    while i < len(modules) and (_is_normalize(modules[i]) or isinstance(modules[i], _RESHAPE)):
        i += 1
    if i >= len(modules) or not isinstance(modules[i], _AFFINE):
        return None
    i += 1
    while i < len(modules) and _is_eval_batchnorm(modules[i]):
        i += 1
    return i


def split_first_layer(model: nn.Module) -> Optional[FirstLayerSplit]:
    """The first-layer split of ``model``, or None when its structure is not recognised.

    The model must already be in the mode it will be evaluated in (eval):
    BatchNorm layers are absorbed only in eval mode.
    """
    prefix: List[nn.Module] = []
    seq: Optional[nn.Sequential] = None
    if isinstance(model, nn.Sequential):
        seq = model
    else:
        norm, body = getattr(model, "normalize", None), getattr(model, "body", None)
        if isinstance(norm, nn.Module) and _is_normalize(norm) and isinstance(body, nn.Sequential):
            prefix, seq = [norm], body
    if seq is None:
        return None
    modules = list(seq)
    k = _split_sequence(modules)
    if k is None:
        return None
    rest = seq[k:] if k < len(modules) else nn.Identity()
    return FirstLayerSplit(lead=tuple(prefix + modules[:k]), rest=rest)


def verify_split(
    split: FirstLayerSplit, x: Tensor, logits: Tensor, atol: float, rtol: float
) -> bool:
    """True when ``split.rest(split.affine(x))`` reproduces ``logits = model(x)``.

    Catches models whose ``forward`` is not ``rest ∘ lead`` (e.g. a subclass
    with its own ``forward``), so that fusion never changes a result.

    Args:
        x: ``[B, *S]`` inputs; logits: ``[B, C]`` from ``model(x)``.
    """
    try:
        fused = split.rest(split.affine(x))
    except (RuntimeError, ValueError, TypeError):
        return False
    return fused.shape == logits.shape and bool(torch.allclose(fused, logits, atol=atol, rtol=rtol))
