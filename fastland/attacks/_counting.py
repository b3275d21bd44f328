"""Counting a model's forward and backward passes (calls and rows), per stage of an evaluation.

:class:`CallCounter` wraps a model; every forward adds one call and ``B`` rows to the
current ``stage``'s counts, and every backward that reaches the logits (an input-gradient
``torch.autograd.grad`` or a ``.backward()``) adds one backward call and ``B`` rows.
:func:`fastland.attacks.worst_case` names the stage after each attack when its model is a
:class:`CallCounter`, so one wrapped model gives the counts of every stage.

Shapes: the wrapped model maps ``[B, *S]`` to logits ``[B, C]``.
"""
from __future__ import annotations

from typing import Dict

from torch import Tensor, nn

__all__ = ["CallCounter", "COUNT_KEYS"]

COUNT_KEYS = ("forward_calls", "forward_rows", "backward_calls", "backward_rows")


class CallCounter(nn.Module):
    """``model`` with counts of its forward and backward calls and rows, per ``stage``.

    Attributes:
        model: the wrapped model (a submodule: its parameters and mode are this module's).
        stage: the name the next calls are counted under (default ``"all"``).
        counts: ``{stage: {"forward_calls", "forward_rows", "backward_calls", "backward_rows"}}``.

    Example:
        >>> counted = CallCounter(model).eval()
        >>> res = fastland.attacks.worst_case(counted, x, y, 8 / 255)
        >>> counted.counts["apgd-t"]["backward_rows"]
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.stage = "all"
        self.counts: Dict[str, Dict[str, int]] = {}

    def _add(self, stage: str, kind: str, rows: int) -> None:
        entry = self.counts.setdefault(stage, dict.fromkeys(COUNT_KEYS, 0))
        entry[f"{kind}_calls"] += 1
        entry[f"{kind}_rows"] += rows

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, C]`` of the wrapped model at ``x`` ``[B, *S]``, counted."""
        return self.record(self.model(x), int(x.shape[0]))

    def record(self, out: Tensor, rows: int) -> Tensor:
        """Count one forward of ``rows`` rows that gave ``out``, and the backward that will
        reach ``out`` (if it requires grad); returns ``out``."""
        stage = self.stage
        self._add(stage, "forward", rows)
        if isinstance(out, Tensor) and out.requires_grad:
            out.register_hook(lambda grad: self._add(stage, "backward", rows))
        return out

    def total(self) -> Dict[str, int]:
        """The counts summed over all stages."""
        return {k: sum(c[k] for c in self.counts.values()) for k in COUNT_KEYS}

    def reset(self) -> None:
        """Forget all counts (the stage is kept)."""
        self.counts = {}
