"""The MLP of the FL literature: 784-200-200-10 on MNIST (McMahan et al. 2017's "2NN")."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten -> Linear(in, 200) -> ReLU -> Linear(200, 200) -> ReLU -> Linear(200, classes).

    Flattens any input, so it also serves flat feature vectors and 8x8 digits.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        hidden: tuple[int, ...] = (200, 200),
    ) -> None:
        super().__init__()
        widths = (math.prod(input_shape), *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
