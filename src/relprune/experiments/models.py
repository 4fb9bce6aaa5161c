"""Reference networks for the experiments, and user models named as ``package.module:factory``."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import RelpruneError


def _flat_size(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).numel())


def lenet300(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """LeNet-300-100: the classic fully connected net (784-300-100-10 on MNIST)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet5(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """LeNet-5 (conv 6@5x5, pool, conv 16@5x5, pool, 120-84-classes), with ReLU and max pooling."""
    small = input_shape[-1] < 16
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2 if small else 0), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = _flat_size(features, input_shape)
    return nn.Sequential(
        *features,
        nn.Linear(flat, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def vgg_small(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """A small VGG-style net: two blocks of two conv-BN-ReLU (16, then 32 channels), each pooled, then 128-classes."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2)]

    features = nn.Sequential(*block(input_shape[0], 16), *block(16, 32), nn.Flatten())
    flat = _flat_size(features, input_shape)
    return nn.Sequential(*features, nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, num_classes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (a 1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR-style ResNet of He et al. (2016): three stages of widths 16/32/64, 1x1 projection
    shortcuts (option B) where the shape changes, global average pooling and one Linear."""

    def __init__(self, depth: int = 20, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise RelpruneError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, width in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(cin, width, 2 if stage and i == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet20(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """ResNet-20 (0.27 M parameters), widths 16/32/64, for 28x28 or 32x32 images."""
    return ResNet(20, input_shape[0], num_classes)


class ViT(nn.Module):
    """A small vision transformer: patch embedding, learned positions, ``nn.TransformerEncoder`` (pre-norm,
    GELU), mean-pooled tokens, a linear head. Its attention is ``nn.MultiheadAttention``: relprune prunes each
    layer's packed query/key/value projection (``in_proj_weight``), ``out_proj`` and feed-forward Linears like any
    layer."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, dim: int = 64,
                 depth: int = 2, heads: int = 4, mlp: int = 128, grid: int = 4):
        super().__init__()
        c, h, w = input_shape
        ph, pw = max(h // grid, 1), max(w // grid, 1)
        self.patch = nn.Conv2d(c, dim, (ph, pw), stride=(ph, pw))
        self.pos = nn.Parameter(torch.zeros(1, (h // ph) * (w // pw), dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(tokens)).mean(1))


def vit(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """A 2-layer vision transformer (dim 64, 4 heads, 16 patches; 0.08 M parameters at 28x28)."""
    return ViT(tuple(input_shape), num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet300": lenet300, "lenet5": lenet5, "vgg-small": vgg_small,
                                               "resnet20": resnet20, "vit": vit}


def check_model_name(name: str) -> Callable[..., nn.Module]:
    """The factory a model name stands for; an unknown name or factory raises before any work."""
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise RelpruneError(f"unknown model {name!r}; built in: {', '.join(MODELS)}, or give package.module:factory")
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise RelpruneError(f"cannot load model factory {name!r}: {err}") from err
    if not callable(factory):
        raise RelpruneError(f"model factory {name!r} is a {type(factory).__name__}, not a callable")
    return factory


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A built-in model by name, or a user model given as ``package.module:factory``.

    A user factory is called with ``input_shape`` and ``num_classes`` when it
    accepts them, else with no arguments.
    """
    factory = check_model_name(name)
    if name in MODELS:
        return factory(input_shape, num_classes)
    try:
        model = factory(input_shape=input_shape, num_classes=num_classes)
    except TypeError:
        model = factory()
    if not isinstance(model, nn.Module):
        raise RelpruneError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
