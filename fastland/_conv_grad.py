"""The spec, kernels and autograd Functions behind :mod:`fastland.fast_conv`.

A convolution's input gradient ``Aᵀ g`` by the ``"flip"`` route (a stride-1 conv of ``g``
with the flipped, transposed kernel) or the ``"native"`` one (PyTorch's own
``convolution_backward``), both with oneDNN off for that one call; the forward and the
weight gradient stay oneDNN's. Three ``autograd.Function`` s built from each other, so the
backward is differentiable to any order. Shapes as in :mod:`fastland.fast_conv`.

The input gradient is also skipped where nobody will read it: when every path below the
layer's input ends in a leaf marked :func:`mark_grad_on_request` (the penalties' input
copies, :func:`fastland.penalty_input`) and no :func:`grad_requested` block asks for it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor

from ._ext import extension_available

__all__ = ["FLIP_MAX_OUT_CHANNELS", "ConvSpec", "make_spec", "route", "conv_fn", "input_grad", "weight_grad",
           "mark_grad_on_request", "is_grad_on_request", "grad_requested"]

# 2-D "flip" beats "native" for few output channels (LeNet's 6: 1.6 vs 3.1 ms), loses for 32 and more.
FLIP_MAX_OUT_CHANNELS = 16


@dataclass(frozen=True)
class ConvSpec:
    """A convolution's geometry: ``stride``, ``padding`` (explicit, zero), ``dilation`` as
    ``n`` ints each (``n`` = 1, 2 or 3 spatial dims), and ``groups``."""

    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int = 1

    @property
    def ndim(self) -> int:
        """Number of spatial dims ``n``."""
        return len(self.stride)


def _tuple(name: str, value: Union[int, Sequence[int]], n: int) -> Tuple[int, ...]:
    """``value`` as ``n`` ints (an int is repeated)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    out = tuple(value)
    if len(out) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{name}: expected an int or {n} ints, got {value!r}")
    return out


def make_spec(n: int, stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0,
              dilation: Union[int, Sequence[int]] = 1, groups: int = 1) -> ConvSpec:
    """A validated :class:`ConvSpec` for ``n`` spatial dims (``padding`` explicit ints); built once per
    distinct geometry (a layer's calls reuse it)."""
    args = tuple(a if isinstance(a, (int, tuple)) else tuple(a) for a in (stride, padding, dilation))
    try:
        return _spec(n, *args, groups)
    except TypeError:  # unhashable (e.g. a tensor among the values): validated uncached
        return _spec.__wrapped__(n, *args, groups)


