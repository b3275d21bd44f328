"""Shared test helpers: devices, tolerances, backends and tiny models.

Used by ``tests/`` and ``benchmarks/``; importable by users who test their own
extensions against fastland's references.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .choices import BACKENDS as _ALL_BACKENDS

__all__ = [
    "devices",
    "BACKENDS",
    "backend_unavailable",
    "skip_if_unavailable",
    "num_threads",
    "TOLERANCES",
    "tolerance",
    "tiny_mlp",
    "tiny_cnn",
    "tiny_bn_cnn",
    "assert_close_to_reference",
]


def devices() -> List[torch.device]:
    """CPU, plus CUDA when present (checked without initialising CUDA when absent)."""
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda"))
    return out


# The kernel backends a fused op can run on (``FASTLAND_BACKEND``).
BACKENDS: Tuple[str, ...] = tuple(b for b in _ALL_BACKENDS if b != "auto")  # the ones a test can force


def backend_unavailable(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run here (a one-line reason), or None when it can.

    ``cpp`` needs the built extension ``fastland._C``; ``triton`` needs triton
    and, without a GPU, the interpreter (``TRITON_INTERPRET=1``).
    """
    from . import _ext
    from .ops.utils import triton_available, triton_interpreted

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "cpp" and not _ext.extension_available():
        return "fastland._C not built"
    if backend == "triton" and not (triton_available() and triton_interpreted()):
        return "triton interpreter not available"
    return None


def skip_if_unavailable(backend: str) -> None:
    """``pytest.skip`` the calling test when ``backend`` cannot run here."""
    reason = backend_unavailable(backend)
    if reason is not None:
        import pytest

        pytest.skip(reason)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, restoring the previous count after
    (on a shared CPU with few cores, 2-thread OpenMP regions stall behind other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# (atol, rtol) per dtype for kernels held to a float64 reference.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def tolerance(dtype: torch.dtype) -> Dict[str, float]:
    """``dict(atol=..., rtol=...)`` for ``torch.testing.assert_close`` at ``dtype``."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close_to_reference(
    out: torch.Tensor, ref_same_dtype: torch.Tensor, ref_fp64: torch.Tensor, atol: float = 1e-6
) -> None:
    """The flash-attention rule: the kernel's error against a float64 reference is
    within 2x PyTorch's own same-dtype error, plus ``atol``."""
    err = (out.double() - ref_fp64).abs().max().item() if out.numel() else 0.0
    base = (ref_same_dtype.double() - ref_fp64).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base + atol, f"max error {err:.3e} > 2 x reference error {base:.3e} + {atol:.1e}"


def tiny_mlp(in_shape: Tuple[int, ...] = (1, 4, 4), n_classes: int = 3, hidden: int = 8) -> nn.Module:
    """Flatten -> Linear -> tanh -> Linear: smooth, so double backward is exact."""
    d = 1
    for s in in_shape:
        d *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))


def tiny_cnn(in_channels: int = 1, n_classes: int = 3, size: int = 6) -> nn.Module:
    """Conv -> softplus -> Linear for ``[B, in_channels, size, size]`` inputs."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.Softplus(), nn.Flatten(),
        nn.Linear(4 * size * size, n_classes),
    )


def tiny_bn_cnn(in_channels: int = 1, n_classes: int = 3, size: int = 6) -> nn.Module:
    """Conv -> BatchNorm -> tanh -> Linear; call ``.eval()`` for per-sample quantities.

    The BatchNorm running statistics are set to non-trivial values so that
    eval mode differs from the identity.
    """
    m = nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
        nn.Linear(4 * size * size, n_classes),
    )
    bn = m[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return m


def fitted_tiny_cnn(n_classes: int, shape: Tuple[int, ...] = (1, 8, 8), n: int = 256, steps: int = 60
                    ) -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A :func:`tiny_cnn` fitted in well under a second to a synthetic ``n_classes`` set (full batch, Adam).

    Returns ``(model in eval mode, x [n, *shape], y [n])``; the attacks' tests share it.
    """
    from .data import synthetic_dataset

    torch.manual_seed(0)
    x, y = synthetic_dataset(n, shape, n_classes, seed=0).tensors
    model = tiny_cnn(shape[0], n_classes, size=shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with num_threads(1):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), x, y


class Round(nn.Module):
    """``round(x·k)/k``: the gradient is zero almost everywhere (masked, not robust)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.k) / self.k


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x [B, *S]`` that ``model`` classifies as ``y [B]``."""
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def assert_in_ball_and_box(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    """``x_adv`` within the L∞ ball of radius ``eps`` around ``x`` (up to rounding) and inside ``[0, 1]``."""
    slack = 4 * torch.finfo(x.dtype).eps  # (x + eps) - x may round one ulp above eps
    assert (x_adv - x).abs().max().item() <= eps + slack
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
