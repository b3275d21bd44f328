"""Bad inputs to the library's public functions, one table: each call raises a ValueError or
TypeError whose one-line message starts with the name of the argument at fault.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from torch import Tensor, nn

import fastland
from fastland import attacks
from fastland.testing import tiny_mlp

SHAPE = (1, 4, 4)
C = 3


class _TupleModel(nn.Module):
    """Returns ``(logits, None)``: a model that does not give logits alone."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tuple[Tensor, None]:
        return self.inner(x), None


def _inputs() -> Dict[str, Any]:
    torch.manual_seed(0)
    m = tiny_mlp(SHAPE, n_classes=C, hidden=5).eval()
    x = torch.rand(2, *SHAPE)
    nan = x.clone()
    nan[0, 0, 0, 0] = math.nan
    return dict(m=m, tup=_TupleModel(m).eval(), x=x, nan=nan, x64=x.double(), y=torch.tensor([0, 1]),
                y_big=torch.tensor([0, C]), y_neg=torch.tensor([0, -1]), y_long=torch.tensor([0, 1, 2]))


def _grad_x(x: Tensor) -> Tensor:
    return x.clone().requires_grad_(True)


def _penalty(fn: Callable, logits_of: Callable[[Tensor, nn.Module], Tensor], **kw: Any) -> Callable:
    """``fn(logits_of(x, m), x, **kw)`` on a fresh ``x`` that requires grad."""

    def call(a: Dict[str, Any]) -> Any:
        x = _grad_x(a["x"])
        return fn(logits_of(x, a["m"]), x, **kw)

    return call


D = fastland.Defence
SQ = dict(n_queries=5)
WC = dict(steps=2, n_queries=5)

