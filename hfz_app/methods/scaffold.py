"""SCAFFOLD: FedAvg with control variates that correct each client's drift."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from hfz_app.arrays import ArrayMismatch, check_arrays
from hfz_app.config import ConfigError
from hfz_app.methods.fedavg import FedAvgMethod
from hfz_app.models import build_target

log = logging.getLogger("hfz_app")

#: The train message's record with the server variate c, and the reply's with the change of c_i.
SERVER_CONTROL = "scaffold.c"
CONTROL_DELTA = "scaffold.dc"
#: Sent once after ``run.resume`` to each participant: its own c_i, which the server rebuilt by
#: summing the participant's Delta c_i (a resumed run is a new Flower run: fresh node state).
CLIENT_CONTROL = "scaffold.ci"
CONTROL_PREFIX = "control."


class Controlled(nn.Module):
    """The target network ``net`` and this client's control variate :math:`c_i` (buffers under
    ``control.``, one per trainable parameter of ``net``: personal, kept in ``context.state``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.control = nn.Module()
        self.names = [n for n, p in net.named_parameters() if p.requires_grad]
        for name in self.names:
            self.control.register_buffer(_buffer(name), torch.zeros_like(net.get_parameter(name)))
        self.server_control: dict[str, torch.Tensor] = {}  # c of this round (received)
        self.control_delta: dict[str, torch.Tensor] = {}  # c_i^+ - c_i (the reply)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def client_control(self, name: str) -> torch.Tensor:
        return self.control.get_buffer(_buffer(name))


def _buffer(name: str) -> str:
    return name.replace(".", "__")


def momentum_weight(steps: int, momentum: float) -> float:
    r""":math:`\sum_{j=1}^{K} (1-\beta^j)/(1-\beta)`: with SGD momentum :math:`\beta` (and
    dampening 0), :math:`x - y_i = \eta_l \sum_k w_k \hat g_k` with
    :math:`w_k = (1-\beta^{K-k+1})/(1-\beta)`; this is :math:`\sum_k w_k` (:math:`K` when
    :math:`\beta = 0`, the paper's plain SGD)."""
    if momentum == 0:
        return float(steps)
    return sum((1 - momentum**j) / (1 - momentum) for j in range(1, steps + 1))


