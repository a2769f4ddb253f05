"""PeFLL: a hypernetwork generates each client's model from a descriptor of its data."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from hfz_app.methods.base import Method
from hfz_app.methods.personal import cross_entropy
from hfz_app.models import build_target
from hfz_app.training import make_optimizer, train_epochs

POOL_CHUNK = 1024


def _key(name: str) -> str:
    return name.replace(".", "__")


def clip_scale(norm: torch.Tensor, max_norm: float) -> float:
    """The factor that brings a step of global norm ``norm`` down to ``max_norm`` (1 if it is
    already within it, or if ``max_norm`` is 0: no clipping)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (float(norm) + 1e-12))


class PeFLLModel(nn.Module):
    r"""The embedding network :math:`\phi`, the hypernetwork :math:`h` and the target.

    :math:`\phi` is an MLP on the flattened input; a client's descriptor is the mean
    :math:`v = \frac1n\sum_{i=1}^n \phi(x_i)` over its inputs (PeFLL's ``embed_y`` off: no
    label enters it, so a new client computes it from unlabelled data). :math:`h` maps
    :math:`v` through an MLP to :math:`a(v) \in \mathbb{R}^r` and then, like PeFLL's linear output
    layer, to every trainable target parameter: :math:`\theta_p(v) = \theta_{0,p} + \sum_{k=1}^r
    a_k(v)\,U_{k,p}`; the output layer's bias :math:`\theta_0` is the target's own parameters
    (so its initialisation is the target's), its weights :math:`U` start at 0. The target's
    buffers (BatchNorm statistics) are its own, as for every method.
    """

    def __init__(self, target: nn.Module, input_shape: tuple[int, int, int], embed_dim: int,
                 embed_hidden: int, hyper_hidden: int, rank: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), embed_hidden),
                                   nn.ReLU(), nn.Linear(embed_hidden, embed_dim))
        self.hyper = nn.Sequential(nn.Linear(embed_dim, hyper_hidden), nn.ReLU(),
                                   nn.Linear(hyper_hidden, rank))
        self.target = target
        self.names = [n for n, p in target.named_parameters() if p.requires_grad]
        self.basis = nn.ParameterDict({
            _key(n): nn.Parameter(torch.zeros(rank, *target.get_parameter(n).shape))
            for n in self.names})

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`v = \frac1n \sum_i \phi(x_i)` over all of ``x`` (pooled in chunks)."""
        total = sum(self.embed(x[s : s + POOL_CHUNK]).sum(0) for s in range(0, len(x), POOL_CHUNK))
        return total / max(len(x), 1)

    def generate(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        r""":math:`\theta(v)`, by target parameter name."""
        a = self.hyper(v)
        return {n: self.target.get_parameter(n) + torch.tensordot(a, self.basis[_key(n)], dims=1)
                for n in self.names}

    def run(self, theta: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The target with weights ``theta`` (and its own buffers) on ``x``."""
        return functional_call(self.target, dict(theta), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The weights generated from ``x``'s own descriptor, applied to ``x``."""
        return self.run(self.generate(self.descriptor(x)), x)


class PeFLLMethod(Method):
    r"""Scott et al. 2024, "PeFLL: Personalized Federated Learning by Learning to Learn",
    without labels in the descriptor (``embed_y`` off), so that it is zero-shot for a new client.

    Each round participant :math:`i` computes :math:`v_i` from its training inputs and
    :math:`\theta_i = h(v_i)` (:class:`PeFLLModel`), trains a copy
    :math:`\tilde\theta_i` of :math:`\theta_i` for ``train.local_epochs`` with ``train.*``, and
    takes PeFLL's hypernetwork step on the embedding network and the hypernetwork
    :math:`\psi = (\phi, h)` through the vector-Jacobian product with the local change
    :math:`\Delta\theta_i = \theta_i - \tilde\theta_i`:

    .. math::
        \psi \leftarrow \psi - \beta\,\Bigl(\frac{\partial\theta_i}{\partial\psi}\Bigr)^{\!\top}
        \Delta\theta_i ,

    with :math:`\beta` = ``pefll.hyper_lr`` (the chain rule through :math:`h` and :math:`v_i`
    reaches :math:`\phi`). As in pFedHN's and PeFLL's own code, the step is clipped: the
    vector-Jacobian product :math:`g_i` is scaled by :math:`\min(1, c / \lVert g_i\rVert_2)`, its
    global norm over :math:`\psi`, with :math:`c` = ``pefll.clip_norm`` (0: no clipping). The
    server averages :math:`\psi` (the configured server step, as for every method), which, up
    to FedAvg's sample weights, is PeFLL's server update
    :math:`\psi \leftarrow \psi - \frac{\beta}{|S|} \sum_i (\partial\theta_i/\partial\psi)^\top
    \Delta\theta_i`. With :math:`U = 0` at the start and :math:`\beta = 1`, round 1 moves
    :math:`\theta_0` to the FedAvg of the :math:`\tilde\theta_i`.

    **What differs from PeFLL's protocol**: PeFLL keeps :math:`h` on the server (descriptor up,
    :math:`\theta_i` down, :math:`\Delta\theta_i` up, :math:`\partial v_i` down, the
    :math:`\phi` gradient up); here the same step is computed on the client, so :math:`\phi` and
    :math:`h` cross the network both ways and the bytes columns count them (:math:`(1 + r)` times
    the target plus :math:`\phi`). PeFLL's regularisers on :math:`h`'s output and on :math:`v`
    are left out.

    pACC: :math:`h(v)` with :math:`v` pooled over the participant's local test inputs.
    zACC: the frozen :math:`\phi` and :math:`h` on a held-out client, :math:`v` pooled over its
    unlabelled inputs, no gradient step. gACC: the same on the global test set.
    """

    name = "pefll"

    def build_model(self) -> PeFLLModel:
        cfg = self.cfg.pefll
        target = build_target(self.cfg.model.target, self.input_shape, self.num_classes)
        return PeFLLModel(target, self.input_shape, cfg.embed_dim, cfg.embed_hidden,
                          cfg.hyper_hidden, cfg.rank)

    def local_train(self, model: PeFLLModel, x, y, generator,
                    config: Mapping[str, Any] | None = None) -> dict[str, float]:
        train = self.cfg.train
        model.train()
        theta = model.generate(model.descriptor(x))
        local = copy.deepcopy(model.target)
        with torch.no_grad():
            for n in model.names:
                local.get_parameter(n).copy_(theta[n])
        optimizer = make_optimizer([{"params": [local.get_parameter(n) for n in model.names]}],
                                   train)
        metrics = train_epochs(local, cross_entropy, x, y, optimizer, epochs=train.local_epochs,
                               batch_size=train.batch_size, generator=generator, amp=train.amp)
        delta = {n: theta[n].detach() - local.get_parameter(n).detach() for n in model.names}
        surrogate = sum((theta[n] * delta[n]).sum() for n in model.names)
        psi = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(surrogate, psi, allow_unused=True)
        grad_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))
        step = self.cfg.pefll.hyper_lr * clip_scale(grad_norm, self.cfg.pefll.clip_norm)
        with torch.no_grad():
            for p, g in zip(psi, grads, strict=True):
                if g is not None:
                    p.sub_(step * g)
            for name, buf in model.target.named_buffers():  # BatchNorm statistics of the pass
                buf.copy_(local.get_buffer(name))
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values()))
        return metrics | {"train_delta_norm": float(norm), "train_psi_grad_norm": float(grad_norm)}

    def zeroshot_module(self, model: PeFLLModel, x: torch.Tensor | None = None) -> nn.Module:
        """The plain target with the weights generated from the client's inputs ``x``."""
        if x is None:
            raise ValueError("pefll: a new client's model is generated from its inputs; pass x")
        with torch.no_grad():
            theta = model.generate(model.descriptor(x))
            plain = copy.deepcopy(model.target)
            for n in model.names:
                plain.get_parameter(n).copy_(theta[n])
        return plain

    def predict(self, model: PeFLLModel, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def predictor(self, model: PeFLLModel, x: torch.Tensor, zeroshot: bool):
        """Weights generated once from the descriptor of all of ``x`` (the client's inputs)."""
        theta = model.generate(model.descriptor(x))
        return lambda batch: model.run(theta, batch)
