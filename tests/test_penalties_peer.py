"""The benchmarks' Hoffman et al. (2019) peer (benchmarks/peers/hoffman_jacobian.py): an
independent Jacobian regulariser, held to the exact ‖J‖²_F of a tiny model and to
fastland's jacobian_loss on one scale."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.func import jacrev, vmap

from fastland import jacobian_loss
from fastland.testing import tiny_cnn

PEER = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "hoffman_jacobian.py"


def _peer():
    spec = importlib.util.spec_from_file_location("hoffman_jacobian", PEER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _setup():
    torch.manual_seed(3)
    model = tiny_cnn(in_channels=2, n_classes=5, size=5).double().eval()
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    J = vmap(jacrev(lambda xi: model(xi.unsqueeze(0))[0]))(x.detach())  # [B, C, *S]
    return model, x, J.pow(2).sum() / x.shape[0]


def test_peer_is_unbiased_for_the_frobenius_norm() -> None:
    """200 one-projection estimates (seed 0): their mean is within 4 standard errors of the
    exact batch-mean ‖J‖²_F (and within 10% of it); n = -1 is the exact value (1e-12)."""
    peer = _peer()
    model, x, exact = _setup()
    logits = model(x)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([peer.jacobian_sq_norm(x, logits, 1, gen).detach() for _ in range(200)])
    se = draws.std() / draws.numel() ** 0.5
    assert abs(draws.mean() - exact) < 4 * se, (float(draws.mean()), float(exact), float(se))
    assert abs(draws.mean() - exact) < 0.1 * exact
    assert draws.std() > 0.05 * exact  # the draws do vary: the test can fail
    torch.testing.assert_close(peer.jacobian_sq_norm(x, logits, -1), exact, rtol=1e-12, atol=0)


def test_peer_module_is_half_of_jacobian_loss() -> None:
    """Exact mode: the peer's JacobianReg is ½·‖J‖²_F, fastland's jacobian_loss the full value;
    their parameter gradients agree likewise (float64, 1e-12)."""
    peer = _peer()
    model, x, exact = _setup()
    logits = model(x)
    theirs = peer.JacobianReg(n=-1)(x, logits)
    ours = jacobian_loss(logits, x, estimator="exact")
    torch.testing.assert_close(2 * theirs, ours, rtol=1e-12, atol=0)
    params = list(model.parameters())
    g_theirs = torch.autograd.grad(2 * theirs, params, allow_unused=True, retain_graph=True)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    for p, a, b in zip(params, g_theirs, g_ours):  # (the last bias is unused: None reads as zero)
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
