"""Collapse diagnostics for distribution embeddings (docs/DESIGN.md, "Collapse diagnostics")."""

from __future__ import annotations

import torch
from torch import Tensor

from hfz_app.hyper.penalty import entropy


def usage(e: Tensor) -> Tensor:
    """``exp(H(mean_i e_i))`` as a tensor on ``e``'s device (no host sync)."""
    return torch.exp(entropy(e.detach().reshape(-1, e.shape[-1]).mean(0)))


def embed_usage(e: Tensor) -> float:
    """``exp(H(mean_i e_i))``: how many of the ``d`` dimensions the data uses (1 = collapse)."""
    return float(usage(e))


def mean_entropy(e: Tensor) -> float:
    """Mean per-sample entropy ``mean_i H(e_i)`` in nats (0 = one-hot, ``log d`` = uniform)."""
    return float(entropy(e.detach()).mean())


def embedding_spread(client_means: Tensor) -> dict[str, float]:
    """Distances between clients' mean embeddings [n_clients, d]: do clients land apart?

    Returns the mean and minimum pairwise Euclidean distance (0.0 for fewer than two clients).
    """
    m = client_means.detach().float()
    if m.shape[0] < 2:
        return {"mean_pairwise_dist": 0.0, "min_pairwise_dist": 0.0}
    d = torch.cdist(m, m)
    iu = torch.triu_indices(m.shape[0], m.shape[0], offset=1)
    pairs = d[iu[0], iu[1]]
    return {"mean_pairwise_dist": float(pairs.mean()), "min_pairwise_dist": float(pairs.min())}


def embedding_stats(e: Tensor) -> dict[str, float]:
    """Both per-batch diagnostics at once, named as they are logged."""
    return {"embed_usage": embed_usage(e), "embed_entropy": mean_entropy(e)}
