"""A fast, exact input gradient for CPU convolutions with few input channels.

oneDNN computes the input gradient of a one-channel convolution very slowly on
CPU (LeNet-5's first layer, batch 128, one thread: 13 ms against 1.5 ms for the
forward), and attacks, flatness and the gradient penalties all need it (58% of
a PGD-10 profile). Switching oneDNN off for the whole model is no cure: its
forward and weight-gradient kernels are the fast ones for the other layers.

So the route is swapped per layer: the forward and the weight gradient stay
oneDNN's; the input gradient ``Aᵀ g`` (``A`` the convolution as a linear map of
its input, ``g`` ``[B, O, *H']`` the output gradient) runs with oneDNN off for
that one call, either as ``"flip"``, a stride-1 convolution of ``g`` with the
flipped, transposed kernel and padding ``d·(k−1) − p`` (few output channels),
or as ``"native"``, PyTorch's own ``convolution_backward`` (any stride,
dilation, groups). Both are exact. Three ``autograd.Function`` s close over
each other (the backward of each is built from the three), so the backward is
differentiable to any order: double-backward penalties work through it.

The path is taken per call only where it was measured to pay: CPU,
float32/float64, grad mode on, an input requiring grad, ``in_channels <=
max_in_channels`` (:data:`MAX_IN_CHANNELS`), a batched input, no autocast, not
under ``torch.compile``; elsewhere the layer runs the ordinary convolution.
"oneDNN off" is PyTorch's process-wide flag, set and restored around that one
call: a conv running meanwhile in another thread may skip oneDNN too (same
values up to float rounding).

Example::

    model = fastland.fast_conv.apply(model)   # in place, per instance; idempotent
    fastland.fast_conv.remove(model)           # back to the plain layers

Shapes: ``B`` batch, ``C`` input and ``O`` output channels, ``*H`` / ``*H'`` the
input's / output's spatial size (1, 2 or 3 dims), ``*k`` the kernel's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MAX_IN_CHANNELS", "FLIP_MAX_OUT_CHANNELS", "ConvSpec", "make_spec", "route", "conv_fn",
    "input_grad", "weight_grad", "conv", "conv_input_grad", "apply", "remove", "is_applied",
]

# Measured at one thread on LeNet-5, DDNet and ResNet-18 layer shapes (benchmarks/notes/conv.md):
# the path wins up to 4 input channels (1.3-1.6x at C=4 for 32 output channels) and loses or
# ties at 8 (0.85x for 32, 1.04x for 64 output channels): above, oneDNN's input gradient is as fast.
MAX_IN_CHANNELS = 4
# 2-D "flip" beats "native" for few output channels (LeNet's 6: 1.6 vs 3.1 ms), loses for 32 and more.
FLIP_MAX_OUT_CHANNELS = 16

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DTYPES = (torch.float32, torch.float64)


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
    """A validated :class:`ConvSpec` for ``n`` spatial dims (``padding`` explicit ints)."""
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


def _input_grad_kernel(g: Tensor, w: Tensor, input_shape: Sequence[int], spec: ConvSpec) -> Tensor:
    """``Aᵀ g``: ``g`` ``[B, O, *H']``, ``w`` ``[O, C/groups, *k]`` → ``[B, C, *H]`` (no autograd)."""
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
    """``∂⟨conv(x, w), g⟩/∂w``: ``x`` ``[B, C, *H]``, ``g`` ``[B, O, *H']`` → ``[O, C/groups, *k]``."""
    w_like = g.new_empty(1).expand(tuple(weight_shape))
    return torch.ops.aten.convolution_backward(
        g, x, w_like, None, list(spec.stride), list(spec.padding), list(spec.dilation),
        False, [0] * spec.ndim, spec.groups, [False, True, False])[1]


def _conv_kernel(x: Tensor, w: Tensor, b: Optional[Tensor], spec: ConvSpec) -> Tensor:
    """The ordinary convolution ``[B, C, *H]`` → ``[B, O, *H']``."""
    n = spec.ndim
    return torch.ops.aten.convolution(x, w, b, list(spec.stride), list(spec.padding),
                                      list(spec.dilation), False, [0] * n, spec.groups)


# --------------------------------------------------------------------------- autograd


def _engine_needs(ctx: Any, i: int) -> bool:
    """Whether the running backward will use the gradient of input ``i`` (``ctx.needs_input_grad``
    is static: an ``autograd.grad(loss, x)`` would otherwise also pay for the weight gradient)."""
    if not ctx.needs_input_grad[i]:
        return False
    try:
        node = ctx.next_functions[i][0]
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # no engine running (vmap, functorch) or an older torch
        return True


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


def _conv_d(x: Tensor, w: Tensor, spec: ConvSpec, native: bool) -> Tensor:
    """Differentiable ``conv(x, w)`` (no bias): by aten itself when ``native``, else :func:`conv_fn`."""
    return _conv_kernel(x, w, None, spec) if native else conv_fn(x, w, None, spec)


def _input_grad_d(g: Tensor, w: Tensor, shape: Sequence[int], spec: ConvSpec, native: bool) -> Tensor:
    """Differentiable ``Aᵀ g``: by ``aten.convolution_backward`` when ``native``, else :func:`input_grad`."""
    if not native:
        return input_grad(g, w, shape, spec)
    return torch.ops.aten.convolution_backward(
        g, g.new_empty(1).expand(tuple(shape)), w, None, list(spec.stride), list(spec.padding),
        list(spec.dilation), False, [0] * spec.ndim, spec.groups, [True, False, False])[0]


def _weight_grad_d(x: Tensor, g: Tensor, shape: Sequence[int], spec: ConvSpec, native: bool) -> Tensor:
    """Differentiable weight gradient: by aten when ``native``, else :func:`weight_grad`."""
    return _weight_grad_kernel(x, g, shape, spec) if native else weight_grad(x, g, shape, spec)


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
        gw = _weight_grad_d(x, g, w.shape, ctx.spec, native) if _engine_needs(ctx, 1) else None
        gb = g.sum(dim=[0, *range(2, g.dim())]) if ctx.has_bias and _engine_needs(ctx, 2) else None
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


# --------------------------------------------------------------------------- the gate and the layer

_F_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_GRAD_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
Ints = Union[int, Sequence[int]]


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled()


def _takes_path(x: Tensor, weight: Tensor, bias: Optional[Tensor], max_in_channels: int) -> bool:
    """Whether a call on these operands goes through the fast path (decided per call)."""
    same = weight.dtype == x.dtype and weight.device == x.device and (
        bias is None or (bias.dtype == x.dtype and bias.device == x.device))
    return (torch.is_grad_enabled() and x.requires_grad and x.device.type == "cpu"
            and x.layout == torch.strided and x.dtype in _DTYPES and same
            and x.dim() == weight.dim()  # batched (an unbatched input takes the plain conv)
            and x.shape[1] <= max_in_channels and not _autocast_on()
            and not torch.compiler.is_compiling())


def _same_padding(weight: Tensor, dilation: Tuple[int, ...]) -> Tuple[Tuple[int, ...], List[int]]:
    """``padding="same"`` as symmetric padding plus the extra right-side pad (PyTorch's convention):
    ``(left per dim, F.pad list)``."""
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    left = tuple(t // 2 for t in total)
    extra: List[int] = []
    for t, lf in zip(reversed(total), reversed(left)):
        extra += [0, t - 2 * lf]
    return left, extra


def conv(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: Ints = 1,
         padding: Union[str, Ints] = 0, dilation: Ints = 1, groups: int = 1, *,
         max_in_channels: int = MAX_IN_CHANNELS) -> Tensor:
    """``F.conv{1,2,3}d`` with the fast input gradient where it pays (decided per call).

    Args:
        input: ``[B, C, *H]``; weight: ``[O, C/groups, *k]``; bias: ``[O]`` or None.
        stride, padding, dilation, groups: as in ``F.conv2d`` (``padding`` may be
            ``"valid"`` or ``"same"``).
        max_in_channels: the path is taken only for ``C <= max_in_channels``.
    Returns:
        ``[B, O, *H']``, the same values as ``F.conv{n}d``.
    """
    n = weight.dim() - 2
    if n not in _F_CONV:
        raise ValueError(f"weight: expected 3 to 5 dims [O, C/groups, *k], got shape {tuple(weight.shape)}")
    if not _takes_path(input, weight, bias, max_in_channels) or (
            isinstance(padding, str) and not (padding == "valid" or _tuple("stride", stride, n) == (1,) * n)):
        return _F_CONV[n](input, weight, bias, stride, padding, dilation, groups)
    dil = _tuple("dilation", dilation, n)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding, extra = _same_padding(weight, dil)
        if any(extra):
            input = F.pad(input, extra)
    elif isinstance(padding, str):
        raise ValueError(f"padding: expected 'valid', 'same' or ints, got {padding!r}")
    return conv_fn(input, weight, bias, make_spec(n, stride, padding, dil, groups))


def conv_input_grad(input_shape: Sequence[int], weight: Tensor, grad_output: Tensor, stride: Ints = 1,
                    padding: Ints = 0, dilation: Ints = 1, groups: int = 1, *,
                    max_in_channels: int = MAX_IN_CHANNELS) -> Tensor:
    """``torch.nn.grad.conv{n}d_input`` (same arguments) by the fast route where it pays.

    Args:
        input_shape: ``[B, C, *H]``; weight: ``[O, C/groups, *k]``;
        grad_output: ``[B, O, *H']``; stride, padding (ints), dilation, groups as the conv's.
    Returns:
        ``[B, C, *H]``, differentiable w.r.t. ``weight`` and ``grad_output``.
    """
    n = weight.dim() - 2
    if n not in _GRAD_INPUT:
        raise ValueError(f"weight: expected 3 to 5 dims [O, C/groups, *k], got shape {tuple(weight.shape)}")
    shape = tuple(int(s) for s in input_shape)
    fast = (grad_output.device.type == "cpu" and grad_output.dtype in _DTYPES
            and weight.dtype == grad_output.dtype and len(shape) == n + 2 and grad_output.dim() == n + 2
            and shape[1] <= max_in_channels and not _autocast_on() and not torch.compiler.is_compiling())
    if not fast:
        return _GRAD_INPUT[n](shape, weight, grad_output, stride, padding, dilation, groups)
    return input_grad(grad_output, weight, shape, make_spec(n, stride, padding, dilation, groups))


class _FastForward:
    """Stands in for a conv module's ``_conv_forward`` (kept in the instance's ``__dict__``).

    Reads only the module's geometry (weight and bias arrive as arguments, so a
    ``DataParallel`` replica sharing this object computes with its own tensors).
    Picklable and deep-copyable with its module.
    """

    def __init__(self, module: nn.Module, max_in_channels: int) -> None:
        self.module = module
        self.max_in_channels = max_in_channels

    def __call__(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        m = self.module
        padding: Union[str, Ints] = m.padding  # type: ignore[assignment]
        if m.padding_mode != "zeros":
            input = F.pad(input, m._reversed_padding_repeated_twice, mode=m.padding_mode)  # type: ignore[arg-type]
            padding = 0
        return conv(input, weight, bias, m.stride, padding, m.dilation, m.groups,  # type: ignore[arg-type]
                    max_in_channels=self.max_in_channels)


def _patchable(m: nn.Module) -> bool:
    """A ``Conv{1,2,3}d`` whose class keeps PyTorch's own ``_conv_forward``."""
    for cls in _CONVS:
        if isinstance(m, cls):
            return type(m)._conv_forward is cls._conv_forward
    return False


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def apply(model: nn.Module, *, max_in_channels: int = MAX_IN_CHANNELS) -> nn.Module:
    """Give every ``Conv1d/2d/3d`` of ``model`` the fast input gradient, in place; returns ``model``.

    Per instance (the class is untouched): ``state_dict``, ``load_state_dict``,
    ``deepcopy``, ``torch.save`` and DDP work as before. Idempotent; a second call
    with another ``max_in_channels`` updates it. Layers whose class overrides
    ``_conv_forward``, or that another tool already patched, are left alone.
    Whether a call takes the path is decided per call (see :func:`conv`).

    Args:
        model: any module (a conv layer itself included).
        max_in_channels: the largest ``in_channels`` that takes the path
            (default :data:`MAX_IN_CHANNELS`, measured on CPU).
    """
    _check_model(model)
    if not isinstance(max_in_channels, int) or isinstance(max_in_channels, bool) or max_in_channels < 1:
        raise ValueError(f"max_in_channels: expected a positive int, got {max_in_channels!r}")
    for m in model.modules():
        current = m.__dict__.get("_conv_forward")
        if isinstance(current, _FastForward):
            current.max_in_channels = max_in_channels
        elif current is None and _patchable(m):
            m.__dict__["_conv_forward"] = _FastForward(m, max_in_channels)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` on every layer of ``model``, in place; returns ``model``. Idempotent."""
    _check_model(model)
    for m in model.modules():
        if isinstance(m.__dict__.get("_conv_forward"), _FastForward):
            del m.__dict__["_conv_forward"]
    return model


def is_applied(model: nn.Module) -> bool:
    """True when some layer of ``model`` carries the fast path."""
    _check_model(model)
    return any(isinstance(m.__dict__.get("_conv_forward"), _FastForward) for m in model.modules())
