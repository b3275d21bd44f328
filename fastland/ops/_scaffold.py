"""The one scaffold every fused op is wired with: schema, kernels per device, fake, autograd.

:func:`define` turns an op's math into a ``torch.library`` operator ``fastland::<name>``:

* the schema, defined once here (in Python);
* its kernels, chosen by the dispatcher from the tensors' device, one dispatcher trip per call:
  ``CPU``: the C++ kernel that ``fastland._C`` registers under this same schema
  (``TORCH_LIBRARY_IMPL(fastland, CPU, m)`` in ``csrc/<op>.cpp``); ``CUDA``: the Triton
  launcher (the reference where Triton is not installed, with one warning, or where the
  launch table does not cover the sizes); every other device, and CPU when the extension
  is not built: the pure-PyTorch reference (``CompositeExplicitAutograd``);
* a fake (meta) implementation, so that ``torch.compile`` traces the op;
* its autograd (``torch.library.register_autograd``): an op's backward calls its backward
  op, itself defined here with an autograd of its own, so double backward works.

Forcing a backend (tests, debugging): ``FASTLAND_BACKEND=auto|triton|cpp|reference`` is
read once, when :mod:`fastland.ops` is imported, and again at each :func:`refresh_backend`
(or inside :func:`forced_backend`). A forced backend installs Python kernels over the
dispatcher's choice (a ``torch.library.Library`` of overrides, dropped on the next refresh),
so ``auto`` costs nothing per call. A backend that cannot serve a tensor raises a one-line
``ValueError`` at the call: ``cpp`` without the extension or on non-CPU tensors, ``triton``
without Triton, or on CPU tensors without ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _ext
from .utils import triton_available, triton_interpreted

__all__ = [
    "ENV_VAR",
    "BACKENDS",
    "TRITON_DTYPES",
    "LaunchConfig",
    "Launch",
    "FusedOp",
    "define",
    "ops",
    "pick_config",
    "backend_for",
    "backend_refusal",
    "requested_backend",
    "refresh_backend",
    "forced_backend",
    "load_cpu_kernels",
]

ENV_VAR = "FASTLAND_BACKEND"
from ..choices import BACKENDS  # noqa: E402  (defined once for the library and the CLI)
# dtypes the Triton kernels take (accumulation: float64 for float64, else float32)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

LIB = torch.library.Library("fastland", "FRAGMENT")


# --------------------------------------------------------------------------- launch tables


class LaunchConfig(NamedTuple):
    """One Triton launch configuration: the program's tile, ``num_warps`` and ``num_stages``.

    ``block`` gives the sizes of the kernel's ``BLOCK_*`` constexprs in the order of the
    op's ``BLOCK_NAMES``; for row kernels the last is ``BLOCK_C``, the widest row served.
    """

    block: Tuple[int, ...]
    num_warps: int
    num_stages: int = 3


def pick_config(configs: Sequence[LaunchConfig], width: int) -> Optional[LaunchConfig]:
    """The first configuration whose last block size (the widest row it covers) is ``>= width``;
    None when ``width`` exceeds them all (the table is sorted by that size)."""
    for cfg in configs:
        if cfg.block[-1] >= width:
            return cfg
    return None


@dataclass(frozen=True)
class Launch:
    """One Triton kernel launch: ``kernel[grid](*args, **kwargs)``, planned but not run.

    ``kwargs`` holds the constexprs (``BLOCK_*``, ...) and ``num_warps``/``num_stages``.
    """

    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    @property
    def name(self) -> str:
        """The kernel's function name, e.g. ``"_grid_combine_fwd_kernel"``."""
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", repr(fn))

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


# (outputs, launches) for contiguous inputs; the launches write the outputs
Plan = Callable[..., Tuple[Any, List[Launch]]]


# --------------------------------------------------------------------------- the registry


