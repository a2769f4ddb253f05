"""Every method through the same ServerApp/ClientApp (in-process, tiny data), and each method's rule."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, MessageType

from client_app import app as client_app
from hfz_app.arrays import PERSONAL_RECORD
from hfz_app.config import load_config
from hfz_app.federation.inprocess import (
    RecordingClientApp,
    full_run_config,
    run_inprocess,
    simulation_node_configs,
)
from hfz_app.federation.roles import Roles
from hfz_app.methods import METHODS, get_method
from hfz_app.methods.fedjets import MixtureOfExperts, load_balance
from hfz_app.methods.fedprox import proximal_term
from hfz_app.methods.personal import PersonalisedPair
from server_app import app as server_app

N, M = 3, 1
TIMING = {"elapsed_s", "round_time_s"}



def run_method(tmp_path: Path, method: str, **overrides):
    sent, client = [], RecordingClientApp(client_app)
    run_config = full_run_config({"run.output_dir": str(tmp_path), "run.method": method,
                                  "run.rounds": 3, "train.torch_threads": 1, **overrides},
                                 preset="tiny")
    grid = run_inprocess(server_app, client, run_config, simulation_node_configs(N + M),
                         on_message=sent.append)
    with (tmp_path / "tiny" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows, grid, sent, client.replies


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_and_reports_every_metric(tmp_path, method) -> None:
    rows, grid, _, _ = run_method(tmp_path, method)
    first, last = rows[1], rows[-1]
    assert float(last["train_loss"]) < float(first["train_loss"])
    for key in ("zacc_weighted", "gacc", "pacc_weighted"):
        assert 0.0 <= float(last[key]) <= 1.0
    # bytes per client per round, both ways, logged for every method
    assert float(last["bytes_sent_per_client"]) > 0
    assert float(last["bytes_received_per_client"]) == float(last["bytes_sent_per_client"])
    trained = {grid.contexts[n].node_config["partition-id"] for n, kind in grid.sent
               if kind == MessageType.TRAIN}
    assert trained == set(range(N))


def test_fedprox_with_zero_mu_is_fedavg(tmp_path) -> None:
    fedavg, _, _, _ = run_method(tmp_path / "a", "fedavg")
    fedprox, _, sent, _ = run_method(tmp_path / "b", "fedprox", **{"fedprox.mu": 0.0})
    # every column FedAvg reports (FedProx adds train_ce, the loss without the proximal term)
    keys = [k for k in fedavg[-1] if k not in TIMING and fedavg[-1][k] != ""]
    assert "zacc_weighted" in keys and "train_loss" in keys
    assert [[r[k] for k in keys] for r in fedavg] == [[r[k] for k in keys] for r in fedprox]
    train = [m for m in sent if m.metadata.message_type == MessageType.TRAIN]
    assert all(m.content["config"]["proximal-mu"] == 0.0 for m in train)


def test_fedprox_mu_changes_the_result(tmp_path) -> None:
    fedavg, _, _, _ = run_method(tmp_path / "a", "fedavg")
    fedprox, _, _, _ = run_method(tmp_path / "b", "fedprox", **{"fedprox.mu": 1.0})
    assert fedavg[1]["train_loss"] != fedprox[1]["train_loss"]


def test_pfedme_moves_the_shared_model_with_its_own_eta(tmp_path) -> None:
    """w <- w - eta*lam*(w - theta) uses pfedme.eta; train.lr plays no part in pFedMe."""
    base, _, _, _ = run_method(tmp_path / "a", "pfedme")
    other_lr, _, _, _ = run_method(tmp_path / "b", "pfedme", **{"train.lr": 0.3})
    other_eta, _, _, _ = run_method(tmp_path / "c", "pfedme", **{"pfedme.eta": 0.05})
    assert [r["gacc"] for r in base] == [r["gacc"] for r in other_lr]
    assert [r["gacc"] for r in base][1:] != [r["gacc"] for r in other_eta][1:]


@pytest.mark.parametrize("method", ["ditto", "pfedme"])
def test_personal_models_never_leave_the_client(tmp_path, method) -> None:
    _, grid, sent, replies = run_method(tmp_path, method)
    cfg = load_config("tiny")
    m = get_method(method)(cfg, (1, 28, 28), 10)
    model = m.build_model()
    shared, personal = set(m.shared_keys(model)), set(m.personal_keys(model))
    assert shared and personal and not shared & personal
    assert any(k.startswith("personal.") for k in personal)
    for message in [*sent, *replies]:
        for record in message.content.array_records.values():
            assert set(record.keys()) <= shared
    # ... and they exist on the participants, trained away from the shared model
    state = grid.contexts[next(iter(grid.contexts))].state[PERSONAL_RECORD].to_torch_state_dict()
    assert {k for k in state if k.startswith("personal.")} == {
        k for k in personal if k.startswith("personal.")}
    key = next(k for k in state if k.startswith("personal.") and k.endswith("weight"))
    final = next(m for m in reversed(sent) if "arrays" in m.content.array_records)
    global_weight = final.content["arrays"][key.replace("personal.", "shared.", 1)].numpy()
    assert not torch.allclose(state[key], torch.from_numpy(global_weight))


def test_fedprox_strategy_is_flowers_fedprox_on_the_shared_keys() -> None:
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedProx

    roles = Roles(participants=(11, 12), heldout=(13,), partition_of={11: 0, 12: 1, 13: 2})
    cfg = load_config("tiny", {"run.method": "fedprox", "fedprox.mu": 0.3, "run.rounds": 2})
    strategy = get_method("fedprox")(cfg, (1, 28, 28), 10).strategy(["w"], roles)
    assert isinstance(strategy, FedProx)

    class Grid:  # configure_train only needs create_message
        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            from flwr.app import Message
            return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                           group_id=group_id)

    from hfz_app.federation.inprocess import _set_task_identity
    _set_task_identity()
    import numpy as np
    messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(2))}),
                                             ConfigRecord(), Grid()))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]  # never the held-out 13
    assert all(m.content["config"]["proximal-mu"] == 0.3 for m in messages)


def test_proximal_term_gradient_pulls_towards_the_anchor() -> None:
    layer = torch.nn.Linear(3, 2)
    anchor = [torch.zeros_like(p) for p in layer.parameters()]
    term = proximal_term(layer, anchor)
    term.backward()
    for p in layer.parameters():  # d/dw ||w - 0||^2 = 2w
        torch.testing.assert_close(p.grad, 2 * p.detach())


def test_moe_routes_each_input_to_exactly_top_k_experts() -> None:
    torch.manual_seed(0)
    experts = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)) for _ in range(4)]
    moe = MixtureOfExperts(experts, (1, 4, 4), top_k=2, gate_hidden=8)
    x = torch.randn(5, 1, 4, 4)
    _, chosen, weights = moe.route(x)
    assert chosen.shape == (5, 2) and torch.allclose(weights.sum(1), torch.ones(5))
    dense = torch.stack([e(x) for e in experts], 1)
    expected = torch.stack([(weights[i, :, None] * dense[i, chosen[i]]).sum(0) for i in range(5)])
    torch.testing.assert_close(moe(x), expected)
    uniform = torch.full((4, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert float(load_balance(uniform, balanced)) == pytest.approx(1.0)


def test_personal_pair_starts_personal_from_the_received_model() -> None:
    pair = PersonalisedPair(torch.nn.Linear(3, 2))
    with torch.no_grad():
        pair.shared.weight.fill_(0.5)
    pair.start_personal()
    torch.testing.assert_close(pair.personal.weight, pair.shared.weight)
    with torch.no_grad():
        pair.shared.weight.fill_(0.1)
    pair.start_personal()  # once only: later rounds keep the personal model
    assert float(pair.personal.weight.detach()[0, 0]) == 0.5


def test_finetune_reference_evaluates_on_the_unlabelled_rest(tmp_path) -> None:
    _, _, _, replies = run_method(tmp_path, "finetune", **{"finetune.labelled_fraction": 0.25})
    zeroshot = [r for r in replies if r.metadata.message_type.startswith("evaluate.zeroshot")]
    cfg = load_config("tiny")
    from hfz_app.data import build_federation
    heldout = build_federation(cfg.data, cfg.run.seed).client(N)
    n = len(heldout.test_x)
    assert zeroshot and all(
        int(r.content["metrics"]["num-examples"]) == n - int(0.25 * n) for r in zeroshot)


def test_label_prior_batches_are_hyperfedzeros_alone(tmp_path) -> None:
    """A baseline run with a preset that turns them on for HyperFedZero trains as without them."""
    plain, _, _, _ = run_method(tmp_path / "a", "fedavg")
    prior, _, _, _ = run_method(tmp_path / "b", "fedavg", **{"train.prior_alpha": 1.0})
    assert [r["train_loss"] for r in plain] == [r["train_loss"] for r in prior]
    hfz, _, _, _ = run_method(tmp_path / "c", "hyperfedzero")
    hfz_prior, _, _, _ = run_method(tmp_path / "d", "hyperfedzero", **{"train.prior_alpha": 1.0})
    assert hfz[1]["train_loss"] != hfz_prior[1]["train_loss"]
