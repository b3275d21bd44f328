"""A recognised model's forward with the faster, exact max-pool, for the gradient attacks.

APGD, APGD-T and PGD spend a fifth of each step in PyTorch's CPU max-pool on LeNet-5-like
models (:mod:`fastland.attacks._max_pool`). :func:`fast_forward` gives, for a model that
:func:`~fastland.attacks._local_prefix.unwrap` recognises (a plain ``Classifier`` or
``nn.Sequential``, optionally inside a ``CallCounter``) and that has a stride = kernel
``MaxPool2d``, a callable with the model's values and input gradients, bitwise: the body's
modules are called as they are, except that each such max-pool is
:func:`~fastland.attacks._max_pool.max_pool` (taken before a ReLU in front of it). The
attack's iterates are then the same as with ``model`` itself. Any other model: None, and the
attack calls the model.

Shapes: ``x`` ``[n, *S]`` → logits ``[n, K]``.
"""
from __future__ import annotations

from typing import Callable, List, Optional

from torch import Tensor, nn

from ._counting import CallCounter
from ._local_prefix import _pool_size, forward_steps, unwrap

__all__ = ["FastForward", "fast_forward", "forward_of"]

Forward = Callable[[Tensor], Tensor]


class FastForward:
    """``model(x)`` through :func:`~fastland.attacks._local_prefix.forward_steps`; built by
    :func:`fast_forward`. Counted in the model's ``CallCounter`` as one forward (and one
    backward) of ``n`` rows, as a call of the model would be."""

    def __init__(self, normalize: Optional[nn.Module], body: List[nn.Module],
                 counter: Optional[CallCounter]) -> None:
        self.normalize = normalize
        self.steps = forward_steps(body)
        self.counter = counter

    def __call__(self, x: Tensor) -> Tensor:
        """``[n, *S]`` → logits ``[n, K]``."""
        z = self.normalize(x) if self.normalize is not None else x
        for step in self.steps:
            z = step(z)
        if self.counter is not None:
            self.counter.record(z, int(x.shape[0]))
        return z


def fast_forward(model: nn.Module) -> Optional[FastForward]:
    """The :class:`FastForward` of ``model``, or None where it would change nothing or the
    model is not recognised."""
    parts = unwrap(model)
    if parts is None:
        return None
    counter, normalize, body = parts
    modules = list(body)
    if not any(_pool_size(m) is not None for m in modules):
        return None
    return FastForward(normalize, modules, counter)


def forward_of(model: nn.Module) -> Forward:
    """What an attack calls for the model's logits: :func:`fast_forward` where it applies,
    else ``model`` itself."""
    return fast_forward(model) or model
