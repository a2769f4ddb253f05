"""The shared-keys layer: Flower's own strategies, trained by participants on the shared arrays.

:class:`SharedKeys` sits in front of any of Flower's FedAvg-family strategies (FedAvg, FedAvgM,
FedProx, FedAdam, ...), whose maths it leaves alone. It knows three things Flower does not:

- which node ids are participants and which are held out (``roles``): only participants are
  sampled to train; held-out nodes get the zero-shot evaluation message;
- which state-dict keys are shared: every reply is checked (keys, shapes, dtypes, finite values)
  by :func:`hfz_app.arrays.check_arrays` and dropped with one logged line if it does not fit,
  before Flower averages anything;
- the run's seed and evaluation schedule: sampling and summation order repeat with the seed.

:class:`HyperFedZeroStrategy` is the layer over :class:`~flwr.serverapp.strategy.FedAvgM`, the
strategy an existing project imports; :func:`layered` builds the layer over any combination
(``layered(FedProx, FedAvgM)``, ``layered(FedAdamKeepingDtypes)``...).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

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
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, Result

from hfz_app.arrays import ArrayMismatch, check_arrays
from hfz_app.evaluation.metrics import evaluation_reply, summarise_evaluation
from hfz_app.federation.roles import ZEROSHOT_MESSAGE_TYPE, Roles

log = logging.getLogger("hfz_app")
BN_STATISTICS = (".running_mean", ".running_var")  # averaged, never stepped by the server
# What the ClientApp reports of its own time (seconds), summed per round into round_timings.
CLIENT_TIMING_KEYS = ("client_data_s", "client_train_s", "client_eval_s")


@contextlib.contextmanager
def seeded_random(seed: int) -> Iterator[None]:
    """Python's global ``random`` seeded, then restored: Flower's ``sample_nodes`` draws with
    ``random.sample``, so seeding around it makes the sample repeat with the run's seed."""
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


