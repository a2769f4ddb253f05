"""The whole ServerApp and ClientApp in-process (real Flower messages, no SuperLink)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from flwr.app import MessageType

from client_app import app as client_app
from hfz_app.checkpoint import load_checkpoint
from hfz_app.federation.inprocess import full_run_config, run_inprocess, simulation_node_configs
from hfz_app.federation.roles import ZEROSHOT_MESSAGE_TYPE
from hfz_app.outputs import COLUMNS, TIMING_COLUMNS
from server_app import app as server_app

N, M = 3, 1


def run_tiny(tmp_path: Path, **overrides) -> tuple:
    sent_content = []
    run_config = full_run_config({"run.output_dir": str(tmp_path), **overrides}, preset="tiny")
    grid = run_inprocess(server_app, client_app, run_config, simulation_node_configs(N + M),
                         on_message=sent_content.append)
    out_dir = tmp_path / "tiny"
    return grid, sent_content, out_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple:
    return run_tiny(tmp_path_factory.mktemp("run"))


def test_heldout_nodes_never_train(tiny_run) -> None:
    grid, _, _ = tiny_run
    partition = {node: ctx.node_config["partition-id"] for node, ctx in grid.contexts.items()}
    trained = {partition[n] for n, kind in grid.sent if kind == MessageType.TRAIN}
    zeroshot = {partition[n] for n, kind in grid.sent if kind == ZEROSHOT_MESSAGE_TYPE}
    assert trained == set(range(N))
    assert zeroshot == {N}  # partition ids >= N are the held-out clients


def test_only_shared_keys_are_sent(tiny_run) -> None:
    from hfz_app.config import load_config
    from hfz_app.methods import get_method

    cfg = load_config("tiny")
    method = get_method(cfg.run.method)(cfg, (1, 28, 28), 10)
    model = method.build_model()
    shared = set(method.shared_keys(model))
    _, sent, _ = tiny_run
    carrying = [m for m in sent if "arrays" in m.content.array_records]
    assert carrying
    for message in carrying:
        assert set(message.content["arrays"].keys()) == shared


def test_metrics_files_hold_every_column(tiny_run) -> None:
    _, _, out_dir = tiny_run
    with (out_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    last = rows[-1]
    for key in ("gacc", "pacc_weighted", "pacc_mean", "zacc_weighted", "zacc_mean", "zacc_std",
                "zacc_p10", "zacc_p90", "gap", "train_loss", "bytes_sent", "bytes_received",
                "round_time_s", "embed_usage_heldout", "embed_entropy_heldout"):
        assert last[key] != "", key
        assert 0 <= float(last[key]) or key == "gap"
    payload = json.loads((out_dir / "metrics.json").read_text())
    assert payload["rounds"][-1]["round"] == 2
    assert [c["partition-id"] for c in payload["clients"]["2"]["heldout"]] == [N]
    assert "client_eval_s" not in payload["clients"]["2"]["heldout"][0]  # timings.csv's
    assert (out_dir / "config.yaml").exists() and (out_dir / "curves.png").exists()
    with (out_dir / "timings.csv").open() as f:
        timings = list(csv.DictReader(f))
    assert list(timings[0]) == TIMING_COLUMNS and [int(t["round"]) for t in timings] == [0, 1, 2]
    for key in ("train_s", "evaluate_s", "record_s", "gacc_s", "client_data_s",
                "client_train_s", "client_eval_s"):
        assert float(timings[-1][key]) > 0, key


def test_checkpoint_after_every_round(tiny_run) -> None:
    _, _, out_dir = tiny_run
    for r in (1, 2):
        ckpt = load_checkpoint(out_dir / "checkpoints" / f"round_{r:04d}.pt")
        assert ckpt.server_round == r
        assert all(torch.isfinite(v).all() for v in ckpt.shared.values())


def test_same_seed_same_metrics(tmp_path: Path, tiny_run) -> None:
    _, _, first_dir = tiny_run
    _, _, second_dir = run_tiny(tmp_path)
    drop = {"elapsed_s", "round_time_s"}

    def rows(path: Path) -> list[dict]:
        with (path / "metrics.csv").open() as f:
            return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]

    assert rows(first_dir) == rows(second_dir)


def test_fedavg_runs_through_the_same_app(tmp_path: Path) -> None:
    _, _, out_dir = run_tiny(tmp_path, **{"run.method": "fedavg"})
    with (out_dir / "metrics.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    assert last["zacc_weighted"] != "" and last["gacc"] != ""
