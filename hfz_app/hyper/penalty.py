"""HyperFedZero's loss: cross-entropy + balancing penalty + sharpness (docs/DESIGN.md, "Loss").

For a batch of embeddings ``e`` of shape [B, d] (rows on the probability simplex):

* importance ``u = mean_i e_i`` (the paper's batch-pooling operator ``P e``);
* balancing ``alpha * var(u) / mean(u)``, as printed in the paper (MoE load balancing uses the
  squared coefficient of variation ``var/mean^2``; with ``mean(u) = 1/d`` fixed the two differ by
  the constant ``d``). ``var`` is the *biased* (population) variance over the ``d`` dimensions:
  ``u`` is the whole population of dimensions, not a sample of them. The term is then exactly
  ``alpha * d * var(u)``: 0 for uniform use, ``alpha * (d - 1) / d`` for total collapse;
* sharpness ``beta * mean_i H(e_i)``, ``H(e) = -sum_j e_j log e_j``, minimised so that each input
  commits to a few dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) along the last dimension; ``0 log 0 = 0``."""
    return torch.special.entr(p).sum(-1)


def balance_penalty(e: Tensor) -> Tensor:
    """``var(u) / mean(u)`` with ``u = e.mean(0)`` and the biased variance (see module doc)."""
    u = e.reshape(-1, e.shape[-1]).mean(0)
    return u.var(unbiased=False) / u.mean()


def sharpness_penalty(e: Tensor) -> Tensor:
    """Mean per-sample entropy ``mean_i H(e_i)``."""
    return entropy(e).mean()


def hfz_loss(
    logits: Tensor, y: Tensor, e: Tensor, alpha: float, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and its parts (detached 0-dim tensors: ``ce``, ``balance``, ``sharpness``).

    ``balance`` and ``sharpness`` are reported unweighted so that logs stay comparable across
    ``alpha``/``beta`` settings; the total uses the weighted terms.
    """
    ce = F.cross_entropy(logits, y)
    total, parts = ce, {"ce": ce.detach()}
    for name, weight, penalty in (("balance", alpha, balance_penalty),
                                  ("sharpness", beta, sharpness_penalty)):
        if weight:
            value = penalty(e)
            total = total + weight * value
        else:  # reported only: a weight-0 term would add nothing but backward work
            with torch.no_grad():
                value = penalty(e)
        parts[name] = value.detach()
    return total, parts
