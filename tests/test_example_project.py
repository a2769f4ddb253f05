"""The public API (hfz_app) and examples/existing-project: a Flower PyTorch-template app adopted to
HyperFedZero, run in-process (2 rounds) and through a real `flwr run`."""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from torch import nn

import hfz_app
from hfz_app import (
    HyperFedZeroLoss,
    HyperFedZeroStrategy,
    hfz_loss,
    hyperfedzero,
    load_shared,
    shared_arrays,
    zero_shot_model,
)
from hfz_app.config import ConfigError
from hfz_app.federation.inprocess import (
    InProcessGrid,
    _set_task_identity,
    simulation_node_configs,
)
from hfz_app.launch import free_port, stop_process_groups, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "existing-project"
BIN = Path(sys.executable).parent
NODES = 3
ADOPTED_FILES = ["pyproject.toml", "existing_project/task.py", "existing_project/client_app.py",
                 "existing_project/server_app.py"]


class Net(nn.Module):
    """A user's own module with a BatchNorm (personal statistics) for the API tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def wrapped(seed: int = 0, **options: Any) -> hfz_app.HyperFedZeroModel:
    torch.manual_seed(seed)
    return hyperfedzero(Net(), input_shape=(1, 8, 8), num_classes=10, **options)


# -- public API ---------------------------------------------------------------------------------


def test_import_is_light_and_exports_resolve() -> None:
    code = ("import sys, hfz_app; heavy = [m for m in ('torch', 'flwr', 'ray') if m in sys.modules];"
            " print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert set(hfz_app.__all__) == {"__version__", *hfz_app._EXPORTS}
    for name in hfz_app.__all__:
        assert getattr(hfz_app, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hfz_app.nope  # noqa: B018


def test_hyperfedzero_leaves_module_alone_and_rejects_unknown_options() -> None:
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = hyperfedzero(net, (1, 8, 8), 10, embed_dim=8, hidden=(32, 32), generate="head")
    assert model.cfg.embed_dim == 8 and model.cfg.hidden == "32,32"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(model.target.conv, nn.Conv2d)  # generate="head": conv stays ordinary
    with pytest.raises(ConfigError) as err:
        hyperfedzero(Net(), (1, 8, 8), 10, embed_dimm=8)
    assert str(err.value).startswith("embed_dimm: unknown option of hyperfedzero() (options: ")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^embed_dim: expected 0 \(one per class\) or >= 2, got 1$"):
        hyperfedzero(Net(), (1, 8, 8), 10, embed_dim=1)
    with pytest.raises(ConfigError, match="^target: not an option"):
        hyperfedzero(Net(), (1, 8, 8), 10, target="lenet")
    with pytest.raises(ConfigError, match=r"^input_shape: expected \(channels, height, width\)"):
        hyperfedzero(Net(), (64,), 10)


def test_loss_is_hfz_loss_and_refuses_bare_logits() -> None:
    model = wrapped(alpha=0.5)
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    out = model(x)
    criterion = HyperFedZeroLoss(model)
    expected, _ = hfz_loss(out.logits, y, out.embedding, 0.5, 0.0)
    assert torch.allclose(criterion(out, y), expected)
    assert set(criterion.parts) == {"ce", "balance", "sharpness"}
    assert criterion(out, y) > torch.nn.functional.cross_entropy(out.logits, y)  # balance > 0
    with pytest.raises(TypeError, match=r"pass model\(x\), not model\(x\).logits"):
        criterion(out.logits, y)


def test_shared_arrays_round_trip_and_personal_state_stays_local() -> None:
    # FedBN: the BatchNorm statistics are personal (the default, shared, sends them)
    sender, receiver = wrapped(seed=0, bn_stats="local"), wrapped(seed=1, bn_stats="local")
    sender.train()
    sender(torch.randn(8, 1, 8, 8))  # moves the BatchNorm running statistics
    state = RecordDict()
    arrays = shared_arrays(sender, state)
    personal = set(sender.personal_keys())
    assert personal and set(arrays.keys()) == set(sender.shared_keys())
    assert not personal & set(arrays.keys())
    assert set(state["hfz.personal"].keys()) == personal
    load_shared(receiver, arrays)
    got, want = receiver.state_dict(), sender.state_dict()
    for key in sender.shared_keys():
        assert torch.equal(got[key], want[key]), key
    bn_mean = next(k for k in personal if k.endswith("running_mean"))
    assert not torch.equal(got[bn_mean], want[bn_mean])  # statistics were not sent
    load_shared(receiver, arrays, state)  # the node's own state brings them back
    assert torch.equal(receiver.state_dict()[bn_mean], want[bn_mean])


def test_shared_batchnorm_statistics_travel_and_the_step_counter_stays() -> None:
    model = wrapped()
    shared, personal = set(model.shared_keys()), set(model.personal_keys())
    assert {"target.bn.running_mean", "target.bn.running_var"} <= shared
    assert personal == {"target.bn.num_batches_tracked"}


def test_load_shared_names_a_foreign_or_missing_key() -> None:
    model = wrapped(bn_stats="local")
    sd = model.state_dict()
    bn_mean = next(k for k in model.personal_keys() if k.endswith("running_mean"))
    foreign = ArrayRecord({k: sd[k] for k in [*model.shared_keys(), bn_mean]})
    with pytest.raises(ValueError, match=rf"^load_shared: '{re.escape(bn_mean)}' is not a shared "
                                         r"key of this model \(1 foreign, 0 missing"):
        load_shared(model, foreign)
    first = model.shared_keys()[0]
    missing = ArrayRecord({k: sd[k] for k in model.shared_keys()[1:]})
    with pytest.raises(ValueError, match=rf"^load_shared: '{re.escape(first)}' is missing"):
        load_shared(model, missing)
    other = wrapped(embed_dim=8, bn_stats="local")  # other options: same keys, other shapes
    with pytest.raises(ValueError, match=r"^load_shared: '.*' has shape \[.*\], expected \["):
        load_shared(model, shared_arrays(other))
    with pytest.raises(TypeError, match="wrap your module with hyperfedzero"):
        load_shared(Net(), foreign)


def test_zero_shot_model_is_the_bare_module_with_generated_weights() -> None:
    model = wrapped()
    x = torch.randn(16, 1, 8, 8)
    plain = zero_shot_model(model, Net(), x, batch_size=5)  # pooled over uneven chunks
    with torch.no_grad():
        pooled = model(x, embedding=model.embed(x).mean(0)).logits
        assert torch.allclose(plain(x), pooled, atol=1e-5)


# -- HyperFedZeroStrategy without roles (an existing project's FedAvg call) ----------------------

SHARED = ["f.weight", "h.out"]


def arrays(value: float) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full((2, 3), value, dtype=np.float32)) for k in SHARED})


def test_strategy_without_roles_trains_and_evaluates_every_connected_node() -> None:
    _set_task_identity()
    grid = InProcessGrid(client_app=None, node_configs={n: {} for n in (7, 5, 6)}, run_config={})
    strategy = HyperFedZeroStrategy(SHARED)
    train = list(strategy.configure_train(1, arrays(0.0), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in train) == [5, 6, 7]
    evaluate = list(strategy.configure_evaluate(1, arrays(0.0), ConfigRecord(), grid))
    assert {m.metadata.message_type for m in evaluate} == {MessageType.EVALUATE}
    assert len(evaluate) == 3

    def reply(node: int, acc: float, n: int) -> Message:
        request = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        metrics = MetricRecord({"eval_acc": acc, "eval_loss": 1.0, "num-examples": n})
        return Message(RecordDict({"metrics": metrics}), reply_to=request)

    summary = strategy.aggregate_evaluate(1, [reply(5, 0.5, 10), reply(6, 1.0, 30)])
    assert summary is not None and summary["eval_acc"] == pytest.approx(0.875)


def test_strategy_takes_num_rounds_from_start_unless_given(monkeypatch) -> None:
    monkeypatch.setattr(FedAvg, "start", lambda self, grid, initial, num_rounds, *a, **k: None)
    default = HyperFedZeroStrategy(SHARED, eval_every=5)
    default.start(None, arrays(0.0), 7)
    assert default.num_rounds == 7 and default.is_eval_round(7) and not default.is_eval_round(6)
    given = HyperFedZeroStrategy(SHARED, num_rounds=4, eval_every=5)
    given.start(None, arrays(0.0), 7)
    assert given.num_rounds == 4


# -- the example, in-process --------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_run(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Two rounds of the adopted example's real ServerApp/ClientApp on 3 in-process nodes."""
    threads = torch.get_num_threads()  # the example's task.py sets 1 thread; restored below
    sys.path.insert(0, str(EXAMPLE))
    from existing_project.client_app import app as client_app
    from existing_project.server_app import app as server_app
    from existing_project.task import hfz_net

    sent: list[Message] = []
    replies: list[Message] = []

    class RecordingGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            out = list(super().send_and_receive(messages, timeout=timeout))
            replies.extend(out)
            return out

    run_config = {"num-server-rounds": 2, "fraction-train": 1.0, "local-epochs": 1, "lr": 0.01}
    cwd = Path.cwd()
    workdir = tmp_path_factory.mktemp("example")
    os.chdir(workdir)  # the template saves final_model.pt to the working directory
    try:
        # run_inprocess, with a grid that also records the replies
        grid = RecordingGrid(client_app, simulation_node_configs(NODES), run_config,
                             on_message=sent.append)
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=run_config))
    finally:
        os.chdir(cwd)
        sys.path.remove(str(EXAMPLE))
        torch.set_num_threads(threads)
    yield {"grid": grid, "sent": sent, "replies": replies, "workdir": workdir,
           "shared": set(hfz_net().shared_keys()), "personal": set(hfz_net().personal_keys())}


