"""SCAFFOLD, FedAMP and PeFLL (issue 22): each one's maths against a hand computation, what
leaves a node, and a resumed run equal to an uninterrupted one (tiny, in-process)."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MessageType

from client_app import app as client_app
from hfz_app.arrays import PERSONAL_RECORD
from hfz_app.checkpoint import load_checkpoint
from hfz_app.config import ConfigError, load_config
from hfz_app.federation.inprocess import (
    RecordingClientApp,
    full_run_config,
    run_inprocess,
    simulation_node_configs,
)
from hfz_app.methods import get_method
from hfz_app.methods.fedamp import attention_weights, cloud_model
from hfz_app.methods.fedavg import FedAvgMethod
from hfz_app.methods.pefll import PeFLLModel
from hfz_app.methods.scaffold import (
    CLIENT_CONTROL,
    CONTROL_DELTA,
    SERVER_CONTROL,
    Controlled,
    momentum_weight,
)
from hfz_app.training import make_optimizer
from server_app import app as server_app

N, M = 3, 1
TIMING = {"elapsed_s", "round_time_s"}

# --- SCAFFOLD ----------------------------------------------------------------------------------


def scaffold_on(net: torch.nn.Module, **overrides) -> tuple:
    cfg = load_config("tiny", {"run.method": "scaffold", "train.batch_size": 2, **overrides})
    method = get_method("scaffold")(cfg, (1, 1, 2), 2)
    return method, Controlled(net)


def test_scaffold_corrected_step_and_variate_by_hand() -> None:
    """One plain SGD step (K=1): y = x - lr (g - c_i + c), and c_i+ = c_i - c + (x - y)/lr = g."""
    lr = 0.1
    method, model = scaffold_on(torch.nn.Linear(2, 2, bias=False),
                                **{"train.lr": lr, "scaffold.lr": 0.0, "scaffold.momentum": 0.0})
    w0 = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    ci = torch.tensor([[0.1, 0.2], [-0.3, 0.4]])
    c = torch.tensor([[1.0, -0.5], [0.0, 2.0]])
    with torch.no_grad():
        model.net.weight.copy_(w0)
        model.client_control("weight").copy_(ci)
    key = "net.weight"
    method.receive_extras(model, {SERVER_CONTROL: ArrayRecord({key: Array(c.numpy())})})
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    y = torch.tensor([0, 1])
    method.local_train(model, x, y, torch.Generator().manual_seed(0))
    # cross-entropy gradient by hand: (softmax(x w^T) - onehot(y))^T x / n
    p = torch.softmax(x @ w0.T, dim=1)
    g = (p - torch.nn.functional.one_hot(y, 2).float()).T @ x / len(x)
    torch.testing.assert_close(model.net.weight.detach(), w0 - lr * (g - ci + c))
    torch.testing.assert_close(model.client_control("weight"), g)
    delta = method.reply_extras(model)[CONTROL_DELTA][key].numpy()
    np.testing.assert_allclose(delta, (g - ci).numpy(), rtol=1e-5, atol=1e-6)


def test_scaffold_steps_with_its_own_momentum_not_the_other_methods() -> None:
    for momentum in (0.0, 0.5):
        method, model = scaffold_on(torch.nn.Linear(2, 2), **{"train.momentum": 0.9,
                                                              "scaffold.momentum": momentum})
        (group,) = method.param_groups(model)
        assert group["momentum"] == momentum
        opt = make_optimizer(method.param_groups(model), method.cfg.train)
        assert opt.param_groups[0]["momentum"] == momentum


def test_scaffold_momentum_weight_by_hand() -> None:
    # beta 0.5, K 3: (1 - .5)/.5 + (1 - .25)/.5 + (1 - .125)/.5 = 1 + 1.5 + 1.75
    assert momentum_weight(3, 0.5) == pytest.approx(4.25)
    assert momentum_weight(7, 0.0) == 7


def test_scaffold_needs_sgd_and_no_dp() -> None:
    with pytest.raises(ConfigError, match="train.optimizer"):
        scaffold_on(torch.nn.Linear(2, 2), **{"train.optimizer": "adam"})
    with pytest.raises(ConfigError, match="privacy.dp"):
        scaffold_on(torch.nn.Linear(2, 2), **{"privacy.dp": "server"})


# --- FedAMP ------------------------------------------------------------------------------------


def test_fedamp_attention_weights_by_hand() -> None:
    models = [{"w": np.array([0.0], np.float32), "n": np.array(5)},
              {"w": np.array([1.0], np.float32), "n": np.array(6)},
              {"w": np.array([3.0], np.float32), "n": np.array(7)}]
    alpha, sigma = 0.5, 2.0
    # d_01 = 1, d_02 = 9: xi_0j = (alpha / sigma) exp(-d_0j / sigma)
    xi01, xi02 = 0.25 * math.exp(-0.5), 0.25 * math.exp(-4.5)
    xi = attention_weights(models, 0, alpha, sigma)
    np.testing.assert_allclose(xi, [1 - xi01 - xi02, xi01, xi02])
    u = cloud_model(models, 0, alpha, sigma)
    assert u["w"].dtype == np.float32 and int(u["n"]) == 5  # integer arrays: its own
    np.testing.assert_allclose(u["w"], [xi01 * 1.0 + xi02 * 3.0], rtol=1e-6)
    # identical models: u_i is that model whatever alpha_k (the weights sum to 1)
    same = [{"w": np.array([2.0], np.float32)}] * 3
    np.testing.assert_allclose(cloud_model(same, 1, 0.9, 1.0)["w"], [2.0], rtol=1e-6)


def test_fedamp_refuses_a_negative_self_weight_in_one_line() -> None:
    cfg = load_config("tiny", {"run.method": "fedamp", "data.num_participants": 12,
                               "fedamp.sigma": 100.0, "fedamp.alpha_k": 10.0})
    with pytest.raises(ConfigError, match=r"fedamp.alpha_k: expected <= .* = 9.09091"):
        get_method("fedamp")(cfg, (1, 2, 2), 2)
    get_method("fedamp")(load_config("tiny", {"run.method": "fedamp", "data.num_participants": 11,
                                              "fedamp.sigma": 100.0, "fedamp.alpha_k": 10.0}),
                         (1, 2, 2), 2)


# --- PeFLL -------------------------------------------------------------------------------------


def identity_pefll(target: torch.nn.Module) -> PeFLLModel:
    model = PeFLLModel(target, (1, 2, 2), embed_dim=4, embed_hidden=4, hyper_hidden=3, rank=2)
    with torch.no_grad():  # phi(x) = relu(x)
        for layer in (model.embed[1], model.embed[3]):
            layer.weight.copy_(torch.eye(4))
            layer.bias.zero_()
    return model


def test_pefll_descriptor_is_the_mean_embedding_of_the_inputs_alone() -> None:
    model = identity_pefll(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))
    x = torch.tensor([[1.0, -2.0, 3.0, 0.0], [-1.0, 4.0, 1.0, 2.0]]).reshape(2, 1, 2, 2)
    # relu: [1, 0, 3, 0] and [0, 4, 1, 2]; mean [0.5, 2, 2, 1]
    torch.testing.assert_close(model.descriptor(x), torch.tensor([0.5, 2.0, 2.0, 1.0]))
    # pooled over chunks (1024 at a time) exactly as in one pass, and order-free
    big = torch.randn(2500, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    one_pass = torch.relu(big.reshape(2500, 4)).mean(0)
    torch.testing.assert_close(model.descriptor(big), one_pass)
    torch.testing.assert_close(model.descriptor(big.flip(0)), one_pass)
    # U = 0 at the start: every client gets the target's own weights
    theta = model.generate(model.descriptor(x))
    torch.testing.assert_close(theta["1.weight"], model.target[1].weight)


def test_pefll_first_step_moves_the_base_to_the_local_model() -> None:
    """With U = 0 and hyper_lr 1, (d theta / d psi)^T Delta theta moves theta_0 by -Delta theta:
    to the locally trained weights, FedAvg's local model from the same start and batches."""
    cfg = load_config("tiny", {"run.method": "pefll", "pefll.hyper_lr": 1.0,
                               "pefll.clip_norm": 0.0})
    method = get_method("pefll")(cfg, (1, 2, 2), 2)
    torch.manual_seed(0)
    model = identity_pefll(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))
    plain = FedAvgMethod(cfg, (1, 2, 2), 2)
    reference = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    reference.load_state_dict(model.target.state_dict())
    x = torch.randn(40, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y = (x.reshape(40, 4)[:, 0] > 0).long()
    embed_before = [p.detach().clone() for p in model.embed.parameters()]
    method.local_train(model, x, y, torch.Generator().manual_seed(2))
    plain.fit(reference, plain.loss, x, y, torch.Generator().manual_seed(2))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(model.target.get_parameter(name), p, rtol=1e-5, atol=1e-6)
    assert any(float(b.detach().abs().sum()) > 0 for b in model.basis.values())  # U learns
    # phi gets no gradient while U = 0 (d theta / d v = U)
    for before, after in zip(embed_before, model.embed.parameters(), strict=True):
        torch.testing.assert_close(after, before)


def test_pefll_clipped_step_has_the_clip_norm_and_the_same_direction() -> None:
    """pefll.clip_norm scales the whole psi step to hyper_lr * c when its norm is above c."""
    x = torch.randn(40, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y = (x.reshape(40, 4)[:, 0] > 0).long()
    steps = {}
    for clip in (0.0, 1e-3):
        cfg = load_config("tiny", {"run.method": "pefll", "pefll.hyper_lr": 0.5,
                                   "pefll.clip_norm": clip})
        torch.manual_seed(0)
        model = identity_pefll(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        metrics = get_method("pefll")(cfg, (1, 2, 2), 2).local_train(
            model, x, y, torch.Generator().manual_seed(2))
        steps[clip] = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float(steps[0.0].norm()) == pytest.approx(0.5 * metrics["train_psi_grad_norm"],
                                                     rel=1e-4)
    assert float(steps[0.0].norm()) > 0.5 * 1e-3  # the clip is active
    assert float(steps[1e-3].norm()) == pytest.approx(0.5 * 1e-3, rel=1e-3)
    # float32 parameters near 1 keep a 5e-4 step to about 1e-7 / 5e-4 relative
    torch.testing.assert_close(steps[1e-3] / steps[1e-3].norm(), steps[0.0] / steps[0.0].norm(),
                               rtol=0, atol=2e-3)


# --- through the apps: what leaves a node; resume -----------------------------------------------


def run_tiny(out: Path, method: str, *, client=client_app, **grid_and_overrides) -> tuple:
    grid_kwargs = {k: grid_and_overrides.pop(k) for k in ("on_message",)
                   if k in grid_and_overrides}  # InProcessGrid's hook
    run_config = full_run_config({"run.output_dir": str(out), "run.method": method,
                                  "run.rounds": 3, "train.torch_threads": 1,
                                  "server.server_momentum": 0.5, **grid_and_overrides},
                                 preset="tiny")
    grid = run_inprocess(server_app, client, run_config, simulation_node_configs(N + M),
                         **grid_kwargs)
    with (out / "tiny" / "metrics.csv").open() as f:
        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]
    return rows, grid


# What each method sends beside the shared arrays: record name -> its keys (SCAFFOLD's variates).
EXTRA_DOWN = {"scaffold": (SERVER_CONTROL, CLIENT_CONTROL)}
EXTRA_UP = {"scaffold": (CONTROL_DELTA,)}
_RUNS: dict[tuple[str, str], tuple] = {}


def declared(method: str) -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
    """(records allowed down, records allowed up, personal keys): record name -> its keys."""
    m = get_method(method)(load_config("tiny", {"run.method": method}), (1, 28, 28), 10)
    model = m.build_model()
    shared, personal = set(m.shared_keys(model)), set(m.personal_keys(model))
    control = set(getattr(m, "control_keys", lambda _: [])(model))
    down = {"arrays": shared} | dict.fromkeys(EXTRA_DOWN.get(method, ()), control)
    up = {"arrays": shared} | dict.fromkeys(EXTRA_UP.get(method, ()), control)
    return down, up, personal


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each method's straight 3-round run (with every message), once per module."""
    def get(method: str):
        if method not in _RUNS:
            out = tmp_path_factory.mktemp(method)
            sent, client = [], RecordingClientApp(client_app)
            rows, grid = run_tiny(out / "straight", method, client=client, on_message=sent.append)
            _RUNS[method] = (out, rows, grid, sent, client.replies)
        return _RUNS[method]
    return get


METHODS = ["scaffold", "fedamp", "pefll"]


@pytest.mark.parametrize("method", METHODS)
def test_only_declared_arrays_leave_a_node(runs, method) -> None:
    _, rows, _, sent, replies = runs(method)
    down, up, personal = declared(method)
    assert float(rows[-1]["train_loss"]) < float(rows[1]["train_loss"])
    seen = set()
    for messages, allowed in ((sent, down), (replies, up)):
        for msg in messages:
            for name, record in msg.content.array_records.items():
                assert name in allowed and set(record.keys()) <= allowed[name], (name, method)
                assert not set(record.keys()) & personal
                seen.add(name)
    assert seen == (set(down) | set(up)) - {CLIENT_CONTROL}  # c_i goes down only after resume


@pytest.mark.parametrize("method", METHODS)
def test_resumed_run_equals_an_uninterrupted_one(runs, method) -> None:
    """The straight run's outputs without round 3's checkpoint (a server lost after round 2),
    resumed by a new ServerApp with fresh node contexts, as a new Flower run has."""
    out, straight, _, _, _ = runs(method)
    shutil.copytree(out / "straight" / "tiny", out / "restarted" / "tiny")
    (out / "restarted" / "tiny" / "checkpoints" / "round_0003.pt").unlink()
    resumed, _ = run_tiny(out / "restarted", method, **{"run.resume": True})
    assert resumed == straight
    final = load_checkpoint(out / "restarted" / "tiny" / "checkpoints" / "round_0003.pt")
    expected = load_checkpoint(out / "straight" / "tiny" / "checkpoints" / "round_0003.pt")
    assert all(torch.equal(final.shared[k], expected.shared[k]) for k in expected.shared)
    assert final.server_state.keys() == expected.server_state.keys()


def test_scaffold_server_variate_is_the_mean_of_the_clients(runs) -> None:
    """c <- c + (1/N) sum_i Delta c_i with every participant training: c = (1/N) sum_i c_i; and
    the server's sum of each Delta c_i (for resume) is that client's c_i."""
    _, _, grid, _, _ = runs("scaffold")
    state = load_checkpoint(runs("scaffold")[0] / "straight" / "tiny" / "checkpoints" /
                            "round_0003.pt").server_state
    nodes = sorted(n for n in grid.contexts if grid.contexts[n].node_config["partition-id"] < N)
    kept = [grid.contexts[n].state[PERSONAL_RECORD].to_torch_state_dict() for n in nodes]
    assert state["scaffold_c"]
    for key, value in state["scaffold_c"].items():
        buffer = "control." + key.removeprefix("net.").replace(".", "__")
        assert float(kept[0][buffer].abs().sum()) > 0
        torch.testing.assert_close(value, sum(k[buffer] for k in kept) / N, rtol=1e-5, atol=1e-7)
        for p in range(N):
            assert torch.equal(state[f"scaffold_c{p}"][key], kept[p][buffer])


def test_fedamp_sends_each_participant_its_own_cloud_model(runs) -> None:
    _, _, _, sent, _ = runs("fedamp")
    state = load_checkpoint(runs("fedamp")[0] / "straight" / "tiny" / "checkpoints" /
                            "round_0003.pt").server_state
    assert {f"fedamp_w{p}" for p in range(N)} <= set(state)
    # the last round's train messages (a message's config is read when it is sent: recorded
    # messages share Flower's one ConfigRecord, which holds the last round by now)
    round3 = [m for m in sent if m.metadata.message_type == MessageType.TRAIN][-N:]
    key = next(iter(round3[0].content["arrays"].keys()))
    values = [m.content["arrays"][key].numpy() for m in round3]
    assert len(round3) == N and not np.array_equal(values[0], values[1])


def test_pefll_exports_the_plain_target_it_generates_for_a_client() -> None:
    """What export writes for a new client: the target with h(v(x)), logits equal to zACC's."""
    cfg = load_config("tiny", {"run.method": "pefll"})
    method = get_method("pefll")(cfg, (1, 28, 28), 10)
    torch.manual_seed(0)
    model = method.build_model()
    with torch.no_grad():
        for basis in model.basis.values():
            basis.normal_(std=0.01)  # U != 0: the weights depend on the client's inputs
    x = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    plain = method.zeroshot_module(model, x)
    assert set(plain.state_dict()) == set(model.target.state_dict())
    torch.testing.assert_close(plain(x), method.predictor(model, x, True)(x))
    assert not torch.allclose(plain(x), method.zeroshot_module(model, x[:5] * 0.1)(x))
    with pytest.raises(ValueError, match="inputs"):
        method.zeroshot_module(model)
    scaffold = get_method("scaffold")(load_config("tiny", {"run.method": "scaffold"}),
                                      (1, 28, 28), 10)
    controlled = scaffold.build_model()
    assert scaffold.zeroshot_module(controlled) is controlled.net  # no control buffers exported
