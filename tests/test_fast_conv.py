"""fastland.fast_conv: the fast input-gradient path gives autograd's gradients, to every order.

Float64 throughout unless stated; tolerances 1e-12 (absolute, on values of order 1-10).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastland import _ext, fast_conv, models
from fastland.fast_conv import conv_fn, make_spec, route

TOL = dict(rtol=0, atol=1e-12)
DT = torch.float64


def _grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().requires_grad_(True)
    y = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    return (y, *torch.autograd.grad(y, [x, *params], g))


def _fast_grad_fn(y: torch.Tensor) -> bool:
    return type(y.grad_fn).__name__ == "_ConvBackward"


# (ctor, C, O, k, kwargs, input spatial shape, batch): odd shapes, every geometry the path handles
CASES = [
    (nn.Conv2d, 1, 6, 5, dict(padding=2), (11, 9), 3),                     # LeNet-like: flip
    (nn.Conv2d, 1, 33, 3, dict(), (8, 7), 2),                             # DDNet-like: native
    (nn.Conv2d, 3, 5, 3, dict(padding=1, bias=False), (7, 10), 1),         # ResNet stem, batch 1
    (nn.Conv2d, 2, 4, 3, dict(stride=2, padding=1), (9, 8), 2),            # strided: native
    (nn.Conv2d, 2, 3, (3, 2), dict(stride=(2, 1), padding=(0, 1)), (9, 8), 2),
    (nn.Conv2d, 1, 3, 3, dict(dilation=2, padding=1), (9, 11), 2),         # dilated: flip
    (nn.Conv2d, 1, 3, 3, dict(dilation=2, padding=5), (6, 7), 2),          # p > d(k-1): native
    (nn.Conv2d, 2, 4, 3, dict(padding="same"), (7, 6), 2),
    (nn.Conv2d, 2, 4, 4, dict(padding="same", dilation=1), (7, 6), 2),     # asymmetric 'same'
    (nn.Conv2d, 1, 4, 3, dict(padding="valid", bias=False), (5, 6), 2),
    (nn.Conv2d, 4, 6, 3, dict(groups=2, padding=1), (6, 5), 2),            # groups: native
    (nn.Conv2d, 2, 3, 3, dict(padding=2, padding_mode="reflect"), (7, 6), 2),
    (nn.Conv2d, 2, 3, 3, dict(padding=1, padding_mode="circular"), (5, 6), 2),
    (nn.Conv1d, 1, 5, 4, dict(padding=1), (13,), 3),
    (nn.Conv1d, 2, 20, 3, dict(stride=3), (14,), 2),
    (nn.Conv3d, 1, 3, 3, dict(padding=1), (4, 5, 3), 2),
    (nn.Conv3d, 2, 4, 2, dict(stride=2, bias=False), (5, 4, 6), 1),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, plain layer
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_gradients_equal_autograd(case):
    ctor, c, o, k, kwargs, spatial, b = case
    torch.manual_seed(0)
    plain = ctor(c, o, k, **kwargs).to(DT)
    fast = fast_conv.apply(copy.deepcopy(plain))
    x = torch.randn(b, c, *spatial, dtype=DT)
    y_ref, *ref = _grads(plain, x, g := torch.randn_like(plain(x)))
    y, *got = _grads(fast, x, g)
    assert _fast_grad_fn(fast(x.requires_grad_(True)))
    torch.testing.assert_close(y, y_ref, **TOL)
    assert len(got) == len(ref)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **TOL)


def test_cases_cover_both_routes():
    routes = set()
    for ctor, c, o, k, kwargs, _, _ in CASES:
        m = ctor(c, o, k, **kwargs)
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            continue
        routes.add(route(m.weight, make_spec(m.weight.dim() - 2, m.stride, m.padding, m.dilation, m.groups)))
    assert routes == {"flip", "native"}


GEOMS = [  # (C, O, k, stride, padding, dilation, groups): flip and native routes
    (1, 3, 3, 1, 1, 1, 1),
    (2, 20, 3, 1, 0, 1, 1),
    (2, 3, 3, 2, 1, 1, 1),
    (2, 4, 2, 1, 1, 2, 2),
]


@pytest.mark.parametrize("geom", GEOMS)
def test_gradcheck_and_gradgradcheck(geom):
    c, o, k, s, p, d, groups = geom
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, c, 6, 5, dtype=DT, generator=gen, requires_grad=True)
    w = torch.randn(o, c // groups, k, k, dtype=DT, generator=gen, requires_grad=True)
    b = torch.randn(o, dtype=DT, generator=gen, requires_grad=True)
    spec = make_spec(2, s, p, d, groups)
    fn = lambda x, w, b: conv_fn(x, w, b, spec)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_third_order_matches_autograd():
    """d/dw of a Hessian-vector product: the three Functions close over each other."""
    torch.manual_seed(2)
    x = torch.randn(2, 1, 7, 6, dtype=DT, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, dtype=DT, requires_grad=True)
    spec = make_spec(2, 1, 1, 1, 1)

    def third(f):
        y = f(x, w).tanh().sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)
        (hx,) = torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(hx.pow(2).sum(), w)[0]

    ref = third(lambda x, w: F.conv2d(x, w, None, 1, 1))
    got = third(lambda x, w: conv_fn(x, w, None, spec))
    assert float(ref.abs().max()) > 100  # third derivatives are large: compare relatively
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("o,k,pad", [(6, 5, 2), (32, 3, 0)], ids=["lenet-flip", "ddnet-native"])
def test_float32_error_within_twice_pytorchs(o, k, pad):
    """float32 runs other kernels (NNPACK for "flip"): its error against a float64 reference
    stays within 2x that of PyTorch's own float32 gradients, plus 1e-6."""
    torch.manual_seed(7)
    plain = nn.Conv2d(1, o, k, padding=pad)
    fast = fast_conv.apply(copy.deepcopy(plain))
    x = torch.rand(16, 1, 28, 28)
    g = torch.randn_like(plain(x))
    ref = _grads(copy.deepcopy(plain).double(), x.double(), g.double())[1:]
    base = _grads(plain, x, g)[1:]
    got = _grads(fast, x, g)[1:]
    for r, b, a in zip(ref, base, got):
        err_b, err_a = float((b.double() - r).abs().max()), float((a.double() - r).abs().max())
        assert err_a <= 2 * err_b + 1e-6, (err_a, err_b)


