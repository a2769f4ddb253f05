"""Target-network zoo: plain ``nn.Module`` classifiers sized from dataset metadata.

The zoo knows nothing about hypernetworks (hypnettorch-style separation): every model here is an
ordinary network that can be trained directly (what FedAvg does) or wrapped by
:class:`hfz_app.hyper.HyperFedZeroModel`, which generates some of its parameters.

>>> net = build_target("lenet", (1, 28, 28), 10)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hfz_app.config import ConfigError
from hfz_app.models.lenet import LeNet5, LeNetS
from hfz_app.models.mlp import MLP
from hfz_app.models.resnet import CifarResNet, resnet20, resnet32
from hfz_app.models.zenkenet import ZenkeNet

InputShape = tuple[int, int, int]
TargetFactory = Callable[[InputShape, int], nn.Module]

#: name -> factory(input_shape (C, H, W), num_classes) -> nn.Module
TARGETS: dict[str, TargetFactory] = {
    "mlp": MLP,
    "lenet_s": LeNetS,
    "lenet": LeNet5,
    "zenkenet": ZenkeNet,
    "resnet20": resnet20,
    "resnet32": resnet32,
}


def target_factory(name: str) -> TargetFactory:
    """The zoo entry ``name``; an unknown name is a one-line ConfigError."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(
            f"model.target: expected one of {', '.join(TARGETS)}, got {name!r}") from None


def build_target(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the zoo network ``name`` for inputs of shape (C, H, W) and ``num_classes`` outputs."""
    factory = target_factory(name)
    if len(input_shape) != 3 or min(input_shape) < 1 or num_classes < 1:
        raise ValueError(
            f"build_target: expected input_shape (C, H, W) and num_classes >= 1, "
            f"got {input_shape!r}, {num_classes!r}"
        )
    return factory(tuple(int(s) for s in input_shape), int(num_classes))


__all__ = [
    "MLP",
    "TARGETS",
    "CifarResNet",
    "LeNet5",
    "LeNetS",
    "ZenkeNet",
    "build_target",
    "resnet20",
    "resnet32",
    "target_factory",
]
