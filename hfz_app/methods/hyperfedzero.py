"""HyperFedZero: the target network's weights generated from each input's distribution embedding.

The model is :class:`hfz_app.hyper.HyperFedZeroModel` around a zoo target; the shared arrays are
its extractor, noise head, hypernetwork (with chunk embeddings), residual base and backbone; BN
statistics stay local. A held-out client runs the frozen modules on its own inputs: the weights
follow its data with no labels and no gradient step.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from hfz_app.evaluation.metrics import EMBED_MEAN_KEY
from hfz_app.hyper import build_model, embedding_stats
from hfz_app.hyper.diagnostics import usage
from hfz_app.methods.base import Method


class HyperFedZeroMethod(Method):
    name = "hyperfedzero"
    uses_label_prior_batches = True

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.input_shape, self.num_classes)

    def shared_keys(self, model: nn.Module) -> list[str]:
        return model.shared_keys()

    def personal_keys(self, model: nn.Module) -> list[str]:
        return model.personal_keys()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """The training loss and its parts; with ``model.compile`` forward, loss and their
        backward are one compiled graph (the recipe's small ops fused: step_time.md)."""
        return (compiled_training_loss() if self.cfg.model.compile else training_loss)(model, x, y)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return model.param_groups(self.cfg.train.lr, self.cfg.train)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).logits

    def predictor(self, model: nn.Module, x: torch.Tensor, zeroshot: bool):
        return model.client_predictor(x)

    def diagnostics(self, model: nn.Module, x: torch.Tensor) -> dict[str, float | list[float]]:
        """Collapse diagnostics of this client's embeddings and their mean (for the distance
        between clients' mean embeddings on the server)."""
        embeddings = torch.cat([model.embed(x[i : i + 1024]) for i in range(0, len(x), 1024)])
        return embedding_stats(embeddings) | {
            EMBED_MEAN_KEY: [float(v) for v in embeddings.mean(0)]}


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Loss of one batch and its detached parts, the embedding's usage among them."""
    output = model(x)
    loss, parts = model.loss(output, y)  # detached parts: summed on the device, no sync
    return loss, {f"train_{k}": v for k, v in parts.items()} | {
        "train_embed_usage": usage(output.embedding)}


@functools.cache
def compiled_training_loss():
    """One ``torch.compile`` of :func:`training_loss` for every model (modules are its inputs)."""
    return torch.compile(training_loss)
