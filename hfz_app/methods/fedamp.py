"""FedAMP: attentive message passing, one personalised cloud model per participant."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from hfz_app.config import ConfigError
from hfz_app.methods.fedprox import proximal_term
from hfz_app.methods.personal import PersonalisedMethod
from hfz_app.training import make_optimizer, train_epochs

STATE_PREFIX = "fedamp_w"  # server_state names: fedamp_w<partition>


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def attention_weights(models: Sequence[Mapping[str, np.ndarray]], i: int, alpha_k: float,
                      sigma: float) -> np.ndarray:
    r"""FedAMP's message-passing weights of participant ``i`` over ``models`` (the latest
    :math:`w_1..w_N`):

    .. math::
        \xi_{ij} = \alpha_k\,A'(\lVert w_i - w_j\rVert^2)
                 = \frac{\alpha_k}{\sigma}\,e^{-\lVert w_i - w_j\rVert^2/\sigma} \ (j \ne i),
        \qquad \xi_{ii} = 1 - \sum_{j \ne i} \xi_{ij},

    with :math:`A(x) = 1 - e^{-x/\sigma}`, the paper's attention-inducing function; the squared
    distance is over every floating-point array. The weights sum to 1; :math:`\xi_{ii} \ge 0`
    needs :math:`\alpha_k \le \sigma/(N-1)`."""
    xi = np.zeros(len(models))
    for j, other in enumerate(models):
        if j != i:
            dist = sum(float(np.sum((models[i][k].astype(np.float64) - other[k]) ** 2))
                       for k in models[i] if _is_float(models[i][k]))
            xi[j] = alpha_k * np.exp(-dist / sigma) / sigma
    xi[i] = 1.0 - xi.sum()
    return xi


def cloud_model(models: Sequence[Mapping[str, np.ndarray]], i: int, alpha_k: float,
                sigma: float) -> dict[str, np.ndarray]:
    r""":math:`u_i = \sum_j \xi_{ij} w_j` (:func:`attention_weights`), each array in its own
    dtype; integer arrays (BatchNorm's step counter) are participant ``i``'s own."""
    xi = attention_weights(models, i, alpha_k, sigma)
    out = {}
    for k, own in models[i].items():
        if _is_float(own):
            out[k] = sum(x * m[k].astype(np.float64) for x, m in zip(xi, models, strict=True)
                         ).astype(own.dtype)
        else:
            out[k] = np.array(own, copy=True)
    return out


class FedAMPLayer:
    r"""FedAMP's server: the latest model :math:`w_j` of every participant (the initial global
    model until it first trains), and for each participant sampled this round its own cloud model
    :math:`u_i` (:func:`cloud_model`) in its train message, built with Flower's Message API.
    The global arrays (zACC, gACC) stay the configured server step over the :math:`w_i`
    (FedAvg: their sample-weighted mean). Every :math:`w_j` is in the checkpoints, so
    ``run.resume`` is exact."""

    def __init__(self, *args: Any, alpha_k: float, sigma: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alpha_k, self.sigma = alpha_k, sigma
        self.models: dict[int, dict[str, np.ndarray]] = {}  # w_j by partition

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        initial = {k: v.numpy() for k, v in arrays.items()}
        partitions = [self.roles.partition_of.get(n, i)
                      for i, n in enumerate(self.roles.participants)]
        models = [self.models.get(p, initial) for p in partitions]
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            i = partitions.index(self.roles.partition_of.get(node, 0))
            u = cloud_model(models, i, self.alpha_k, self.sigma)
            content = RecordDict(dict(msg.content.items()))  # Flower's messages share one
            content[self.arrayrecord_key] = ArrayRecord({k: Array(v) for k, v in u.items()})
            out.append(Message(content, dst_node_id=node,
                               message_type=msg.metadata.message_type))
        return out

    def accept_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        kept = super().accept_replies(server_round, replies)
        for msg in kept:
            partition = self.roles.partition_of.get(msg.metadata.src_node_id, 0)
            self.models[partition] = {k: v.numpy() for k, v in
                                      msg.content[self.arrayrecord_key].items()}
        return kept

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        return super().server_state() | {f"{STATE_PREFIX}{p}": dict(w)
                                         for p, w in self.models.items()}

    def load_server_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        super().load_server_state(state)
        self.models = {int(name.removeprefix(STATE_PREFIX)): {k: np.asarray(v)
                                                              for k, v in value.items()}
                       for name, value in state.items() if name.startswith(STATE_PREFIX)}


class FedAMPMethod(PersonalisedMethod):
    r"""Huang et al. 2021, "Personalized Cross-Silo Federated Learning on Non-IID Data".

    The server keeps every participant's latest model :math:`w_j` and sends participant
    :math:`i` its personalised cloud model :math:`u_i = \sum_j \xi_{ij} w_j`, weighted by
    attention on model similarity (:func:`attention_weights`: ``fedamp.alpha_k``,
    ``fedamp.sigma``). From :math:`u_i` the participant trains its personalised model on

    .. math::
        F_i(w) + \frac{\lambda}{2\alpha_k}\,\lVert w - u_i \rVert^2

    (``fedamp.lam``; ``train.*`` optimiser, ``train.local_epochs``), keeps it in
    ``context.state`` and sends it: the server stores it as :math:`w_i`. pACC: the participant's
    personalised model :math:`w_i`. zACC and gACC: the global arrays, the configured server step
    over the :math:`w_i` (FedAvg: their plain sample-weighted average), since a held-out client
    has no model of its own to attend from. Bytes: FedAvg's (one model each way).
    """

    name = "fedamp"
    strategy_layer = FedAMPLayer

    def __init__(self, cfg, input_shape, num_classes) -> None:
        super().__init__(cfg, input_shape, num_classes)
        others = cfg.data.num_participants - 1
        if others > 0 and cfg.fedamp.alpha_k > cfg.fedamp.sigma / others:
            raise ConfigError(
                f"fedamp.alpha_k: expected <= fedamp.sigma / (data.num_participants - 1) = "
                f"{cfg.fedamp.sigma / others:g}, so that a participant's weight on its own model "
                f"stays >= 0; got {cfg.fedamp.alpha_k:g}")

    def local_train(self, model, x, y, generator, config: Mapping[str, Any] | None = None):
        train, cfg = self.cfg.train, self.cfg.fedamp
        personal, cloud = model.personal, model.shared
        personal.load_state_dict(cloud.state_dict())  # from u_i
        model.personal_ready.fill_(1)
        anchor = [p.detach().clone() for p in cloud.parameters()]
        weight = cfg.lam / cfg.alpha_k

        def loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
            ce = nn.functional.cross_entropy(m(xb), yb)
            return ce + 0.5 * weight * proximal_term(m, anchor), {"train_ce": ce.detach()}

        optimizer = make_optimizer([{"params": list(personal.parameters())}], train)
        metrics = train_epochs(personal, loss, x, y, optimizer, epochs=train.local_epochs,
                               batch_size=train.batch_size, generator=generator, amp=train.amp)
        cloud.load_state_dict(personal.state_dict())  # the reply: w_i
        return metrics

    def strategy_kwargs(self) -> dict[str, Any]:
        return {"alpha_k": self.cfg.fedamp.alpha_k, "sigma": self.cfg.fedamp.sigma}
