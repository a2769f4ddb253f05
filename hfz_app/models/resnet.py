"""CIFAR-style ResNets (He et al. 2016, section 4.2): ResNet-20 and ResNet-32.

3x3 conv stem with 16 channels, three stages of ``n`` basic blocks with 16/32/64 channels (stride 2
at the start of stages 2 and 3), global average pooling, one linear layer; 6n + 2 layers.
Shortcuts use option A (identity; when the shape changes, subsample and zero-pad the channels),
the parameter-free choice of the paper's CIFAR experiments. BatchNorm after every conv; convs have
no bias; He (Kaiming normal) initialisation. Global pooling makes any input size >= 1x1 work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ShortcutA(nn.Module):
    """Option A shortcut: stride-2 subsampling and zero channels, no parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        need = stride != 1 or in_planes != planes
        self.shortcut = _ShortcutA(in_planes, planes, stride) if need else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, depth: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(input_shape: tuple[int, int, int], num_classes: int) -> CifarResNet:
    return CifarResNet(input_shape, num_classes, depth=20)


def resnet32(input_shape: tuple[int, int, int], num_classes: int) -> CifarResNet:
    return CifarResNet(input_shape, num_classes, depth=32)