@dataclass
class FusedOp:
    """One operator ``fastland::<name>`` and its implementations.

    ``reference`` is the pure-PyTorch spec (same arguments and outputs as the schema);
    ``triton_plan`` (None without Triton) plans the launches for contiguous inputs;
    ``triton_serves`` says whether the launch table covers the arguments (else the
    reference serves).
    """

    name: str
    schema: str
    reference: Callable[..., Any]
    triton_plan: Optional[Plan] = None
    triton_serves: Callable[..., bool] = field(default=lambda *args: True)

    @property
    def overload(self) -> "torch._ops.OpOverload":
        return getattr(torch.ops.fastland, self.name).default

    def triton(self, *args: Any) -> Any:
        """Run the Triton kernels (inputs made contiguous), or the reference where they do not serve."""
        if self.triton_plan is None or not self.triton_serves(*args):
            return self.reference(*args)
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        out, launches = self.triton_plan(*args)
        for launch in launches:
            launch.run()
        return out


_OPS: Dict[str, FusedOp] = {}


def ops() -> Dict[str, FusedOp]:
    """Every op defined so far, by name (forward and backward ops alike)."""
    return dict(_OPS)


def save_inputs(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
    """``setup_context`` of a backward op whose own backward needs every input (all tensors)."""
    ctx.save_for_backward(*inputs)


def define(
    name: str,
    schema: str,
    *,
    reference: Callable[..., Any],
    fake: Callable[..., Any],
    triton_plan: Optional[Plan] = None,
    triton_serves: Optional[Callable[..., bool]] = None,
    backward: Optional[Callable[..., Any]] = None,
    setup_context: Optional[Callable[..., None]] = None,
) -> "torch._ops.OpOverload":
    """Define ``fastland::<name><schema>`` and register its kernels, fake and autograd.

    Args:
        name: the op's name, e.g. ``"grid_combine"``.
        schema: ``"(Tensor x, ...) -> Tensor"``.
        reference: the pure-PyTorch implementation (other devices, CPU without the extension,
            and ``FASTLAND_BACKEND=reference``).
        fake: shapes and dtypes of the outputs from those of the inputs.
        triton_plan: ``(*contiguous args) -> (outputs, [Launch])`` (None without Triton).
        triton_serves: whether the Triton kernels cover the arguments (default: always).
        backward, setup_context: as for ``torch.library.register_autograd`` (None: not differentiable).
    Returns:
        ``torch.ops.fastland.<name>.default``.
    """
    if name in _OPS:
        raise ValueError(f"name: fastland::{name} is already defined")
    op = FusedOp(name, schema, reference, triton_plan, triton_serves or (lambda *args: True))
    LIB.define(name + schema)
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    LIB.impl(name, _cuda_kernel(op), "CUDA")
    torch.library.register_fake(f"fastland::{name}", fake, lib=LIB)
    if backward is not None:
        torch.library.register_autograd(f"fastland::{name}", backward, setup_context=setup_context, lib=LIB)
    _OPS[name] = op
    if _state.override is not None:  # a backend is forced: cover this op too
        _install_forced(_state.override, op, _state.requested)
    return op.overload


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn(
        "fastland: triton is not installed; CUDA tensors use the pure-PyTorch reference ops "
        "(pip install triton for the fused kernels)",
        RuntimeWarning,
        stacklevel=4,
    )


def _cuda_kernel(op: FusedOp) -> Callable[..., Any]:
    def kernel(*args: Any) -> Any:
        if op.triton_plan is None:
            _warn_no_triton()
            return op.reference(*args)
        return op.triton(*args)

    return kernel


def load_cpu_kernels() -> bool:
    """Load ``fastland._C`` (its C++ kernels register for CPU under the schemas defined here).

    True when loaded; else CPU tensors use the references (one warning, see :mod:`fastland._ext`).
    """
    return _ext.extension_available()


# --------------------------------------------------------------------------- forcing a backend


@dataclass
class _State:
    raw: str = "auto"
    requested: str = "auto"  # validated; "" when raw is not a backend
    override: Optional[torch.library.Library] = None


_state = _State()


def _invalid_message() -> str:
    return f"{ENV_VAR}: expected one of {BACKENDS}, got {_state.raw!r}"


def requested_backend() -> str:
    """The backend ``FASTLAND_BACKEND`` asked for at the last refresh (``auto`` when unset).

    Raises ``ValueError`` when it named no backend.
    """
    if not _state.requested:
        raise ValueError(_invalid_message())
    return _state.requested


def refresh_backend() -> str:
    """Read ``FASTLAND_BACKEND`` again and install (or drop) the forced kernels; returns its value.

    An unknown value is not raised here: every op call (and :func:`backend_for`) then raises it.
    """
    raw = os.environ.get(ENV_VAR, "auto")
    value = raw.strip().lower() or "auto"
    if _state.override is not None:
        _state.override._destroy()
        _state.override = None
    _state.raw, _state.requested = raw, value if value in BACKENDS else ""
    if _state.requested != "auto":
        _state.override = torch.library.Library("fastland", "IMPL")
        for op in _OPS.values():
            _install_forced(_state.override, op, _state.requested)
    return value


@contextlib.contextmanager
def forced_backend(backend: str) -> Iterator[str]:
    """Run the block with ``FASTLAND_BACKEND=backend`` (then restore the previous value)."""
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = backend
    try:
        yield refresh_backend()
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before
        refresh_backend()


def _device_of(args: Sequence[Any]) -> torch.device:
    return next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))


