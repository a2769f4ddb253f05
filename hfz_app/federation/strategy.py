"""HyperFedZeroStrategy: FedAvg over the shared modules only, trained by participants only."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, Result
from flwr.serverapp.strategy.fedopt import FedOpt

from hfz_app.evaluation.metrics import summarise_evaluation
from hfz_app.federation.roles import ZEROSHOT_MESSAGE_TYPE, Roles

log = logging.getLogger("hfz_app")
# How long a strategy without given roles waits for min_available_nodes before giving up.
NODE_WAIT_S = 600.0


class HyperFedZeroStrategy(FedAvg):
    r"""Federated Averaging of HyperFedZero's shared arrays, with zero-shot evaluation.

    A HyperFedZero model is split into *shared* arrays :math:`\theta` -- the distribution
    extractor :math:`\theta_f` with its noise head, the chunked hypernetwork :math:`\theta_h` with
    its chunk embeddings, and a backbone when only a head is generated -- and *personal* state
    (local BatchNorm statistics, optimiser state, generated weights) that never leaves a client.
    This strategy only ever holds, sends and averages ``shared_keys``.

    Participating clients, on a ``train`` message, load :math:`\theta` and minimise on their data

    .. math::
        \frac{1}{n_k}\sum_i \ell\big(c(x_i;\, h(e_i;\theta_h)),\, y_i\big)
        + \alpha\,\frac{\operatorname{var}(u)}{\operatorname{mean}(u)}
        + \beta\,\frac{1}{B}\sum_i H(e_i),
        \qquad e_i = \operatorname{softmax}\!\big(f(x_i;\theta_f) + z\,\operatorname{softplus}(
        \mathrm{noisy}(x_i))\big),\quad u = \frac{1}{B}\sum_i e_i,

    then reply with *exactly* the received keys and ``num-examples`` = :math:`n_k`. The server sets
    :math:`\bar\theta = \sum_k n_k\theta_k / \sum_k n_k` over the valid replies; with server
    momentum :math:`\mu` (FedAvgM) it applies :math:`v \leftarrow \mu v + (\theta - \bar\theta)`,
    :math:`\theta \leftarrow \theta - \eta v`. A reply whose keys differ from ``shared_keys`` or
    that holds a non-finite value is dropped and logged, never averaged.

    Evaluation, every ``eval_every`` rounds and after the last: participants get ``evaluate`` and
    report accuracy on their local test split with their own generated weights (pACC); held-out
    nodes get ``evaluate.zeroshot`` and run the frozen modules on all their data -- no gradient
    step, labels used only for the metric (zACC). Held-out nodes never receive a train message.

    Parameters
    ----------
    shared_keys : Sequence[str]
        The state-dict keys that are shared; any other key in a reply invalidates it.
    roles : Roles, optional
        Which node ids are participants and which are held out (see ``roles.discover_roles``).
        Omitted (``None``), as in an existing project that used FedAvg: every connected node
        (``grid.get_node_ids()``, re-read at each configure step, waiting for
        ``min_available_nodes``) is a participant, nothing is held out, and evaluation metrics
        are aggregated as FedAvg does (sample-weighted mean of every reported key).
    num_rounds : int, optional
        Total rounds, so that the last round is always evaluated. Omitted: taken from
        :meth:`start`'s ``num_rounds``.
    eval_every : int
        Evaluate every this many rounds.
    server_momentum, server_lr : float
        FedAvgM's :math:`\mu` and :math:`\eta`; ``0`` and ``1`` give plain FedAvg.
    seed : int
        Seeds participant sampling when ``fraction_train < 1``.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self,
        shared_keys: Sequence[str],
        roles: Roles | None = None,
        *,
        num_rounds: int | None = None,
        eval_every: int = 1,
        server_momentum: float = 0.0,
        server_lr: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("min_train_nodes", 1)
        kwargs.setdefault("min_evaluate_nodes", 1)
        kwargs.setdefault("min_available_nodes", 1)
        super().__init__(**kwargs)
        self.shared_keys = frozenset(shared_keys)
        # roles=None: discover participants from the grid (no held-out nodes), FedAvg-style.
        self.discover_roles = roles is None
        self.roles = roles if roles is not None else Roles(participants=(), heldout=())
        self.num_rounds = num_rounds
        self._num_rounds_from_start = num_rounds is None
        self.eval_every = eval_every
        self.server_momentum = server_momentum
        self.server_lr = server_lr
        self.seed = seed
        self._current: ArrayRecord | None = None
        self._velocity: dict[str, np.ndarray] | None = None
        # What the recorder writes after each round: aggregated scalars and per-client replies.
        self.round_stats: dict[int, dict[str, float]] = {}
        self.client_metrics: dict[int, dict[str, list[dict[str, Any]]]] = {}

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              *args: Any, **kwargs: Any) -> Result:
        """FedAvg's ``start``; also the default for ``num_rounds`` when the constructor had none."""
        if self._num_rounds_from_start:
            self.num_rounds = num_rounds
        return super().start(grid, initial_arrays, num_rounds, *args, **kwargs)

    def _refresh_roles(self, grid: Grid) -> None:
        """Without given roles, every connected node is a participant (partition = rank of id)."""
        if not self.discover_roles:
            return
        needed = max(self.min_available_nodes, self.min_train_nodes, 1)
        deadline = time.monotonic() + NODE_WAIT_S
        while len(node_ids := sorted(grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"min_available_nodes: {len(node_ids)} of {needed} nodes "
                                   f"connected after {NODE_WAIT_S:.0f} s")
            log.info("waiting for nodes: %d of %d connected", len(node_ids), needed)
            time.sleep(1.0)
        self.roles = Roles(participants=tuple(node_ids), heldout=(),
                           partition_of={n: i for i, n in enumerate(node_ids)})

    # -- training -------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample participants only; held-out nodes are never asked to train."""
        self._check_arrays(arrays)
        self._refresh_roles(grid)
        participants = list(self.roles.participants)
        sample_size = max(int(len(participants) * self.fraction_train), self.min_train_nodes)
        sample_size = min(sample_size, len(participants))
        rng = random.Random(self.seed * 1_000_003 + server_round)
        node_ids = sorted(rng.sample(participants, sample_size), key=self.roles.partition_of.get)
        self._current = arrays
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self.round_stats[server_round] = {
            "n_train_sent": len(node_ids),
            "bytes_sent": float(arrays.count_bytes() * len(node_ids)),
            "bytes_sent_per_client": float(arrays.count_bytes()),
        }
        log.info("round %d: training %d of %d participants", server_round, len(node_ids),
                 len(participants))
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid replies, then FedAvg (plus optional server momentum) in partition order."""
        replies = list(replies)
        kept = [msg for msg in replies if self._is_valid_train_reply(msg)]
        # Summation order fixes float rounding: sort by partition id (node ids are random per run).
        kept.sort(key=lambda msg: self.roles.partition_of.get(msg.metadata.src_node_id, 0))
        stats = self.round_stats.setdefault(server_round, {})
        stats["n_train_replies"] = len(kept)
        stats["n_dropped"] = len(replies) - len(kept)
        stats["bytes_received"] = float(
            sum(msg.content[self.arrayrecord_key].count_bytes() for msg in kept)
        )
        stats["bytes_received_per_client"] = stats["bytes_received"] / max(len(kept), 1)
        arrays, metrics = super().aggregate_train(server_round, kept)
        if arrays is not None and (self.server_momentum > 0 or self.server_lr != 1.0):
            arrays = self._server_step(arrays)
        if metrics is not None:
            stats.update({k: float(v) for k, v in metrics.items() if not isinstance(v, list)})
        return arrays, metrics

    def _is_valid_train_reply(self, msg: Message) -> bool:
        node = msg.metadata.src_node_id
        if msg.has_error():
            log.warning("round reply from node %s failed: %s", node, msg.error.reason)
            return False
        arrays = msg.content.array_records.get(self.arrayrecord_key)
        if arrays is None or len(msg.content.array_records) != 1:
            log.warning("dropped reply from node %s: expected one ArrayRecord '%s'", node,
                        self.arrayrecord_key)
            return False
        keys = set(arrays.keys())
        if keys != self.shared_keys:
            extra, missing = sorted(keys - self.shared_keys), sorted(self.shared_keys - keys)
            log.warning("dropped reply from node %s: not the shared keys (foreign %s, missing %s)",
                        node, extra[:5], missing[:5])
            return False
        for key, array in arrays.items():
            if not np.isfinite(array.numpy()).all():
                log.warning("dropped reply from node %s: non-finite values in '%s'", node, key)
                return False
        metrics = msg.content.metric_records
        if len(metrics) != 1 or self.weighted_by_key not in next(iter(metrics.values())):
            log.warning("dropped reply from node %s: expected one MetricRecord with '%s'", node,
                        self.weighted_by_key)
            return False
        return True

    def _server_step(self, averaged: ArrayRecord) -> ArrayRecord:
        """FedAvgM: treat (current - average) as a pseudo-gradient with momentum and step size."""
        assert self._current is not None
        current = {k: v.numpy() for k, v in self._current.items()}
        average = {k: v.numpy() for k, v in averaged.items()}
        if self._velocity is None:
            self._velocity = {k: np.zeros_like(v) for k, v in current.items()}
        updated = {}
        for key, value in current.items():
            pseudo_grad = value - average[key]
            self._velocity[key] = self.server_momentum * self._velocity[key] + pseudo_grad
            updated[key] = (value - self.server_lr * self._velocity[key]).astype(value.dtype)
        return ArrayRecord({k: Array(v) for k, v in updated.items()})

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        """The optimiser state a restarted ServerApp needs beyond the arrays (FedAvgM: velocity)."""
        return {} if self._velocity is None else {"velocity": self._velocity}

    def load_server_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        if "velocity" in state:
            self._velocity = state["velocity"]

    def _check_arrays(self, arrays: ArrayRecord) -> None:
        keys = set(arrays.keys())
        if keys != self.shared_keys:
            raise ValueError(
                f"HyperFedZeroStrategy: the global arrays must hold exactly the shared keys; "
                f"foreign {sorted(keys - self.shared_keys)[:5]}, "
                f"missing {sorted(self.shared_keys - keys)[:5]}"
            )

    # -- evaluation -----------------------------------------------------------------------------

    def is_eval_round(self, server_round: int) -> bool:
        return server_round % self.eval_every == 0 or server_round == self.num_rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """pACC on every participant, zACC on every held-out node, on evaluation rounds."""
        if not self.is_eval_round(server_round):
            return []
        self._refresh_roles(grid)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [
            *self._construct_messages(record, list(self.roles.participants),
                                      MessageType.EVALUATE),
            *self._construct_messages(record, list(self.roles.heldout), ZEROSHOT_MESSAGE_TYPE),
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Summarise pACC over participants and zACC (mean, spread, percentiles) over held-out."""
        replies = list(replies)
        if not replies:
            return None
        if self.discover_roles:  # an existing project's own metric keys: FedAvg's weighted mean
            metrics = super().aggregate_evaluate(server_round, replies)
            if metrics is not None:
                self.round_stats.setdefault(server_round, {}).update(
                    {k: float(v) for k, v in metrics.items() if not isinstance(v, list)})
            return metrics
        per_role: dict[str, list[dict[str, Any]]] = {"participant": [], "heldout": []}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("evaluation reply from node %s failed: %s", node, msg.error.reason)
                continue
            role = "heldout" if node in self.roles.heldout else "participant"
            per_role[role].append(dict(next(iter(msg.content.metric_records.values()))))
        for role_replies in per_role.values():
            role_replies.sort(key=lambda r: r.get("partition-id", 0))
        summary = summarise_evaluation(per_role["participant"], per_role["heldout"])
        self.round_stats.setdefault(server_round, {}).update(summary)
        self.client_metrics[server_round] = {"participants": per_role["participant"],
                                             "heldout": per_role["heldout"]}
        return MetricRecord(summary)


class _FedAdamStep(FedAdam):
    r"""Flower's :class:`~flwr.serverapp.strategy.FedAdam` step on top of a key-filtering strategy.

    Put first in the bases of a :class:`HyperFedZeroStrategy` subclass (:func:`with_fedadam`):
    the filtered, sample-weighted average :math:`\bar\theta` of the valid replies becomes
    FedAdam's pseudo-gradient :math:`\Delta_t = \bar\theta - \theta_t`, and

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\Delta_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\Delta_t^2,\quad
        \theta_{t+1} = \theta_t + \eta_t\, \frac{m_t}{\sqrt{v_t} + \tau}

    (Reddi et al. 2021; :math:`\eta_t` is Flower's bias-corrected step). Only shared keys are
    ever in :math:`\theta`, so personal state never enters the optimiser.
    """

    def __init__(self, shared_keys: Sequence[str], roles: Roles | None = None, *,
                 eta: float, beta_1: float, beta_2: float, tau: float, **kwargs: Any) -> None:
        # FedOpt.__init__ takes FedAvg's arguments only; ours go to the key-filtering strategy,
        # the next class after FedOpt in this MRO.
        super(FedOpt, self).__init__(shared_keys, roles, **kwargs)
        self.current_arrays = None
        self.eta, self.eta_l, self.tau = eta, 0.0, tau
        self.beta_1, self.beta_2 = beta_1, beta_2
        self.m_t = self.v_t = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        # FedAdam's bias correction is a float64 scalar: keep each array's own dtype.
        assert self.current_arrays is not None
        return ArrayRecord({k: Array(v.numpy().astype(self.current_arrays[k].dtype, copy=False))
                            for k, v in arrays.items()}), metrics

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        state = {"fedadam_m": self.m_t, "fedadam_v": self.v_t}
        return {k: v for k, v in state.items() if v}

    def load_server_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        self.m_t, self.v_t = state.get("fedadam_m"), state.get("fedadam_v")


def with_fedadam(strategy_class: type[HyperFedZeroStrategy]) -> type[HyperFedZeroStrategy]:
    """``strategy_class`` with FedAdam's server step after its key filter and average.

    Works for any :class:`HyperFedZeroStrategy` subclass (FedProx's too): the result takes the
    class's own arguments plus ``eta``, ``beta_1``, ``beta_2`` and ``tau``."""
    return type(f"FedAdam{strategy_class.__name__}", (_FedAdamStep, strategy_class),
                {"__doc__": _FedAdamStep.__doc__})
