"""The one interface every federated method implements.

A method says how to build its model from the dataset's metadata, which of its arrays are shared,
how one local round trains, how it predicts for pACC (a participant's own model) and for zACC (a
held-out client, no fine-tuning), and which strategy aggregates it. Shared code does the rest:
data, loops, metrics, outputs, roles, checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from flwr.serverapp.strategy import FedAvg, FedAvgM
from torch import nn

from hfz_app.config import Config
from hfz_app.federation.roles import Roles
from hfz_app.federation.strategy import FedAdamKeepingDtypes, SharedKeys, layered, with_layer
from hfz_app.models.common import personal_buffer_keys
from hfz_app.training import LossFn, make_optimizer, train_epochs


class Method:
    """Base class: FedAvg-like behaviour; subclasses override what differs."""

    name: ClassVar[str] = ""
    # Label-prior batches (train.prior_alpha) only help a model that conditions on its batch; a
    # baseline run with a HyperFedZero preset must not inherit them (they cost FedAvg 0.3 zACC).
    uses_label_prior_batches: ClassVar[bool] = False
    #: A held-out client gets a model from the frozen shared arrays alone (no label, no gradient
    #: step): the zero-shot app and export accept the method's checkpoints.
    zero_shot: ClassVar[bool] = True

    def __init__(self, cfg: Config, input_shape: tuple[int, int, int], num_classes: int) -> None:
        self.cfg = cfg
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes

    # -- model and the federation seam ----------------------------------------------------------

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def shared_keys(self, model: nn.Module) -> list[str]:
        """State-dict keys the server averages; everything else stays on the client (BatchNorm
        buffers as ``model.bn_stats`` says)."""
        personal = set(personal_buffer_keys(model, self.cfg.model.bn_stats))
        return [k for k in model.state_dict() if k not in personal]

    def personal_keys(self, model: nn.Module) -> list[str]:
        shared = set(self.shared_keys(model))
        return [k for k in model.state_dict() if k not in shared]

    # -- local training -------------------------------------------------------------------------

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return nn.functional.cross_entropy(model(x), y), {}

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def local_train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        config: Mapping[str, Any] | None = None,
    ) -> dict[str, float]:
        """One round of local training; returns metrics (``train_loss`` and named parts).

        ``model`` holds the received shared arrays and this client's personal state; ``config`` is
        the round's ConfigRecord from the strategy (``server-round``, and e.g. FedProx's
        ``proximal-mu``)."""
        return self.fit(model, self.loss, x, y, generator)

    # -- arrays beside the shared ones (SCAFFOLD's control variates) ------------------------------

    def receive_extras(self, model: nn.Module, records: Mapping[str, Any]) -> None:
        """Take what a train message carries beside the shared arrays (``records``: its
        ArrayRecords by name; SCAFFOLD: the server's control variate). Default: nothing."""

    def reply_extras(self, model: nn.Module) -> dict[str, Any]:
        """ArrayRecords a train reply carries beside the shared arrays, by name (SCAFFOLD: the
        change of the client's control variate). The strategy layer declares and checks them;
        nothing else leaves a node. Default: none."""
        return {}

    def fit(self, model: nn.Module, loss: LossFn, x: torch.Tensor, y: torch.Tensor,
            generator: torch.Generator) -> dict[str, float]:
        """``train.local_epochs`` of ``loss`` over the method's parameter groups (the shared loop
        for methods that change only the loss, e.g. FedProx)."""
        train = self.cfg.train
        optimizer = make_optimizer(self.param_groups(model), train)
        return train_epochs(
            model, loss, x, y, optimizer,
            epochs=train.local_epochs, batch_size=train.batch_size, generator=generator,
            prior_alpha=train.prior_alpha if self.uses_label_prior_batches else 0.0,
            amp=train.amp,
        )

    # -- prediction -----------------------------------------------------------------------------

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits of a participant's own model (pACC) and of the global model (gACC)."""
        return model(x)

    def predict_zeroshot(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits of the shared model alone: on a held-out client (zACC: frozen shared arrays, no
        labels, no gradient step) and on the server's global test set (gACC)."""
        return self.predict(model, x)

    def predictor(self, model: nn.Module, x: torch.Tensor, zeroshot: bool):
        """The logits function used to evaluate on one client's inputs ``x`` (or the global test
        set). A method that pools over a client's unlabelled inputs looks at all of ``x`` here."""
        predict = self.predict_zeroshot if zeroshot else self.predict
        return lambda batch: predict(model, batch)

    def prepare_heldout(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """What a held-out client may do before it is evaluated, and on which of its samples.

        Zero-shot methods do nothing and are evaluated on all the client's data; only the labelled
        fine-tuning reference overrides this (it trains on a labelled slice, tests on the rest).
        """
        return model, x, y

    def diagnostics(self, model: nn.Module, x: torch.Tensor) -> dict[str, float | list[float]]:
        """Extra per-client evaluation metrics (HyperFedZero: embedding collapse)."""
        return {}

    def zeroshot_module(self, model: nn.Module, x: torch.Tensor | None = None) -> nn.Module:
        """The module a new client runs (what export writes): the model itself by default.
        ``x``: the client's unlabelled inputs, for a method whose weights follow them (PeFLL)."""
        return model

    # -- server side ----------------------------------------------------------------------------

    #: Flower strategies whose hooks this method's server needs, before the server step
    #: (FedProx: ``proximal-mu`` in each round's config).
    strategy_hooks: ClassVar[tuple[type[FedAvg], ...]] = ()
    #: A server-side layer of this method's own, put in front of the shared-keys layer (SCAFFOLD:
    #: the server control variate; FedAMP: one cloud model per participant). ``None``: none.
    strategy_layer: ClassVar[type | None] = None

    def strategy(self, shared_keys: list[str], roles: Roles) -> SharedKeys:
        """The shared-keys layer over Flower's strategies: this method's hooks, then the server
        step ``server.optimizer`` names (FedAvgM with ``server_momentum`` and ``server_lr``, or
        FedAdam with the ``fedadam_*`` settings)."""
        cfg, server = self.cfg, self.cfg.server
        if server.optimizer == "fedadam":
            step: type[FedAvg] = FedAdamKeepingDtypes
            step_kwargs: dict[str, Any] = {
                "eta": server.fedadam_eta, "beta_1": server.fedadam_beta_1,
                "beta_2": server.fedadam_beta_2, "tau": server.fedadam_tau}
        else:
            step = FedAvgM
            step_kwargs = {"server_momentum": server.server_momentum,
                           "server_learning_rate": server.server_lr}
        cls = layered(*self.strategy_hooks, step)
        if self.strategy_layer is not None:
            cls = with_layer(self.strategy_layer, cls)
        return cls(
            shared_keys, roles, num_rounds=cfg.run.rounds, eval_every=cfg.run.eval_every,
            eval_participants=cfg.eval.participants_sample,
            eval_heldout=cfg.eval.heldout_sample, seed=cfg.run.seed,
            fraction_train=server.fraction_train,
            min_train_nodes=server.min_train_nodes, **step_kwargs, **self.strategy_kwargs())

    def strategy_kwargs(self) -> dict[str, Any]:
        """This method's own arguments for its ``strategy_hooks`` (FedProx: ``proximal_mu``)."""
        return {}
