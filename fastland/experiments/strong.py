"""The strong robustness evaluation of a trained model: the worst case per sample, and masking flags.

For a test subset this runs, batch by batch, the AutoAttack-style ensemble of
:func:`fastland.attacks.worst_case` (APGD-CE, APGD-T, Square; each attack only on
the samples still correct) at the evaluation's ε, plus the three checks for
masked gradients of :func:`fastland.attacks.masking_flags`: APGD-CE at 4·ε,
PGD-100 against PGD-10 (the paper's attack), and what the gradient-free attack
found that the gradient attacks missed.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import Tensor, nn

from .._progress import progress_bar
from ..attacks import WorstCase, masking_flags, pgd, worst_case

__all__ = ["strong_evaluation"]


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return model(x).argmax(1) == y


def strong_evaluation(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int = 100, n_queries: int = 5000,
    batch_size: int = 500, seed: int = 0, progress: bool = False,
) -> Dict[str, Any]:
    """Worst-case robust accuracy over APGD-CE, APGD-T and Square, with the masking flags.

    Args:
        model: in eval mode; ``[B, *S] -> [B, C]``.
        x: ``[N, *S]`` in [0, 1]; y: ``[N]`` int64 labels (on the model's device).
        eps: the L∞ radius (pixel units).
        steps: APGD iterations per run; n_queries: Square's query budget.
        batch_size: samples per attack call; seed: seeds every random draw.
    Returns:
        JSON-ready: ``worst_case_acc`` (%), ``broken_by`` (share of the subset each attack
        broke, and ``clean``: wrong before any attack), ``pgd10_acc``, ``pgd100_acc``,
        ``large_eps_acc`` (APGD-CE at 4·ε, %), ``masking_flags`` (sentences) and ``n_strong``.
    """
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed + 2)
    parts: List[WorstCase] = []
    p10, p100, big = [], [], []
    bar = progress_bar(x.shape[0], "strong evaluation", progress, unit="img")
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        parts.append(worst_case(model, xb, yb, eps, steps=steps, n_queries=n_queries, generator=gen))
        big.append(worst_case(model, xb, yb, 4 * eps, attacks=("apgd-ce",), steps=steps, generator=gen).robust)
        for k, acc in ((10, p10), (100, p100)):
            x_adv = pgd(model, xb, yb, eps, alpha=2.5 * eps / k, steps=k, random_start=True, generator=gen)
            acc.append(_correct(model, x_adv, yb))
        bar.update(xb.shape[0])
    bar.close()
    res = WorstCase.cat(parts)
    r10, r100, rbig = torch.cat(p10), torch.cat(p100), torch.cat(big)
    flags = masking_flags(res, pgd10_accuracy=r10, pgd100_accuracy=r100, large_eps_accuracy=rbig, eps=eps)
    return {
        "worst_case_acc": 100 * res.accuracy,
        "broken_by": {k: 100 * v for k, v in res.share_broken.items()},
        "pgd10_acc": 100 * float(r10.double().mean()),
        "pgd100_acc": 100 * float(r100.double().mean()),
        "large_eps_acc": 100 * float(rbig.double().mean()),
        "masking_flags": flags,
        "n_strong": int(x.shape[0]),
        "strong_settings": {"eps": eps, "steps": steps, "n_queries": n_queries, "attacks": list(res.attacks)},
    }
