"""Evaluation of a trained classifier: clean accuracy, PGD accuracy and flatness Φ.

Defaults are the paper's (docs/design.md §1): PGD on Fashion-MNIST with 10 steps,
ε = 25/255, α = 6.25/255; on CIFAR-10 5 steps, ε = 8/255, α = 2/255. Φ (Eq. 8)
is the mean over test samples of φ(x) (Eq. 7), computed by
:func:`fastland.flatness` on a fixed random subset of the test set.

Catastrophic overfitting (Wong et al. 2020): a model trained on one-step attacks
can become robust to FGSM alone, while PGD breaks it. FGSM accuracy is measured
on the PGD images, and a gap of more than :data:`OVERFITTING_GAP` points is
flagged in a plain sentence (:func:`overfitting_flags`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from .._checks import check_tensor
from .._progress import progress_bar

from ..choices import EVAL_ATTACKS

__all__ = ["EVAL_ATTACKS", "EvalSettings", "default_eval_settings", "accuracy", "pgd_accuracy", "flatness_of", "attack_flatness_of",
           "subset_indices", "fgsm_accuracy", "OVERFITTING_GAP", "overfitting_flags", "overfitting_check",
           "evaluate"]

#: FGSM accuracy above PGD accuracy by more than this many points flags catastrophic overfitting.
OVERFITTING_GAP = 20.0


@dataclass
class EvalSettings:
    """What :func:`evaluate` measures and how.

    ``n_clean``/``n_pgd``/``n_phi``/``n_strong``: how many test examples (a fixed
    random subset, nested; ``None`` = all). ``phi_*`` are passed to
    :func:`fastland.flatness` (``None`` keeps its default). ``reduction``:
    ``"sum"`` over grid points (the paper's Φ) or ``"mean"``. ``attack``:
    ``"pgd"`` (the paper's PGD alone, fast) or ``"strong"`` (also the worst case
    over APGD-CE, APGD-T and Square with ``strong_steps`` and ``n_queries``, and
    the gradient-masking flags; see :mod:`fastland.experiments.strong`).
    """

    eps: float
    alpha: float
    steps: int
    n_clean: Optional[int] = None
    n_pgd: Optional[int] = None
    n_phi: Optional[int] = 500
    phi_dirs: Optional[int] = None
    phi_span: Optional[float] = None
    phi_points: Optional[int] = None
    reduction: str = "sum"
    batch_size: int = 500
    seed: int = 0
    attack: str = "strong"
    n_strong: Optional[int] = 1000
    strong_steps: int = 100
    n_queries: int = 5000


def default_eval_settings(dataset: str, **overrides: Any) -> EvalSettings:
    """The paper's PGD evaluation for ``dataset`` (``fmnist``, ``cifar10``; others get
    the Fashion-MNIST one), with ``overrides`` (``None`` values ignored)."""
    from .paper import paper_settings

    ps = paper_settings(dataset)
    s = EvalSettings(eps=ps.eval_eps, alpha=ps.eval_alpha, steps=ps.eval_steps)
    for k, v in overrides.items():
        if not hasattr(s, k):
            raise ValueError(f"{k}: not an evaluation setting; expected one of {sorted(asdict(s))}")
        if v is not None:
            setattr(s, k, v)
    return s


def _check_xy(x: Tensor, y: Tensor) -> None:
    check_tensor("x", x, min_ndim=2, nonempty=True)
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise ValueError(f"y: expected an int64 tensor of shape [{x.shape[0]}], got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500, progress: bool = False) -> float:
    """Clean accuracy in [0, 1] of ``model`` on ``x [N, *S]``, ``y [N]``, evaluated in eval mode
    (the modes are restored)."""
    from .._grid import eval_mode

    _check_xy(x, y)
    dev = next(model.parameters()).device
    bar = progress_bar(x.shape[0], "clean accuracy", progress, unit="img")
    correct = 0
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
            correct += int((model(xb).argmax(1) == yb).sum())
            bar.update(xb.shape[0])
    bar.close()
    return correct / x.shape[0]


def pgd_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Accuracy in [0, 1] under an L∞ PGD attack (random start) of ``model`` (eval mode).

    Args:
        x: ``[N, *S]`` in [0, 1]; y: ``[N]`` int64.
        eps, alpha, steps: the attack (pixel units).
        seed: seeds the random starts (a generator on the model's device).
    """
    from ..attacks import pgd

    _check_xy(x, y)
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    bar = progress_bar(x.shape[0], f"PGD-{steps} accuracy", progress, unit="img")
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
        x_adv = pgd(model, xb, yb, eps=eps, alpha=alpha, steps=steps, random_start=True, generator=gen)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == yb).sum())
        bar.update(xb.shape[0])
    bar.close()
    return correct / x.shape[0]


