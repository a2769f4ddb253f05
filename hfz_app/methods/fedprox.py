"""FedProx: FedAvg plus a proximal term on the client, with Flower's own FedProx strategy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.serverapp.strategy import FedProx
from torch import nn

from hfz_app.federation.roles import Roles
from hfz_app.federation.strategy import HyperFedZeroStrategy
from hfz_app.methods.fedavg import FedAvgMethod


class FedProxStrategy(FedProx, HyperFedZeroStrategy):
    r"""Flower's :class:`~flwr.serverapp.strategy.FedProx` restricted to the shared keys.

    FedProx's one hook (``configure_train`` puts ``proximal-mu`` in the round's ConfigRecord)
    runs first, then HyperFedZeroStrategy's participant sampling, key filter and evaluation.
    The client minimises, from the received global weights :math:`w^t`,

    .. math::
        F_k(w) + \frac{\mu}{2}\,\lVert w - w^t \rVert^2 .

    ``proximal_mu = 0`` is FedAvg.
    """

    def __init__(self, shared_keys, roles: Roles, *, proximal_mu: float, **kwargs: Any) -> None:
        # FedProx.__init__ takes FedAvg's arguments only; ours go through HyperFedZeroStrategy,
        # whose super() is FedAvg in this MRO (FedProxStrategy -> FedProx -> HFZ -> FedAvg).
        HyperFedZeroStrategy.__init__(self, shared_keys, roles, **kwargs)
        self.proximal_mu = proximal_mu


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """:math:`\\lVert w - w^t \\rVert^2` over the trainable parameters, ``anchor`` = :math:`w^t`."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))


class FedProxMethod(FedAvgMethod):
    """Li et al. 2020. One shared target network; the local loss adds (mu/2)||w - w^t||^2 with mu
    read from the round's config, as Flower's FedProx strategy sends it."""

    name = "fedprox"

    def local_train(self, model, x, y, generator, config: Mapping[str, Any] | None = None):
        mu = float((config or {}).get("proximal-mu", self.cfg.fedprox.mu))
        anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

        def loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
            ce = nn.functional.cross_entropy(m(xb), yb)
            return ce + 0.5 * mu * proximal_term(m, anchor), {"train_ce": float(ce.detach())}

        return self.fit(model, loss, x, y, generator)

    strategy_class = FedProxStrategy

    def strategy_kwargs(self) -> dict[str, Any]:
        return {**super().strategy_kwargs(), "proximal_mu": self.cfg.fedprox.mu}