class NodeSubset(Grid):
    """A view of ``grid`` that shows only ``node_ids`` (all of its nodes, sorted, when ``None``),
    so that Flower's own sampling in ``configure_train``/``configure_evaluate`` draws from the
    participants alone, in a fixed order."""

    def __init__(self, grid: Grid, node_ids: Sequence[int] | None = None) -> None:
        self.grid, self.node_ids = grid, node_ids

    @property
    def run(self):  # type: ignore[override]
        return self.grid.run

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        self.grid.set_run(run_id)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # type: ignore[override]
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids) if self.node_ids is not None else sorted(
            self.grid.get_node_ids())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class SharedKeys:
    r"""Role-aware, key-filtering layer over a Flower FedAvg-family strategy (put it first in the
    bases; :func:`layered`).

    Participating clients, on a ``train`` message, load the shared arrays :math:`\theta` (for
    HyperFedZero: the extractor :math:`\theta_f` with its noise head, the chunked hypernetwork
    :math:`\theta_h` with its chunk embeddings, and a backbone when only a head is generated),
    minimise their local loss and reply with *exactly* the received keys and ``num-examples`` =
    :math:`n_k`. Replies that do not fit are dropped; the rest, in partition order, go to the
    Flower strategy underneath (FedAvg: :math:`\bar\theta = \sum_k n_k\theta_k / \sum_k n_k`).
    Personal state (BatchNorm statistics, generated weights) never reaches the server.

    Evaluation, every ``eval_every`` rounds and after the last: participants get ``evaluate``
    (pACC, their own model on their local test split); held-out nodes get ``evaluate.zeroshot``
    (zACC: frozen shared arrays on all their data, no gradient step). Held-out nodes never train.

    Parameters
    ----------
    shared_keys : Sequence[str]
        The state-dict keys that are shared.
    roles : Roles, optional
        Participants and held-out node ids (``roles.discover_roles``). ``None``, as in an existing
        project that used FedAvg: every connected node is a participant, nothing is held out,
        and evaluation is Flower's (sample-weighted mean of every reported key).
    num_rounds : int, optional
        Total rounds, so that the last one is always evaluated (default: :meth:`start`'s).
    eval_every : int
        Evaluate every this many rounds.
    eval_participants, eval_heldout : int
        Score only a sample of this many participants / held-out nodes on each evaluation
        round, drawn anew each round from ``seed`` (0: all of them).
    seed : int
        Seeds node sampling (``fraction_train < 1``).
    **kwargs
        The Flower strategies' own arguments (FedAvg's, and e.g. FedAvgM's ``server_momentum``).
        Flower's strategies pass only FedAvg's arguments up their ``super().__init__`` chain,
        so each base is initialised here with its own arguments, first to last in the MRO.
    """

    def __init__(self, shared_keys: Sequence[str], roles: Roles | None = None, *,
                 num_rounds: int | None = None, eval_every: int = 1, seed: int = 0,
                 eval_participants: int = 0, eval_heldout: int = 0, **kwargs: Any) -> None:
        for key in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
            kwargs.setdefault(key, 1)
        _init_flower_bases(self, kwargs)
        self.shared_keys = tuple(shared_keys)
        self.discover_roles = roles is None
        self.roles = roles if roles is not None else Roles(participants=(), heldout=())
        self.num_rounds = num_rounds
        self._num_rounds_from_start = num_rounds is None
        self.eval_every = eval_every
        self.eval_sizes = {"participants": eval_participants, "heldout": eval_heldout}
        self.seed = seed
        self.reference: ArrayRecord | None = None  # the first global arrays: shapes and dtypes
        # What the recorder writes after each round: aggregated scalars and per-client replies.
        self.round_stats: dict[int, dict[str, float]] = {}
        self.client_metrics: dict[int, dict[str, list[dict[str, Any]]]] = {}
        # Where each round's time went (seconds; hfz_app.outputs.TIMING_COLUMNS): kept apart
        # from round_stats so that metrics.csv/.json stay identical from run to run.
        self.round_timings: dict[int, dict[str, float]] = {}
        self._phase_start: dict[str, float] = {}

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              *args: Any, **kwargs: Any) -> Result:
        """Flower's ``start``; also the default for ``num_rounds`` when the constructor had none."""
        if self._num_rounds_from_start:
            self.num_rounds = num_rounds
        return super().start(grid, initial_arrays, num_rounds, *args, **kwargs)  # type: ignore[misc]

    def _round_seed(self, server_round: int) -> int:
        return self.seed * 1_000_003 + server_round

    def _participants(self, grid: Grid) -> NodeSubset:
        """The nodes that may train: the participants, or (no roles) every connected node."""
        return NodeSubset(grid, None if self.discover_roles else self.roles.participants)

    def _note_connected(self, node_ids: Iterable[int]) -> None:
        """Without given roles, every connected node is a participant (partition = rank of id)."""
        if self.discover_roles:
            ids = sorted(node_ids)
            self.roles = Roles(participants=tuple(ids), heldout=(),
                               partition_of={n: i for i, n in enumerate(ids)})

    def _by_partition(self, messages: Iterable[Message], node_of) -> list[Message]:
        return sorted(messages, key=lambda m: self.roles.partition_of.get(node_of(m), 0))

    def _phase(self, server_round: int, name: str, begin: bool) -> None:
        """Time the ServerApp's phases: ``<name>_s`` from its ``begin`` to its end, where
        ``train``/``evaluate`` run from configure_* to aggregate_* (Flower sending the messages,
        the ClientApps' work, the replies coming back) and ``aggregate_*`` is the aggregation."""
        now = time.perf_counter()
        if begin:
            self._phase_start[name] = now
        elif name in self._phase_start:
            self.round_timings.setdefault(server_round, {})[f"{name}_s"] = (
                now - self._phase_start.pop(name))

    def _client_timings(self, server_round: int, metrics: Any) -> None:
        """Move the ClientApp's own timings (``client_*_s``) out of a reply's metrics into the
        round's totals: they differ from run to run, so they stay out of the averaged metrics."""
        totals = self.round_timings.setdefault(server_round, {})
        for key in CLIENT_TIMING_KEYS:
            if key in metrics:
                totals[key] = totals.get(key, 0.0) + float(metrics.pop(key))

    # -- training -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling and messages, over the participants only."""
        self._phase(server_round, "train", begin=True)
        self._check_global(arrays)
        if isinstance(self, FedAvgM):
            # FedAvgM steps from the arrays it last produced; a wrapper that changes them after
            # aggregation (DP noise) must not leave it stepping from stale ones.
            self.current_arrays = arrays
        view = self._participants(grid)
        with seeded_random(self._round_seed(server_round)):
            messages = list(super().configure_train(  # type: ignore[misc]
                server_round, arrays, config, view))
        self._note_connected(view.get_node_ids())
        messages = self._by_partition(messages, lambda m: m.metadata.dst_node_id)
        self.round_stats[server_round] = {
            "n_train_sent": len(messages),
            "bytes_sent": float(arrays.count_bytes() * len(messages)),
            "bytes_sent_per_client": float(arrays.count_bytes()),
        }
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The Flower strategy's aggregation over the replies that fit, in partition order."""
        self._phase(server_round, "train", begin=False)
        self._phase(server_round, "aggregate_train", begin=True)
        kept = self.accept_replies(server_round, replies)
        arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        if arrays is not None:
            arrays = self.averaged_statistics(arrays, kept)
        if metrics is not None:
            self.round_stats.setdefault(server_round, {}).update(
                {k: float(v) for k, v in metrics.items() if not isinstance(v, list)})
        self._phase(server_round, "aggregate_train", begin=False)
        return arrays, metrics

    def averaged_statistics(self, arrays: ArrayRecord, kept: Sequence[Message]) -> ArrayRecord:
        """``arrays`` with BatchNorm running statistics (``*.running_mean``, ``*.running_var``)
        set to the replies' sample-weighted mean. They are estimates, not trained weights: a
        server step on them (FedAvgM's momentum, FedAdam) extrapolates, and drove a shrinking
        variance below zero (NaN logits) on docs/ADOPTING.md's CNN with server momentum 0.5."""
        keys = [k for k in arrays if k.endswith(BN_STATISTICS)]
        if not keys or not kept:
            return arrays
        weight_key = self.weighted_by_key  # type: ignore[attr-defined]
        weights = np.array([float(next(iter(m.content.metric_records.values()))[weight_key])
                            for m in kept])
        weights = weights / weights.sum() if weights.sum() > 0 else np.ones(len(kept)) / len(kept)
        records = [m.content[self.arrayrecord_key] for m in kept]  # type: ignore[attr-defined]
        out = {}
        for key, value in arrays.items():
            if key in keys:
                mean = sum(w * r[key].numpy().astype(np.float64) for w, r in zip(weights, records))
                value = Array(np.asarray(mean).astype(value.numpy().dtype, copy=False))
            out[key] = value
        return ArrayRecord(out)

    def accept_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The train replies that fit (no error; one ArrayRecord with exactly the shared arrays,
        finite; one MetricRecord with the weight key), their arrays in the global key order,
        sorted by partition; the others are logged and counted as dropped."""
        replies = list(replies)
        kept = []
        for msg in replies:
            if msg.has_error():  # e.g. a node lost mid-round (Flower: "Node Unavailable")
                log.warning("round reply from node %s failed: %s", msg.metadata.src_node_id,
                            msg.error.reason)
                continue
            problem = self._reply_problem(msg)
            if problem:
                log.warning("dropped reply from node %s: %s", msg.metadata.src_node_id, problem)
                continue
            self._client_timings(server_round, next(iter(msg.content.metric_records.values())))
            arrays = msg.content[self.arrayrecord_key]  # type: ignore[attr-defined]
            if list(arrays.keys()) != self.key_order():  # Flower's steps zip arrays by position
                msg.content[self.arrayrecord_key] = ArrayRecord(  # type: ignore[attr-defined]
                    {k: arrays[k] for k in self.key_order()})
            kept.append(msg)
        kept = self._by_partition(kept, lambda m: m.metadata.src_node_id)
        stats = self.round_stats.setdefault(server_round, {})
        stats["n_train_replies"] = len(kept)
        stats["n_dropped"] = len(replies) - len(kept)
        stats["bytes_received"] = float(sum(
            m.content[self.arrayrecord_key].count_bytes() for m in kept))  # type: ignore[attr-defined]
        stats["bytes_received_per_client"] = stats["bytes_received"] / max(len(kept), 1)
        return kept

    def _reply_problem(self, msg: Message) -> str:
        """Why a train reply without an error cannot be averaged ("" if it can)."""
        content, key = msg.content, self.arrayrecord_key  # type: ignore[attr-defined]
        if len(content.array_records) != 1 or key not in content.array_records:
            return f"expected one ArrayRecord '{key}'"
        try:
            check_arrays(content[key], self._expected(), "arrays")
        except ArrayMismatch as err:
            return str(err)
        weight = self.weighted_by_key  # type: ignore[attr-defined]
        if len(content.metric_records) != 1 or weight not in next(
                iter(content.metric_records.values())):
            return f"expected one MetricRecord with '{weight}'"
        return ""

    def key_order(self) -> list[str]:
        """The global arrays' key order, which every reply is put in."""
        return list(self.reference.keys()) if self.reference is not None else list(
            self.shared_keys)

    def _expected(self) -> dict[str, Any]:
        if self.reference is not None:
            return dict(self.reference.items())
        return dict.fromkeys(self.shared_keys)

    def _check_global(self, arrays: ArrayRecord) -> None:
        try:
            check_arrays(arrays, self._expected(), "global arrays (exactly the shared keys)")
        except ArrayMismatch as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
        if self.reference is None:
            self.reference = arrays

    # -- server optimiser state, for checkpoints -------------------------------------------------

    # checkpoint name -> (attribute of the Flower strategy, held as a list in key order?)
    _SERVER_STATE: ClassVar[dict[str, tuple[str, bool]]] = {"velocity": ("momentum_vector", True), "fedadam_m": ("m_t", False),
                     "fedadam_v": ("v_t", False)}

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        """The Flower strategy's optimiser state (FedAvgM's momentum, FedAdam's moments), by key:
        what a restarted ServerApp needs beyond the arrays."""
        state = {}
        for name, (attr, as_list) in self._SERVER_STATE.items():
            value = getattr(self, attr, None)
            if value:
                state[name] = dict(zip(self.key_order(), value)) if as_list else dict(value)
        return state

    def load_server_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        for name, (attr, as_list) in self._SERVER_STATE.items():
            if name in state and hasattr(self, attr):
                value = state[name]
                setattr(self, attr, [value[k] for k in self.key_order()] if as_list
                        else dict(value))

    # -- evaluation -----------------------------------------------------------------------------

    def is_eval_round(self, server_round: int) -> bool:
        return server_round % self.eval_every == 0 or server_round == self.num_rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """On evaluation rounds: pACC on the participants, zACC on the held-out nodes (all, or
        this round's samples: ``eval_participants``/``eval_heldout``); without roles: Flower's
        own evaluation of the connected nodes."""
        if not self.is_eval_round(server_round):
            return []
        self._phase(server_round, "evaluate", begin=True)
        if self.discover_roles:
            view = NodeSubset(grid)
            with seeded_random(self._round_seed(server_round)):
                messages = list(super().configure_evaluate(  # type: ignore[misc]
                    server_round, arrays, config, view))
            self._note_connected(view.get_node_ids())
            return self._by_partition(messages, lambda m: m.metadata.dst_node_id)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays,  # type: ignore[attr-defined]
                             self.configrecord_key: config})  # type: ignore[attr-defined]
        messages = [Message(record, dst_node_id=node, message_type=kind)
                    for role, kind in (("participants", MessageType.EVALUATE),
                                       ("heldout", ZEROSHOT_MESSAGE_TYPE))
                    for node in self.evaluated(role, server_round)]
        self.round_stats.setdefault(server_round, {}).update(
            {"n_eval_sent": len(messages),
             "bytes_sent_eval": float(arrays.count_bytes() * len(messages))})
        return messages

    def evaluated(self, role: str, server_round: int) -> tuple[int, ...]:
        """The nodes of ``role`` ("participants" or "heldout") scored this round, in partition
        order: all of them, or a sample of ``eval_participants``/``eval_heldout`` drawn from the
        seed, the round and the role (the same on every rerun, a new one each round)."""
        nodes = getattr(self.roles, role)
        size = self.eval_sizes[role]
        if not size or size >= len(nodes):
            return tuple(nodes)
        rng = random.Random(f"evaluate {role} seed {self.seed} round {server_round}")
        return tuple(nodes[i] for i in sorted(rng.sample(range(len(nodes)), size)))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """pACC over participants and zACC (mean, spread, percentiles) over held-out nodes
        (without roles: Flower's sample-weighted mean of every key)."""
        self._phase(server_round, "evaluate", begin=False)
        replies = list(replies)
        if not replies:
            return None
        for msg in replies:
            if not msg.has_error():
                for record in msg.content.metric_records.values():
                    self._client_timings(server_round, record)
        if self.discover_roles:
            metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
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
            records = list(msg.content.metric_records.values())
            try:
                metrics = evaluation_reply(dict(records[0]) if records else {})
            except ValueError as err:  # e.g. a reply from another project's ClientApp
                log.warning("dropped evaluation reply from node %s: %s", node, err)
                continue
            per_role[role].append(metrics)
        for role_replies in per_role.values():
            role_replies.sort(key=lambda r: r.get("partition-id", 0))
        summary = summarise_evaluation(per_role["participant"], per_role["heldout"])
        self.round_stats.setdefault(server_round, {}).update(summary)
        self.client_metrics[server_round] = {"participants": per_role["participant"],
                                             "heldout": per_role["heldout"]}
        return MetricRecord(summary)


