"""Central DP with Flower's fixed-clipping wrappers, through the real ServerApp/ClientApp
(in-process, tiny data), and the RDP accountant against dp-accounting itself."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType

from client_app import app as client_app
from hfz_app.checkpoint import load_checkpoint
from hfz_app.config import load_config
from hfz_app.federation.inprocess import (
    RecordingClientApp,
    full_run_config,
    run_inprocess,
    simulation_node_configs,
)
from hfz_app.federation.privacy import epsilon, planned_epsilon
from hfz_app.methods import get_method
from server_app import app as server_app

N, M = 3, 1
ROUNDS = 2
# timings, and the privacy columns only a wrapped run writes
SKIP = {"elapsed_s", "round_time_s", "epsilon"}
# far above any update's norm on the tiny preset: clipping never bites
NO_CLIP = 1e6



def run(tmp_path: Path, **overrides):
    sent, client = [], RecordingClientApp(client_app)
    run_config = full_run_config({"run.output_dir": str(tmp_path), "run.rounds": ROUNDS,
                                  "train.torch_threads": 1, **overrides}, preset="tiny")
    run_inprocess(server_app, client, run_config, simulation_node_configs(N + M),
                  on_message=sent.append)
    with (tmp_path / "tiny" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    final = load_checkpoint(tmp_path / "tiny" / "checkpoints" / f"round_{ROUNDS:04d}.pt").shared
    return rows, final, sent, client.replies


def metric_table(rows):
    keys = [k for k in rows[-1] if k not in SKIP and rows[-1][k] != ""]
    return keys, np.array([[float(r[k]) if r[k] != "" else np.nan for k in keys] for r in rows])


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return run(tmp_path_factory.mktemp("plain"))


def shared_keys() -> set[str]:
    cfg = load_config("tiny")
    method = get_method(cfg.run.method)(cfg, (1, 28, 28), 10)
    return set(method.shared_keys(method.build_model()))


@pytest.mark.parametrize("dp", ["server", "client"])
def test_no_noise_no_clipping_equals_the_plain_run(tmp_path, plain, dp) -> None:
    rows, final, sent, _ = run(tmp_path, **{
        "privacy.dp": dp, "privacy.noise_multiplier": 0.0, "privacy.clipping_norm": NO_CLIP,
        "privacy.uniform_weights": False})
    keys, table = metric_table(rows)
    plain_keys, plain_table = metric_table(plain[0])
    assert keys == plain_keys and "zacc_weighted" in keys and "gacc" in keys
    # Flower clips as theta0 + (theta - theta0): equal to theta up to float32 rounding only
    np.testing.assert_allclose(table, plain_table, rtol=1e-4, atol=1e-6)
    for key, value in plain[1].items():
        np.testing.assert_allclose(final[key].numpy(), value.numpy(), rtol=0, atol=1e-5)
    assert all(math.isinf(float(r["epsilon"])) for r in rows[1:])  # no noise: no guarantee
    train = [m for m in sent if m.metadata.message_type == MessageType.TRAIN]
    # client-side clipping: the wrapper sends the clipping norm, the nodes' mod applies it
    assert all(("clipping_norm" in m.content["config"]) == (dp == "client") for m in train)


@pytest.mark.parametrize("dp", ["server", "client"])
def test_noise_changes_the_shared_arrays_and_only_shared_keys_travel(tmp_path, plain, dp) -> None:
    rows, final, sent, replies = run(tmp_path, **{
        "privacy.dp": dp, "privacy.noise_multiplier": 0.3, "privacy.clipping_norm": 0.5})
    shared = shared_keys()
    assert set(final) == shared
    assert any(not np.allclose(final[k].numpy(), v.numpy(), atol=1e-4)
               for k, v in plain[1].items())
    for message in [*sent, *replies]:  # server -> node and node -> server
        for record in message.content.array_records.values():
            assert set(record.keys()) == shared
        assert set(message.content.array_records) <= {"arrays"}
    train = [m for m in replies if m.metadata.message_type == MessageType.TRAIN]
    assert len(train) == N * ROUNDS
    # the accountant's epsilon, round by round, is the planned one
    cfg = load_config("tiny", {"privacy.noise_multiplier": 0.3, "privacy.dp": dp})
    assert all(r["n_dropped"] in ("", "0") for r in rows)
    for row in rows[1:]:
        assert float(row["epsilon"]) == pytest.approx(planned_epsilon(cfg, int(row["round"])),
                                                      rel=1e-5)


@pytest.mark.parametrize("dp", ["server", "client"])
def test_noisy_run_repeats_with_its_seed(tmp_path, dp) -> None:
    """Flower draws the noise from numpy's global generator; the wrapper seeds it per round."""
    noisy = {"privacy.dp": dp, "privacy.noise_multiplier": 0.3, "privacy.clipping_norm": 0.5}
    first = run(tmp_path / "a", **noisy)
    np.random.seed(12345)  # whatever state the process's generator is in does not matter
    again = run(tmp_path / "b", **noisy)
    other = run(tmp_path / "c", **noisy, **{"run.seed": 1})
    assert metric_table(first[0])[0] == metric_table(again[0])[0]
    np.testing.assert_array_equal(metric_table(first[0])[1], metric_table(again[0])[1])
    assert all(np.array_equal(first[1][k].numpy(), again[1][k].numpy()) for k in first[1])
    assert any(not np.array_equal(first[1][k].numpy(), other[1][k].numpy()) for k in first[1])


