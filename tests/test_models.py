"""Models: output shapes, parameter counts, normalisation, first-layer layout, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastland import models
from fastland.data import DATASETS, DatasetInfo, synthetic_info


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_params(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear_params(d_in: int, d_out: int) -> int:
    return d_in * d_out + d_out


def lenet_count(c: int, feat: int, k: int = 10) -> int:
    """conv6 5x5, conv16 5x5, fc 16*feat*feat-120-84-k."""
    return (conv_params(c, 6, 5) + conv_params(6, 16, 5) + linear_params(16 * feat * feat, 120)
            + linear_params(120, 84) + linear_params(84, k))


def ddnet_count(c: int, feat: int, k: int = 10) -> int:
    """conv32-conv32-conv64-conv64 (3x3), fc 64*feat*feat-200-200-k."""
    return (conv_params(c, 32, 3) + conv_params(32, 32, 3) + conv_params(32, 64, 3)
            + conv_params(64, 64, 3) + linear_params(64 * feat * feat, 200)
            + linear_params(200, 200) + linear_params(200, k))


def resnet18_count(c: int, k: int = 10, w: int = 64) -> int:
    """He et al.'s BasicBlock ResNet-18 with a 3x3 stem; BN has 2 parameters per channel."""
    total = conv_params(c, w, 3, bias=False) + 2 * w
    in_planes = w
    for mult in (1, 2, 4, 8):
        planes = w * mult
        for block in range(2):
            src = in_planes if block == 0 else planes
            total += conv_params(src, planes, 3, False) + 2 * planes
            total += conv_params(planes, planes, 3, False) + 2 * planes
            if src != planes:
                total += conv_params(src, planes, 1, False) + 2 * planes
        in_planes = planes
    return total + linear_params(8 * w, k)


@pytest.mark.parametrize(
    "name, dataset, expected",
    [
        ("lenet", "fmnist", lenet_count(1, 5)),
        ("lenet", "cifar10", lenet_count(3, 5)),
        ("ddnet", "fmnist", ddnet_count(1, 4)),
        ("ddnet", "cifar10", ddnet_count(3, 5)),
        ("resnet18", "fmnist", resnet18_count(1)),
        ("resnet18", "cifar10", resnet18_count(3)),
    ],
)
def test_output_shape_and_parameter_count(name: str, dataset: str, expected: int) -> None:
    model = models.create(name, dataset).eval()
    info = DATASETS[dataset]
    x = torch.rand(3, *info.shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, info.n_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert n_params(model) == expected
    assert isinstance(model.body[0], nn.Conv2d)
    assert model.input_shape == info.shape


def test_published_parameter_counts() -> None:
    """The well-known totals: LeNet-5 on CIFAR 62 006, C&W's MNIST CNN 312 202,
    kuangliu's CIFAR ResNet-18 11 173 962."""
    assert n_params(models.create("lenet", "cifar10")) == 62006
    assert n_params(models.create("ddnet", "fmnist")) == 312202
    assert n_params(models.create("resnet18", "cifar10")) == 11173962


def test_resnet_layout_for_first_layer_fusion() -> None:
    body = models.create("resnet18", "cifar10").body
    kinds = [type(m) for m in body]
    assert kinds[:3] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert all(isinstance(b, models.BasicBlock) for stage in body[3:7] for b in stage)
    assert kinds[7:] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    stem = body[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.bias is None
    assert not any(isinstance(m, nn.MaxPool2d) for m in body.modules())


@pytest.mark.parametrize("name", ["lenet", "ddnet"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (2, 19, 23)])
def test_odd_shapes(name: str, shape: tuple) -> None:
    model = models.create(name, synthetic_info(shape, n_classes=7))
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7)


def test_small_width_resnet_odd_shape_and_classes() -> None:
    model = models.ResNet18((2, 9, 13), num_classes=5, width=4).eval()
    assert model(torch.rand(3, 2, 9, 13)).shape == (3, 5)
    assert n_params(model) == resnet18_count(2, 5, 4)


def test_normalize_matches_formula_and_is_first() -> None:
    info = DATASETS["cifar10"]
    model = models.create("ddnet", "cifar10")
    x = torch.rand(4, 3, 32, 32)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), (x - mean) / std)
    torch.testing.assert_close(model(x), model.body((x - mean) / std))
    assert model.normalize.mean.shape == (1, 3, 1, 1)
    assert "normalize.mean" in model.state_dict() and "normalize.std" in model.state_dict()


