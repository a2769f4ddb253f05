"""Local training and evaluation loops shared by every method (plain torch, no Flower).

Data arrive as whole tensors (already shifted, see ``hfz_app.data``); batches are index slices
drawn with a seeded generator, so a client's round is reproducible from (seed, round, partition).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hfz_app.config import TrainSection

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def round_seed(seed: int, server_round: int, partition: int) -> int:
    """One seed per (run seed, round, client): the same inputs give the same update."""
    return (seed * 1_000_003 + server_round * 10_007 + partition) % (2**31 - 1)


def make_optimizer(groups: list[dict], cfg: TrainSection) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_epochs(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Minibatch training; returns the sample-weighted mean of the loss and its named parts."""
    model.train()
    totals: dict[str, float] = {}
    seen = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss, parts = loss_fn(model, x[idx], y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            n = len(idx)
            seen += n
            totals["train_loss"] = totals.get("train_loss", 0.0) + loss.item() * n
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + float(value) * n
    return {key: value / max(seen, 1) for key, value in totals.items()}


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    num_examples: int


@torch.inference_mode()
def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 512,
) -> EvalResult:
    """Accuracy and mean cross-entropy of ``predict`` (logits) on (x, y); no gradients."""
    correct, loss_sum = 0, 0.0
    for start in range(0, len(x), batch_size):
        logits = predict(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    n = len(x)
    return EvalResult(correct / max(n, 1), loss_sum / max(n, 1), n)