def _refuse(message: Callable[[torch.device], str]) -> Callable[..., Any]:
    def kernel(*args: Any) -> Any:
        raise ValueError(message(_device_of(args)))

    return kernel


def _triton_refusal(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot serve tensors on ``device`` (None when they can)."""
    if not triton_available():
        return f"{ENV_VAR}=triton: triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return None
    return (f"{ENV_VAR}=triton: expected CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got a tensor on {device}")


def _forced_triton(op: FusedOp) -> Callable[..., Any]:
    def kernel(*args: Any) -> Any:
        reason = _triton_refusal(_device_of(args))
        if reason is not None:
            raise ValueError(reason)
        return op.triton(*args)

    return kernel


def _cpp_refusal(device: torch.device) -> Optional[str]:
    """Why the C++ kernels cannot serve tensors on ``device`` (None when they can)."""
    if device.type != "cpu":
        return f"{ENV_VAR}=cpp: expected CPU tensors, got a tensor on {device}"
    if not _ext.extension_available():
        return f"{ENV_VAR}=cpp: the C++ extension fastland._C is not available ({_ext.unavailable_reason()})"
    return None


def _install_forced(lib: torch.library.Library, op: FusedOp, backend: str) -> None:
    """Register ``backend``'s kernels for ``op`` on CPU and CUDA in the override library ``lib``."""
    if backend == "":
        for key in ("CPU", "CUDA"):
            lib.impl(op.name, _refuse(lambda device: _invalid_message()), key)
    elif backend == "reference":
        for key in ("CPU", "CUDA"):
            lib.impl(op.name, op.reference, key)
    elif backend == "triton":
        for key in ("CPU", "CUDA"):
            lib.impl(op.name, _forced_triton(op), key)
    elif backend == "cpp":
        lib.impl(op.name, _refuse(lambda device: _cpp_refusal(device)), "CUDA")
        if not _ext.extension_available():  # else the C++ kernel serves CPU: no override
            lib.impl(op.name, _refuse(lambda device: _cpp_refusal(device)), "CPU")


def backend_refusal(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot serve tensors on ``device`` in this process (None when it can).

    ``reference`` always can; ``cpp`` needs CPU tensors and the built extension; ``triton``
    needs Triton and CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend: expected one of {BACKENDS[1:]}, got {backend!r}")
    device = torch.device(device)
    if backend == "cpp":
        return _cpp_refusal(device)
    if backend == "triton":
        return _triton_refusal(device)
    return None


def backend_for(tensor: Tensor) -> str:
    """The backend that serves the ops on ``tensor``: ``"triton"``, ``"cpp"`` or ``"reference"``.

    Follows ``FASTLAND_BACKEND`` as of the last :func:`refresh_backend`. Raises ``ValueError``
    for an unknown value or a forced backend that cannot serve ``tensor``'s device.
    """
    requested = requested_backend()
    device = tensor.device
    if requested == "reference":
        return "reference"
    if requested == "triton":
        reason = _triton_refusal(device)
        if reason is not None:
            raise ValueError(reason)
        return "triton"
    if requested == "cpp":
        reason = _cpp_refusal(device)
        if reason is not None:
            raise ValueError(reason)
        return "cpp"
    if device.type == "cuda":
        return "triton" if triton_available() else "reference"
    if device.type == "cpu" and _ext.extension_available():
        return "cpp"
    return "reference"