@functools.lru_cache(maxsize=256)
def _spec(n: int, stride: Union[int, Tuple[int, ...]], padding: Union[int, Tuple[int, ...]],
          dilation: Union[int, Tuple[int, ...]], groups: int) -> ConvSpec:
    spec = ConvSpec(_tuple("stride", stride, n), _tuple("padding", padding, n),
                    _tuple("dilation", dilation, n), groups)
    for name, values, low in (("stride", spec.stride, 1), ("padding", spec.padding, 0),
                              ("dilation", spec.dilation, 1)):
        if min(values) < low:
            raise ValueError(f"{name}: expected ints >= {low}, got {values}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    return spec


# --------------------------------------------------------------------------- the kernels


@contextlib.contextmanager
def _onednn_off() -> Iterator[None]:
    """oneDNN disabled for the calls inside (a process-wide flag, restored on exit)."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def route(weight: Tensor, spec: ConvSpec) -> str:
    """The input-gradient route for ``weight`` ``[O, C/groups, *k]`` and ``spec``: ``"flip"`` or ``"native"``.

    ``"flip"`` needs a 2-D conv, stride 1, one group and ``p <= d·(k−1)``, and is chosen for at most
    :data:`FLIP_MAX_OUT_CHANNELS` output channels; ``"native"`` handles the rest.
    """
    k = weight.shape[2:]
    flip_ok = (
        spec.ndim == 2  # 1-D and 3-D flipped convolutions without oneDNN were measured slower
        and spec.groups == 1
        and all(s == 1 for s in spec.stride)
        and all(d * (kk - 1) >= p for d, kk, p in zip(spec.dilation, k, spec.padding))
        and weight.shape[0] <= FLIP_MAX_OUT_CHANNELS
    )
    return "flip" if flip_ok else "native"


# The C++ weight gradient for one input channel is taken up to this many output channels (LeNet-5's 6:
# 0.71 ms against oneDNN's 1.02; DDNet's 32: 1.95 against 1.46; one thread, batch 128, groups
# conv-first-layer-weight-grad-* of benchmarks/bench_conv.py).
ONE_CHANNEL_WEIGHT_GRAD_MAX_OUT = 16


@functools.lru_cache(maxsize=256)
def _unit_geometry(spec: ConvSpec) -> bool:
    """2-D, stride 1, dilation 1, one group: the geometry the one-channel kernels compute."""
    return (spec.ndim == 2 and spec.groups == 1 and all(s == 1 for s in spec.stride)
            and all(d == 1 for d in spec.dilation))


_KERNEL_DTYPES = (torch.float32, torch.float64)


def one_channel_kernels(w: Tensor, spec: ConvSpec, *tensors: Optional[Tensor]) -> bool:
    """Whether the C++ kernels for one input channel serve a convolution of weight ``w``
    ``[O, 1, kh, kw]`` and ``spec`` on ``tensors`` (the other operands; None skipped): a 2-D,
    stride-1, undilated, one-group convolution of a single input channel, float32/float64 CPU
    tensors of one dtype, none under a ``torch.func`` transform or vmap, the extension loaded."""
    if not (w.dim() == 4 and w.shape[1] == 1 and w.device.type == "cpu" and w.dtype in _KERNEL_DTYPES
            and _unit_geometry(spec)):
        return False
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != w.dtype or _batched(t)):
            return False
    return extension_available() and not _batched(w)  # no kernel of ours reads a functorch wrapper


def _input_grad_kernel(g: Tensor, w: Tensor, input_shape: Sequence[int], spec: ConvSpec) -> Tensor:
    """``Aᵀ g``: ``g`` ``[B, O, *H']``, ``w`` ``[O, C/groups, *k]`` → ``[B, C, *H]`` (no autograd).

    One input channel (LeNet-5's first layer) on the CPU: the C++ kernel (0.54 ms against the
    flip's 1.77 for LeNet-5 at batch 128, one thread; see benchmarks/notes/conv.md)."""
    if one_channel_kernels(w, spec, g):
        from . import _C

        return _C.conv_input_grad_1ch(g, w, int(input_shape[2]), int(input_shape[3]), spec.padding[0],
                                      spec.padding[1])
    if route(w, spec) == "flip":
        n = spec.ndim
        wt = w.transpose(0, 1).flip(list(range(2, 2 + n)))
        pad = [d * (kk - 1) - p for d, kk, p in zip(spec.dilation, w.shape[2:], spec.padding)]
        with _onednn_off():
            return torch.ops.aten.convolution(g, wt, None, [1] * n, pad, list(spec.dilation),
                                              False, [0] * n, 1)
    with _onednn_off():
        return _input_grad_d(g, w, input_shape, spec, native=True)


def _weight_grad_kernel(x: Tensor, g: Tensor, weight_shape: Sequence[int], spec: ConvSpec) -> Tensor:
    """``∂⟨conv(x, w), g⟩/∂w``: ``x`` ``[B, C, *H]``, ``g`` ``[B, O, *H']`` → ``[O, C/groups, *k]``.

    One input channel and at most :data:`ONE_CHANNEL_WEIGHT_GRAD_MAX_OUT` output channels on the
    CPU: the C++ kernel; elsewhere aten's."""
    return _weight_and_bias_grad(x, g, weight_shape, spec, False)[0]


def _weight_and_bias_grad(x: Tensor, g: Tensor, weight_shape: Sequence[int], spec: ConvSpec,
                          bias: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``(∂/∂w, ∂/∂b)`` of ``⟨conv(x, w, b), g⟩`` (the second None unless ``bias``), in one pass
    over ``g`` where the C++ kernel serves (see :func:`_weight_grad_kernel`)."""
    w_like = g.new_empty(1).expand(tuple(weight_shape))
    if (weight_shape[0] <= ONE_CHANNEL_WEIGHT_GRAD_MAX_OUT and x.dim() == 4
            and one_channel_kernels(w_like, spec, x, g)):
        from . import _C

        dw, db = _C.conv_weight_grad_1ch(x, g, int(weight_shape[2]), int(weight_shape[3]), spec.padding[0],
                                         spec.padding[1], bias)
        return dw, db
    grads = torch.ops.aten.convolution_backward(
        g, x, w_like, [int(weight_shape[0])] if bias else None, list(spec.stride), list(spec.padding),
        list(spec.dilation), False, [0] * spec.ndim, spec.groups, [False, True, bias])
    return grads[1], grads[2] if bias else None


def _conv_kernel(x: Tensor, w: Tensor, b: Optional[Tensor], spec: ConvSpec) -> Tensor:
    """The ordinary convolution ``[B, C, *H]`` → ``[B, O, *H']``: the C++ kernel for one input
    channel on the CPU (0.49 ms against oneDNN's 1.02 for LeNet-5 at batch 128, one thread), aten's
    elsewhere."""
    if x.dim() == 4 and one_channel_kernels(w, spec, x, b):
        from . import _C

        return _C.conv_forward_1ch(x, w, b, spec.padding[0], spec.padding[1])
    n = spec.ndim
    return torch.ops.aten.convolution(x, w, b, list(spec.stride), list(spec.padding),
                                      list(spec.dilation), False, [0] * n, spec.groups)


# --------------------------------------------------------------------------- autograd


# --------------------------------------------------------------------------- gradients on request

_ON_REQUEST = "_fastland_grad_on_request"  # attribute of a leaf whose gradient is computed on request only
_marked = [0]  # leaves ever marked in this process: no graph walk until the first
_WALK_BUDGET = 16  # nodes visited below a layer's input before giving up (and computing the gradient)
_ACCUMULATE = torch._C._functions.AccumulateGrad


class _Requests(threading.local):
    ids: Set[int]

    def __init__(self) -> None:
        self.ids = set()


_requests = _Requests()


def _drop_grad(t: Tensor) -> None:
    t.grad = None


def mark_grad_on_request(t: Tensor) -> Tensor:
    """Mark the leaf ``t`` (requiring grad) so that backward passes compute its gradient only
    inside a :func:`grad_requested` block for it; returns ``t``.

    Outside such a block the fast layers skip the input gradient that only ``t`` would
    receive, and ``t.grad`` stays None whatever the model (a gradient that reaches it through
    other layers is dropped after accumulation).
    """
    if not (t.is_leaf and t.requires_grad):
        raise ValueError(f"t: expected a leaf tensor that requires grad, got is_leaf={t.is_leaf}, "
                         f"requires_grad={t.requires_grad}")
    if not getattr(t, _ON_REQUEST, False):
        setattr(t, _ON_REQUEST, True)
        t.register_post_accumulate_grad_hook(_drop_grad)
        _marked[0] += 1
    return t


def is_grad_on_request(t: Tensor) -> bool:
    """Whether ``t`` was marked by :func:`mark_grad_on_request`."""
    return bool(getattr(t, _ON_REQUEST, False))


@contextlib.contextmanager
def grad_requested(t: Tensor) -> Iterator[None]:
    """Backward passes run inside (on this thread) compute the gradient of ``t`` as usual."""
    key = id(t)
    fresh = key not in _requests.ids
    _requests.ids.add(key)
    try:
        yield
    finally:
        if fresh:
            _requests.ids.discard(key)


def _unwanted(node: Any) -> bool:
    """Whether every path down the graph from ``node`` ends in a leaf marked grad-on-request
    and not requested (so the gradient flowing into ``node`` would be thrown away).
    Walks at most :data:`_WALK_BUDGET` nodes; False when it cannot tell."""
    stack, seen, found = [node], 0, False
    while stack:
        n = stack.pop()
        if n is None:
            continue
        seen += 1
        if seen > _WALK_BUDGET:
            return False
        if isinstance(n, _ACCUMULATE):  # a leaf
            var = n.variable
            if not getattr(var, _ON_REQUEST, False) or id(var) in _requests.ids:
                return False
            found = True
            continue
        stack.extend(fn for fn, _ in n.next_functions)
    return found


def _engine_needs(ctx: Any, i: int) -> bool:
    """Whether the running backward will use the gradient of input ``i`` (``ctx.needs_input_grad``
    is static: an ``autograd.grad(loss, x)`` would otherwise also pay for the weight gradient),
    and whether anybody reads it (see :func:`mark_grad_on_request`)."""
    if not ctx.needs_input_grad[i]:
        return False
    try:
        node = ctx.next_functions[i][0]
        if node is None:
            return True
        if not torch._C._will_engine_execute_node(node):
            return False
    except (AttributeError, RuntimeError):  # no engine running (vmap, functorch) or an older torch
        return True
    return not (_marked[0] and _unwanted(node))


def _batched(*ts: Tensor) -> bool:
    """True for a vmapped tensor (the legacy vmap of ``autograd.grad(..., is_grads_batched=True)``
    or a ``torch.func`` transform): there a Function's outputs would not join the outer autograd
    graph, so the backward uses plain aten ops, which autograd differentiates itself."""
    f = torch._C._functorch
    try:
        return f.maybe_current_level() is not None or any(
            bool(f.is_legacy_batchedtensor(t) or f.is_batchedtensor(t)) for t in ts)
    except AttributeError:  # pragma: no cover - an older torch
        return False


# In a backward without create_graph (grad mode off) the three differentiable pieces below call
# their kernels directly: the same values without an autograd.Function round trip each.


def _conv_d(x: Tensor, w: Tensor, spec: ConvSpec, native: bool) -> Tensor:
    """Differentiable ``conv(x, w)`` (no bias): by aten itself when ``native``, else :func:`conv_fn`."""
    if native or not torch.is_grad_enabled():
        return _conv_kernel(x, w, None, spec)
    return conv_fn(x, w, None, spec)


def _input_grad_d(g: Tensor, w: Tensor, shape: Sequence[int], spec: ConvSpec, native: bool) -> Tensor:
    """Differentiable ``Aᵀ g``: by ``aten.convolution_backward`` when ``native``, else :func:`input_grad`."""
    if not native:
        if not torch.is_grad_enabled():
            return _input_grad_kernel(g, w, shape, spec)
        return input_grad(g, w, shape, spec)
    return torch.ops.aten.convolution_backward(
        g, g.new_empty(1).expand(tuple(shape)), w, None, list(spec.stride), list(spec.padding),
        list(spec.dilation), False, [0] * spec.ndim, spec.groups, [True, False, False])[0]


def _weight_grad_d(x: Tensor, g: Tensor, shape: Sequence[int], spec: ConvSpec, native: bool) -> Tensor:
    """Differentiable weight gradient: by aten when ``native``, else :func:`weight_grad`."""
    if native or not torch.is_grad_enabled():
        return _weight_grad_kernel(x, g, shape, spec)
    return weight_grad(x, g, shape, spec)


class _Conv(torch.autograd.Function):
    """``conv(x, w, b)`` whose backward takes the fast input-gradient route."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Optional[Tensor], spec: ConvSpec) -> Tensor:
        return _conv_kernel(x, w, b, spec)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        x, w, b, spec = inputs
        ctx.save_for_backward(x, w)
        ctx.spec, ctx.has_bias = spec, b is not None

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, w = ctx.saved_tensors
        native = _batched(g, x)
        gx = _input_grad_d(g, w, x.shape, ctx.spec, native) if _engine_needs(ctx, 0) else None
        need_w, need_b = _engine_needs(ctx, 1), ctx.has_bias and _engine_needs(ctx, 2)
        if need_w and need_b and not (native or torch.is_grad_enabled()):  # one pass over g for both
            gw, gb = _weight_and_bias_grad(x, g, w.shape, ctx.spec, True)
        else:
            gw = _weight_grad_d(x, g, w.shape, ctx.spec, native) if need_w else None
            gb = g.sum(dim=[0, *range(2, g.dim())]) if need_b else None
        return gx, gw, gb, None


class _InputGrad(torch.autograd.Function):
    """``Aᵀ g`` as a function of ``(g, w)``: VJP ``c ↦ (conv(c, w), weight_grad(c, g))``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, w: Tensor, input_shape: Tuple[int, ...], spec: ConvSpec) -> Tensor:
        return _input_grad_kernel(g, w, input_shape, spec)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        g, w, _, spec = inputs
        ctx.save_for_backward(g, w)
        ctx.spec = spec

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> Tuple[Optional[Tensor], ...]:
        g, w = ctx.saved_tensors
        native = _batched(c, g)
        dg = _conv_d(c, w, ctx.spec, native) if _engine_needs(ctx, 0) else None
        dw = _weight_grad_d(c, g, w.shape, ctx.spec, native) if _engine_needs(ctx, 1) else None
        return dg, dw, None, None


class _WeightGrad(torch.autograd.Function):
    """``∂⟨conv(x, w), g⟩/∂w`` as a function of ``(x, g)``: VJP ``c ↦ (input_grad(g, c), conv(x, c))``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, g: Tensor, weight_shape: Tuple[int, ...], spec: ConvSpec) -> Tensor:
        return _weight_grad_kernel(x, g, weight_shape, spec)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
        x, g, _, spec = inputs
        ctx.save_for_backward(x, g)
        ctx.spec = spec

    @staticmethod
    def backward(ctx: Any, c: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, g = ctx.saved_tensors
        native = _batched(c, x, g)
        dx = _input_grad_d(g, c, x.shape, ctx.spec, native) if _engine_needs(ctx, 0) else None
        dg = _conv_d(x, c, ctx.spec, native) if _engine_needs(ctx, 1) else None
        return dx, dg, None, None


def conv_fn(x: Tensor, w: Tensor, b: Optional[Tensor], spec: ConvSpec) -> Tensor:
    """Differentiable ``conv(x, w, b)``: ``[B, C, *H]``, ``[O, C/groups, *k]``, ``[O]`` → ``[B, O, *H']``."""
    return _Conv.apply(x, w, b, spec)


def input_grad(g: Tensor, w: Tensor, input_shape: Sequence[int], spec: ConvSpec) -> Tensor:
    """Differentiable ``Aᵀ g``: ``g`` ``[B, O, *H']``, ``w`` ``[O, C/groups, *k]`` → ``[B, *input_shape[1:]]``."""
    return _InputGrad.apply(g, w, tuple(input_shape), spec)


def weight_grad(x: Tensor, g: Tensor, weight_shape: Sequence[int], spec: ConvSpec) -> Tensor:
    """Differentiable weight gradient: ``x`` ``[B, C, *H]``, ``g`` ``[B, O, *H']`` → ``weight_shape``."""
    return _WeightGrad.apply(x, g, tuple(weight_shape), spec)


# Function.apply binds its arguments to ``forward``'s signature on every call of a Function with
# ``setup_context``; the signature, computed once here, saves rebuilding it per call.
for _fn in (_Conv, _InputGrad, _WeightGrad):
    _fn.forward.__signature__ = inspect.signature(_fn.forward)  # type: ignore[attr-defined]
del _fn