def test_torch_func_grad_through_the_path():
    c = fast_conv.apply(nn.Conv2d(1, 3, 3, padding=1).to(DT))
    x = torch.randn(2, 1, 5, 6, dtype=DT)
    f = lambda x: c(x).tanh().sum()  # noqa: E731
    got = torch.func.grad(f)(x)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(f(xr), xr)
    torch.testing.assert_close(got, ref, **TOL)


# --------------------------------------------------------------------------- the library on top


def _pair(name: str = "lenet", seed: int = 0):
    torch.manual_seed(seed)
    plain = fast_conv.remove(models.create(name, "fmnist").to(DT))
    return plain, fast_conv.apply(copy.deepcopy(plain))


@pytest.mark.parametrize("penalty", ["amsreg_loss", "jacobian_loss"])
@pytest.mark.parametrize("batched", [False, True])
def test_penalties_same_value_and_parameter_gradients(penalty, batched):
    import fastland

    plain, fast = _pair()
    x = torch.rand(3, 1, 28, 28, dtype=DT, generator=torch.Generator().manual_seed(3))
    out = []
    for m in (plain, fast):
        xi = x.clone().requires_grad_(True)
        value = getattr(fastland, penalty)(m(xi), xi, estimator="exact", batched=batched)
        out.append((value, torch.autograd.grad(value, list(m.parameters()))))
    torch.testing.assert_close(out[1][0], out[0][0], **TOL)
    for a, r in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def _defences():
    try:
        from fastland import defences
    except ImportError:  # pragma: no cover - before the move
        from fastland import train as defences
    return defences


@pytest.mark.parametrize("name", ["none", "at", "jacobian", "amsreg"])
def test_training_steps_reach_the_same_parameters(name):
    d = _defences()
    spec = d.Defence(name, lam=0.5 if name != "none" else 0.0, eps=10 / 255 if name == "at" else 0.0,
                     steps=3, estimator="projection", n_proj=2)
    plain, fast = _pair("ddnet" if name == "jacobian" else "lenet")
    data = torch.Generator().manual_seed(4)
    x, y = torch.rand(4, 1, 28, 28, dtype=DT, generator=data), torch.randint(0, 10, (4,), generator=data)
    for m in (plain, fast):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(5)
        for _ in range(2):
            d.train_step(m.train(), x, y, spec, opt, generator=gen)
    for (n, a), (_, r) in zip(fast.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=n)


