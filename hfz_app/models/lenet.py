"""LeNet family: LeNet-5 (LeCun et al. 1998) and a small LeNet (hypnettorch's "mnist_small").

Both follow the classic layout for 32x32 inputs. For smaller inputs the convolutions are padded
("same") instead of "valid" so that the network still fits: the first conv is padded below 32x32
(MNIST's classic 28 -> 32 padding), the second below 16x16 (8x8 digits).
"""

from __future__ import annotations

import torch
from torch import nn

from hfz_app.models.common import flat_features


def _features(in_ch: int, size: int, ch: tuple[int, int], act: type[nn.Module]) -> nn.Sequential:
    pad1 = 2 if size < 32 else 0
    pad2 = 2 if size < 16 else 0
    return nn.Sequential(
        nn.Conv2d(in_ch, ch[0], 5, padding=pad1),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(ch[0], ch[1], 5, padding=pad2),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )


class LeNet5(nn.Module):
    """conv5x5-6 -> pool -> conv5x5-16 -> pool -> fc120 -> fc84 -> out (ReLU, max-pooling)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.features = _features(c, min(h, w), (6, 16), nn.ReLU)
        n = flat_features(self.features, input_shape)
        self.classifier = nn.Sequential(
            nn.Linear(n, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNetS(nn.Module):
    """Small LeNet: conv5x5-10 -> pool -> conv5x5-20 -> pool -> fc50 -> out."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.features = _features(c, min(h, w), (10, 20), nn.ReLU)
        n = flat_features(self.features, input_shape)
        self.classifier = nn.Sequential(nn.Linear(n, 50), nn.ReLU(), nn.Linear(50, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