def _by_round(replies: list[Message], kind: str) -> list[list[dict[str, float]]]:
    """Per round, the metrics of each reply of this kind (2 rounds x NODES replies)."""
    rows = [dict(r.content["metrics"]) for r in replies if r.metadata.message_type == kind]
    return [rows[i:i + NODES] for i in range(0, len(rows), NODES)]


def _weighted(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] * r["num-examples"] for r in rows) / sum(r["num-examples"] for r in rows)


def test_example_learns_in_two_rounds(example_run) -> None:
    replies = example_run["replies"]
    assert replies and not any(r.has_error() for r in replies)
    train = _by_round(replies, MessageType.TRAIN)
    evaluate = _by_round(replies, MessageType.EVALUATE)
    assert [len(r) for r in train] == [NODES, NODES] and [len(r) for r in evaluate] == [NODES] * 2
    loss = [_weighted(rows, "train_loss") for rows in train]
    acc = [_weighted(rows, "eval_acc") for rows in evaluate]
    assert loss[1] < 0.8 * loss[0], loss  # measured 2.00 -> 0.99
    assert acc[1] > 0.6, acc  # 10 classes: chance is 0.1; measured 0.89
    saved = torch.load(example_run["workdir"] / "final_model.pt")
    assert set(saved) == example_run["shared"]


