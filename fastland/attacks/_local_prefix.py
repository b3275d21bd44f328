"""A model's local prefix, recomputed only where a square window changed the input.

A Square candidate differs from the current point in one ``side × side`` window. The
leading layers of a CNN up to its first max-pool are *local* (each output pixel reads a
fixed patch of the input), so the candidate's features after them differ from the current
point's only on the window's receptive field. :class:`LocalPrefix` splits such a model into

    ``model(x) = rest(features(x))``

and :meth:`LocalPrefix.update` recomputes ``features`` on a fixed-size block of output
pixels around each sample's window, from the matching patch of the input, and writes it into
a copy of the current features. Same layers and weights, smaller tensors: equal to the full
``features`` up to float rounding (the convolutions sum the same products on a smaller
image; tested to 1e-12 in float64).

Recognised: a :class:`fastland.models.Classifier` (with its ``Normalize``) or an
``nn.Sequential``, optionally inside :class:`~fastland.attacks._counting.CallCounter`, whose
first modules are a ``Conv2d`` (stride 1, any zero padding), then ``ReLU``, unpadded
stride-1 ``Conv2d`` and unpadded ``MaxPool2d`` (kernel = stride), up to the first
``MaxPool2d``, with no hooks and the unmodified ``forward``. Anything else: :func:`local_prefix`
returns None and the caller evaluates the whole model.

Shapes: ``x`` ``[n, C, H, W]``; ``features`` ``[n, C', H', W']``; ``top``, ``left`` ``[n]``
int64 window corners; the logits ``[n, K]``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fast_conv
from ._counting import CallCounter
from ._max_pool import max_pool

__all__ = ["LocalPrefix", "local_prefix", "run_forward", "forward_steps", "unwrap"]

_Layer = Tuple[int, int]  # (kernel, stride) of one local layer along one spatial dimension


def _pair(value: object) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _is_plain(module: nn.Module) -> bool:
    """No hooks and the class's own ``forward`` (a subclass could change what it computes)."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _local_layer(module: nn.Module, first: bool) -> Optional[Tuple[_Layer, _Layer]]:
    """``((k_h, s_h), (k_w, s_w))`` of a local layer this path supports, else None."""
    if type(module) is nn.ReLU:
        return (1, 1), (1, 1)
    if type(module) is nn.Conv2d:
        if module.stride != (1, 1) or module.dilation != (1, 1) or module.padding_mode != "zeros":
            return None
        if isinstance(module.padding, str) or (not first and module.padding != (0, 0)):
            return None
        kh, kw = module.kernel_size
        return (kh, 1), (kw, 1)
    if type(module) is nn.MaxPool2d:
        k, s = _pair(module.kernel_size), _pair(module.stride if module.stride is not None else module.kernel_size)
        if k != s or _pair(module.padding) != (0, 0) or _pair(module.dilation) != (1, 1) or module.ceil_mode:
            return None
        if module.return_indices:
            return None
        return (k[0], k[0]), (k[1], k[1])
    return None


def _affected(lo: Tensor, hi: Tensor, layers: List[_Layer], sizes: List[int]) -> Tuple[Tensor, Tensor]:
    """The output interval ``[lo, hi]`` (``[n]`` each, clipped) that an input interval reaches
    through ``layers`` (padding already applied to the input coordinates); ``sizes`` are the
    layers' output sizes."""
    for (k, s), size in zip(layers, sizes):
        lo = torch.div(lo - k + 1 + s - 1, s, rounding_mode="floor").clamp(min=0)
        hi = torch.div(hi, s, rounding_mode="floor").clamp(max=size - 1)
    return lo, hi


def _block(side: int, layers: List[_Layer], size: int) -> int:
    """The number of output pixels (one dimension) a window of ``side`` pixels can reach."""
    length = side
    for k, s in layers:
        length = (length + k - 2) // s + 1
    return min(length, size)


