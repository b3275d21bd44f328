"""Classifiers of the paper: LeNet-5, DDNet and ResNet-18 (CIFAR variant).

Every model is a :class:`Classifier`: ``forward(x) = body(normalize(x))``,
with inputs ``x`` in pixel space ``[0, 1]`` (so ε is in pixel units such as
8/255) and the dataset's mean/std normalisation as the model's first layer.
``body`` is an ``nn.Sequential`` whose first module is an ``nn.Conv2d`` for
all three architectures, so that the first-layer linearity trick of
docs/design.md §2 applies: for directions ``d``, ``conv(normalize(x + a·d)) =
conv(normalize(x)) + a·conv₀(d / std)`` (``conv₀`` without bias, zero padding
in normalised space), exactly, even for padded convolutions.

Shapes: ``B`` batch, ``C`` input channels, ``H × W`` image size, ``K`` classes.

Example::

    model = fastland.models.create("lenet", "fmnist")    # [B, 1, 28, 28] -> [B, 10]
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import fast_conv
from ._checks import check_tensor
from .data import DATASETS, DatasetInfo, synthetic_info

__all__ = [
    "Normalize",
    "Classifier",
    "LeNet5",
    "DDNet",
    "ResNet18",
    "BasicBlock",
    "create",
    "MODEL_NAMES",
]

Shape = Tuple[int, int, int]


# --------------------------------------------------------------------------- building blocks


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``: the model's first layer.

    Args:
        mean: ``C`` floats, the per-channel mean in pixel units.
        std: ``C`` positive floats.

    Buffers ``mean`` and ``std`` have shape ``[1, C, 1, 1]`` (saved in the state
    dict; they follow ``.to(device, dtype)``).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = _channel_vector("mean", mean)
        std_t = _channel_vector("std", std)
        if mean_t.numel() != std_t.numel():
            raise ValueError(
                f"std: expected {mean_t.numel()} values (one per channel, like mean), "
                f"got {std_t.numel()}"
            )
        if bool((std_t <= 0).any()):
            raise ValueError(f"std: expected positive values, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return self.mean.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, C, H, W]``."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _channel_vector(name: str, values: Sequence[float]) -> Tensor:
    """A non-empty, finite 1-D float32 tensor from a sequence of floats."""
    try:
        t = torch.as_tensor(values, dtype=torch.float32).flatten()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a sequence of floats, got {values!r}") from exc
    if t.numel() == 0:
        raise ValueError(f"{name}: expected at least one value (one per channel), got none")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got {t.tolist()}")
    return t


class Classifier(nn.Module):
    """``forward(x) = body(normalize(x))``: a classifier on pixel-space inputs.

    Args:
        normalize: the per-channel normalisation (the first layer).
        body: the network on normalised inputs; its first module is the first
            affine layer (an ``nn.Conv2d`` for the models of this file).
        input_shape: ``(C, H, W)`` the model expects, or None to accept any
            ``[B, C, H, W]`` with the normaliser's ``C``.
        num_classes: ``K``, the number of logits (informational).

    ``forward`` takes ``x`` ``[B, C, H, W]`` floating point in ``[0, 1]`` and
    returns logits ``[B, K]``.
    """

    def __init__(
        self,
        normalize: Normalize,
        body: nn.Sequential,
        *,
        input_shape: Optional[Shape] = None,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(normalize, Normalize):
            raise TypeError(
                f"normalize: expected a fastland.models.Normalize, got {type(normalize).__name__}"
            )
        if not isinstance(body, nn.Sequential) or len(body) == 0:
            raise TypeError(f"body: expected a non-empty nn.Sequential, got {type(body).__name__}")
        if input_shape is not None and input_shape[0] != normalize.channels:
            raise ValueError(
                f"input_shape: expected {normalize.channels} channels (as normalize), "
                f"got {tuple(input_shape)}"
            )
        self.normalize = normalize
        self.body = body
        self.input_shape: Optional[Shape] = tuple(input_shape) if input_shape else None  # type: ignore[assignment]
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` in ``[0, 1]`` → logits ``[B, K]``."""
        self._check_input(x)
        return self.body(self.normalize(x))

    def _check_input(self, x: Tensor) -> None:
        """Shape and dtype checks (no reduction, no device sync)."""
        check_tensor("x", x, ndim=4)
        expected = self.input_shape
        if expected is None:
            if x.shape[1] != self.normalize.channels:
                raise ValueError(
                    f"x: expected {self.normalize.channels} channels, got shape {tuple(x.shape)}"
                )
        elif tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x: expected shape [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}"
            )


