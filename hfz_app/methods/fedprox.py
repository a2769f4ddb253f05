"""FedProx: FedAvg plus a proximal term on the client, with Flower's own FedProx strategy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.serverapp.strategy import FedProx
from torch import nn

from hfz_app.methods.fedavg import FedAvgMethod


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """:math:`\\lVert w - w^t \\rVert^2` over the trainable parameters, ``anchor`` = :math:`w^t`."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))


class FedProxMethod(FedAvgMethod):
    r"""Li et al. 2020. One shared target network; from the received global weights :math:`w^t`
    the client minimises

    .. math::
        F_k(w) + \frac{\mu}{2}\,\lVert w - w^t \rVert^2,

    with :math:`\mu` read from the round's config, where Flower's own FedProx strategy puts it
    (its one hook, under the shared-keys layer). ``fedprox.mu = 0`` is FedAvg."""

    name = "fedprox"

    def local_train(self, model, x, y, generator, config: Mapping[str, Any] | None = None):
        mu = float((config or {}).get("proximal-mu", self.cfg.fedprox.mu))
        anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

        def loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
            ce = nn.functional.cross_entropy(m(xb), yb)
            return ce + 0.5 * mu * proximal_term(m, anchor), {"train_ce": ce.detach()}

        return self.fit(model, loss, x, y, generator)

    strategy_hooks = (FedProx,)

    def strategy_kwargs(self) -> dict[str, Any]:
        return {"proximal_mu": self.cfg.fedprox.mu}
