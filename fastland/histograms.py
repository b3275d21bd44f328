"""``log p`` of clean samples and of randomly perturbed ones (the paper's Fig. 3)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._checks import check_images, check_model, check_model_dtype
from ._grid import check_logits, eval_mode, plan

__all__ = ["LoglikHistogram", "loglik_histogram"]

from .choices import PERTURBATIONS


@dataclass
class LoglikHistogram:
    """``log p + log Z`` of clean samples and of random perturbations of them (Fig. 3).

    Attributes:
        clean: ``[N]``.
        perturbed: ``[N, n_perturb]``.
        eps: the perturbation size (pixel units); kind: ``"rademacher"`` or ``"uniform"``.
    """

    clean: Tensor
    perturbed: Tensor
    eps: float
    kind: str


def loglik_histogram(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float = 8 / 255,
    n_perturb: int = 1,
    kind: str = "rademacher",
    clip: bool = False,
    batch_size: Union[int, str] = "auto",
    generator: Optional[torch.Generator] = None,
) -> LoglikHistogram:
    """``log p`` (up to ``log Z``) of clean samples and of randomly perturbed ones.

    Each sample gets ``n_perturb`` perturbations ``x + eps·d``, ``d`` a random
    sign vector (``kind="rademacher"``: every pixel moves by ``±eps``) or
    uniform in ``[-1, 1]^D`` (``"uniform"``); ``clip`` clamps the perturbed
    inputs to ``[0, 1]``. The model is evaluated in eval mode (restored).

    Args:
        model: ``[B, *S] -> [B, C]`` logits.
        x: ``[N, *S]`` in ``[0, 1]``.
        eps: perturbation size in pixel units (> 0).
        n_perturb: perturbations per sample (>= 1).
        batch_size: inputs per model call or ``"auto"``.
        generator: on ``x``'s device, for the perturbations.
    Returns:
        :class:`LoglikHistogram` with ``clean [N]``, ``perturbed [N, n_perturb]`` (on the CPU).

    Example::

        h = fastland.loglik_histogram(model, x_test[:1000], eps=8 / 255)
    """
    check_model(model)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: expected a finite number > 0 (pixel units), got {eps!r}")
    if isinstance(n_perturb, bool) or not isinstance(n_perturb, int) or n_perturb < 1:
        raise ValueError(f"n_perturb: expected an integer >= 1, got {n_perturb!r}")
    if kind not in PERTURBATIONS:
        raise ValueError(f"kind: expected one of {PERTURBATIONS}, got {kind!r}")
    check_images("x", x)
    check_model_dtype(model, x)
    clean, perturbed = [], []
    with eval_mode(model), torch.inference_mode():
        per_call = max(1, plan(model, x, batch_size=batch_size, fuse_first_layer=False,
                               backward=False).per_call // n_perturb)
        for i in range(0, x.shape[0], per_call):
            xb = x[i : i + per_call]
            rep = xb.unsqueeze(1).expand(-1, n_perturb, *xb.shape[1:])
            if kind == "rademacher":
                d = torch.randint(0, 2, rep.shape, generator=generator, device=x.device).to(xb.dtype) * 2 - 1
            else:
                d = torch.rand(rep.shape, generator=generator, device=x.device, dtype=xb.dtype) * 2 - 1
            xp = rep + eps * d
            if clip:
                xp = xp.clamp(0, 1)
            clean.append(torch.logsumexp(check_logits(model(xb), xb), dim=-1).cpu())
            lp = torch.logsumexp(model(xp.flatten(0, 1)), dim=-1)
            perturbed.append(lp.view(-1, n_perturb).cpu())
    return LoglikHistogram(torch.cat(clean), torch.cat(perturbed), float(eps), kind)