def _needed(block: int, layers: List[_Layer]) -> int:
    """The input pixels (one dimension, padded coordinates) that ``block`` outputs read."""
    length = block
    for k, s in reversed(layers):
        length = (length - 1) * s + k
    return length


def _pool_size(module: nn.Module) -> Optional[Tuple[int, int]]:
    """``(kh, kw)`` of a max-pool :func:`~fastland.attacks._max_pool.max_pool` computes
    (stride = kernel), else None."""
    if type(module) is nn.MaxPool2d and _is_plain(module) and _local_layer(module, False) is not None:
        return _pair(module.kernel_size)
    return None


def forward_steps(modules: List[nn.Module]) -> List[Callable[[Tensor], Tensor]]:
    """The steps of ``nn.Sequential(*modules)``, decided once: each max-pool of stride =
    kernel is :func:`~fastland.attacks._max_pool.max_pool`, taken before a ReLU that precedes
    it (``max`` and ReLU commute exactly, and so do their gradients: both send nothing where
    the window's maximum is ≤ 0 and route it to the window's first maximum elsewhere); any
    other module is called as it is. Values and gradients are those of the modules."""
    steps: List[Callable[[Tensor], Tensor]] = []
    i = 0
    while i < len(modules):
        module = modules[i]
        pool = _pool_size(modules[i + 1]) if i + 1 < len(modules) else None
        if type(module) is nn.ReLU and _is_plain(module) and pool is not None:
            steps.append(lambda z, k=pool: torch.relu(max_pool(z, *k)))
            i += 2
            continue
        own = _pool_size(module)
        steps.append((lambda z, k=own: max_pool(z, *k)) if own is not None else module)
        i += 1
    return steps


def run_forward(modules: List[nn.Module], z: Tensor) -> Tensor:
    """``nn.Sequential(*modules)(z)`` through :func:`forward_steps` (the same values)."""
    return _apply(forward_steps(modules), z)


def _apply(steps: List[Callable[[Tensor], Tensor]], z: Tensor) -> Tensor:
    for step in steps:
        z = step(z)
    return z


def _stride(layers: List[_Layer]) -> int:
    out = 1
    for _, s in layers:
        out *= s
    return out


