"""Frozen shared modules: the checkpoint's Config, the model, and its evaluation.

Nothing here imports the training loop, the methods registry (which imports the optimiser
factory) or an optimiser: the model is built straight from the model zoo and the HyperFedZero
wrapper, every parameter has ``requires_grad=False``, and evaluation runs under
``torch.inference_mode()``. The arithmetic is the training app's (``hfz_app.training.evaluate``
and the methods' ``predictor``/``diagnostics``), so the zero-shot app's zACC equals the
training app's for the same checkpoint and clients (a test checks it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from hfz_app.config import Config, ConfigError, flatten, load_config
from hfz_app.evaluation.metrics import EMBED_MEAN_KEY
from hfz_app.hyper import HyperFedZeroModel, build_model, embedding_stats
from hfz_app.models import build_target

# Methods whose frozen shared arrays alone make the model a new client runs.
SUPPORTED_METHODS = ("hyperfedzero", "fedavg")
# As hfz_app.methods.base: buffers describing one client's data, never shared.
LOCAL_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class ZeroShotError(ValueError):
    """A problem with the zero-shot app's input, reported as one line."""


def config_from_dict(tree: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    """The Config saved in a checkpoint (``Config.to_dict()``), with flat dotted overrides."""
    try:
        return load_config(None, flatten(tree) | dict(overrides or {}))
    except ConfigError as err:
        raise ZeroShotError(f"checkpoint config: {err}") from None


def config_to_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def config_from_json(text: str) -> Config:
    return config_from_dict(json.loads(text))


def check_method(cfg: Config) -> None:
    if cfg.run.method not in SUPPORTED_METHODS:
        raise ZeroShotError(
            f"run.method: the zero-shot app evaluates {', '.join(SUPPORTED_METHODS)} checkpoints "
            f"(frozen shared modules, no local step); got {cfg.run.method!r}"
        )


def shared_keys(model: nn.Module) -> list[str]:
    """The keys a checkpoint of this model holds (the methods' ``shared_keys``)."""
    if isinstance(model, HyperFedZeroModel):
        return model.shared_keys()
    return [k for k in model.state_dict() if not k.endswith(LOCAL_BUFFER_SUFFIXES)]


def build_frozen_model(
    cfg: Config,
    input_shape: tuple[int, int, int],
    num_classes: int,
    shared: Mapping[str, torch.Tensor],
) -> nn.Module:
    """The method's model with the frozen shared arrays, in eval mode, no parameter trainable.

    Personal state (BatchNorm statistics) keeps its initial values, as on a held-out node of the
    training app: a new client has none of its own.
    """
    check_method(cfg)
    torch.manual_seed(cfg.run.seed)  # as hfz_app.federation.client.build_with_arrays
    if cfg.run.method == "hyperfedzero":
        model: nn.Module = build_model(cfg.model, tuple(input_shape), num_classes)
    else:
        model = build_target(cfg.model.target, tuple(input_shape), num_classes)
    expected = set(shared_keys(model))
    if set(shared) != expected:
        raise ZeroShotError(
            f"checkpoint arrays do not fit a {cfg.run.method}/{cfg.model.target} model: foreign "
            f"{sorted(set(shared) - expected)[:5]}, missing {sorted(expected - set(shared))[:5]}"
        )
    model.load_state_dict(dict(shared), strict=False)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def predictor(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits function for evaluating on one client's inputs ``x`` (the methods'
    ``predictor``): HyperFedZero embeds each batch itself, or with granularity ``client`` uses
    the embedding pooled over all of ``x``; a plain target is just called."""
    if isinstance(model, HyperFedZeroModel):
        return model.client_predictor(x)
    return model


def diagnostics(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """HyperFedZero's collapse diagnostics and the client's mean embedding; nothing otherwise."""
    if not isinstance(model, HyperFedZeroModel):
        return {}
    embeddings = torch.cat([model.embed(x[i : i + 1024]) for i in range(0, len(x), 1024)])
    return embedding_stats(embeddings) | {EMBED_MEAN_KEY: [float(v) for v in embeddings.mean(0)]}


def pooled_embedding(model: HyperFedZeroModel, x: torch.Tensor) -> torch.Tensor:
    """Mean of ``model.embed(x)`` over all of a client's (unlabelled) inputs: [d]."""
    with torch.inference_mode():
        return model.pooled_embedding(x)


def frozen_metrics(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, partition: int, batch_size: int = 512
) -> dict[str, Any]:
    """Accuracy, loss, sample count and diagnostics of the frozen model on (x, y)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.inference_mode():
        predict = predictor(model, x)
        for start in range(0, len(x), batch_size):
            logits = predict(x[start : start + batch_size])
            target = y[start : start + batch_size]
            loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
        extra = diagnostics(model, x)
    n = len(x)
    return {
        "accuracy": correct / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "num-examples": n,
        "partition-id": partition,
        **extra,
    }
