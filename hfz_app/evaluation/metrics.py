"""Summaries of per-client evaluation replies: what the paper reports, plus its spread.

- pACC: each participant's own model on its local test split;
- zACC: each held-out (non-participating) client's whole data, frozen model, no fine-tuning;
- gap:  pACC - zACC (sample-weighted), what a client loses by not having taken part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

EMBED_MEAN_KEY = "embed_mean"


# Evaluation reply keys, and the names Flower's PyTorch template replies with instead.
REPLY_KEYS = {"accuracy": ("eval_acc", "acc"), "loss": ("eval_loss",),
              "num-examples": ("num_examples",)}


def evaluation_reply(metrics: dict[str, Any]) -> dict[str, Any]:
    """One node's evaluation metrics with this project's keys (Flower template's ``eval_acc``,
    ``eval_loss`` accepted); a reply lacking one is a one-line ValueError naming what was
    expected."""
    out = dict(metrics)
    for key, aliases in REPLY_KEYS.items():
        if key not in out:
            found = next((a for a in aliases if a in out), None)
            if found is None:
                expected = ", ".join(f"'{k}' (or {', '.join(repr(a) for a in a_)})"
                                     for k, a_ in REPLY_KEYS.items())
                raise ValueError(f"evaluation reply: expected the keys {expected}; "
                                 f"got {', '.join(map(repr, sorted(metrics))) or 'none'}")
            out[key] = out[found]
    return out


def _weighted(values: np.ndarray, weights: np.ndarray) -> float:
    return float((values * weights).sum() / weights.sum())


def accuracy_spread(replies: Sequence[dict[str, Any]], prefix: str) -> dict[str, float]:
    """Sample-weighted mean, mean over clients, std, 10th/90th percentile of ``accuracy``."""
    if not replies:
        return {}
    acc = np.array([float(r["accuracy"]) for r in replies])
    n = np.array([float(r["num-examples"]) for r in replies])
    loss = np.array([float(r["loss"]) for r in replies])
    return {
        f"{prefix}_weighted": _weighted(acc, n),
        f"{prefix}_mean": float(acc.mean()),
        f"{prefix}_std": float(acc.std()),
        f"{prefix}_p10": float(np.percentile(acc, 10)),
        f"{prefix}_p90": float(np.percentile(acc, 90)),
        f"{prefix}_loss": _weighted(loss, n),
        f"{prefix}_clients": float(len(replies)),
    }


def embedding_spread(replies: Sequence[dict[str, Any]], prefix: str) -> dict[str, float]:
    """Collapse diagnostics averaged over clients, and how far apart clients' mean embeddings lie."""
    out: dict[str, float] = {}
    for key in ("embed_usage", "embed_entropy"):
        values = [float(r[key]) for r in replies if key in r]
        if values:
            out[f"{key}_{prefix}"] = float(np.mean(values))
    means = [np.asarray(r[EMBED_MEAN_KEY], dtype=float) for r in replies if EMBED_MEAN_KEY in r]
    if len(means) >= 2:
        stacked = np.stack(means)
        dists = np.linalg.norm(stacked[:, None] - stacked[None], axis=-1)
        out[f"embed_distance_{prefix}"] = float(dists[np.triu_indices(len(means), 1)].mean())
    return out


def summarise_evaluation(
    participants: Sequence[dict[str, Any]], heldout: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """All evaluation metrics of one round, as flat scalars."""
    out = accuracy_spread(participants, "pacc") | accuracy_spread(heldout, "zacc")
    out |= embedding_spread(participants, "participants") | embedding_spread(heldout, "heldout")
    if participants and heldout:
        out["gap"] = out["pacc_weighted"] - out["zacc_weighted"]
    return out