def _init_flower_bases(strategy: SharedKeys, kwargs: dict[str, Any]) -> None:
    """Initialise each Flower base of ``strategy`` with FedAvg's arguments plus its own, first to
    last in the MRO: a later base re-initialises only classes further down, so every base ends up
    with its own arguments (Flower's ``__init__``\\ s forward only FedAvg's)."""
    common = set(inspect.signature(FedAvg.__init__).parameters) - {"self"}
    bases = [c for c in type(strategy).__mro__
             if issubclass(c, FedAvg) and "__init__" in vars(c) and not issubclass(c, SharedKeys)]
    own = {c: set(inspect.signature(c.__init__).parameters) - common - {"self"} for c in bases}
    unknown = set(kwargs) - common - set().union(*own.values())
    if unknown:
        raise TypeError(f"{type(strategy).__name__}: unexpected argument(s) {sorted(unknown)}")
    shared = {k: v for k, v in kwargs.items() if k in common}
    for base in bases:
        base.__init__(strategy, **shared, **{k: v for k, v in kwargs.items() if k in own[base]})


class HyperFedZeroStrategy(SharedKeys, FedAvgM):
    r"""FedAvg over the shared arrays only, with optional server momentum (Flower's FedAvgM).

    With ``server_momentum`` :math:`\mu` and ``server_learning_rate`` :math:`\eta`, from the
    average :math:`\bar\theta` of the valid replies:
    :math:`v \leftarrow \mu v + (\theta - \bar\theta)`, :math:`\theta \leftarrow \theta - \eta v`
    (Hsu et al. 2019); ``0`` and ``1`` give plain FedAvg. See :class:`SharedKeys` for roles,
    the reply check and evaluation.
    """


