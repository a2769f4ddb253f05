"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfz_app.federation.inprocess import full_run_config, run_inprocess, simulation_node_configs

TINY_NODES = 3 + 1  # the tiny preset: 3 participants + 1 held out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 1-round HyperFedZero training run (tiny preset) through the training app, in-process;
    returns its output root (the run is ``<root>/tiny``)."""
    from client_app import app as client_app
    from server_app import app as server_app

    out = tmp_path_factory.mktemp("outputs")
    run_config = full_run_config({"run.output_dir": str(out), "run.rounds": 1,
                                  "train.torch_threads": 1}, preset="tiny")
    run_inprocess(server_app, client_app, run_config, simulation_node_configs(TINY_NODES))
    return out