def test_normalize_follows_dtype() -> None:
    model = models.create("lenet", "fmnist").double()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    assert model(x).dtype == torch.float64


@pytest.mark.parametrize("name", ["lenet", "resnet18"])  # both pad their first conv
def test_first_layer_linearity_is_exact_with_padding(name: str) -> None:
    """conv(N(x + a d1 + b d2)) = conv(N(x)) + a conv0(d1/std) + b conv0(d2/std)."""
    model = models.create(name, "cifar10").double()
    conv, norm = model.body[0], model.normalize
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    d1, d2 = torch.randn_like(x).sign(), torch.randn_like(x)
    a, b = 0.037, -0.11
    lhs = conv(norm(x + a * d1 + b * d2))

    def conv0(d: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(d, conv.weight, None, conv.stride, conv.padding)

    rhs = conv(norm(x)) + a * conv0(d1 / norm.std) + b * conv0(d2 / norm.std)
    torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=1e-10)


def test_create_num_classes_override_and_datasetinfo() -> None:
    info = DatasetInfo("mine", (3, 16, 16), 4, (0.1, 0.2, 0.3), (1.0, 2.0, 3.0), ("a", "b", "c", "d"))
    model = models.create("ddnet", info, num_classes=6)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 6)
    assert model.normalize.std.flatten().tolist() == [1.0, 2.0, 3.0]
    assert models.create("lenet", "synthetic")(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_model_names() -> None:
    assert set(models.MODEL_NAMES) == {"lenet", "ddnet", "resnet18"}


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"name: .*'lenet'.*'ddnet'.*'resnet18'.*'vgg'"):
        models.create("vgg", "fmnist")
    with pytest.raises(ValueError, match=r"dataset: .*'fmnist'.*'cifar10'.*'synthetic'.*'mnist'"):
        models.create("lenet", "mnist")


def test_bad_inputs_name_the_argument() -> None:
    model = models.create("lenet", "fmnist")
    with pytest.raises(TypeError, match=r"x: expected a floating-point dtype, got torch.uint8"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"x: expected shape \[B, 1, 28, 28\], got \(2, 3, 28, 28\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"x: expected 4 dimensions"):
        model(torch.rand(1, 28, 28))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
        model([[0.0]])


def test_bad_construction_arguments() -> None:
    with pytest.raises(ValueError, match=r"std: expected 2 values"):
        models.Normalize([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match=r"std: expected positive"):
        models.Normalize([0.1], [0.0])
    with pytest.raises(ValueError, match=r"mean: expected finite"):
        models.Normalize([float("nan")], [1.0])
    with pytest.raises(ValueError, match=r"mean: expected 3 values"):
        models.LeNet5((3, 32, 32), mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match=r"num_classes: expected a positive int"):
        models.DDNet(num_classes=0)
    with pytest.raises(ValueError, match=r"input_shape: DDNet needs images of at least 16x16"):
        models.DDNet((1, 12, 12))
    with pytest.raises(ValueError, match=r"input_shape: expected \(C, H, W\)"):
        models.LeNet5((28, 28))
    with pytest.raises(TypeError, match=r"body: expected a non-empty nn.Sequential"):
        models.Classifier(models.Normalize([0.0], [1.0]), nn.Linear(3, 2))


def test_trains_on_synthetic_data() -> None:
    """Sanity: ten Adam steps on 96 synthetic images classify fresh draws from the same
    class prototypes well above chance (25%)."""
    from fastland.data import synthetic_dataset

    shape = (1, 12, 12)
    images, labels = synthetic_dataset(96, shape, n_classes=4, seed=1).tensors
    fresh_x, fresh_y = synthetic_dataset(200, shape, n_classes=4, seed=1).tensors  # same prototypes
    model = models.create("lenet", synthetic_info(shape, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(fresh_x[96:]).argmax(1) == fresh_y[96:]).float().mean().item()
    assert acc > 0.9
