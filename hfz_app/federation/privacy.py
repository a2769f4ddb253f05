"""Central differential privacy for any method's strategy, with Flower's own DP wrappers.

``wrap_strategy(strategy, cfg)`` puts a method's :class:`SharedKeys` inside Flower's
``DifferentialPrivacyServerSideFixedClipping`` (the server clips each reply's update
:math:`\\Delta_k = \\theta_k - \\theta` to L2 norm :math:`C`) or
``DifferentialPrivacyClientSideFixedClipping`` (the node clips, with Flower's
``fixedclipping_mod``, which :func:`privacy_mod` applies when the run config says so). Either way
the server then adds :math:`\\mathcal N(0, (\\sigma C / m)^2)` to every coordinate of the average
of the :math:`m` sampled updates. Only the shared arrays travel, so only they are clipped and
noised: personal state (BatchNorm statistics, generated weights) never leaves a node.

Epsilon at ``privacy.delta`` comes from Flower's ``RdpAccountant`` (a wrapper over Google's
``dp-accounting`` RDP accountant): one sampled Gaussian event of noise multiplier :math:`\\sigma`
per released aggregate. Flower's wrappers compose it themselves (``accountant=``) only around a
strategy whose ``aggregate_train`` is ``FedAvg.aggregate_train`` itself
(``DifferentialPrivacyFixedClippingBase.__init__`` in flwr 1.42 refuses any other); the
shared-keys layer overrides it to drop replies that do not fit, so the wrapper below composes the
same event after each successful release and writes ``epsilon`` into the inner strategy's
``round_stats`` (the run's metrics rows).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from hfz_app.config import Config, PrivacySection, from_run_config
from hfz_app.federation.strategy import SharedKeys

log = logging.getLogger("hfz_app")

_SAMPLING = {
    "no-amplification": (SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE),
    "poisson": (SamplingMethod.POISSON, NeighboringRelation.ADD_OR_REMOVE_ONE),
}


# -- accounting -----------------------------------------------------------------------------------


def make_accountant(population: int, delta: float, accounting: str = "no-amplification"):
    """Flower's RDP accountant (dp-accounting backend) for ``population`` clients."""
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    sampling, relation = _SAMPLING[accounting]
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                       neighboring_relation=relation, sampling_method=sampling))