def test_client_side_mod_clips_each_update(tmp_path) -> None:
    clip = 1e-3
    _, _, sent, replies = run(tmp_path, **{
        "privacy.dp": "client", "privacy.noise_multiplier": 0.0, "privacy.clipping_norm": clip})
    received = {m.metadata.message_id: m for m in sent
                if m.metadata.message_type == MessageType.TRAIN}
    train = [r for r in replies if r.metadata.message_type == MessageType.TRAIN]
    assert train
    for reply in train:
        original = received[reply.metadata.reply_to_message_id].content["arrays"]
        update = [reply.content["arrays"][k].numpy() - original[k].numpy()
                  for k in original]
        norm = math.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in update))
        assert norm <= clip * 1.001


def test_plain_run_has_no_mod_effect_and_no_epsilon(plain) -> None:
    rows, _, sent, _ = plain
    assert all(r["epsilon"] == "" for r in rows)
    train = [m for m in sent if m.metadata.message_type == MessageType.TRAIN]
    assert all("clipping_norm" not in m.content["config"] for m in train)


# -- the accountant ------------------------------------------------------------------------------


def test_epsilon_falls_with_noise_and_grows_with_rounds() -> None:
    kw = {"sample_size": 10, "population": 10, "delta": 1e-5}
    by_noise = [epsilon(s, 10, **kw) for s in (0.5, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True)
    by_rounds = [epsilon(1.0, t, **kw) for t in (1, 5, 20, 100)]
    assert by_rounds == sorted(by_rounds)
    assert epsilon(0.0, 10, **kw) == math.inf
    poisson = {**kw, "sample_size": 3, "accounting": "poisson"}
    assert epsilon(1.0, 10, **poisson) < epsilon(1.0, 10, **kw)  # sampling amplifies


@pytest.mark.parametrize("sigma,rounds", [(0.5, 10), (1.0, 20), (2.0, 100)])
def test_epsilon_is_dp_accountings_rdp_value(sigma, rounds) -> None:
    from dp_accounting import dp_event, rdp

    plain = rdp.RdpAccountant()
    plain.compose(dp_event.GaussianDpEvent(sigma), rounds)
    assert epsilon(sigma, rounds, sample_size=10, population=10, delta=1e-5) == pytest.approx(
        plain.get_epsilon(1e-5), rel=1e-9)
    sampled = rdp.RdpAccountant()
    sampled.compose(dp_event.PoissonSampledDpEvent(0.3, dp_event.GaussianDpEvent(sigma)), rounds)
    assert epsilon(sigma, rounds, sample_size=3, population=10, delta=1e-5,
                   accounting="poisson") == pytest.approx(sampled.get_epsilon(1e-5), rel=1e-9)
