"""ZenkeNet: the CIFAR CNN of Zenke, Poole & Ganguli (2017), as in hypnettorch's ``ZenkeNet``.

conv3x3-32 (same) -> conv3x3-32 (valid) -> maxpool -> dropout 0.25 -> conv3x3-64 (same) ->
conv3x3-64 (valid) -> maxpool -> dropout 0.25 -> fc512 -> dropout 0.5 -> out. Below 16x16 the
"valid" convolutions are padded too, so that 8x8 inputs still fit.
"""

from __future__ import annotations

import torch
from torch import nn

from hfz_app.models.common import flat_features


class ZenkeNet(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        valid = 0 if min(h, w) >= 16 else 1
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=valid),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=valid),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
        )
        n = flat_features(self.features, input_shape)
        self.classifier = nn.Sequential(
            nn.Linear(n, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