def fgsm_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, batch_size: int = 500,
                  progress: bool = False) -> float:
    """Accuracy in [0, 1] under FGSM at ``eps`` (:func:`fastland.attacks.fgsm`, model in eval mode).

    Args:
        x: ``[N, *S]`` in [0, 1]; y: ``[N]`` int64; eps: the L∞ radius (pixel units).
    """
    from .._grid import eval_mode
    from ..attacks import fgsm

    _check_xy(x, y)
    dev = next(model.parameters()).device
    bar = progress_bar(x.shape[0], "FGSM accuracy", progress, unit="img")
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
        x_adv = fgsm(model, xb, yb, eps)
        with torch.no_grad(), eval_mode(model):
            correct += int((model(x_adv).argmax(1) == yb).sum())
        bar.update(xb.shape[0])
    bar.close()
    return correct / x.shape[0]


def overfitting_flags(fgsm_acc: float, pgd_acc: float, steps: int = 10) -> List[str]:
    """One plain sentence when FGSM accuracy exceeds PGD-``steps`` accuracy by more than
    :data:`OVERFITTING_GAP` points (accuracies in percent), else ``[]``."""
    gap = fgsm_acc - pgd_acc
    if gap <= OVERFITTING_GAP:
        return []
    return [f"FGSM accuracy ({fgsm_acc:.1f}%) exceeds PGD-{steps} accuracy ({pgd_acc:.1f}%) by {gap:.1f} points: "
            "the model looks catastrophically overfitted to FGSM"]


def overfitting_check(model: nn.Module, x: Tensor, y: Tensor, settings: EvalSettings, pgd_acc: float, *,
                      progress: bool = False) -> Dict[str, Any]:
    """``{"fgsm_acc": %, "overfitting_flags": [...]}`` on the PGD subset of ``(x [N, *S], y [N])``
    (``settings.n_pgd``, ``settings.seed``), against that subset's ``pgd_acc`` (%).

    One FGSM step per image: cheap enough to add to an evaluation computed without it.
    """
    s = settings
    idx = subset_indices(x.shape[0], s.n_pgd, s.seed)
    fgsm_acc = 100 * fgsm_accuracy(model, x[idx], y[idx], eps=s.eps, batch_size=s.batch_size, progress=progress)
    return {"fgsm_acc": fgsm_acc, "overfitting_flags": overfitting_flags(fgsm_acc, pgd_acc, s.steps)}


def flatness_of(model: nn.Module, x: Tensor, s: EvalSettings, *, progress: bool = False) -> Dict[str, float]:
    """Φ of ``model`` on ``x [N, *S]`` (:func:`fastland.flatness`), as
    ``{"phi": mean φ, "phi_stderr": its standard error}``."""
    from ..measures import flatness

    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev)
    gen.manual_seed(s.seed + 1)
    kwargs: Dict[str, Any] = {"reduction": s.reduction, "generator": gen}
    for ours, theirs in (("phi_dirs", "n_dirs"), ("phi_span", "span"), ("phi_points", "points")):
        if getattr(s, ours) is not None:
            kwargs[theirs] = getattr(s, ours)
    f = flatness(model, x.to(dev), **kwargs)
    return {"phi": float(f.mean), "phi_stderr": float(f.stderr)}