class ScaffoldLayer:
    r"""SCAFFOLD's server: the control variate :math:`c` beside the global model (see
    :class:`ScaffoldMethod`). Every train message gets ``scaffold.c``; every reply must hold a
    ``scaffold.dc`` with exactly :math:`c`'s keys, shapes and dtypes, or it is dropped (and its
    model with it); then :math:`c \leftarrow c + \frac1N\sum_{i\in S}\Delta c_i`."""

    def __init__(self, *args: Any, control_reference: Mapping[str, np.ndarray],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.control_reference = {k: np.asarray(v) for k, v in control_reference.items()}
        self.control = {k: np.zeros_like(v) for k, v in self.control_reference.items()}
        # sum of each participant's Delta c_i, by partition: its c_i, for run.resume
        self.client_controls: dict[int, dict[str, np.ndarray]] = {}
        self.restore_pending: set[int] = set()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = ArrayRecord({k: Array(v) for k, v in self.control.items()})
        out = []
        for msg in messages:
            content = RecordDict(dict(msg.content.items()))  # Flower's messages share one
            content[SERVER_CONTROL] = control
            partition = self.roles.partition_of.get(msg.metadata.dst_node_id)
            if partition in self.restore_pending and partition in self.client_controls:
                content[CLIENT_CONTROL] = ArrayRecord(
                    {k: Array(v) for k, v in self.client_controls[partition].items()})
            self.restore_pending.discard(partition)
            out.append(Message(content, dst_node_id=msg.metadata.dst_node_id,
                               message_type=msg.metadata.message_type))
        stats = self.round_stats[server_round]
        stats["bytes_sent_per_client"] += float(control.count_bytes())
        stats["bytes_sent"] = stats["bytes_sent_per_client"] * len(out)
        return out

    def _reply_problem(self, msg: Message) -> str:
        records = msg.content.array_records
        if CONTROL_DELTA not in records:
            return f"expected an ArrayRecord '{CONTROL_DELTA}'"
        try:
            check_arrays(records[CONTROL_DELTA], self.control_reference, CONTROL_DELTA)
        except ArrayMismatch as err:
            return str(err)
        delta = msg.content.pop(CONTROL_DELTA)
        try:
            return super()._reply_problem(msg)
        finally:
            msg.content[CONTROL_DELTA] = delta

    def accept_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        kept = super().accept_replies(server_round, replies)
        total = {k: np.zeros_like(v) for k, v in self.control.items()}
        delta_bytes = 0
        for msg in kept:
            delta = msg.content.pop(CONTROL_DELTA)  # Flower's averaging wants one ArrayRecord
            delta_bytes += delta.count_bytes()
            partition = self.roles.partition_of.get(msg.metadata.src_node_id, 0)
            own = self.client_controls.setdefault(
                partition, {k: np.zeros_like(v) for k, v in self.control.items()})
            for k in total:
                value = delta[k].numpy()
                total[k] += value
                own[k] = own[k] + value
        n = max(len(self.roles.participants), 1)
        self.control = {k: (self.control[k] + total[k] / n).astype(self.control[k].dtype)
                        for k in self.control}
        stats = self.round_stats[server_round]
        stats["bytes_received"] += float(delta_bytes)
        stats["bytes_received_per_client"] = stats["bytes_received"] / max(len(kept), 1)
        return kept

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        state = super().server_state() | {"scaffold_c": dict(self.control)}
        for partition, ci in self.client_controls.items():
            state[f"scaffold_c{partition}"] = dict(ci)
        return state

    def load_server_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        super().load_server_state(state)
        if "scaffold_c" in state:
            self.control = {k: np.asarray(state["scaffold_c"][k]) for k in self.control}
        self.client_controls = {int(name.removeprefix("scaffold_c")): dict(value)
                                for name, value in state.items()
                                if name.startswith("scaffold_c") and name != "scaffold_c"}
        self.restore_pending = set(self.client_controls)


class ScaffoldMethod(FedAvgMethod):
    r"""Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning" (option II).

    The server holds the global model :math:`x` and a server control variate :math:`c`; client
    :math:`i` holds its own :math:`c_i` (``context.state``; both start at 0). A train message
    carries :math:`x` and :math:`c`; from :math:`y_i = x` the client takes its
    :math:`K` local steps on the corrected gradient

    .. math::
        y_i \leftarrow y_i - \eta_l\,\bigl(g_i(y_i) - c_i + c\bigr),

    then updates its variate and replies with :math:`y_i` and :math:`\Delta c_i`:

    .. math::
        c_i^+ = c_i - c + \frac{x - y_i}{\eta_l\,S_K}, \qquad \Delta c_i = c_i^+ - c_i,

    with :math:`\eta_l` = ``scaffold.lr`` (0: ``train.lr``), :math:`S_K = K` for plain SGD
    (the paper, and the default ``scaffold.momentum`` 0) and, with SGD momentum :math:`\beta`
    (``scaffold.momentum``),
    :math:`S_K = \sum_{j=1}^K (1-\beta^j)/(1-\beta)`: the total weight momentum gives the
    corrected gradients, so that :math:`c_i^+` is again their weighted mean minus the
    correction. The server steps :math:`x` with the configured server step over the
    :math:`y_i` (``server.*``, the same for every method; FedAvg: the sample-weighted mean) and

    .. math::
        c \leftarrow c + \frac{1}{N} \sum_{i \in S} \Delta c_i

    (:math:`N` participants, :math:`S` this round's). :math:`c` is in every checkpoint, and the
    server rebuilds each :math:`c_i = \sum_t \Delta c_i^t` so that ``run.resume`` is exact.
    A train message and reply each carry the model and one variate: twice FedAvg's bytes.
    zACC, pACC and gACC: the global model :math:`x`. Needs ``train.optimizer=sgd`` and
    ``privacy.dp=none`` (Flower's DP wrappers would clip and noise the model, not the variates).
    """

    name = "scaffold"
    strategy_layer = ScaffoldLayer

    def __init__(self, cfg, input_shape, num_classes) -> None:
        super().__init__(cfg, input_shape, num_classes)
        if cfg.train.optimizer != "sgd":
            raise ConfigError(f"train.optimizer: scaffold's control-variate update assumes sgd, "
                              f"got {cfg.train.optimizer!r}")
        if cfg.privacy.dp != "none":  # the variates would leave the node neither clipped nor noised
            raise ConfigError(f"privacy.dp: scaffold sends control variates that Flower's DP "
                              f"wrappers neither clip nor noise; use none, got {cfg.privacy.dp!r}")

    def build_model(self) -> Controlled:
        return Controlled(build_target(self.cfg.model.target, self.input_shape, self.num_classes))

    def shared_keys(self, model: nn.Module) -> list[str]:
        return [k for k in super().shared_keys(model) if not k.startswith(CONTROL_PREFIX)]

    def local_lr(self) -> float:
        r""":math:`\eta_l`: ``scaffold.lr``, or ``train.lr`` when 0."""
        return self.cfg.scaffold.lr or self.cfg.train.lr

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": [model.net.get_parameter(n) for n in model.names],
                 "lr": self.local_lr(), "momentum": self.cfg.scaffold.momentum}]

    def zeroshot_module(self, model: Controlled, x: torch.Tensor | None = None) -> nn.Module:
        return model.net

    def control_keys(self, model: Controlled) -> list[str]:
        """The keys of :math:`c`, :math:`c_i` and :math:`\\Delta c_i` on the wire: the state-dict
        keys of the parameters they correct."""
        return [f"net.{n}" for n in model.names]

    def receive_extras(self, model: Controlled, records: Mapping[str, Any]) -> None:
        keys = self.control_keys(model)
        reference = {f"net.{n}": model.net.get_parameter(n) for n in model.names}
        if CLIENT_CONTROL in records:  # after run.resume: this client's own c_i, once
            ci = records[CLIENT_CONTROL].to_torch_state_dict()
            check_arrays(ci, reference, CLIENT_CONTROL)
            with torch.no_grad():
                for n, k in zip(model.names, keys, strict=True):
                    model.client_control(n).copy_(ci[k])
        if SERVER_CONTROL not in records:
            raise ArrayMismatch(f"scaffold: the train message has no '{SERVER_CONTROL}' record")
        c = records[SERVER_CONTROL].to_torch_state_dict()
        check_arrays(c, reference, SERVER_CONTROL)
        device = next(model.parameters()).device
        model.server_control = {n: c[k].to(device) for n, k in zip(model.names, keys, strict=True)}

    def local_train(self, model: Controlled, x, y, generator, config=None):
        train = self.cfg.train
        params = [model.net.get_parameter(n) for n in model.names]
        start = [p.detach().clone() for p in params]
        ci = [model.client_control(n) for n in model.names]
        # c as received (receive_extras); called directly, without a train message: 0, its start
        server = {n: model.server_control.get(n, torch.zeros_like(c))
                  for n, c in zip(model.names, ci, strict=True)}
        correction = [(server[n] - c).detach() for n, c in zip(model.names, ci, strict=True)]
        # g_i(y) - c_i + c: each parameter's gradient corrected as it is computed
        hooks = [p.register_hook(lambda g, d=d: g + d) for p, d in zip(params, correction,
                                                                      strict=True)]
        try:
            metrics = self.fit(model, self.loss, x, y, generator)
        finally:
            for hook in hooks:
                hook.remove()
        steps = train.local_epochs * math.ceil(len(x) / train.batch_size)
        scale = self.local_lr() * momentum_weight(steps, self.cfg.scaffold.momentum)
        with torch.no_grad():
            model.control_delta = {}
            for n, p, p0, c_old in zip(model.names, params, start, ci, strict=True):
                # Delta c_i = c_i+ - c_i; c_i += Delta c_i, the sum the server repeats on resume
                model.control_delta[n] = (p0 - p) / scale - server[n]
                c_old.add_(model.control_delta[n])
        return metrics

    def reply_extras(self, model: Controlled) -> dict[str, Any]:
        keys = self.control_keys(model)
        return {CONTROL_DELTA: ArrayRecord({k: Array(model.control_delta[n].detach().cpu().numpy())
                                            for n, k in zip(model.names, keys, strict=True)})}

    def strategy_kwargs(self) -> dict[str, Any]:
        with torch.random.fork_rng():
            model = self.build_model()
        return {"control_reference": {f"net.{n}": np.zeros_like(
            model.net.get_parameter(n).detach().cpu().numpy()) for n in model.names}}
