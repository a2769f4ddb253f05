"""The zero-shot app (zeroshot_app/): in-process on the checkpoint of a 1-round training run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from hfz_app.config import flatten, load_config
from hfz_app.federation.inprocess import run_inprocess, simulation_node_configs
from hfz_app.federation.roles import ZEROSHOT_MESSAGE_TYPE
from hfz_app.zeroshot.checkpoint_config import ZeroShotError, config_to_json
from hfz_app.zeroshot.server import OWN_KEYS, overridable_keys, plan_zeroshot

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "zeroshot_app"
sys.path.insert(0, str(APP_DIR))  # the app's modules are top-level, as in its FAB

import zeroshot_client_app
import zeroshot_server_app

from client_app import app as client_app

N, M = 3, 1


def declared_run_config() -> dict:
    """The run config Flower passes: every key declared in zeroshot_app/pyproject.toml."""
    tree = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    return flatten(tree["tool"]["flwr"]["app"]["config"])


def zeroshot_run_config(out: Path, **overrides) -> dict:
    return declared_run_config() | {"output-dir": str(out), "train.torch_threads": 1} | overrides


@pytest.fixture(scope="module")
def zeroshot_run(trained: Path) -> tuple:
    sent = []
    grid = run_inprocess(zeroshot_server_app.app, zeroshot_client_app.app,
                         zeroshot_run_config(trained, **{"run-name": "tiny"}),
                         simulation_node_configs(N + M), on_message=sent.append)
    return grid, sent, trained / "tiny-zeroshot"


def test_pyproject_declares_exactly_the_keys_the_app_reads() -> None:
    assert set(declared_run_config()) == set(OWN_KEYS) | set(overridable_keys())
    tree = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    components = tree["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "zeroshot_server_app:app",
                          "clientapp": "zeroshot_client_app:app"}


def test_zacc_equals_the_training_apps_for_the_same_checkpoint(trained, zeroshot_run) -> None:
    training = json.loads((trained / "tiny" / "metrics.json").read_text())
    _, _, out = zeroshot_run
    zeroshot = json.loads((out / "zeroshot.json").read_text())
    last = training["rounds"][-1]
    assert last["round"] == zeroshot["checkpoint_round"] == 1
    assert zeroshot["summary"]["zacc_weighted"] == pytest.approx(last["zacc_weighted"], abs=1e-9)
    for key in ("zacc_mean", "zacc_loss", "embed_usage_heldout", "embed_entropy_heldout"):
        assert zeroshot["summary"][key] == pytest.approx(last[key], abs=1e-9), key
    trained_clients = training["clients"]["1"]["heldout"]
    assert [c["partition-id"] for c in zeroshot["clients"]] == \
        [c["partition-id"] for c in trained_clients] == [N]
    for ours, theirs in zip(zeroshot["clients"], trained_clients):
        assert ours["accuracy"] == theirs["accuracy"]
        assert ours["num-examples"] == theirs["num-examples"]
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-9)


def test_only_role_queries_and_zeroshot_messages_are_sent(zeroshot_run) -> None:
    grid, sent, _ = zeroshot_run
    partition = {node: ctx.node_config["partition-id"] for node, ctx in grid.contexts.items()}
    kinds = {kind for _, kind in grid.sent}
    assert kinds == {MessageType.QUERY, ZEROSHOT_MESSAGE_TYPE}
    assert {partition[n] for n, kind in grid.sent if kind == ZEROSHOT_MESSAGE_TYPE} == {N}
    assert all(not m.content.array_records for m in sent if
               m.metadata.message_type == MessageType.QUERY)


def test_results_written_like_the_training_app(zeroshot_run) -> None:
    _, _, out = zeroshot_run
    assert (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["round"] == "1" and rows[0]["zacc_weighted"] != ""
    payload = json.loads((out / "metrics.json").read_text())
    assert [c["partition-id"] for c in payload["clients"]["1"]["heldout"]] == [N]
    with (out / "clients.csv").open() as f:
        clients = list(csv.DictReader(f))
    assert [int(c["partition-id"]) for c in clients] == [N]


def test_client_computes_no_gradient_and_replies_metrics_only(trained, monkeypatch) -> None:
    """An optimiser or a backward pass anywhere on the node's path would raise here."""
    from hfz_app.checkpoint import load_checkpoint
    from hfz_app.federation.inprocess import InProcessGrid
    from hfz_app.methods.hyperfedzero import HyperFedZeroMethod
    from hfz_app.zeroshot.client import CONFIG_JSON_KEY

    def refuse(*args, **kwargs):
        raise AssertionError("an optimiser or a gradient on the zero-shot path")

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    seen = []
    original = HyperFedZeroMethod.predictor

    def spy(self, model, x, zeroshot):
        assert zeroshot
        predict = original(self, model, x, zeroshot)

        def logits(batch):
            seen.append((torch.is_inference_mode_enabled(),
                         any(p.requires_grad for p in model.parameters())))
            out = predict(batch)
            assert not out.requires_grad
            return out

        return logits

    monkeypatch.setattr(HyperFedZeroMethod, "predictor", spy)
    plan = plan_zeroshot(zeroshot_run_config(trained, **{"run-name": "tiny"}))
    content = RecordDict({
        "arrays": ArrayRecord(dict(load_checkpoint(plan.checkpoint_path).shared)),
        "config": ConfigRecord({"server-round": 1, CONFIG_JSON_KEY:
                                config_to_json(plan.cfg)}),
    })
    InProcessGrid(zeroshot_client_app.app, {}, {})  # Message() needs a run identity
    msg = Message(content, dst_node_id=7, message_type=ZEROSHOT_MESSAGE_TYPE)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": N, "num-partitions": N + M},
                      state=RecordDict(), run_config={})
    reply = zeroshot_client_app.app(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert not reply.content.array_records and not reply.content.config_records
    assert set(reply.content.metric_records) == {"metrics"}
    assert seen and all(inference and not grad for inference, grad in seen)


def test_a_train_message_is_refused(trained) -> None:
    from hfz_app.federation.inprocess import InProcessGrid

    InProcessGrid(zeroshot_client_app.app, {}, {})
    msg = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": N, "num-partitions": N + M},
                      state=RecordDict(), run_config={})
    try:
        reply = zeroshot_client_app.app(msg, context)
    except Exception:  # noqa: BLE001 -- Flower raises for an unregistered handler: also a refusal
        return
    assert reply.has_error()