def attack_flatness_of(model: nn.Module, x: Tensor, y: Tensor, s: EvalSettings) -> Dict[str, float]:
    """Flatness along the FGSM direction (:func:`fastland.attack_flatness`) of ``model`` on
    ``x [N, *S]``, ``y [N]``, beside random signed directions, as ``{"attack_flat", "attack_flat_stderr",
    "attack_flat_random", "anisotropy"}`` (higher = flatter; anisotropy > 1: the attack direction is steeper)."""
    from ..anisotropy import attack_flatness

    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev)
    gen.manual_seed(s.seed + 3)
    f = attack_flatness(model, x.to(dev), y.to(dev), directions="fgsm", generator=gen)
    return {"attack_flat": float(f.mean), "attack_flat_stderr": float(f.stderr),
            "attack_flat_random": float(f.random_mean), "anisotropy": float(f.anisotropy)}


def subset_indices(n_total: int, n: Optional[int], seed: int) -> Tensor:
    """Indices of a fixed random subset of size ``n`` (all, in order, when ``n`` is None or too big)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, settings: EvalSettings, *, progress: bool = True,
    phi: bool = True,
) -> Dict[str, Any]:
    """Clean accuracy, PGD accuracy and Φ of ``model`` on ``(x [N, *S], y [N])``.

    The model is put in eval mode (and left so). Accuracies are in percent.
    Returns a JSON-ready dict: ``clean_acc``, ``pgd_acc``, ``fgsm_acc`` (FGSM at
    ``eps`` on the PGD images), ``overfitting_flags`` (sentences; see
    :func:`overfitting_flags`), ``phi``, ``phi_stderr`` (absent with ``phi=False``),
    with ``attack="strong"`` the
    worst case (``worst_case_acc``, ``broken_by``, ``masking_flags``, ...), the
    sample counts and the settings.
    """
    _check_xy(x, y)
    if settings.reduction not in ("sum", "mean"):
        raise ValueError(f"reduction: expected 'sum' or 'mean', got {settings.reduction!r}")
    if settings.attack not in EVAL_ATTACKS:
        raise ValueError(f"attack: expected one of {EVAL_ATTACKS}, got {settings.attack!r}")
    model.eval()
    s = settings
    out: Dict[str, Any] = {}
    idx = subset_indices(x.shape[0], s.n_clean, s.seed)
    out["clean_acc"] = 100 * accuracy(model, x[idx], y[idx], batch_size=s.batch_size, progress=progress)
    out["n_clean"] = int(idx.numel())
    idx = subset_indices(x.shape[0], s.n_pgd, s.seed)
    out["pgd_acc"] = 100 * pgd_accuracy(model, x[idx], y[idx], eps=s.eps, alpha=s.alpha, steps=s.steps,
                                        batch_size=s.batch_size, seed=s.seed, progress=progress)
    out["n_pgd"] = int(idx.numel())
    out.update(overfitting_check(model, x, y, s, out["pgd_acc"], progress=progress))
    if s.attack == "strong":
        from .strong import strong_evaluation

        idx = subset_indices(x.shape[0], s.n_strong, s.seed)
        dev = next(model.parameters()).device
        out.update(strong_evaluation(model, x[idx].to(dev), y[idx].to(dev), eps=s.eps, steps=s.strong_steps,
                                     n_queries=s.n_queries, batch_size=s.batch_size, seed=s.seed,
                                     progress=progress))
    if phi:
        idx = subset_indices(x.shape[0], s.n_phi, s.seed)
        out.update(flatness_of(model, x[idx], s, progress=progress))
        out.update(attack_flatness_of(model, x[idx], y[idx], s))
        out["n_phi"] = int(idx.numel())
    out["settings"] = asdict(s)
    return out
