"""What every process of a run derives from its Config, built once per process.

A ClientApp process (one per Ray worker or SuperNode) and the ServerApp rebuild the same
federation and method from the run config; the launcher shares the partition plan with them
through ``PLAN_CACHE_ENV``, so each process reads it instead of partitioning again.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hfz_app.config import Config, from_dict, from_run_config
from hfz_app.data import ClientData, DataSourceError, Federation, build_federation
from hfz_app.federation.roles import NODE_DATA_DIR_KEY, node_data_dir
from hfz_app.methods import Method, MethodRuntime, runtime_for

# A folder where the partition plan is kept, shared by a run's processes. `python -m
# hfz_app.launch` sets it to its run's private FLWR_HOME: the ServerApp and each ClientApp read the
# plan the launcher computed instead of importing flwr-datasets and partitioning again (~2 s each).
PLAN_CACHE_ENV = "HFZ_PLAN_CACHE"


def plan_cache() -> str | None:
    return os.environ.get(PLAN_CACHE_ENV) or None


@dataclass(frozen=True)
class Job:
    """The run's Config, its federation, and the method's runtime (the model seam)."""

    cfg: Config
    federation: Federation
    runtime: MethodRuntime

    @property
    def method(self) -> Method:
        return self.runtime.method

    def node_data(self, node_config: Mapping[str, Any], partition: int, heldout: bool
                  ) -> ClientData:
        """This node's data: its own files when its node config names a ``data-dir``, else its
        partition of the federation."""
        data_dir = node_data_dir(node_config)
        try:
            return self.federation.client_data(partition, heldout, data_dir)
        except DataSourceError as err:
            if not data_dir:
                raise
            raise DataSourceError(f"node config {NODE_DATA_DIR_KEY}: {err}") from None


@functools.lru_cache(maxsize=4)
def _job(config_json: str) -> Job:
    cfg = from_dict(json.loads(config_json))
    federation = build_federation(cfg.data, cfg.run.seed, plan_cache())
    return Job(cfg, federation, runtime_for(cfg, federation.input_shape, federation.num_classes))


def job_for(cfg: Config) -> Job:
    """The job of ``cfg``, built on first use in this process."""
    return _job(json.dumps(cfg.to_dict(), sort_keys=True))


def node_job(cfg: Config) -> Job:
    """:func:`job_for` on a node, which also takes ``train.torch_threads``."""
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    return job_for(cfg)


@functools.lru_cache(maxsize=4)
def _job_from_run_config(items: tuple[tuple[str, Any], ...]) -> Job:
    return node_job(from_run_config(dict(items)))


def job_from_run_config(run_config: Mapping[str, Any]) -> Job:
    """A node's job for a Flower run config (``context.run_config``)."""
    return _job_from_run_config(tuple(sorted(run_config.items())))