# --------------------------------------------------------------------------- LeNet-5 and DDNet


def _conv_out(size: int, kernel: int, padding: int = 0) -> int:
    """Spatial size after a stride-1 convolution."""
    return size + 2 * padding - kernel + 1


def _check_shape(name: str, input_shape: Sequence[int]) -> Shape:
    """``input_shape`` as a ``(C, H, W)`` tuple of positive ints."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"input_shape: expected (C, H, W) positive ints for {name}, got {input_shape}")
    return shape  # type: ignore[return-value]


def _check_classes(num_classes: int) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    return num_classes


def lenet5_body(input_shape: Shape = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """LeNet-5: conv6 5×5 - relu - maxpool - conv16 5×5 - relu - maxpool - fc120 - fc84 - fc.

    The first convolution pads by 2 on images smaller than 32×32 (28×28
    becomes 28×28, as in LeCun's 32×32 input) and not at all from 32×32 up, so
    both Fashion-MNIST and CIFAR-10 reach 16×5×5 features.
    """
    c, h, w = _check_shape("LeNet5", input_shape)
    pad = 2 if min(h, w) < 32 else 0
    fh = _conv_out(_conv_out(h, 5, pad) // 2, 5) // 2
    fw = _conv_out(_conv_out(w, 5, pad) // 2, 5) // 2
    if fh < 1 or fw < 1:
        raise ValueError(f"input_shape: LeNet5 needs images of at least 10x10 pixels, got {input_shape}")
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c, 6, 5, padding=pad)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, 5)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(16 * fh * fw, 120)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)),
        ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, num_classes)),
    ]))


def ddnet_body(input_shape: Shape = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """DDNet (Papernot et al.'s distillation-defence CNN), 3×3 unpadded convolutions.

    conv32 - conv32 - pool - conv64 - conv64 - pool - fc200 - fc200 - fc, ReLU
    after every layer but the last (28×28 → 64×4×4 features, 32×32 → 64×5×5).
    """
    c, h, w = _check_shape("DDNet", input_shape)
    fh = _conv_out(_conv_out(_conv_out(_conv_out(h, 3), 3) // 2, 3), 3) // 2
    fw = _conv_out(_conv_out(_conv_out(_conv_out(w, 3), 3) // 2, 3), 3) // 2
    if fh < 1 or fw < 1:
        raise ValueError(f"input_shape: DDNet needs images of at least 16x16 pixels, got {input_shape}")
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c, 32, 3)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 32, 3)),
        ("relu2", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(32, 64, 3)),
        ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(64, 64, 3)),
        ("relu4", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64 * fh * fw, 200)),
        ("relu5", nn.ReLU()),
        ("fc2", nn.Linear(200, 200)),
        ("relu6", nn.ReLU()),
        ("fc3", nn.Linear(200, num_classes)),
    ]))


# --------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN layers and a (projected) shortcut.

    ``[B, in_planes, H, W]`` → ``[B, planes, ⌈H/stride⌉, ⌈W/stride⌉]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet18_body(
    input_shape: Shape = (3, 32, 32), num_classes: int = 10, width: int = 64
) -> nn.Sequential:
    """ResNet-18, CIFAR variant: 3×3 stem conv (no bias), BN, ReLU, no max-pool,
    BasicBlock stages ``[2, 2, 2, 2]`` of widths ``width·(1, 2, 4, 8)`` (64…512),
    global average pool, flatten, fc. Any ``H, W ≥ 1`` (the pool is adaptive).
    """
    c, _, _ = _check_shape("ResNet18", input_shape)
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width: expected a positive int, got {width!r}")
    layers: "OrderedDict[str, nn.Module]" = OrderedDict([
        ("conv1", nn.Conv2d(c, width, 3, stride=1, padding=1, bias=False)),
        ("bn1", nn.BatchNorm2d(width)),
        ("relu", nn.ReLU()),
    ])
    in_planes = width
    for stage, mult in enumerate((1, 2, 4, 8), start=1):
        planes = width * mult
        stride = 1 if stage == 1 else 2
        layers[f"layer{stage}"] = nn.Sequential(
            BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)
        )
        in_planes = planes
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(in_planes, num_classes)
    return nn.Sequential(layers)


# --------------------------------------------------------------------------- public builders


def _build(
    body_fn: Callable[..., nn.Sequential],
    input_shape: Sequence[int],
    num_classes: int,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    **kwargs: int,
) -> Classifier:
    shape = _check_shape(body_fn.__name__, input_shape)
    num_classes = _check_classes(num_classes)
    c = shape[0]
    normalize = Normalize(mean if mean is not None else [0.0] * c, std if std is not None else [1.0] * c)
    if normalize.channels != c:
        raise ValueError(
            f"mean: expected {c} values (one per input channel of {tuple(shape)}), "
            f"got {normalize.channels}"
        )
    body = body_fn(shape, num_classes, **kwargs)
    # CPU input gradients of the few-channel first convolution by the fast exact route
    # (fastland.fast_conv); the layers are untouched elsewhere (CUDA, wide layers).
    model = Classifier(normalize, body, input_shape=shape, num_classes=num_classes)
    return fast_conv.apply(model)


def LeNet5(
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Classifier:
    """LeNet-5 on ``[B, *input_shape]`` pixel-space inputs → ``[B, num_classes]``.

    ``mean``/``std`` (one per channel) default to no normalisation.
    """
    return _build(lenet5_body, input_shape, num_classes, mean, std)


def DDNet(
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Classifier:
    """DDNet on ``[B, *input_shape]`` pixel-space inputs → ``[B, num_classes]``."""
    return _build(ddnet_body, input_shape, num_classes, mean, std)


def ResNet18(
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    width: int = 64,
) -> Classifier:
    """ResNet-18 (CIFAR variant) on ``[B, *input_shape]`` → ``[B, num_classes]``.

    ``width`` is the first stage's width (64 in the paper; smaller for tests).
    """
    return _build(resnet18_body, input_shape, num_classes, mean, std, width=width)


_BUILDERS: Dict[str, Callable[..., Classifier]] = {
    "lenet": LeNet5,
    "ddnet": DDNet,
    "resnet18": ResNet18,
}
MODEL_NAMES: Tuple[str, ...] = tuple(_BUILDERS)


def _dataset_info(dataset: Union[str, DatasetInfo]) -> DatasetInfo:
    if isinstance(dataset, DatasetInfo):
        return dataset
    if dataset == "synthetic":
        return synthetic_info()
    if isinstance(dataset, str) and dataset in DATASETS:
        return DATASETS[dataset]
    valid = ", ".join(repr(n) for n in (*DATASETS, "synthetic"))
    raise ValueError(f"dataset: expected one of {valid} or a DatasetInfo, got {dataset!r}")


def create(
    name: str, dataset: Union[str, DatasetInfo], num_classes: Optional[int] = None
) -> Classifier:
    """Build model ``name`` for ``dataset``'s input shape, classes and normalisation.

    Args:
        name: one of :data:`MODEL_NAMES` (``"lenet"``, ``"ddnet"``, ``"resnet18"``).
        dataset: ``"fmnist"``, ``"cifar10"``, ``"synthetic"`` (1×28×28, 10
            classes) or a :class:`fastland.data.DatasetInfo`.
        num_classes: overrides the dataset's number of classes.
    Returns:
        a :class:`Classifier` taking ``[B, C, H, W]`` in ``[0, 1]``.
    """
    if name not in _BUILDERS:
        valid = ", ".join(repr(n) for n in MODEL_NAMES)
        raise ValueError(f"name: expected one of {valid}, got {name!r}")
    info = _dataset_info(dataset)
    k = info.n_classes if num_classes is None else num_classes
    return _BUILDERS[name](info.shape, k, info.mean, info.std)
