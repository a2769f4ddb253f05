"""pFedMe: personalised models as Moreau envelopes of the clients' losses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hfz_app.methods.fedprox import proximal_term
from hfz_app.methods.personal import PersonalisedMethod
from hfz_app.training import autocast


class PFedMeMethod(PersonalisedMethod):
    r"""Dinh et al. 2020, "Personalized Federated Learning with Moreau Envelopes".

    For every local batch :math:`\mathcal{D}`, starting from the received :math:`w^t`, the
    personal model :math:`\theta_k` takes ``pfedme.inner_steps`` (K) SGD steps with rate
    ``pfedme.personal_lr`` on

    .. math::
        \tilde F_k(\theta; \mathcal{D}) + \frac{\lambda}{2}\,\lVert \theta - w \rVert^2 ,

    then the local copy of the shared model moves towards it,
    :math:`w \leftarrow w - \eta\lambda\,(w - \theta_k)` (:math:`\eta` = ``pfedme.eta``). The client
    sends :math:`w`; the server averages (pFedMe's server mixing :math:`\beta = 1`, i.e. FedAvg).
    pACC: the last :math:`\theta_k` (kept in ``context.state``); zACC and gACC: :math:`w`.
    """

    name = "pfedme"

    def local_train(self, model, x, y, generator, config: Mapping[str, Any] | None = None):
        train, cfg = self.cfg.train, self.cfg.pfedme
        theta, w = model.personal, model.shared
        theta.load_state_dict(w.state_dict())  # each round starts from the received model
        model.personal_ready.fill_(1)
        optimizer = torch.optim.SGD(theta.parameters(), lr=cfg.personal_lr)
        theta.train()
        w.train()
        w_params = list(w.parameters())
        total, seen = torch.zeros((), dtype=torch.float64, device=x.device), 0
        for _ in range(train.local_epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), train.batch_size):
                idx = order[start : start + train.batch_size]
                anchor = [p.detach() for p in w_params]
                for _ in range(cfg.inner_steps):
                    with autocast(x.device, train.amp):
                        ce = nn.functional.cross_entropy(theta(x[idx]), y[idx])
                    loss = ce + 0.5 * cfg.lam * proximal_term(theta, anchor)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                with torch.no_grad():
                    for pw, pt in zip(w_params, theta.parameters(), strict=True):
                        pw.sub_(cfg.eta * cfg.lam * (pw - pt))
                total += ce.detach().double() * len(idx)  # summed on the device: no sync
                seen += len(idx)
        # BatchNorm statistics follow the personal model's passes (w never runs forward here).
        for (name, buf), src in zip(w.named_buffers(), theta.buffers(), strict=True):
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(src)
        return {"train_loss": float(total) / max(seen, 1)}
