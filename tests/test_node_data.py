"""A SuperNode with its own files (node config ``data-dir``) trains and is evaluated on them."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MessageType

from client_app import app as client_app
from hfz_app.config import load_config
from hfz_app.data import DataSourceError, build_federation
from hfz_app.federation.inprocess import full_run_config, run_inprocess, simulation_node_configs
from hfz_app.federation.job import job_for
from server_app import app as server_app


def write_npz(path, n_train: int, n_test: int, shape=(28, 28), classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    np.savez(path,
             x_train=rng.integers(0, 255, (n_train, *shape), dtype=np.uint8),
             y_train=rng.integers(0, classes, n_train),
             x_test=rng.integers(0, 255, (n_test, *shape), dtype=np.uint8),
             y_test=rng.integers(0, classes, n_test))


def test_nodes_with_a_data_dir_use_their_own_files(tmp_path) -> None:
    write_npz(tmp_path / "own0.npz", 77, 23)
    write_npz(tmp_path / "own3.npz", 40, 9)
    nodes = simulation_node_configs(4)
    first, last = min(nodes), max(nodes)
    nodes[first]["data-dir"] = str(tmp_path / "own0.npz")
    nodes[last]["data-dir"] = str(tmp_path / "own3.npz")
    replies = []

    def client(msg, context):
        reply = client_app(msg, context)
        replies.append((context.node_id, msg.metadata.message_type, reply))
        return reply

    run_config = full_run_config({"run.output_dir": str(tmp_path / "out"), "run.rounds": 1,
                                  "train.torch_threads": 1}, preset="tiny")
    run_inprocess(server_app, client, run_config, nodes)
    examples = {(node, kind): int(r.content["metrics"]["num-examples"])
                for node, kind, r in replies if kind != MessageType.QUERY}
    assert examples[(first, MessageType.TRAIN)] == 77
    assert examples[(first, MessageType.EVALUATE)] == 23
    assert examples[(last, "evaluate.zeroshot")] == 49  # held out: all of its own data
    fed = build_federation(load_config("tiny").data, 0)
    second = sorted(nodes)[1]
    assert examples[(second, MessageType.TRAIN)] == len(fed.client(1).train_x)  # unchanged


def test_a_data_dir_of_the_wrong_shape_is_one_clear_error(tmp_path) -> None:
    write_npz(tmp_path / "small.npz", 10, 5, shape=(8, 8))
    job = job_for(load_config("tiny"))
    with pytest.raises(DataSourceError, match=r"node config data-dir: .*small.npz holds \(1, 8, 8\)"):
        job.node_data({"data-dir": str(tmp_path / "small.npz")}, 0, False)
    with pytest.raises(DataSourceError, match="node config data-dir: folder: .* does not exist"):
        job.node_data({"data-dir": str(tmp_path / "missing.npz")}, 0, False)
