"""Fast, exact convolutions on the CPU for layers with few input channels.

oneDNN computes the input gradient of a one-channel convolution very slowly on
CPU (LeNet-5's first layer, batch 128, one thread: 13 ms against 1.0 ms for the
forward), and attacks, flatness and the gradient penalties all need it (58% of
a PGD-10 profile). Switching oneDNN off for the whole model is no cure: its
kernels are the fast ones for the other layers.

So the route is swapped per layer. The input gradient ``Aᵀ g`` (``A`` the
convolution as a linear map of its input, ``g`` ``[B, O, *H']`` the output
gradient) runs with oneDNN off for that one call, either as ``"flip"``, a
stride-1 convolution of ``g`` with the flipped, transposed kernel and padding
``d·(k−1) − p`` (few output channels), or as ``"native"``, PyTorch's own
``convolution_backward`` (any stride, dilation, groups). Both are exact. A 2-D,
stride-1, undilated convolution with one input channel (LeNet-5's and DDNet's
first layers) on float32/float64 CPU tensors has C++ kernels of its own when
the extension is loaded (csrc/conv_*_1ch.cpp, LeNet-5 at batch 128, one
thread): the forward (0.49 ms against oneDNN's 1.02), the input gradient (0.54
against the flip's 1.77) and, up to 16 output channels, the weight and bias
gradients in one pass (0.71 against oneDNN's 1.02); equal to PyTorch's up to
rounding. Three ``autograd.Function`` s close over each other (the backward of
each is built from the three), so the backward is differentiable to any
order: double-backward penalties work through it.

The path is taken per call only where it was measured to pay: CPU,
float32/float64, a batched input, no autocast, not under ``torch.compile``,
and either an input requiring grad with ``in_channels <= max_in_channels``
(:data:`MAX_IN_CHANNELS`; grad mode on) or one input channel (its C++ kernels,
whether a weight, the input or nothing requires grad); elsewhere the layer runs
the ordinary convolution. "oneDNN off" is PyTorch's process-wide flag, set and
restored around that one call: a conv running meanwhile in another thread may
skip oneDNN too (same values up to float rounding).

Example::

    model = fastland.fast_conv.apply(model)   # in place, per instance; idempotent
    fastland.fast_conv.remove(model)           # back to the plain layers

Shapes: ``B`` batch, ``C`` input and ``O`` output channels, ``*H`` / ``*H'`` the
input's / output's spatial size (1, 2 or 3 dims), ``*k`` the kernel's.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

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

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DTYPES = (torch.float32, torch.float64)


from ._conv_grad import (  # noqa: E402  (the spec, the kernels and the autograd Functions)
    FLIP_MAX_OUT_CHANNELS, ConvSpec, _conv_kernel, _tuple, conv_fn, input_grad, make_spec, one_channel_kernels,
    route, weight_grad,
)
from ._ext import extension_available  # noqa: E402


# --------------------------------------------------------------------------- the gate and the layer

_F_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_GRAD_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
Ints = Union[int, Sequence[int]]


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled()


def _path(x: Tensor, weight: Tensor, bias: Optional[Tensor], max_in_channels: int) -> Optional[str]:
    """The path a call on these operands takes (decided per call): ``"input_grad"`` (the fast input
    gradient: an input requiring grad, at most ``max_in_channels`` channels), ``"one_channel"`` (one
    input channel: the C++ kernels, whatever requires grad), or None (the plain convolution)."""
    same = weight.dtype == x.dtype and weight.device == x.device and (
        bias is None or (bias.dtype == x.dtype and bias.device == x.device))
    if not (x.device.type == "cpu" and x.layout == torch.strided and x.dtype in _DTYPES and same
            and x.dim() == weight.dim()  # batched (an unbatched input takes the plain conv)
            and not _autocast_on() and not torch.compiler.is_compiling()):
        return None
    if torch.is_grad_enabled() and x.requires_grad and x.shape[1] <= max_in_channels:
        return "input_grad"
    if x.shape[1] == 1 and extension_available():
        return "one_channel"
    return None


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
    """``F.conv{1,2,3}d`` with the fast kernels where they pay (decided per call, see the module).

    Args:
        input: ``[B, C, *H]``; weight: ``[O, C/groups, *k]``; bias: ``[O]`` or None.
        stride, padding, dilation, groups: as in ``F.conv2d`` (``padding`` may be
            ``"valid"`` or ``"same"``).
        max_in_channels: the fast input gradient is taken only for ``C <= max_in_channels``
            (one input channel takes the C++ kernels whatever it is).
    Returns:
        ``[B, O, *H']``, the same values as ``F.conv{n}d``.
    """
    n = weight.dim() - 2
    if n not in _F_CONV:
        raise ValueError(f"weight: expected 3 to 5 dims [O, C/groups, *k], got shape {tuple(weight.shape)}")
    path = _path(input, weight, bias, max_in_channels)
    if path is None or (
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
    spec = make_spec(n, stride, padding, dil, groups)
    if path == "one_channel":
        if not one_channel_kernels(weight, spec, input, bias):
            return _F_CONV[n](input, weight, bias, stride, spec.padding, dil, groups)
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))):
            return _conv_kernel(input, weight, bias, spec)  # nothing to differentiate: the kernel alone
    return conv_fn(input, weight, bias, spec)


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
    """Give every ``Conv1d/2d/3d`` of ``model`` the fast kernels, in place; returns ``model``.

    Per instance (the class is untouched): ``state_dict``, ``load_state_dict``,
    ``deepcopy``, ``torch.save`` and DDP work as before. Idempotent; a second call
    with another ``max_in_channels`` updates it. Layers whose class overrides
    ``_conv_forward``, or that another tool already patched, are left alone.
    Whether a call takes the path is decided per call (see :func:`conv`).

    Args:
        model: any module (a conv layer itself included).
        max_in_channels: the largest ``in_channels`` that takes the fast input gradient
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
