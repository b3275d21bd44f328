"""Argument checks shared by every public function.

Each error names the argument, what was expected and what was received, so
that a user sees at once which call is wrong. The grid functions (landscape,
flatness) resolve all their checks with one call at their entry
(:func:`check_landscape_call`, :func:`check_flatness_call`) and pass plain,
checked tensors down.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .choices import DIRECTION_KINDS


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    floating: bool = True,
    finite: bool = False,
    nonempty: bool = False,
) -> torch.Tensor:
    """Validate ``value`` as a tensor and return it.

    Args:
        name: the argument's name, quoted in the error.
        ndim: exact number of dimensions wanted, or None.
        min_ndim: least number of dimensions wanted, or None.
        floating: require a floating-point dtype.
        finite: require no NaN/inf (costs one reduction; use on inputs, not in hot loops).
        nonempty: require a non-zero first dimension.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(
            f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(value.shape)}"
        )
    if floating and not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {value.dtype}")
    if nonempty and (value.dim() == 0 or value.shape[0] == 0):
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(value.shape)}")
    if finite and value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return value


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """All tensors on one device, else an error naming each one's device."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"expected all tensors on one device, got {where}")


def check_eval_mode(name: str, model: nn.Module) -> None:
    """Raise when ``model`` (or a submodule with batch statistics / dropout) is in train mode.

    Per-sample quantities (input scores, landscapes) are only per-sample when
    BatchNorm uses running statistics and dropout is off.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError(
            f"{name}: expected a model in eval mode (BatchNorm running statistics, no dropout), "
            "got one in train mode; call model.eval() first"
        )


def check_in_unit_box(name: str, x: torch.Tensor) -> bool:
    """True when every entry of ``x`` lies in [0, 1] (pixel space)."""
    return bool(((x >= 0) & (x <= 1)).all()) if x.numel() else True


def check_model(model: object) -> None:
    """``model`` must be an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def check_images(name: str, x: object, *, warn_outside: bool = True, stacklevel: int = 3) -> torch.Tensor:
    """``x`` a non-empty floating ``[N, *S]`` tensor without NaN/inf; warns when it leaves [0, 1].

    One host synchronisation for both checks (finite, in the unit box). The warning points
    ``stacklevel`` frames up (3: the caller of the function that called this one).
    """
    import warnings

    check_tensor(name, x, min_ndim=2, nonempty=True)
    assert isinstance(x, torch.Tensor)
    if not x.numel():
        return x
    finite, inside = torch.stack([torch.isfinite(x).all(), ((x >= 0) & (x <= 1)).all()]).tolist()
    if not finite:
        raise ValueError(f"{name}: contains NaN or inf")
    if warn_outside and not inside:
        warnings.warn(
            f"{name}: expected pixel values in [0, 1], got values in [{x.min().item():.4g}, "
            f"{x.max().item():.4g}]; fastland models normalise inside the model, pass unnormalised images",
            stacklevel=stacklevel,
        )
    return x


def check_model_dtype(model: nn.Module, x: torch.Tensor) -> None:
    """The model's floating parameters and ``x`` share one dtype; else one clear error."""
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    if p is not None and p.dtype != x.dtype:
        raise TypeError(f"x: expected dtype {p.dtype} (that of the model's parameters), got {x.dtype}; "
                        f"convert one of them (x.to({p.dtype}) or model.to({x.dtype}))")


def check_span_points(span: float, points: int) -> None:
    """``points`` an int >= 1, ``span`` a finite number > 0."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"points: expected an integer >= 1 (grid points per axis), got {points!r}")
    if isinstance(span, bool) or not isinstance(span, (int, float)) or not math.isfinite(span) or span <= 0:
        raise ValueError(f"span: expected a finite number > 0 (half-width in pixel units, e.g. 8/255), got {span!r}")


def check_labels(x: torch.Tensor, y: Any) -> None:
    """``y`` must be ``[N]`` integer labels on ``x``'s device."""
    if y is None:
        raise ValueError("y: FGSM directions need labels; pass y=[N] integer labels")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y: expected integer labels of shape [{x.shape[0]}], got {got}")
    check_same_device(("x", "y"), (x, y))


def check_flatness_args(n_dirs: int, span: float, points: int, reduction: str, directions: str) -> None:
    """One-line errors for the grid settings of :func:`fastland.flatness`."""
    check_span_points(span, points)
    if isinstance(n_dirs, bool) or not isinstance(n_dirs, int) or n_dirs < 1:
        raise ValueError(f"n_dirs: expected an integer >= 1, got {n_dirs!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction: expected 'sum' or 'mean', got {reduction!r}")
    if not isinstance(directions, str) or directions not in DIRECTION_KINDS:
        what = f"a {type(directions).__name__}" if not isinstance(directions, str) else repr(directions)
        raise ValueError(f"directions: expected one of {DIRECTION_KINDS} (flatness draws its own pairs), got {what}")


def _check_model_and_images(model: object, x: object) -> None:
    """``x`` images ``[N, *S]`` (see :func:`check_images`) for ``model``, an ``nn.Module`` of ``x``'s dtype."""
    check_images("x", x, stacklevel=5)
    assert isinstance(model, nn.Module) and isinstance(x, torch.Tensor)
    check_model_dtype(model, x)


def check_landscape_call(model: object, x: object, y: object, span: float, points: int, directions: object) -> None:
    """Every check of :func:`fastland.landscape` that needs no forward (the given pair is checked where it is read)."""
    check_model(model)
    check_span_points(span, points)
    _check_model_and_images(model, x)
    if isinstance(directions, str) and directions == "fgsm":
        check_labels(x, y)  # type: ignore[arg-type]


def check_flatness_call(model: object, x: object, y: object, n_dirs: int, span: float, points: int,
                        reduction: str, directions: str) -> None:
    """Every check of :func:`fastland.flatness` that needs no forward, in the order of its arguments' errors."""
    check_model(model)
    check_flatness_args(n_dirs, span, points, reduction, directions)
    _check_model_and_images(model, x)
    if directions == "fgsm":
        check_labels(x, y)  # type: ignore[arg-type]
