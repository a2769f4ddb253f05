"""Ditto: FedAvg for the shared model, plus a personal model regularised towards it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hfz_app.methods.fedprox import proximal_term
from hfz_app.methods.personal import PersonalisedMethod, cross_entropy
from hfz_app.training import make_optimizer, train_epochs


class DittoMethod(PersonalisedMethod):
    r"""Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization".

    Each round a participant (1) trains the shared model :math:`w` on its data exactly as FedAvg
    does and sends it, and (2) trains its personal model :math:`v_k`, kept in ``context.state``,
    on

    .. math::
        F_k(v_k) + \frac{\lambda}{2}\,\lVert v_k - w^t \rVert^2,

    with :math:`w^t` the global model received this round (``ditto.lam``). ``lam = 0`` is local
    training; a large ``lam`` ties :math:`v_k` to :math:`w^t`. pACC: :math:`v_k`; zACC and gACC:
    :math:`w`.
    """

    name = "ditto"

    def local_train(self, model, x, y, generator, config: Mapping[str, Any] | None = None):
        train, ditto = self.cfg.train, self.cfg.ditto
        model.start_personal()
        anchor = [p.detach().clone() for p in model.shared.parameters()]
        shared_opt = make_optimizer([{"params": list(model.shared.parameters())}], train)
        metrics = train_epochs(model.shared, cross_entropy, x, y, shared_opt,
                               epochs=train.local_epochs, batch_size=train.batch_size,
                               generator=generator, amp=train.amp)

        def personal_loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
            ce = nn.functional.cross_entropy(m(xb), yb)
            loss = ce + 0.5 * ditto.lam * proximal_term(m, anchor)
            return loss, {"train_personal_ce": ce.detach()}

        personal_opt = torch.optim.SGD(model.personal.parameters(),
                                       lr=ditto.personal_lr or train.lr, momentum=train.momentum)
        personal = train_epochs(model.personal, personal_loss, x, y, personal_opt,
                                epochs=ditto.personal_epochs, batch_size=train.batch_size,
                                generator=generator, amp=train.amp)
        return metrics | {"train_personal_loss": personal["train_loss"],
                          "train_personal_ce": personal["train_personal_ce"]}
