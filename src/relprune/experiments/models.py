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


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet300": lenet300, "lenet5": lenet5, "vgg-small": vgg_small}


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