class FedAdamKeepingDtypes(FedAdam):
    r"""Flower's FedAdam (Reddi et al. 2021), each array kept in its own dtype.

    .. math::
        \Delta_t = \bar\theta - \theta_t,\quad m_t = \beta_1 m_{t-1} + (1-\beta_1)\Delta_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\Delta_t^2,\quad
        \theta_{t+1} = \theta_t + \eta_t\, \frac{m_t}{\sqrt{v_t} + \tau}

    Flower's bias-corrected step :math:`\eta_t` is a float64 numpy scalar, which turns float32
    arrays into float64 ones: the nodes would then receive arrays their model does not hold.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.current_arrays is None:
            return arrays, metrics
        return ArrayRecord({k: Array(v.numpy().astype(self.current_arrays[k].dtype, copy=False))
                            for k, v in arrays.items()}), metrics


@functools.cache
def layered(*flower_bases: type[FedAvg]) -> type[SharedKeys]:
    """The :class:`SharedKeys` layer over Flower strategies, e.g. ``layered(FedProx, FedAvgM)``:
    FedProx's hook (``proximal-mu`` in the round's config) with FedAvgM's server step."""
    if flower_bases == (FedAvgM,):
        return HyperFedZeroStrategy
    name = "HyperFedZero" + "".join(b.__name__ for b in flower_bases)
    return type(name, (SharedKeys, *flower_bases), {"__doc__": SharedKeys.__doc__})


@functools.cache
def with_layer(layer: type, base: type[SharedKeys]) -> type[SharedKeys]:
    """``layer`` (a method's own server step: SCAFFOLD's control variate, FedAMP's cloud models)
    in front of a shared-keys strategy ``base``; ``layer`` takes its own keyword arguments and
    passes the rest on."""
    return type(layer.__name__ + base.__name__, (layer, base), {"__doc__": layer.__doc__})
