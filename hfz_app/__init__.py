"""HyperFedZero on Flower.

The public API for using HyperFedZero inside an existing Flower project (the guide:
``docs/ADOPTING.md``; worked example in ``examples/existing-project/``):

===========================  ====================================================================
``hyperfedzero``             wrap your own torch module: ``hyperfedzero(Net(), (1, 28, 28), 10)``
``HyperFedZeroModel``        what it returns: ``model(x)`` -> ``HFZOutput(logits, embedding)``
``HyperFedZeroLoss``         drop-in for ``nn.CrossEntropyLoss()``: ``criterion(model(x), y)``
``hfz_loss``                 the same loss as a function of logits, labels and embeddings
``HyperFedZeroStrategy``     the ServerApp's strategy (FedAvg over the shared arrays only)
``shared_arrays``            client/server: the ``ArrayRecord`` to send (personal arrays stay)
``load_shared``              client: load received arrays, strict on the shared keys
``zero_shot_model``          deploy: your bare module with weights generated from unlabelled data
``recipe_options``           the recipe's options by section (``model``, ``train``, ``server``)
``LabelPriorBatchSampler``   the recipe's label-prior batches, as a DataLoader ``batch_sampler``
``client_embedding``         a client's embedding pooled over all its unlabelled inputs
``discover_roles``           server: ask each node whether it is a participant or held out
``role_reply``               client: the ``@app.query()`` answer to that question
===========================  ====================================================================

The whole path from Flower's PyTorch template, zero-shot evaluation and export: docs/ADOPTING.md.

Names are imported on first use, so ``import hfz_app`` (and ``hfz_app.config``) stays cheap: no
torch, Flower or Ray import until a name is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "hyperfedzero": "hfz_app.api",
    "HyperFedZeroLoss": "hfz_app.api",
    "shared_arrays": "hfz_app.api",
    "load_shared": "hfz_app.api",
    "zero_shot_model": "hfz_app.api",
    "model_options": "hfz_app.api",
    "recipe_options": "hfz_app.api",
    "LabelPriorBatchSampler": "hfz_app.api",
    "client_embedding": "hfz_app.api",
    "discover_roles": "hfz_app.federation.roles",
    "role_reply": "hfz_app.federation.roles",
    "HyperFedZeroModel": "hfz_app.hyper.wrapper",
    "HFZOutput": "hfz_app.hyper.wrapper",
    "hfz_loss": "hfz_app.hyper.penalty",
    "HyperFedZeroStrategy": "hfz_app.federation.strategy",
}

__all__ = [  # = __version__ + the _EXPORTS keys (tests/test_example_project.py checks it)
    "HFZOutput",
    "HyperFedZeroLoss",
    "HyperFedZeroModel",
    "HyperFedZeroStrategy",
    "LabelPriorBatchSampler",
    "__version__",
    "client_embedding",
    "discover_roles",
    "hfz_loss",
    "hyperfedzero",
    "load_shared",
    "model_options",
    "recipe_options",
    "role_reply",
    "shared_arrays",
    "zero_shot_model",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load lazily
    from hfz_app.api import (
        HyperFedZeroLoss,
        LabelPriorBatchSampler,
        client_embedding,
        hyperfedzero,
        load_shared,
        model_options,
        recipe_options,
        shared_arrays,
        zero_shot_model,
    )
    from hfz_app.federation.roles import discover_roles, role_reply
    from hfz_app.federation.strategy import HyperFedZeroStrategy
    from hfz_app.hyper.penalty import hfz_loss
    from hfz_app.hyper.wrapper import HFZOutput, HyperFedZeroModel


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hfz_app' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