def test_example_sends_only_shared_keys(example_run) -> None:
    shared, personal = example_run["shared"], example_run["personal"]
    assert personal and not shared & personal  # Net's BatchNorm statistics stay on the nodes
    carrying = [m for m in example_run["sent"] + example_run["replies"]
                if "arrays" in m.content.array_records]
    assert len(carrying) == 2 * NODES * 2 + 2 * NODES  # train out/back + evaluate out, 2 rounds
    for message in carrying:
        assert set(message.content["arrays"].keys()) == shared
    for context in example_run["grid"].contexts.values():
        assert set(context.state["hfz.personal"].keys()) == personal


# -- the adoption diff --------------------------------------------------------------------------


def _changed_lines(diff_lines: list[str]) -> list[str]:
    return [line.rstrip("\n") for line in diff_lines
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_readme_shows_the_real_adoption_diff() -> None:
    actual: list[str] = []
    for name in ADOPTED_FILES:
        before = (EXAMPLE / "before" / name).read_text().splitlines(keepends=True)
        after = (EXAMPLE / name).read_text().splitlines(keepends=True)
        actual += _changed_lines(list(difflib.unified_diff(before, after)))
    readme = (EXAMPLE / "README.md").read_text()
    block = re.search(r"```diff\n(.*?)```", readme, re.DOTALL)
    assert block is not None
    shown = _changed_lines(block.group(1).splitlines())
    # as multisets: GNU diff and difflib may place an added blank line differently
    assert sorted(shown) == sorted(actual), "regenerate the diff in the example's README.md"
    assert 0 < len(actual) <= 45  # a small diff: measured 41 lines (25 added, 16 removed)


# -- the example through a real `flwr run` -------------------------------------------------------


@pytest.mark.slow
def test_example_runs_with_flwr_run(tmp_path: Path) -> None:
    """`flwr run examples/existing-project` on a SuperLink of our own (private FLWR_HOME, free
    port), 3 simulated nodes, 2 rounds; the run's status, not flwr's exit code, decides."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "t"\n[superlink.t]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
         "--port", str(port), "--database", str(home / "state.db"),
         "--disable-runtime-dependency-installation"],
        env=env, cwd=tmp_path, stdout=(tmp_path / "superlink.log").open("w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )

    def flwr(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=tmp_path, text=True,
                              capture_output=True, check=False, timeout=timeout)

    try:
        wait_healthy(port, superlink)
        submitted = flwr("run", str(EXAMPLE), "t", "--format", "json", "--federation-config",
                         f"num-supernodes={NODES} client-resources-num-cpus=1",
                         "--run-config", "num-server-rounds=2")
        run_id = str(json.loads(submitted.stdout)["run-id"])
        log = flwr("log", run_id, "t", "--stream", timeout=240)
        status = json.loads(flwr("ls", "t", "--run-id", run_id, "--format", "json").stdout)
        run = status["runs"][0]
        assert run["status"] == "finished:completed", (run, log.stdout[-3000:])
        assert "eval_acc" in log.stdout
        saved = torch.load(tmp_path / "final_model.pt")  # the ServerApp reached its last line
        sys.path.insert(0, str(EXAMPLE))
        try:
            from existing_project.task import hfz_net
        finally:
            sys.path.remove(str(EXAMPLE))
        assert set(saved) == set(hfz_net().shared_keys())
    finally:
        stop_process_groups([superlink])