class LocalPrefix:
    """``model(x) = rest(features(x))`` with a windowed :meth:`update` of ``features``.

    Built by :func:`local_prefix`; see the module's docstring.
    """

    def __init__(self, normalize: Optional[nn.Module], prefix: List[nn.Module], rest: List[nn.Module],
                 counter: Optional[CallCounter]) -> None:
        self.normalize = normalize
        self.first = prefix[0]
        # the windows' first convolution runs the module's own kernel (fast_conv's, where applied), so
        # that a window's features equal the whole forward's bit for bit
        self._conv = fast_conv.conv if fast_conv.is_applied(self.first) else F.conv2d
        self._prefix_steps = forward_steps(list(prefix))
        self._after_first = forward_steps(list(prefix)[1:])
        self._rest_steps = forward_steps(list(rest))
        self.counter = counter
        self.padding: Tuple[int, int] = _pair(self.first.padding)
        geometry = [_local_layer(m, i == 0) for i, m in enumerate(prefix)]
        self.rows: List[_Layer] = [g[0] for g in geometry]  # type: ignore[index]
        self.cols: List[_Layer] = [g[1] for g in geometry]  # type: ignore[index]

    def features(self, x: Tensor) -> Tensor:
        """``[n, C, H, W]`` → the prefix's output ``[n, C', H', W']``."""
        z = self.normalize(x) if self.normalize is not None else x
        return _apply(self._prefix_steps, z)

    def rest(self, features: Tensor) -> Tensor:
        """``[n, C', H', W']`` → logits ``[n, K]`` (counted as one model forward of ``n`` rows)."""
        logits = _apply(self._rest_steps, features)
        if self.counter is not None:
            self.counter._add(self.counter.stage, "forward", int(features.shape[0]))
        return logits

    def _sizes(self, h: int, layers: List[_Layer], pad: int) -> List[int]:
        sizes, length = [], h + 2 * pad
        for k, s in layers:
            length = (length - k) // s + 1
            sizes.append(length)
        return sizes

    def _start(self, corner: Tensor, side: int, layers: List[_Layer], size_in: int, pad: int,
               block: int) -> Tensor:
        sizes = self._sizes(size_in, layers, pad)
        lo, _ = _affected(corner + pad, corner + pad + side - 1, layers, sizes)
        return lo.clamp(max=sizes[-1] - block)

    def update(self, features: Tensor, x_new: Tensor, top: Tensor, left: Tensor, side: int) -> Tensor:
        """``features`` ``[n, C', H', W']`` of the current points with the block reached by each
        sample's window (corner ``top``, ``left`` ``[n]``, ``side`` pixels) recomputed from
        ``x_new`` ``[n, C, H, W]``, which may differ from the current points only there."""
        n, c, h, w = x_new.shape
        ph, pw = self.padding
        fh, fw = features.shape[2:]
        bh, bw = _block(side, self.rows, fh), _block(side, self.cols, fw)
        q_top = self._start(top, side, self.rows, h, ph, bh)  # [n], in feature pixels
        q_left = self._start(left, side, self.cols, w, pw, bw)
        z = self.normalize(x_new) if self.normalize is not None else x_new
        z = F.pad(z, (pw, pw, ph, ph))
        nh, nw = _needed(bh, self.rows), _needed(bw, self.cols)
        rows = q_top * _stride(self.rows)
        cols = q_left * _stride(self.cols)
        samples = torch.arange(n, device=x_new.device).view(n, 1, 1, 1)
        patch = z[samples, torch.arange(c, device=x_new.device).view(1, c, 1, 1),
                  (rows[:, None] + torch.arange(nh, device=x_new.device)).view(n, 1, nh, 1),
                  (cols[:, None] + torch.arange(nw, device=x_new.device)).view(n, 1, 1, nw)]
        out = self._conv(patch, self.first.weight, self.first.bias, groups=self.first.groups)
        out = _apply(self._after_first, out)
        k = features.shape[1]
        new = features.clone()
        new[samples, torch.arange(k, device=x_new.device).view(1, k, 1, 1),
            (q_top[:, None] + torch.arange(bh, device=x_new.device)).view(n, 1, bh, 1),
            (q_left[:, None] + torch.arange(bw, device=x_new.device)).view(n, 1, 1, bw)] = out
        return new


def unwrap(model: nn.Module) -> Optional[Tuple[Optional[CallCounter], Optional[nn.Module], nn.Sequential]]:
    """``(counter, normalize, body)`` of a model these paths recognise — a plain
    :class:`fastland.models.Classifier` (with its ``Normalize``) or ``nn.Sequential``,
    optionally inside a plain :class:`CallCounter` — else None."""
    from ..models import Classifier, Normalize

    counter = None
    if type(model) is CallCounter and _is_plain(model):
        counter, model = model, model.model
    if type(model) is Classifier and _is_plain(model):
        if type(model.normalize) is not Normalize or not _is_plain(model.normalize):
            return None
        return counter, model.normalize, model.body
    if type(model) is nn.Sequential and _is_plain(model):
        return counter, None, model
    return None


def local_prefix(model: nn.Module) -> Optional[LocalPrefix]:
    """The :class:`LocalPrefix` of ``model``, or None where this path does not apply."""
    parts = unwrap(model)
    if parts is None:
        return None
    counter, normalize, body = parts
    modules = list(body)
    end = None
    for i, module in enumerate(modules):
        if not _is_plain(module) or _local_layer(module, i == 0) is None or (i == 0 and type(module) is not nn.Conv2d):
            break
        if type(module) is nn.MaxPool2d:
            end = i + 1
            break
    if end is None or end == len(modules):
        return None
    return LocalPrefix(normalize, modules[:end], modules[end:], counter)