def test_input_gradient_only_skips_the_weight_gradient(monkeypatch):
    """An attack's ``autograd.grad(loss, x)`` must not pay for the weight gradient."""
    calls = []
    from fastland import _conv_grad

    kernel = _conv_grad._weight_and_bias_grad
    monkeypatch.setattr(_conv_grad, "_weight_and_bias_grad", lambda *a: calls.append(1) or kernel(*a))
    _, fast = _pair()
    x = torch.rand(2, 1, 28, 28, dtype=DT, requires_grad=True)
    torch.autograd.grad(fast(x).sum(), x)
    assert calls == []
    fast(x).sum().backward()
    assert calls == [1]


# --------------------------------------------------------------------------- apply / remove


def test_apply_remove_idempotent_and_per_instance():
    m = fast_conv.remove(models.create("ddnet", "fmnist"))
    other = fast_conv.apply(models.create("ddnet", "fmnist"))
    assert not fast_conv.is_applied(m)
    assert fast_conv.apply(fast_conv.apply(m)) is m
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    forwards = [c.__dict__["_conv_forward"] for c in convs]
    fast_conv.apply(m, max_in_channels=8)
    assert [c.__dict__["_conv_forward"] for c in convs] == forwards
    assert all(f.max_in_channels == 8 for f in forwards)
    assert fast_conv.is_applied(other) and type(m) is type(other)
    assert fast_conv.remove(fast_conv.remove(m)) is m
    assert not fast_conv.is_applied(m) and all("_conv_forward" not in c.__dict__ for c in convs)


@pytest.mark.parametrize("name", ["lenet", "ddnet", "resnet18"])
def test_fastland_models_carry_the_path(name):
    m = models.create(name, "cifar10" if name == "resnet18" else "fmnist")
    assert fast_conv.is_applied(m)
    assert "_conv_forward" in m.body.conv1.__dict__


def test_state_dict_deepcopy_and_pickle_round_trip():
    plain, fast = _pair()
    assert list(fast.state_dict()) == list(plain.state_dict())
    clone = copy.deepcopy(fast)
    conv1 = clone.body.conv1
    assert conv1.__dict__["_conv_forward"].module is conv1
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.body.conv1.__dict__["_conv_forward"].module is loaded.body.conv1
    buf = io.BytesIO()
    torch.save(fast.state_dict(), buf)
    buf.seek(0)
    fresh = _pair(seed=9)[1]
    fresh.load_state_dict(torch.load(buf))
    x = torch.rand(2, 1, 28, 28, dtype=DT, requires_grad=True)
    for m in (clone, loaded, fresh):
        y = m(x)
        assert _fast_grad_fn(m.body.conv1(m.normalize(x)))
        torch.testing.assert_close(y, plain(x), **TOL)


