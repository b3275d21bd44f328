"""The estimators behind :mod:`fastland.penalties` (private).

Per-sample values ``[B]``; the public functions validate the arguments, reduce
over the batch and document the math. Checks that run every step (finite
inputs, the finite-difference sanity check) use :func:`require`, which does
not synchronise with the host on CUDA.
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Any, Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from . import ops
from . import reference as _reference  # module import: reference may import penalties in turn
from ._checks import check_tensor
from ._conv_grad import grad_requested

_warned: Set[str] = set()


def warn_once(message: str) -> None:
    """One ``RuntimeWarning`` per distinct message per process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def require(cond: Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the one-element ``cond`` is true.

    On CUDA this is ``torch._assert_async``: no host synchronisation; a failure
    surfaces at a later kernel launch as a device-side assertion (and leaves the
    CUDA context unusable, as any device-side assert does).
    """
    if cond.device.type == "cuda":
        torch._assert_async(cond, message)
    elif not bool(cond):
        raise ValueError(message)


def all_finite(t: Tensor) -> Tensor:
    """Whether ``t`` (any shape) holds no NaN/inf, as a one-element bool tensor.

    A sum is finite when every element is (a NaN or an inf propagates), and only an overflow
    of finite values makes it infinite. On the CPU: one sum in ``t``'s own precision (float32
    for half types), and ``isfinite(t).all()`` only when that sum is not finite (a bad value
    or an overflow). Elsewhere, with no host synchronisation: the float64 sum of a
    float32/half tensor (which cannot overflow), ``isfinite(t).all()`` for float64."""
    if not t.is_floating_point():
        return torch.isfinite(t).all()
    if t.device.type == "cpu":
        s = torch.isfinite(t.detach().sum(dtype=torch.float32 if t.dtype in _HALF else None))
        return s if bool(s) else torch.isfinite(t).all()
    if t.dtype == torch.float64:
        return torch.isfinite(t).all()
    return torch.isfinite(t.detach().sum(dtype=torch.float64))


def check_finite(name: str, t: Tensor) -> None:
    """Refuse NaN/inf in ``t`` (any shape): a penalty of such inputs means nothing."""
    require(all_finite(t), f"{name}: expected finite values, got a tensor containing NaN or inf")


_COMPILED_NODE = "CompiledFunctionBackward"
# the module that defines the autograd.Function behind every compiled region's backward
_AOT_RUNTIME = "torch._functorch._aot_autograd.runtime_wrappers"


def check_not_compiled(logits: Tensor, estimator: str) -> None:
    """Refuse logits whose graph holds a ``torch.compile`` region: its backward
    has no double backward, so ``loss.backward()`` would fail later with
    "torch.compile ... does not currently support double backward".

    Walks the autograd graph of ``logits`` ``[B, C]`` once (Python, about a
    microsecond per node), and only once ``torch.compile``'s autograd wrapper has been
    imported: before that no graph can hold a compiled region.
    """
    if _AOT_RUNTIME not in sys.modules:
        return
    seen: Set[int] = set()
    stack = [logits.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name() == _COMPILED_NODE:
            raise ValueError(compiled_model_message(estimator))
        stack.extend(fn for fn, _ in node.next_functions)


def compiled_model_message(estimator: str) -> str:
    """The error for a compiled model under a double-backward estimator."""
    return (
        f"logits: computed by a torch.compile'd model, whose backward cannot be differentiated again, "
        f"as estimator={estimator!r} needs (PyTorch: 'torch.compile with aot_autograd does not currently "
        "support double backward'); use estimator='finite_difference', model=<the compiled model> "
        "(first-order backward only), or compute logits with the uncompiled module"
    )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 otherwise (float32 accumulation under autocast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Our own small ops (softmax, norms) run in the accumulation dtype, not autocast's."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


# --------------------------------------------------------------------------- VJPs


def no_dependency_error() -> ValueError:
    return ValueError(
        "x: expected a tensor in the graph of logits, but logits do not depend on x; "
        "pass the very tensor that was fed to the model"
    )


# Double-backward nodes (made by a VJP with create_graph=True) whose second input is a forward
# activation they saved and whose derivative with respect to it is zero everywhere: the masks of
# ReLU-type layers and the routing of max-pooling are piecewise constant, average pooling's backward
# does not read its input at all. PyTorch still fills that zero (zeros_like) and adds it into the
# gradient of the forward graph, one pass over the activation each; the penalties drop it.
ZERO_SECOND_DERIVATIVE = frozenset({
    "ThresholdBackwardBackward0",  # ReLU, Threshold
    "HardtanhBackwardBackward0",  # ReLU6, Hardtanh
    "LeakyReluBackwardBackward0",  # LeakyReLU
    "MaxPool2DWithIndicesBackwardBackward0",  # MaxPool2d
    "MaxPool3DWithIndicesBackwardBackward0",  # MaxPool3d
    "AdaptiveMaxPool2DBackwardBackward0",  # AdaptiveMaxPool2d
    "AvgPool2DBackwardBackward0",  # AvgPool2d
    "AvgPool3DBackwardBackward0",  # AvgPool3d
})


def _drop_zero_input(grad_inputs: Tuple[Optional[Tensor], ...],
                     grad_outputs: Tuple[Optional[Tensor], ...]) -> Optional[Tuple[Optional[Tensor], ...]]:
    """Post-hook of a :data:`ZERO_SECOND_DERIVATIVE` node: its zero second gradient becomes None
    (undefined), which the engine skips instead of adding."""
    if len(grad_inputs) != 2:
        return None
    return grad_inputs[0], None


def drop_zero_gradients(g: Tensor, logits: Tensor) -> None:
    """Hook the :data:`ZERO_SECOND_DERIVATIVE` nodes of the VJP graph of ``g`` so that a later
    backward skips their zero gradients for the forward graph.

    Only nodes made after ``logits`` are visited and hooked: the VJP's own (the caller's forward
    graph is numbered before its output ``logits`` on the same thread), and the walk stops at the
    forward graph. The parameter gradients are unchanged: each skipped term is an exact zero, and
    every forward node it targets lies on the path from ``logits`` to ``x``, which the penalty's
    cotangent (a function of ``logits``) reaches as well, so no gradient becomes None that was zero.

    Args:
        g: ``[B, *S]``, the input gradient computed with ``create_graph=True``.
        logits: ``[B, C]``, the tensor the VJP started from (its cotangent requires grad through it).
    """
    root = logits.grad_fn
    if root is None or g.grad_fn is None:
        return
    floor = root._sequence_nr()
    stack = [g.grad_fn]
    seen: Set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node._sequence_nr() <= floor:
            continue
        seen.add(node)
        if node.name() in ZERO_SECOND_DERIVATIVE:
            node.register_hook(_drop_zero_input)
        stack.extend(fn for fn, _ in node.next_functions)


def _vjp_sqnorms_loop(logits: Tensor, x: Tensor, cotangents: Tensor) -> Tensor:
    """``Σ_p ‖cotangents[p]ᵀ J‖²`` per sample, one double-backward VJP at a time.

    Args:
        logits: ``[B, C]`` (accumulation dtype), in the graph of ``x``.
        x: ``[B, *S]``.
        cotangents: ``[P, B, C]``, may require grad (the gradient flows through them); when they
            do (a function of ``logits``), the VJP graph's zero gradients are dropped
            (:func:`drop_zero_gradients`).
    Returns:
        ``[B]`` in the dtype of ``cotangents``.
    """
    total: Optional[Tensor] = None
    for k in range(cotangents.shape[0]):
        with grad_requested(x):
            (g,) = torch.autograd.grad(
                logits, x, grad_outputs=cotangents[k], create_graph=True, retain_graph=True, allow_unused=True,
            )
        if g is None:
            raise no_dependency_error()
        if cotangents.requires_grad:
            drop_zero_gradients(g, logits)
        sq = g.reshape(g.shape[0], -1).to(cotangents.dtype).pow(2).sum(dim=1)
        total = sq if total is None else total + sq
    assert total is not None
    return total


def _vjp_sqnorms_batched(logits: Tensor, x: Tensor, cotangents: Tensor) -> Tensor:
    """Same as :func:`_vjp_sqnorms_loop` in one vmapped backward (``is_grads_batched``):
    ``[P, B, C] -> [B]``."""
    with grad_requested(x):
        (g,) = torch.autograd.grad(
            logits, x, grad_outputs=cotangents, create_graph=True, retain_graph=True,
            allow_unused=True, is_grads_batched=True,
        )
    if g is None:
        raise no_dependency_error()
    if cotangents.requires_grad:
        drop_zero_gradients(g, logits)
    P, B = cotangents.shape[0], cotangents.shape[1]
    return g.reshape(P, B, -1).to(cotangents.dtype).pow(2).sum(dim=2).sum(dim=0)


def use_batched(device: torch.device, batched: Optional[bool]) -> bool:
    """Per-device default: batched on CUDA, loop elsewhere (measured slower on CPU)."""
    if batched is not None:
        return bool(batched)
    return device.type == "cuda"


def vjp_sqnorms(logits: Tensor, x: Tensor, cotangents: Tensor, *, batched: Optional[bool] = None) -> Tensor:
    """``Σ_p ‖cotangents[p]ᵀ J‖²`` per sample ``[B]``, differentiable (double backward).

    ``logits [B, C]`` from ``x [B, *S]``, ``cotangents [P, B, C]``. ``batched``:
    one vmapped backward (True), a loop (False) or per device (None). When the
    batched backward fails (an op without a batching rule) it falls back to the
    loop with one warning.
    """
    if cotangents.shape[0] > 1 and use_batched(x.device, batched):
        try:
            return _vjp_sqnorms_batched(logits, x, cotangents)
        except RuntimeError as err:  # no batching rule for some op of the model
            warn_once(
                "fastland penalties: the batched backward (is_grads_batched) failed for this model "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "falling back to a loop over projections"
            )
    return _vjp_sqnorms_loop(logits, x, cotangents)


# --------------------------------------------------------------------------- double-backward estimators


def _one_hot_noise(z: Tensor) -> Tensor:
    """``[C, B, C]`` one-hot rows: ``noise[c, b] = e_c`` (unit norm, so projections = one-hots)."""
    B, C = z.shape
    eye = torch.eye(C, device=z.device, dtype=z.dtype)
    return eye.unsqueeze(1).expand(C, B, C).contiguous()


def projection_penalty(
    logits: Tensor, x: Tensor, weight: str, estimator: str, n_proj: int,
    generator: Optional[torch.Generator], batched: Optional[bool],
) -> Tensor:
    """Per-sample ``projection`` / ``exact`` estimate of ``‖diag(w) J‖²_F``: ``[B]``.

    ``logits [B, C]`` in any float dtype; ``weight``: ``"softmax"`` (AMSReg,
    ``w = p``) or ``"uniform"`` (Jacobian, ``w = 1``).
    """
    C = logits.shape[1]
    if estimator == "projection" and n_proj >= C:
        estimator = "exact"
    with no_autocast(logits.device):
        z = logits.to(accumulation_dtype(logits.dtype))
        if estimator == "exact":
            noise, scale = _one_hot_noise(z), 1.0
        else:
            noise, scale = _reference.unit_sphere_noise(n_proj, z, generator), C / n_proj
        cot, _ = ops.weighted_projection(z, noise, weight)
        return vjp_sqnorms(z, x, cot, batched=batched) * scale


def gradnorm_penalty(logits: Tensor, x: Tensor) -> Tensor:
    """Per-sample ``‖∇x log p(x)‖² = ‖pᵀ J‖²`` (one double-backward VJP): ``[B]``."""
    with no_autocast(logits.device):
        z = logits.to(accumulation_dtype(logits.dtype))
        p = torch.softmax(z, dim=-1)
        return _vjp_sqnorms_loop(z, x, p.unsqueeze(0))


# --------------------------------------------------------------------------- finite difference

# Default finite-difference step h (L2 length in input units) per evaluation dtype:
# large enough that rounding in log p(x + h·u) − log p(x) (about eps·|log p| / h)
# stays small against ‖∇x log p‖, small against the scale on which the input
# score changes for inputs in [0, 1] (an L2 step of 1e-2 moves a 28×28 image by
# 3.6e-4 per pixel in RMS).
_FD_STEPS = {torch.float64: 1e-4, torch.float32: 1e-2, torch.bfloat16: 1e-1, torch.float16: 1e-1}
_HALF = (torch.bfloat16, torch.float16)


def default_fd_step(dtype: torch.dtype) -> float:
    """The default ``h`` of ``estimator="finite_difference"`` when log p is evaluated in
    ``dtype``: ``1e-4`` (float64), ``1e-2`` (float32), ``1e-1`` (bfloat16/float16)."""
    return _FD_STEPS.get(dtype, 1e-2)


def fd_step_floor(dtype: torch.dtype) -> float:
    """The least ``h`` accepted for log p evaluated in ``dtype``: ``sqrt(eps)``
    (1.5e-8 float64, 3.5e-4 float32, 0.088 bfloat16, 0.031 float16). Below it
    the rounding of ``log p(x + h·u) − log p(x)``, about ``eps·|log p| / h``,
    outgrows a gradient norm of ``sqrt(eps)·|log p|``."""
    return math.sqrt(torch.finfo(dtype).eps)


def fd_eval_dtype(logits: Tensor, x: Tensor) -> torch.dtype:
    """The dtype log p is evaluated in: that of ``x`` when the logits are
    half precision but ``x`` is not (autocast), else that of the logits."""
    return x.dtype if logits.dtype in _HALF and x.dtype not in _HALF else logits.dtype


def check_fd_model(model: Optional[nn.Module]) -> None:
    """``model`` given, callable, and the same function at every call (no active dropout)."""
    if model is None:
        raise ValueError(
            "model: estimator='finite_difference' evaluates the model once more at x + h·u, "
            "so it needs model=<the module that computed logits>, got None"
        )
    if not callable(model):
        raise TypeError(f"model: expected a callable torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Module):
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise ValueError(
                    f"model: estimator='finite_difference' needs the same function at x and x + h·u, "
                    f"but {name or 'model'} is a {type(m).__name__} in train mode (a new random mask "
                    "per forward pass); use another estimator or switch dropout off"
                )


def check_fd_step(h: object, dtype: torch.dtype) -> float:
    """``h`` a finite number ``>= fd_step_floor(dtype)``; returns it as a float."""
    if isinstance(h, bool) or not isinstance(h, (int, float)):
        raise TypeError(f"h: expected a float step > 0 (or None for the default), got {type(h).__name__}")
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"h: expected a finite step > 0, got {h!r}")
    floor = fd_step_floor(dtype)
    if h < floor:
        raise ValueError(
            f"h: expected a step >= {floor:.2g} for log p evaluated in {dtype} (below it rounding swamps "
            f"log p(x + h·u) − log p(x); default {default_fd_step(dtype):g}), got {h!r}"
        )
    return float(h)


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def running_stats_kept(model: nn.Module) -> Iterator[None]:
    """Let extra forward passes in train mode update scratch copies of the
    BatchNorm running statistics, not the module's own.

    The buffers are swapped, not restored by copying: the first forward's graph
    saved them, and any in-place write would invalidate its backward.
    """
    swapped: List[Tuple[nn.Module, str, Tensor]] = []
    modules = model.modules() if isinstance(model, nn.Module) else ()
    for m in modules:
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            for name in _RUNNING_STATS:
                buf = getattr(m, name, None)
                if isinstance(buf, Tensor):
                    swapped.append((m, name, buf))
                    setattr(m, name, buf.detach().clone())
    try:
        yield
    finally:
        for m, name, buf in swapped:
            setattr(m, name, buf)


def _logits_of(model: nn.Module, x: Tensor, name: str, like: Tensor) -> Tensor:
    """``model(x)`` checked to be a ``[B, C]`` tensor shaped as ``like``."""
    out = model(x)
    check_tensor(name, out, ndim=2)
    if out.shape != like.shape:
        raise ValueError(
            f"model: expected {name} of shape {tuple(like.shape)} (that of logits), got "
            f"{tuple(out.shape)}; pass the model that computed logits"
        )
    return out


def _lse(z: Tensor) -> Tensor:
    """``logsumexp`` over classes in the accumulation dtype: ``[B, C] -> [B]``."""
    with no_autocast(z.device):
        return torch.logsumexp(z.to(accumulation_dtype(z.dtype)), dim=-1)


def _check_same_function(lse_given: Tensor, lse_eval: Tensor) -> None:
    """The autocast path re-evaluates log p at ``x`` in full precision: it must
    agree with the given (half-precision) logits' to about bfloat16 accuracy.
    ``[B]`` each; bound on the batch mean: ``4·eps(bfloat16)·(1 + |log p|)`` (3 %)."""
    dev = (lse_given - lse_eval).abs().mean()
    bound = 4 * torch.finfo(torch.bfloat16).eps * (1 + lse_given.abs().mean())
    require(dev <= bound, "model: log p(x) of model= (re-evaluated in full precision) differs from that of "
                          "the given logits beyond half-precision rounding; pass the model that computed logits")


def _check_taylor(d: Tensor, gnorm: Tensor, lse0: Tensor, h: float, dtype: torch.dtype) -> None:
    """``d = (log p(x + h·u) − log p(x)) / h`` must be close to ``‖∇x log p‖``
    (its first-order value): ``mean |d − ‖g‖| <= mean ‖g‖ + rounding``. ``[B]`` each.
    Fails when model= did not compute the logits or ``h`` is far too large."""
    dev = (d - gnorm).abs().mean()
    rounding = 64 * torch.finfo(dtype).eps * (1 + lse0.detach().abs().mean()) / h
    require(dev <= gnorm.mean() + rounding,
            f"model: the finite difference (log p(x + h·u) − log p(x))/h is off from ‖∇x log p‖ by more than "
            f"‖∇x log p‖ itself on the batch mean: model= is not the module that computed logits, or h={h:g} "
            "is far too large for this model")


def finite_difference_penalty(logits: Tensor, x: Tensor, model: nn.Module, h: Optional[float]) -> Tensor:
    """Per-sample ``((log p(x + h·u) − log p(x)) / h)²``, ``u = ∇x log p / ‖∇x log p‖``: ``[B]``.

    One first-order VJP (detached direction ``u``), one more forward pass; the
    result is differentiable by an ordinary backward through both forward passes.
    Half-precision logits of a full-precision ``x`` (autocast) are re-evaluated:
    both forward passes run with autocast off, in ``x``'s dtype (one forward
    more), since bfloat16 rounding and the large bfloat16 step bias the estimate.
    """
    dtype = fd_eval_dtype(logits, x)
    step = check_fd_step(default_fd_step(dtype) if h is None else h, dtype)
    mixed = dtype != logits.dtype

    def precision() -> contextlib.AbstractContextManager:
        return no_autocast(x.device) if mixed else contextlib.nullcontext()

    with running_stats_kept(model):
        if mixed:
            with precision():
                z0 = _logits_of(model, x, "model(x)", logits)
            lse0 = _lse(z0)
            _check_same_function(_lse(logits.detach()), lse0.detach())
        else:
            lse0 = _lse(logits)
        with grad_requested(x):
            (g,) = torch.autograd.grad(lse0.sum(), x, retain_graph=True, allow_unused=True)
        if g is None:
            raise no_dependency_error()
        with torch.no_grad():
            g_flat = g.reshape(g.shape[0], -1).to(lse0.dtype)
            gnorm = g_flat.norm(dim=1)
            u = (g_flat / gnorm.clamp_min(torch.finfo(lse0.dtype).tiny).unsqueeze(1)).reshape(g.shape)
        with precision():
            z_h = _logits_of(model, x + step * u.to(x.dtype), "model(x + h·u)", logits)
    d = (_lse(z_h) - lse0) / step
    _check_taylor(d.detach(), gnorm, lse0, step, dtype)
    return d.pow(2)
