"""The local training loop shared by every method (plain torch, no Flower); evaluation is the
method runtime's (``hfz_app.methods.runtime``).

Data arrive as whole tensors (already shifted, see ``hfz_app.data``); batches are index slices
drawn with a seeded generator, so a client's round is reproducible from (seed, round, partition).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from hfz_app.config import TrainSection

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def round_seed(seed: int, server_round: int, partition: int) -> int:
    """One seed per (run seed, round, client): the same inputs give the same update."""
    return (seed * 1_000_003 + server_round * 10_007 + partition) % (2**31 - 1)


def batch_indices(
    y: torch.Tensor, batch_size: int, generator: torch.Generator, prior_alpha: float = 0.0
) -> list[torch.Tensor]:
    """One epoch of minibatch indices into a client's data.

    ``prior_alpha = 0``: a random permutation cut into batches (every sample once). ``> 0``: label
    -prior augmentation: each batch first draws label frequencies ``q ~ Dir(prior_alpha)`` over the
    client's classes, then samples ``batch_size`` indices with replacement so that its labels follow
    ``q``. Batches then differ in label mix, so a model conditioned on a pooled embedding of the
    batch must learn what the mix implies, instead of absorbing one fixed local prior.
    """
    n = len(y)
    if prior_alpha <= 0:
        order = torch.randperm(n, generator=generator)
        return [order[start : start + batch_size] for start in range(0, n, batch_size)]
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=generator)))
    batches = []
    for _ in range((n + batch_size - 1) // batch_size):
        q = torch.from_numpy(rng.dirichlet(np.full(len(classes), prior_alpha))).float()
        weights = (q / counts)[inverse]
        batches.append(torch.multinomial(weights, batch_size, replacement=True,
                                         generator=generator))
    return batches


def autocast(device: torch.device, enabled: bool):
    """``train.amp``: bfloat16 autocast of forward and loss on CUDA; a no-op elsewhere (so CPU
    results are the same with or without it)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def make_optimizer(groups: list[dict], cfg: TrainSection) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``groups``. Groups whose settings coincide (the recipe's three
    HyperFedZero groups all run at ``lr``) are merged first, so each distinct setting costs one
    update call. SGD takes torch's multi-tensor (``foreach``) path on every device: one call per
    group instead of three per parameter tensor. Both give bit-identical results
    (``tests/test_hyper.py``). Adam keeps the single-tensor path, whose results the multi-tensor
    one does not reproduce."""
    groups = merge_groups(groups)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           foreach=True)


def merge_groups(groups: list[dict]) -> list[dict]:
    """One group per distinct setting (every key but ``params`` and ``name``), parameters in
    their first-seen order; ``name`` lists the merged groups' names."""
    merged: dict[tuple, dict] = {}
    for group in groups:
        settings = {k: v for k, v in group.items() if k not in ("params", "name")}
        key = tuple(sorted(settings.items()))
        into = merged.setdefault(key, {**settings, "params": []})
        into["params"].extend(group["params"])
        if "name" in group:
            into["name"] = "+".join(filter(None, (into.get("name"), group["name"])))
    return list(merged.values())


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
    prior_alpha: float = 0.0,
    amp: bool = False,
) -> dict[str, float]:
    """Minibatch training; returns the sample-weighted mean of the loss and its named parts.
    ``prior_alpha``: label-prior augmentation of the batches (see :func:`batch_indices`);
    ``amp``: :func:`autocast` of forward and loss (CUDA only).

    ``x`` and ``y`` may live on an accelerator; batch indices are drawn on the CPU (the same
    batches on every device), and the sums stay on the device in float64 until the end, so a step
    never waits for the host."""
    model.train()
    totals: dict[str, torch.Tensor] = {}
    seen = 0
    labels = y.cpu()
    for _ in range(epochs):
        for idx in batch_indices(labels, batch_size, generator, prior_alpha):
            with autocast(x.device, amp):
                loss, parts = loss_fn(model, x[idx], y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            n = len(idx)
            seen += n
            for key, value in {"train_loss": loss.detach(), **parts}.items():
                totals[key] = totals.get(key, 0.0) + torch.as_tensor(value).double() * n
    return {key: float(value) / max(seen, 1) for key, value in totals.items()}
