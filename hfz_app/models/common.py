"""Small helpers shared by the zoo."""

from __future__ import annotations

import torch
from torch import nn


def flat_features(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Number of features ``features`` produces for one input of ``input_shape``.

    A dry run on zeros is the one rule that stays right for every input size and padding choice.
    """
    with torch.no_grad():
        out = features(torch.zeros(1, *input_shape))
    if out.numel() == 0:
        raise ValueError(f"input shape {input_shape} is too small for this network")
    return out.numel()
