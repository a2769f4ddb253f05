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


def personal_buffer_keys(model: nn.Module, bn_stats: str) -> list[str]:
    """State-dict keys of ``model``'s BatchNorm buffers that stay on a node under the
    ``model.bn_stats`` policy: ``"local"`` (FedBN) keeps all of them; ``"shared"`` sends the
    running mean and variance to be averaged and keeps only the step counter
    (``num_batches_tracked``, an integer that an average would turn into a float)."""
    keep = None if bn_stats == "local" else ("num_batches_tracked",)
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys += [prefix + b for b, _ in module.named_buffers(recurse=False)
                     if keep is None or b in keep]
    return keys
