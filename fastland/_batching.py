"""Batch sizes within a memory budget, and the eval-mode context.

``batch_size="auto"`` picks how many grid points go through the model at once:
the bytes one point needs (the sum of every leaf module's output for one
sample, times a factor for backward passes) divided into a budget (a quarter
of the free CUDA memory, or :data:`CPU_BUDGET_BYTES` on the CPU), capped by
:data:`MAX_AUTO_POINTS` — beyond a few thousand points per forward the CPU
gains nothing and the latency of a progress bar update grows.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Union

import torch
from torch import Tensor, nn

__all__ = ["CPU_BUDGET_BYTES", "MAX_AUTO_POINTS", "bytes_per_point", "resolve_batch_size", "eval_mode"]

CPU_BUDGET_BYTES = 512 * 2**20
MAX_AUTO_POINTS = 4096


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` (every submodule) in eval mode; restore each module's mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training


def bytes_per_point(model: nn.Module, x1: Tensor) -> int:
    """Activation bytes of one input ``x1`` ``[1, *S]``: its size plus every leaf module's output."""
    sizes: List[int] = [x1.numel() * x1.element_size()]

    def hook(_m: nn.Module, _inp: object, out: object) -> None:
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            model(x1)
    finally:
        for h in handles:
            h.remove()
    return max(1, sum(sizes))


def _budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 4
    return CPU_BUDGET_BYTES


def resolve_batch_size(
    batch_size: Union[int, str], model: nn.Module, x1: Tensor, *, backward: bool = False
) -> int:
    """Grid points per model call.

    Args:
        batch_size: a positive int, or ``"auto"`` (memory budget, see module doc).
        x1: ``[1, *S]`` one representative input.
        backward: the points also go through a backward pass (activations kept:
            budget three times the forward's bytes).
    """
    if isinstance(batch_size, bool) or not (batch_size == "auto" or isinstance(batch_size, int)):
        raise ValueError(f"batch_size: expected a positive int or 'auto', got {batch_size!r}")
    if isinstance(batch_size, int):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int or 'auto', got {batch_size}")
        return batch_size
    per_point = bytes_per_point(model, x1) * (3 if backward else 1)
    return int(max(1, min(MAX_AUTO_POINTS, _budget(x1.device) // per_point)))