def test_declined_calls_run_the_plain_conv():
    c = fast_conv.apply(nn.Conv2d(1, 4, 3).to(DT))
    x = torch.randn(2, 1, 6, 6, dtype=DT)
    assert type(c(x.requires_grad_(True)).grad_fn).__name__ == "_ConvBackward"
    two = fast_conv.apply(nn.Conv2d(2, 4, 3).to(DT))
    assert type(two(torch.randn(2, 2, 6, 6, dtype=DT)).grad_fn).__name__ == "ConvolutionBackward0"  # x needs no grad
    with torch.no_grad():
        assert c(x).grad_fn is None
    assert type(c(x[0]).grad_fn).__name__ != "_ConvBackward"                     # unbatched input
    wide = fast_conv.apply(nn.Conv2d(5, 4, 3).to(DT))
    assert type(wide(torch.randn(1, 5, 6, 6, dtype=DT, requires_grad=True)).grad_fn).__name__ != "_ConvBackward"
    bf = fast_conv.apply(nn.Conv2d(1, 4, 3).bfloat16())
    assert type(bf(torch.randn(1, 1, 6, 6, dtype=torch.bfloat16, requires_grad=True)).grad_fn).__name__ != "_ConvBackward"
    c32 = fast_conv.apply(nn.Conv2d(1, 4, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = c32(torch.randn(1, 1, 6, 6, requires_grad=True))
    assert y.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_falls_back_to_the_plain_conv():
    c = fast_conv.apply(nn.Conv2d(1, 4, 3).cuda())
    y = c(torch.randn(2, 1, 6, 6, device="cuda", requires_grad=True))
    assert type(y.grad_fn).__name__ != "_ConvBackward"


def test_conv_input_grad_matches_torch():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(6, 1, 5, 5, dtype=DT, generator=gen)
    for s, p, shape in [(1, 2, (3, 1, 10, 9)), (2, 1, (3, 1, 12, 11)), (1, 0, (2, 1, 9, 8))]:
        g = torch.randn(F.conv2d(torch.zeros(shape, dtype=DT), w, None, s, p).shape, dtype=DT, generator=gen)
        ref = torch.nn.grad.conv2d_input(shape, w, g, s, p)
        torch.testing.assert_close(fast_conv.conv_input_grad(shape, w, g, s, p), ref, **TOL)


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fast_conv.apply("lenet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_in_channels: expected a positive int, got 0"):
        fast_conv.apply(nn.Conv2d(1, 1, 1), max_in_channels=0)
    with pytest.raises(ValueError, match="stride: expected an int or 2 ints"):
        make_spec(2, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="weight: expected 3 to 5 dims"):
        fast_conv.conv(torch.randn(1, 1, 3), torch.randn(2, 1))


# --------------------------------------------------------------------------- gradients on request


def test_input_marked_on_request_gets_no_input_gradient(input_grad_calls):
    """A plain backward skips the input gradient that only a marked leaf would receive (x.grad
    stays None) and gives the weight gradients of torch's conv; inside grad_requested the
    gradient is computed as usual, equal to torch's."""
    from fastland._conv_grad import grad_requested, is_grad_on_request, mark_grad_on_request

    gen = torch.Generator().manual_seed(11)
    conv = nn.Conv2d(1, 6, 5, padding=2).to(DT)
    fast = fast_conv.apply(copy.deepcopy(conv))
    x0 = torch.randn(3, 1, 9, 7, dtype=DT, generator=gen)
    g = torch.randn(3, 6, 9, 7, dtype=DT, generator=gen)
    y_ref, gx_ref, gw_ref, gb_ref = _grads(conv, (x0 - 0.5) * 2.0, g)
    calls = input_grad_calls

    x = mark_grad_on_request(x0.clone().requires_grad_(True))
    assert is_grad_on_request(x) and not is_grad_on_request(x0)
    y = fast((x - 0.5) * 2.0)  # two elementwise nodes between the leaf and the layer
    y.backward(g)
    assert calls[0] == 0 and x.grad is None
    torch.testing.assert_close(fast.weight.grad, gw_ref, **TOL)
    torch.testing.assert_close(fast.bias.grad, gb_ref, **TOL)

    y = fast((x - 0.5) * 2.0)
    with grad_requested(x):
        (gx,) = torch.autograd.grad(y, x, g)
    assert calls[0] == 1
    torch.testing.assert_close(gx, 2.0 * gx_ref, **TOL)
    assert x.grad is None


def test_input_gradient_kept_when_anybody_reads_it(input_grad_calls):
    """The skip needs every path below the layer to end in marked leaves: an unmarked leaf
    on one path, or more nodes than the walk's budget, keep the input gradient."""
    from fastland import _conv_grad
    from fastland._conv_grad import mark_grad_on_request

    gen = torch.Generator().manual_seed(12)
    fast = fast_conv.apply(nn.Conv2d(1, 3, 3).to(DT))
    calls = input_grad_calls
    marked = mark_grad_on_request(torch.randn(2, 1, 6, 5, dtype=DT, generator=gen).requires_grad_(True))
    plain = torch.randn(2, 1, 6, 5, dtype=DT, generator=gen, requires_grad=True)
    fast(marked + plain).sum().backward()
    assert calls[0] == 1 and marked.grad is None
    torch.testing.assert_close(plain.grad, torch.autograd.grad(
        nn.functional.conv2d(marked.detach() + plain, fast.weight, fast.bias).sum(), plain)[0], **TOL)

    deep = marked
    for _ in range(_conv_grad._WALK_BUDGET + 1):
        deep = deep * 1.0
    fast(deep).sum().backward()
    assert calls[0] == 2 and marked.grad is None  # computed (budget spent), then dropped


def test_mark_grad_on_request_refuses_non_leaves():
    from fastland._conv_grad import mark_grad_on_request

    with pytest.raises(ValueError, match="t: expected a leaf tensor that requires grad, got is_leaf=True, "
                                         "requires_grad=False"):
        mark_grad_on_request(torch.zeros(2))
    with pytest.raises(ValueError, match="is_leaf=False"):
        mark_grad_on_request(torch.zeros(2, requires_grad=True) * 2)


@pytest.mark.skipif(not _ext.extension_available(), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("o,k,pad,hw,b", [
    (6, (5, 5), (2, 2), (28, 28), 5),    # LeNet-5's first layer
    (1, (3, 3), (0, 0), (7, 9), 1),      # one output channel, no padding
    (33, (3, 2), (1, 0), (11, 6), 2),    # non-square kernel, wide layer
    (4, (3, 3), (4, 3), (5, 8), 3),      # padding beyond the kernel: outputs larger than the input
    (5, (1, 7), (0, 3), (9, 40), 2),     # rows longer than one register chunk
])
def test_one_channel_kernel_matches_torch(dtype, o, k, pad, hw, b):
    """The C++ input gradient of a one-input-channel convolution equals aten's on fresh random
    inputs of odd shapes (float64 to 1e-12, float32 to 1e-5 relative to the largest entry)."""
    from fastland import _C

    gen = torch.Generator().manual_seed(sum(hw) + o)
    ho, wo = hw[0] + 2 * pad[0] - k[0] + 1, hw[1] + 2 * pad[1] - k[1] + 1
    g = torch.randn(b, o, ho, wo, generator=gen, dtype=dtype)
    w = torch.randn(o, 1, *k, generator=gen, dtype=dtype)
    want = torch.ops.aten.convolution_backward(
        g, torch.empty(b, 1, *hw, dtype=dtype), w, None, [1, 1], list(pad), [1, 1], False, [0, 0], 1,
        [True, False, False])[0]
    got = _C.conv_input_grad_1ch(g, w, hw[0], hw[1], pad[0], pad[1])
    tol = 1e-12 if dtype == torch.float64 else 1e-5 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    with pytest.raises(RuntimeError, match="conv_input_grad_1ch"):
        _C.conv_input_grad_1ch(g, w, hw[0] + 1, hw[1], pad[0], pad[1])


# (O, k, padding, input spatial size, batch): odd shapes for the forward and weight-gradient kernels
ONE_CHANNEL_SHAPES = [
    (6, (5, 5), (2, 2), (28, 28), 5),    # LeNet-5's first layer
    (1, (3, 3), (0, 0), (7, 9), 1),      # one output channel, no padding
    (33, (3, 2), (1, 0), (11, 6), 2),    # non-square kernel, wide layer
    (4, (3, 3), (4, 3), (5, 8), 3),      # padding beyond the kernel: outputs larger than the input
    (5, (1, 7), (0, 3), (9, 40), 2),     # rows longer than one register block, the widest compiled kernel
    (3, (2, 9), (1, 4), (6, 13), 2),     # wider than the compiled kernels: PyTorch's own weight gradient
]


@pytest.mark.skipif(not _ext.extension_available(), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("o,k,pad,hw,b", ONE_CHANNEL_SHAPES)
def test_one_channel_forward_and_weight_grad_match_torch(dtype, o, k, pad, hw, b):
    """The C++ forward (with and without bias) and weight and bias gradients of a one-input-channel
    convolution equal aten's on fresh random inputs of odd shapes (float64 to 1e-12, float32 to
    1e-5 relative to the largest entry); a mismatched shape gets a one-line error naming the kernel."""
    from fastland import _C

    gen = torch.Generator().manual_seed(sum(hw) + o + k[1])
    x = torch.randn(b, 1, *hw, generator=gen, dtype=dtype)
    w = torch.randn(o, 1, *k, generator=gen, dtype=dtype)
    bias = torch.randn(o, generator=gen, dtype=dtype)

    def close(got, want):
        tol = 1e-12 if dtype == torch.float64 else 1e-5 * float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=tol)

    for bb in (bias, None):
        close(_C.conv_forward_1ch(x, w, bb, pad[0], pad[1]), F.conv2d(x, w, bb, 1, pad))
    g = torch.randn(F.conv2d(x, w, None, 1, pad).shape, generator=gen, dtype=dtype)
    _, want_w, want_b = torch.ops.aten.convolution_backward(
        g, x, w, [o], [1, 1], list(pad), [1, 1], False, [0, 0], 1, [False, True, True])
    got_w, got_b = _C.conv_weight_grad_1ch(x, g, k[0], k[1], pad[0], pad[1], True)
    close(got_w, want_w)
    close(got_b, want_b)
    got_w, none = _C.conv_weight_grad_1ch(x, g, k[0], k[1], pad[0], pad[1], False)
    close(got_w, want_w)
    assert none is None
    with pytest.raises(RuntimeError, match="conv_weight_grad_1ch"):
        _C.conv_weight_grad_1ch(x, g, k[0] + 1, k[1], pad[0], pad[1], True)
    with pytest.raises(RuntimeError, match="conv_forward_1ch"):
        _C.conv_forward_1ch(x, w, bias[:-1] if o > 1 else torch.zeros(2, dtype=dtype), pad[0], pad[1])


def test_one_channel_layer_trains_through_the_kernels(monkeypatch):
    """A one-input-channel layer whose input needs no grad (a plain training step): the forward and
    the weight and bias gradients run the C++ kernels (one pass for both gradients), equal to the
    plain layer's in float64; gradcheck and gradgradcheck of (w, b) at a constant input pass;
    without grad the kernel runs with no graph at all."""
    from fastland import _conv_grad

    if not _ext.extension_available():
        pytest.skip("the C++ extension is not built")
    calls = []
    kernel = _conv_grad._weight_and_bias_grad
    monkeypatch.setattr(_conv_grad, "_weight_and_bias_grad",
                        lambda *a: calls.append(a[-1]) or kernel(*a))
    torch.manual_seed(4)
    plain = nn.Conv2d(1, 6, 5, padding=2).to(DT)
    fast = fast_conv.apply(copy.deepcopy(plain))
    x = torch.randn(3, 1, 11, 9, dtype=DT)
    y = fast(x)
    assert _fast_grad_fn(y)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [fast.weight, fast.bias], g)
    ref = torch.autograd.grad(plain(x), [plain.weight, plain.bias], g)
    assert calls == [True]  # weight and bias in one pass
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **TOL)
    spec = make_spec(2, 1, 2, 1, 1)
    assert torch.autograd.gradcheck(lambda w, b: conv_fn(x, w, b, spec), (fast.weight, fast.bias))
    assert torch.autograd.gradgradcheck(lambda w, b: conv_fn(x, w, b, spec), (fast.weight, fast.bias))
    with torch.no_grad():
        out = fast(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, plain(x).detach(), **TOL)


def test_wide_layers_keep_atens_weight_gradient(monkeypatch):
    """More output channels than ONE_CHANNEL_WEIGHT_GRAD_MAX_OUT (DDNet's 32, where oneDNN's weight
    gradient was measured faster): aten's, through the same Function."""
    from fastland import _C, _conv_grad

    if not _ext.extension_available():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(_C, "conv_weight_grad_1ch", None, raising=False)  # would fail if called
    torch.manual_seed(5)
    o = _conv_grad.ONE_CHANNEL_WEIGHT_GRAD_MAX_OUT + 1
    plain = nn.Conv2d(1, o, 3).to(DT)
    fast = fast_conv.apply(copy.deepcopy(plain))
    x = torch.randn(2, 1, 7, 6, dtype=DT)
    got = torch.autograd.grad(fast(x).sum(), [fast.weight, fast.bias])
    ref = torch.autograd.grad(plain(x).sum(), [plain.weight, plain.bias])
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **TOL)


@pytest.mark.skipif(not _ext.extension_available(), reason="the C++ extension is not built")
def test_one_channel_weight_grad_is_the_same_at_any_thread_count():
    """The weight gradient adds per-block totals in one fixed order: bit for bit the same on one
    thread and on two (a training run's result does not depend on its thread count here)."""
    from fastland import _C
    from fastland.testing import num_threads

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(37, 1, 28, 28, generator=gen)
    g = torch.randn(37, 6, 28, 28, generator=gen)
    with num_threads(1):
        one = _C.conv_weight_grad_1ch(x, g, 5, 5, 2, 2, True)
    with num_threads(2):
        two = _C.conv_weight_grad_1ch(x, g, 5, 5, 2, 2, True)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
