"""HyperFedZeroStrategy on hand-made replies: key filter, non-finite drop, roles, momentum."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from hfz_app.federation.inprocess import InProcessGrid, _set_task_identity
from hfz_app.federation.roles import ZEROSHOT_MESSAGE_TYPE, Roles
from hfz_app.federation.strategy import HyperFedZeroStrategy

SHARED = ["f.weight", "h.out"]
ROLES = Roles(participants=(11, 12, 13), heldout=(21,), partition_of={11: 0, 12: 1, 13: 2, 21: 3})


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    _set_task_identity()


def arrays(value: float, keys=SHARED) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full((2, 3), value, dtype=np.float32)) for k in keys})


def reply(node: int, arrays_: ArrayRecord, n: int = 10) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": arrays_,
                          "metrics": MetricRecord({"train_loss": 1.0, "num-examples": n})})
    return Message(content, reply_to=request)


def strategy(**kwargs) -> HyperFedZeroStrategy:
    return HyperFedZeroStrategy(SHARED, ROLES, num_rounds=4, **kwargs)


def test_averages_valid_replies_weighted_by_examples() -> None:
    agg, metrics = strategy().aggregate_train(1, [reply(11, arrays(1.0), 10),
                                                  reply(12, arrays(4.0), 30)])
    assert agg is not None and set(agg) == set(SHARED)
    np.testing.assert_allclose(agg["f.weight"].numpy(), 3.25)
    assert metrics["train_loss"] == pytest.approx(1.0)


def test_foreign_key_and_non_finite_replies_are_dropped(caplog) -> None:
    s = strategy()
    foreign = arrays(100.0, SHARED + ["personal.bn.running_mean"])
    bad = arrays(1.0)
    bad["h.out"] = Array(np.full((2, 3), np.nan, dtype=np.float32))
    missing = arrays(100.0, SHARED[:1])
    with caplog.at_level("WARNING", logger="hfz_app"):
        agg, _ = s.aggregate_train(1, [reply(11, arrays(2.0)), reply(12, foreign),
                                       reply(13, bad), reply(13, missing)])
    np.testing.assert_allclose(agg["f.weight"].numpy(), 2.0)  # only the valid reply counts
    assert s.round_stats[1]["n_dropped"] == 3 and s.round_stats[1]["n_train_replies"] == 1
    text = caplog.text
    assert "'personal.bn.running_mean' is not a shared key of this model (1 foreign" in text
    assert "'h.out' holds non-finite values" in text
    assert "'h.out' is missing (0 foreign, 1 missing" in text


def test_all_replies_invalid_keeps_global_arrays() -> None:
    agg, metrics = strategy().aggregate_train(1, [reply(11, arrays(np.inf))])
    assert agg is None and metrics is None


def test_trains_participants_only_and_evaluates_both_roles() -> None:
    grid = InProcessGrid(client_app=None, node_configs={n: {} for n in (11, 12, 13, 21)},
                         run_config={})
    s = strategy(eval_every=2)
    train = list(s.configure_train(1, arrays(0.0), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in train) == [11, 12, 13]
    assert {m.metadata.message_type for m in train} == {MessageType.TRAIN}
    assert train[0].content["config"]["server-round"] == 1
    assert list(s.configure_evaluate(1, arrays(0.0), ConfigRecord(), grid)) == []
    evaluate = list(s.configure_evaluate(2, arrays(0.0), ConfigRecord(), grid))
    kinds = {m.metadata.dst_node_id: m.metadata.message_type for m in evaluate}
    assert kinds == {11: MessageType.EVALUATE, 12: MessageType.EVALUATE,
                     13: MessageType.EVALUATE, 21: ZEROSHOT_MESSAGE_TYPE}
    assert list(s.configure_evaluate(3, arrays(0.0), ConfigRecord(), grid)) == []
    assert len(list(s.configure_evaluate(4, arrays(0.0), ConfigRecord(), grid))) == 4  # last


def test_fraction_train_samples_deterministically() -> None:
    grid = InProcessGrid(client_app=None, node_configs={}, run_config={})
    picks = [
        [m.metadata.dst_node_id for m in strategy(fraction_train=0.5, seed=3)
         .configure_train(r, arrays(0.0), ConfigRecord(), grid)]
        for r in (1, 1, 2)
    ]
    assert len(picks[0]) == 1 and picks[0] == picks[1]


def test_global_arrays_with_foreign_keys_are_refused() -> None:
    grid = InProcessGrid(client_app=None, node_configs={}, run_config={})
    with pytest.raises(ValueError, match="exactly the shared keys"):
        strategy().configure_train(1, arrays(0.0, SHARED + ["x"]), ConfigRecord(), grid)


def test_server_momentum_follows_fedavgm() -> None:
    s = strategy(server_momentum=0.5)
    grid = InProcessGrid(client_app=None, node_configs={}, run_config={})
    s.configure_train(1, arrays(1.0), ConfigRecord(), grid)
    agg, _ = s.aggregate_train(1, [reply(11, arrays(0.0))])
    np.testing.assert_allclose(agg["f.weight"].numpy(), 0.0)  # v = 1, theta = 1 - 1
    s.configure_train(2, agg, ConfigRecord(), grid)
    agg, _ = s.aggregate_train(2, [reply(11, arrays(-1.0))])
    np.testing.assert_allclose(agg["f.weight"].numpy(), -1.5)  # v = 0.5 + 1, theta = 0 - 1.5


def test_evaluation_summary_per_role() -> None:
    s = strategy()

    def eval_reply(node: int, acc: float, n: int) -> Message:
        request = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        return Message(RecordDict({"metrics": MetricRecord(
            {"accuracy": acc, "loss": 0.5, "num-examples": n, "partition-id": node})}),
            reply_to=request)

    summary = s.aggregate_evaluate(4, [eval_reply(11, 0.9, 100), eval_reply(12, 0.7, 300),
                                       eval_reply(21, 0.6, 50)])
    assert summary["pacc_weighted"] == pytest.approx(0.75)
    assert summary["pacc_mean"] == pytest.approx(0.8)
    assert summary["zacc_weighted"] == pytest.approx(0.6)
    assert summary["gap"] == pytest.approx(0.15)
    assert [c["partition-id"] for c in s.client_metrics[4]["heldout"]] == [21]


def test_evaluation_samples_are_seeded_per_round_in_partition_order() -> None:
    """``eval_participants``/``eval_heldout``: that many nodes of each role per evaluation
    round, the same on a rerun, another sample the next round; 0 (the default): every node."""
    roles = Roles(participants=tuple(range(100, 140)), heldout=tuple(range(200, 210)),
                  partition_of={n: i for i, n in enumerate([*range(100, 140), *range(200, 210)])})
    grid = InProcessGrid(client_app=None, node_configs={}, run_config={})

    def sent(s: HyperFedZeroStrategy, server_round: int) -> tuple[list[int], list[int]]:
        messages = s.configure_evaluate(server_round, arrays(0.0), ConfigRecord(), grid)
        kinds = [(m.metadata.dst_node_id, m.metadata.message_type) for m in messages]
        return ([n for n, k in kinds if k == MessageType.EVALUATE],
                [n for n, k in kinds if k == ZEROSHOT_MESSAGE_TYPE])

    sampled = HyperFedZeroStrategy(SHARED, roles, num_rounds=4, seed=3, eval_participants=5,
                                   eval_heldout=2)
    parts, held = sent(sampled, 1)
    assert len(parts) == 5 and len(held) == 2 and parts == sorted(parts)
    assert set(parts) <= set(roles.participants) and set(held) <= set(roles.heldout)
    assert sent(HyperFedZeroStrategy(SHARED, roles, num_rounds=4, seed=3, eval_participants=5,
                                     eval_heldout=2), 1) == (parts, held)
    assert sent(sampled, 2)[0] != parts
    assert sampled.round_stats[1]["n_eval_sent"] == 7
    assert sampled.round_stats[1]["bytes_sent_eval"] == 7 * arrays(0.0).count_bytes()
    everyone = HyperFedZeroStrategy(SHARED, roles, num_rounds=4)
    assert sent(everyone, 1) == (list(roles.participants), list(roles.heldout))


def test_client_timings_leave_the_metrics_for_the_round_totals() -> None:
    """The ClientApps' own seconds (``client_*_s``) are summed per round into
    ``round_timings`` and appear neither in the averaged train metrics nor in the per-client
    evaluation replies (metrics.csv/.json stay identical from run to run)."""
    s = strategy()
    timed = [reply(n, arrays(1.0)) for n in (11, 12)]
    for msg, (data_s, train_s) in zip(timed, ((0.5, 2.0), (0.25, 1.0))):
        msg.content["metrics"]["client_data_s"] = data_s
        msg.content["metrics"]["client_train_s"] = train_s
    _, metrics = s.aggregate_train(1, timed)
    assert "client_train_s" not in metrics and "client_data_s" not in metrics
    request = Message(RecordDict(), dst_node_id=21, message_type=ZEROSHOT_MESSAGE_TYPE)
    s.aggregate_evaluate(1, [Message(RecordDict({"metrics": MetricRecord(
        {"accuracy": 0.5, "loss": 1.0, "num-examples": 4, "partition-id": 3,
         "client_data_s": 0.125, "client_eval_s": 0.75})}), reply_to=request)])
    totals = {k: v for k, v in s.round_timings[1].items() if k.startswith("client_")}
    assert totals == pytest.approx({"client_data_s": 0.875, "client_train_s": 3.0,
                                    "client_eval_s": 0.75})
    assert s.round_timings[1]["aggregate_train_s"] >= 0  # the ServerApp's own phase
    assert "client_eval_s" not in s.client_metrics[1]["heldout"][0]


def test_fedadam_steps_on_the_filtered_average_only() -> None:
    """Flower's FedAdam under the key filter: Reddi et al.'s update by hand, foreign replies
    dropped before the average, float32 kept, and the optimiser state exposed for resume."""
    from hfz_app.federation.strategy import FedAdamKeepingDtypes, layered

    s = layered(FedAdamKeepingDtypes)(SHARED, ROLES, num_rounds=4, eta=0.1, beta_1=0.9,
                                      beta_2=0.99, tau=1e-3)
    grid = InProcessGrid(client_app=None, node_configs={}, run_config={})
    s.configure_train(1, arrays(1.0), ConfigRecord(), grid)
    foreign = arrays(100.0, SHARED + ["personal.bn.running_mean"])
    agg, _ = s.aggregate_train(1, [reply(11, arrays(0.0)), reply(12, foreign)])
    delta = 0.0 - 1.0
    m, v = 0.1 * delta, 0.01 * delta**2
    eta_t = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    assert agg["f.weight"].numpy().dtype == np.float32
    np.testing.assert_allclose(agg["f.weight"].numpy(), 1.0 + eta_t * m / (np.sqrt(v) + 1e-3),
                               rtol=1e-6)
    assert s.round_stats[1]["n_dropped"] == 1
    assert set(s.server_state()) == {"fedadam_m", "fedadam_v"}
    assert set(s.server_state()["fedadam_m"]) == set(SHARED)


def test_fedadam_composes_with_fedprox() -> None:
    """FedProx's hook and FedAdam's step both apply: proximal-mu goes out, Adam steps back."""
    from flwr.serverapp.strategy import FedProx

    from hfz_app.federation.strategy import FedAdamKeepingDtypes, layered

    s = layered(FedProx, FedAdamKeepingDtypes)(SHARED, ROLES, num_rounds=4, proximal_mu=0.3,
                                               eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    grid = InProcessGrid(client_app=None, node_configs={}, run_config={})
    train = list(s.configure_train(1, arrays(1.0), ConfigRecord(), grid))
    assert train[0].content["config"]["proximal-mu"] == pytest.approx(0.3)
    assert sorted(m.metadata.dst_node_id for m in train) == [11, 12, 13]  # participants only
    agg, _ = s.aggregate_train(1, [reply(11, arrays(0.0))])
    assert float(agg["f.weight"].numpy()[0, 0]) < 1.0 and s.m_t is not None