# (call on the inputs, the argument its error must name)
CASES: Dict[str, Tuple[Callable[[Dict[str, Any]], Any], str]] = {
    "landscape: x 1-D": (lambda a: fastland.landscape(a["m"], torch.rand(16)), "x"),
    "landscape: x NaN": (lambda a: fastland.landscape(a["m"], a["nan"], points=3), "x"),
    "landscape: x integer": (lambda a: fastland.landscape(a["m"], (a["x"] * 255).long(), points=3), "x"),
    "landscape: span < 0": (lambda a: fastland.landscape(a["m"], a["x"], span=-0.1, points=3), "span"),
    "landscape: points 0": (lambda a: fastland.landscape(a["m"], a["x"], points=0), "points"),
    "landscape: model returns a tuple": (lambda a: fastland.landscape(a["tup"], a["x"], points=3), "model"),
    "landscape: float64 x, float32 model": (lambda a: fastland.landscape(a["m"], a["x64"], points=3), "x"),
    "landscape: label >= C": (lambda a: fastland.landscape(a["m"], a["x"], y=a["y_big"], directions="fgsm",
                                                           points=3), "y"),
    "landscape: label < 0": (lambda a: fastland.landscape(a["m"], a["x"], y=a["y_neg"], directions="fgsm",
                                                          points=3), "y"),
    "landscape: y of another length": (lambda a: fastland.landscape(a["m"], a["x"], y=a["y_long"],
                                                                    directions="fgsm", points=3), "y"),
    "landscape: model not a Module": (lambda a: fastland.landscape("model", a["x"], points=3), "model"),
    "flatness: x 1-D": (lambda a: fastland.flatness(a["m"], torch.rand(16)), "x"),
    "flatness: x NaN": (lambda a: fastland.flatness(a["m"], a["nan"]), "x"),
    "flatness: n_dirs 0": (lambda a: fastland.flatness(a["m"], a["x"], n_dirs=0), "n_dirs"),
    "flatness: span < 0": (lambda a: fastland.flatness(a["m"], a["x"], span=-1.0), "span"),
    "flatness: points 0": (lambda a: fastland.flatness(a["m"], a["x"], points=0), "points"),
    "flatness: model returns a tuple": (lambda a: fastland.flatness(a["tup"], a["x"]), "model"),
    "flatness: float64 x, float32 model": (lambda a: fastland.flatness(a["m"], a["x64"]), "x"),
    "flatness: reduction": (lambda a: fastland.flatness(a["m"], a["x"], reduction="max"), "reduction"),
    "flatness: label >= C": (lambda a: fastland.flatness(a["m"], a["x"], y=a["y_big"], directions="fgsm"), "y"),
    "ams_score: x 1-D": (lambda a: fastland.ams_score(a["m"], torch.rand(16)), "x"),
    "ams_score: x NaN": (lambda a: fastland.ams_score(a["m"], a["nan"]), "x"),
    "ams_score: model returns a tuple": (lambda a: fastland.ams_score(a["tup"], a["x"]), "model"),
    "ams_score: float64 x, float32 model": (lambda a: fastland.ams_score(a["m"], a["x64"]), "x"),
    "ams_score: batch_size 0": (lambda a: fastland.ams_score(a["m"], a["x"], batch_size=0), "batch_size"),
    "loglik_histogram: x 1-D": (lambda a: fastland.loglik_histogram(a["m"], torch.rand(16)), "x"),
    "loglik_histogram: x NaN": (lambda a: fastland.loglik_histogram(a["m"], a["nan"]), "x"),
    "loglik_histogram: eps < 0": (lambda a: fastland.loglik_histogram(a["m"], a["x"], eps=-0.1), "eps"),
    "loglik_histogram: n_perturb 0": (lambda a: fastland.loglik_histogram(a["m"], a["x"], n_perturb=0),
                                      "n_perturb"),
    "loglik_histogram: kind": (lambda a: fastland.loglik_histogram(a["m"], a["x"], kind="zigzag"), "kind"),
    "loglik_histogram: model returns a tuple": (lambda a: fastland.loglik_histogram(a["tup"], a["x"]), "model"),
    "loglik_histogram: float64 x, float32 model": (lambda a: fastland.loglik_histogram(a["m"], a["x64"]), "x"),
    "directions: x 0-D": (lambda a: fastland.directions(torch.tensor(1.0)), "x"),
    "directions: x a list": (lambda a: fastland.directions([1.0, 2.0]), "x"),
    "directions: kind": (lambda a: fastland.directions(a["x"], "zigzag"), "kind"),
    "amsreg_loss: logits of another batch": (_penalty(fastland.amsreg_loss, lambda x, m: m(x)[:1]), "x"),
    "amsreg_loss: logits 1-D": (_penalty(fastland.amsreg_loss, lambda x, m: m(x)[0]), "logits"),
    "amsreg_loss: logits NaN": (_penalty(fastland.amsreg_loss, lambda x, m: m(x) * math.nan), "logits"),
    "amsreg_loss: n_proj 0": (_penalty(fastland.amsreg_loss, lambda x, m: m(x), n_proj=0), "n_proj"),
    "amsreg_loss: estimator": (_penalty(fastland.amsreg_loss, lambda x, m: m(x), estimator="magic"), "estimator"),
    "amsreg_loss: reduction": (_penalty(fastland.amsreg_loss, lambda x, m: m(x), reduction="max"), "reduction"),
    "amsreg_loss: x without grad": (lambda a: fastland.amsreg_loss(a["m"](a["x"]), a["x"]), "x"),
    "jacobian_loss: logits of another batch": (_penalty(fastland.jacobian_loss, lambda x, m: m(x)[:1]), "x"),
    "jacobian_loss: logits 1-D": (_penalty(fastland.jacobian_loss, lambda x, m: m(x)[0]), "logits"),
    "jacobian_loss: logits NaN": (_penalty(fastland.jacobian_loss, lambda x, m: m(x) * math.nan), "logits"),
    "jacobian_loss: n_proj 0": (_penalty(fastland.jacobian_loss, lambda x, m: m(x), n_proj=0), "n_proj"),
    "jacobian_loss: estimator": (_penalty(fastland.jacobian_loss, lambda x, m: m(x), estimator="gradnorm"),
                                 "estimator"),
    "jacobian_loss: x without grad": (lambda a: fastland.jacobian_loss(a["m"](a["x"]), a["x"]), "x"),
    "Defence: name": (lambda a: D("mixup"), "defence"),
    "Defence: lam < 0": (lambda a: D("amsreg", lam=-1.0), "lam"),
    "Defence: lam NaN": (lambda a: D("amsreg", lam=math.nan), "lam"),
    "Defence: eps < 0": (lambda a: D("at", eps=-0.1), "eps"),
    "Defence: steps 0": (lambda a: D("at", eps=0.1, steps=0), "steps"),
    "Defence: alpha < 0": (lambda a: D("at", eps=0.1, alpha=-0.1), "alpha"),
    "Defence: n_proj 0": (lambda a: D("amsreg", lam=1.0, n_proj=0), "n_proj"),
    "Defence: estimator": (lambda a: D("jacobian", lam=1.0, estimator="gradnorm"), "estimator"),
    "defence_loss: defence a string": (lambda a: fastland.defence_loss(a["m"], a["x"], a["y"], "amsreg"),
                                       "defence"),
    "defence_loss: label >= C with at": (lambda a: fastland.defence_loss(a["m"], a["x"], a["y_big"],
                                                                        D("at", eps=0.1, steps=1)), "y"),
    "defence_loss: label >= C": (lambda a: fastland.defence_loss(a["m"], a["x"], a["y_big"], D("none")), "y"),
    "defence_loss: label < 0": (lambda a: fastland.defence_loss(a["m"], a["x"], a["y_neg"], D("none")), "y"),
    "defence_loss: y of another length": (lambda a: fastland.defence_loss(a["m"], a["x"], a["y_long"], D("none")),
                                          "y"),
    "defence_loss: float y": (lambda a: fastland.defence_loss(a["m"], a["x"], a["y"].float(), D("none")), "y"),
    "defence_loss: x NaN": (lambda a: fastland.defence_loss(a["m"], a["nan"], a["y"], D("none")), "x"),
    "defence_loss: model returns a tuple": (lambda a: fastland.defence_loss(a["tup"], a["x"], a["y"], D("none")),
                                            "model"),
    "defence_loss: float64 x, float32 model": (lambda a: fastland.defence_loss(a["m"], a["x64"], a["y"],
                                                                              D("none")), "x"),
    "pgd: eps < 0": (lambda a: attacks.pgd(a["m"], a["x"], a["y"], -0.1, 0.01, 2), "eps"),
    "pgd: eps NaN": (lambda a: attacks.pgd(a["m"], a["x"], a["y"], math.nan, 0.01, 2), "eps"),
    "pgd: alpha < 0": (lambda a: attacks.pgd(a["m"], a["x"], a["y"], 0.1, -0.01, 2), "alpha"),
    "pgd: steps 0": (lambda a: attacks.pgd(a["m"], a["x"], a["y"], 0.1, 0.01, 0), "steps"),
    "pgd: steps 2.5": (lambda a: attacks.pgd(a["m"], a["x"], a["y"], 0.1, 0.01, 2.5), "steps"),
    "pgd: x 1-D": (lambda a: attacks.pgd(a["m"], torch.rand(16), a["y"], 0.1, 0.01, 2), "x"),
    "pgd: x NaN": (lambda a: attacks.pgd(a["m"], a["nan"], a["y"], 0.1, 0.01, 2), "x"),
    "pgd: label >= C": (lambda a: attacks.pgd(a["m"], a["x"], a["y_big"], 0.1, 0.01, 2), "y"),
    "pgd: label < 0": (lambda a: attacks.pgd(a["m"], a["x"], a["y_neg"], 0.1, 0.01, 2), "y"),
    "pgd: y of another length": (lambda a: attacks.pgd(a["m"], a["x"], a["y_long"], 0.1, 0.01, 2), "y"),
    "pgd: model returns a tuple": (lambda a: attacks.pgd(a["tup"], a["x"], a["y"], 0.1, 0.01, 2), "model"),
    "pgd: float64 x, float32 model": (lambda a: attacks.pgd(a["m"], a["x64"], a["y"], 0.1, 0.01, 2), "x"),
    "apgd: eps < 0": (lambda a: attacks.apgd(a["m"], a["x"], a["y"], -0.1, steps=2), "eps"),
    "apgd: steps 0": (lambda a: attacks.apgd(a["m"], a["x"], a["y"], 0.1, steps=0), "steps"),
    "apgd: restarts 0": (lambda a: attacks.apgd(a["m"], a["x"], a["y"], 0.1, steps=2, restarts=0), "restarts"),
    "apgd: loss": (lambda a: attacks.apgd(a["m"], a["x"], a["y"], 0.1, steps=2, loss="hinge"), "loss"),
    "apgd: x NaN": (lambda a: attacks.apgd(a["m"], a["nan"], a["y"], 0.1, steps=2), "x"),
    "apgd: label >= C": (lambda a: attacks.apgd(a["m"], a["x"], a["y_big"], 0.1, steps=2), "y"),
    "apgd: y of another length": (lambda a: attacks.apgd(a["m"], a["x"], a["y_long"], 0.1, steps=2), "y"),
    "apgd: model returns a tuple": (lambda a: attacks.apgd(a["tup"], a["x"], a["y"], 0.1, steps=2), "model"),
    "apgd: float64 x, float32 model": (lambda a: attacks.apgd(a["m"], a["x64"], a["y"], 0.1, steps=2), "x"),
    "square: eps < 0": (lambda a: attacks.square(a["m"], a["x"], a["y"], -0.1, **SQ), "eps"),
    "square: n_queries 0": (lambda a: attacks.square(a["m"], a["x"], a["y"], 0.1, n_queries=0), "n_queries"),
    "square: p_init > 1": (lambda a: attacks.square(a["m"], a["x"], a["y"], 0.1, p_init=1.5, **SQ), "p_init"),
    "square: x NaN": (lambda a: attacks.square(a["m"], a["nan"], a["y"], 0.1, **SQ), "x"),
    "square: label >= C": (lambda a: attacks.square(a["m"], a["x"], a["y_big"], 0.1, **SQ), "y"),
    "square: y of another length": (lambda a: attacks.square(a["m"], a["x"], a["y_long"], 0.1, **SQ), "y"),
    "square: model returns a tuple": (lambda a: attacks.square(a["tup"], a["x"], a["y"], 0.1, **SQ), "model"),
    "square: float64 x, float32 model": (lambda a: attacks.square(a["m"], a["x64"], a["y"], 0.1, **SQ), "x"),
    "worst_case: eps < 0": (lambda a: attacks.worst_case(a["m"], a["x"], a["y"], -0.1, **WC), "eps"),
    "worst_case: steps 0": (lambda a: attacks.worst_case(a["m"], a["x"], a["y"], 0.1, steps=0, n_queries=5),
                            "steps"),
    "worst_case: unknown attack": (lambda a: attacks.worst_case(a["m"], a["x"], a["y"], 0.1, attacks=("fgsm",),
                                                                **WC), "attacks"),
    "worst_case: no attacks": (lambda a: attacks.worst_case(a["m"], a["x"], a["y"], 0.1, attacks=(), **WC),
                               "attacks"),
    "worst_case: n_target_classes 0": (lambda a: attacks.worst_case(a["m"], a["x"], a["y"], 0.1,
                                                                    n_target_classes=0, **WC), "n_target_classes"),
    "worst_case: x NaN": (lambda a: attacks.worst_case(a["m"], a["nan"], a["y"], 0.1, **WC), "x"),
    "worst_case: label >= C": (lambda a: attacks.worst_case(a["m"], a["x"], a["y_big"], 0.1, **WC), "y"),
    "worst_case: model returns a tuple": (lambda a: attacks.worst_case(a["tup"], a["x"], a["y"], 0.1, **WC),
                                          "model"),
    "worst_case: float64 x, float32 model": (lambda a: attacks.worst_case(a["m"], a["x64"], a["y"], 0.1, **WC),
                                             "x"),
}