def epsilon(
    noise_multiplier: float,
    rounds: int,
    *,
    sample_size: int,
    population: int,
    delta: float,
    accounting: str = "no-amplification",
) -> float:
    """Epsilon at ``delta`` after ``rounds`` Gaussian releases (``inf`` without noise).

    ``accounting="no-amplification"`` takes no credit for sampling ``sample_size`` of
    ``population`` clients (valid however they are drawn; what Flower's accounted DP wrappers
    require); ``"poisson"`` credits a sampling rate ``q = sample_size / population`` as if each
    client were drawn independently with that probability (the usual DP-FedAvg figure; this app
    draws exactly ``sample_size``, so it is an approximation when ``q < 1``)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = make_accountant(population, delta, accounting)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, sample_size, population), rounds)
    return accountant.get_epsilon(delta)


def sample_size(cfg: Config) -> int:
    """How many participants train each round (SharedKeys's rule)."""
    participants = cfg.data.num_participants
    size = max(int(participants * cfg.server.fraction_train), cfg.server.min_train_nodes)
    return min(size, participants)


def planned_epsilon(cfg: Config, rounds: int | None = None) -> float:
    """Epsilon the configured run reaches after ``rounds`` (default: all of them)."""
    p = cfg.privacy
    return epsilon(p.noise_multiplier, cfg.run.rounds if rounds is None else rounds,
                   sample_size=sample_size(cfg), population=cfg.data.num_participants,
                   delta=p.delta, accounting=p.accounting)


# -- server side ----------------------------------------------------------------------------------


NOISE_STREAM = 7919  # keeps the DP noise's stream apart from the run's other uses of its seed


@contextlib.contextmanager
def seeded_global_numpy(seed: int, server_round: int) -> Iterator[None]:
    """numpy's global generator seeded from (run seed, round), restored afterwards.

    Flower's DP wrappers draw their Gaussian noise with ``np.random.normal``; seeding around each
    aggregation makes a DP run repeat with its seed, and a resumed run add the same noise from
    its first round on as an uninterrupted one.
    """
    saved = np.random.get_state()
    np.random.seed(np.random.SeedSequence([seed, NOISE_STREAM, server_round]).generate_state(4))
    try:
        yield
    finally:
        np.random.set_state(saved)


class _Accounted:
    """Shared by both wrappers: checks replies against the shared keys before Flower clips them,
    equal weights if configured, and one accountant event per released aggregate."""

    inner: SharedKeys
    privacy: PrivacySection

    def __init__(self, inner: SharedKeys, privacy: PrivacySection, population: int,
                 sampled: int) -> None:
        # The next class in the MRO is the Flower wrapper: (strategy, noise, clipping, sampled).
        super().__init__(inner, privacy.noise_multiplier, privacy.clipping_norm, sampled)
        self.inner, self.privacy = inner, privacy
        self.ledger = (make_accountant(population, privacy.delta, privacy.accounting)
                       if privacy.noise_multiplier > 0 else None)
        self.event = (GaussianPrivacyEvent(privacy.noise_multiplier, sampled, population)
                      if self.ledger is not None else None)

    def _prepare(self, server_round: int, replies: Iterable[Message]) -> tuple[list[Message], int]:
        """The replies the inner strategy accepts (exactly the shared arrays, finite, in the
        global key order: Flower clips by position), weights made equal if asked."""
        replies = list(replies)
        kept = self.inner.accept_replies(server_round, replies)
        if self.privacy.uniform_weights:
            for msg in kept:
                metrics_key, metrics = next(iter(msg.content.metric_records.items()))
                metrics[self.inner.weighted_by_key] = 1
                msg.content[metrics_key] = metrics
        return kept, len(replies) - len(kept)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's clipping and noise over the valid replies, then one accountant event."""
        kept, dropped = self._prepare(server_round, replies)
        with seeded_global_numpy(self.inner.seed, server_round):
            arrays, metrics = super().aggregate_train(server_round, kept)
        self._account(server_round, arrays, dropped)
        return arrays, metrics

    def _account(self, server_round: int, arrays: ArrayRecord | None, dropped: int) -> None:
        stats = self.inner.round_stats.setdefault(server_round, {})
        stats["n_dropped"] = stats.get("n_dropped", 0) + dropped
        if self.ledger is None:
            stats["epsilon"] = math.inf
            return
        if arrays is not None:  # a release: one more Gaussian event (none if nothing was kept)
            self.ledger.compose(self.event)
        stats["epsilon"] = float(self.ledger.get_epsilon(self.privacy.delta))


class ServerSideFixedClipping(_Accounted, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping around a SharedKeys, with accounting."""


class ClientSideFixedClipping(_Accounted, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping around a SharedKeys, with accounting; the
    nodes clip with Flower's ``fixedclipping_mod`` (see :func:`privacy_mod`)."""


def wrap_strategy(strategy: SharedKeys, cfg: Config) -> Strategy:
    """The method's strategy inside Flower's DP wrapper that ``privacy.dp`` names (``"none"``:
    unchanged). Keep using ``strategy`` itself for ``round_stats``/``client_metrics``."""
    p = cfg.privacy
    if p.dp == "none":
        return strategy
    population, sampled = cfg.data.num_participants, sample_size(cfg)
    cls = ServerSideFixedClipping if p.dp == "server" else ClientSideFixedClipping
    wrapped = cls(strategy, p, population, sampled)
    eps = planned_epsilon(cfg)
    print(f"privacy: {p.dp}-side fixed clipping C={p.clipping_norm:g}, noise multiplier "
          f"{p.noise_multiplier:g} (noise std {p.noise_multiplier * p.clipping_norm / sampled:.3g}"
          f" on the mean of {sampled} of {population} updates), "
          f"{'equal' if p.uniform_weights else 'num-examples'} weights; epsilon after "
          f"{cfg.run.rounds} rounds {eps:.3g} at delta {p.delta:g} ({p.accounting})", flush=True)
    return wrapped


# -- client side ----------------------------------------------------------------------------------


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: Flower's ``fixedclipping_mod`` on train messages when the run config says
    ``privacy.dp=client``; every other message, and every other run, passes through untouched."""
    if msg.metadata.message_type == MessageType.TRAIN and _dp_mode(context) == "client":
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _dp_mode(context: Context) -> str:
    return from_run_config(context.run_config).privacy.dp