@pytest.mark.parametrize("granularity", ["sample", "batch", "client"])
def test_frozen_metrics_equal_the_training_apps_evaluation(granularity: str) -> None:
    """The zero-shot node and the training app's held-out node are one code path (the method's
    runtime): the same reply for the same arrays and client, for every granularity; a perturbed
    hypernetwork so that the embedding matters."""
    from hfz_app.federation.inprocess import InProcessGrid, full_run_config
    from hfz_app.federation.job import job_for
    from hfz_app.federation.strategy import CLIENT_TIMING_KEYS
    from hfz_app.zeroshot.client import CONFIG_JSON_KEY

    overrides = {"train.torch_threads": 1, "model.granularity": granularity}
    run_config = full_run_config(overrides, preset="tiny")
    job = job_for(load_config("tiny", overrides))
    torch.manual_seed(5)
    reference = job.runtime.build()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    arrays = job.runtime.reply(reference)
    InProcessGrid(zeroshot_client_app.app, {}, {})  # Message() needs a run identity
    context = Context(run_id=1, node_id=7, node_config={"partition-id": N, "num-partitions": N + M},
                      state=RecordDict(), run_config=run_config)
    replies = []
    for app, config in ((client_app, {}), (zeroshot_client_app.app,
                                           {CONFIG_JSON_KEY: config_to_json(job.cfg)})):
        content = RecordDict({"arrays": arrays,
                              "config": ConfigRecord({"server-round": 1, **config})})
        reply = app(Message(content, dst_node_id=7, message_type=ZEROSHOT_MESSAGE_TYPE), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        replies.append(dict(reply.content["metrics"]))
    for key in CLIENT_TIMING_KEYS:  # the training app's ServerApp moves them to timings.csv
        replies[0].pop(key, None)
    assert replies[0] == replies[1] and replies[0]["num-examples"] > 0


def test_data_overrides_apply_and_model_keys_are_refused(trained) -> None:
    plan = plan_zeroshot(zeroshot_run_config(
        trained, **{"run-name": "tiny", "data.alpha_dir_heldout": 0.1, "seed": 3}))
    assert plan.cfg.data.alpha_dir_heldout == 0.1 and plan.cfg.run.seed == 3
    assert plan.overrides == {"data.alpha_dir_heldout": 0.1, "train.torch_threads": 1,
                              "run.seed": 3}
    with pytest.raises(ZeroShotError, match="model.hidden: not a zero-shot run-config key"):
        plan_zeroshot(zeroshot_run_config(trained, **{"run-name": "tiny", "model.hidden": "8"}))


@pytest.mark.parametrize("case", ["missing", "corrupt", "no-checkpoints", "unknown-run",
                                  "bad-round", "nothing"])
def test_one_line_errors(trained, tmp_path: Path, case: str) -> None:
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    keys, expected = {
        "missing": ({"checkpoint": str(tmp_path / "nope.pt")}, "checkpoint: no file at"),
        "corrupt": ({"checkpoint": str(tmp_path / "bad.pt")}, "is not a HyperFedZero checkpoint"),
        "no-checkpoints": ({"run-name": "empty", "output-dir": str(tmp_path)},
                           "run 'empty' has no checkpoints in"),
        "unknown-run": ({"run-name": "nope"}, "no run named 'nope' in .* \\(runs there: tiny"),
        "bad-round": ({"run-name": "tiny", "round": 5}, "no checkpoint of round 5 \\(rounds: 1\\)"),
        "nothing": ({}, "no checkpoint given"),
    }[case]
    with pytest.raises(ZeroShotError, match=expected) as err:
        plan_zeroshot(zeroshot_run_config(trained, **keys))
    assert "\n" not in str(err.value)


def test_launcher_reports_a_bad_checkpoint_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hfz_app.launch", "--app", "zeroshot", "-c", 'run-name="nope"',
         "-c", f'output-dir="{tmp_path}"'],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: zero-shot: no run named 'nope' in {tmp_path} "
                                   f"(runs there: none)")


@pytest.mark.slow
def test_flwr_run_of_the_zeroshot_app(trained: Path) -> None:
    """A real `flwr run zeroshot_app` in local simulation (own SuperLink, Ray), via the launcher."""
    proc = subprocess.run(
        [sys.executable, "-m", "hfz_app.launch", "--app", "zeroshot",
         "-c", 'run-name="tiny"', "-c", f'output-dir="{trained}"', "-c", 'name="flwr-zs"',
         "-c", "train.torch_threads=1"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "completed" in proc.stdout
    ours = json.loads((trained / "flwr-zs" / "zeroshot.json").read_text())
    training = json.loads((trained / "tiny" / "metrics.json").read_text())
    assert ours["summary"]["zacc_weighted"] == pytest.approx(
        training["rounds"][-1]["zacc_weighted"], abs=1e-9)