@pytest.fixture(scope="module")
def inputs() -> Dict[str, Any]:
    return _inputs()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_one_line_error_naming_the_argument(name, inputs):
    call, argument = CASES[name]
    with pytest.raises((ValueError, TypeError)) as info:
        call(inputs)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{argument}: "), message


# the same calls with good inputs: the errors above come from the one bad argument, not from the set-up
GOOD: Dict[str, Callable[[Dict[str, Any]], Any]] = {
    "landscape": lambda a: fastland.landscape(a["m"], a["x"], y=a["y"], directions="fgsm", points=3),
    "flatness": lambda a: fastland.flatness(a["m"], a["x"], y=a["y"], directions="fgsm"),
    "ams_score": lambda a: fastland.ams_score(a["m"], a["x"]),
    "loglik_histogram": lambda a: fastland.loglik_histogram(a["m"], a["x"]),
    "directions": lambda a: fastland.directions(a["x"]),
    "amsreg_loss": _penalty(fastland.amsreg_loss, lambda x, m: m(x)),
    "jacobian_loss": _penalty(fastland.jacobian_loss, lambda x, m: m(x)),
    "defence_loss": lambda a: fastland.defence_loss(a["m"], a["x"], a["y"], D("at", eps=0.1, steps=1)),
    "pgd": lambda a: attacks.pgd(a["m"], a["x"], a["y"], 0.1, 0.01, 2),
    "apgd": lambda a: attacks.apgd(a["m"], a["x"], a["y"], 0.1, steps=2),
    "square": lambda a: attacks.square(a["m"], a["x"], a["y"], 0.1, **SQ),
    "worst_case": lambda a: attacks.worst_case(a["m"], a["x"], a["y"], 0.1, **WC),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_good_input_raises_nothing(name, inputs):
    assert GOOD[name](inputs) is not None
