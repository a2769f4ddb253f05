"""What a node does with each message; ``client_app.py`` only routes to these functions.

Every handler rebuilds the method's model (cheap) from the run config, loads the shared arrays
from the message and the node's personal arrays from ``context.state`` (kept for the run, never
sent), and replies with the shared arrays and metrics only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from hfz_app.config import Config, from_run_config
from hfz_app.data import Federation, build_federation
from hfz_app.federation.roles import node_role, role_reply
from hfz_app.methods import Method, get_method
from hfz_app.training import evaluate, round_seed

PERSONAL = "personal"


@dataclass(frozen=True)
class Job:
    """Everything a node derives from the run config, built once per process."""

    cfg: Config
    federation: Federation
    method: Method


@functools.lru_cache(maxsize=4)
def _job(run_config_items: tuple[tuple[str, Any], ...]) -> Job:
    cfg = from_run_config(dict(run_config_items))
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    federation = build_federation(cfg.data, cfg.run.seed)
    method = get_method(cfg.run.method)(cfg, federation.input_shape, federation.num_classes)
    return Job(cfg, federation, method)


def job_for(run_config: Mapping[str, Any]) -> Job:
    return _job(tuple(sorted(run_config.items())))


def build_with_arrays(job: Job, arrays: ArrayRecord, state: RecordDict | None) -> nn.Module:
    """The method's model with the received shared arrays and this node's personal arrays."""
    torch.manual_seed(job.cfg.run.seed)  # same init of anything neither shared nor personal
    model = job.method.build_model()
    received = arrays.to_torch_state_dict()
    expected = set(job.method.shared_keys(model))
    if set(received) != expected:
        raise ValueError(
            f"received arrays do not match the method's shared keys: foreign "
            f"{sorted(set(received) - expected)[:5]}, missing {sorted(expected - set(received))[:5]}"
        )
    model.load_state_dict(received, strict=False)
    if state is not None and PERSONAL in state:
        model.load_state_dict(state[PERSONAL].to_torch_state_dict(), strict=False)
    return model


def _reply_metrics(msg: Message, metrics: Mapping[str, Any]) -> Message:
    return Message(RecordDict({"metrics": MetricRecord(dict(metrics))}), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Answer the server's role query from this node's config."""
    cfg = job_for(context.run_config).cfg
    return role_reply(msg, context.node_config, cfg.data.num_participants)


def handle_train(msg: Message, context: Context) -> Message:
    """One round of local training on a participant."""
    job = job_for(context.run_config)
    partition, heldout = node_role(context.node_config, job.cfg.data.num_participants)
    if heldout:
        raise RuntimeError(f"held-out node (partition {partition}) received a train message")
    data = job.federation.node_client(context.node_config, partition, heldout)
    server_round = int(msg.content["config"]["server-round"])
    model = build_with_arrays(job, msg.content["arrays"], context.state)
    seed = round_seed(job.cfg.run.seed, server_round, partition)
    torch.manual_seed(seed)
    metrics = job.method.local_train(
        model, data.train_x, data.train_y, torch.Generator().manual_seed(seed),
        dict(msg.content["config"]),
    )
    state = model.state_dict()
    personal = job.method.personal_keys(model)
    if personal:
        context.state[PERSONAL] = ArrayRecord({k: state[k] for k in personal})
    shared = ArrayRecord({k: state[k] for k in job.method.shared_keys(model)})
    metrics = {**metrics, "num-examples": len(data.train_x), "partition-id": partition}
    return Message(RecordDict({"arrays": shared, "metrics": MetricRecord(metrics)}), reply_to=msg)


def _evaluate_reply(msg: Message, job: Job, model: nn.Module, x, y, zeroshot: bool, partition: int):
    method = job.method
    model.eval()
    with torch.inference_mode():
        result = evaluate(method.predictor(model, x, zeroshot), x, y)
        extra = method.diagnostics(model, x)
    metrics = {
        "accuracy": result.accuracy,
        "loss": result.loss,
        "num-examples": result.num_examples,
        "partition-id": partition,
        **extra,
    }
    return _reply_metrics(msg, metrics)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """pACC: a participant's own model (shared arrays + personal state) on its local test split."""
    job = job_for(context.run_config)
    partition, heldout = node_role(context.node_config, job.cfg.data.num_participants)
    data = job.federation.node_client(context.node_config, partition, heldout)
    model = build_with_arrays(job, msg.content["arrays"], context.state)
    return _evaluate_reply(msg, job, model, data.test_x, data.test_y, heldout, partition)


def handle_zeroshot(msg: Message, context: Context) -> Message:
    """zACC: frozen shared modules on a held-out client's whole data; no optimiser, no gradient.

    Only metrics go back: the weights the hypernetwork generates here never leave the node.
    """
    job = job_for(context.run_config)
    partition, heldout = node_role(context.node_config, job.cfg.data.num_participants)
    if not heldout:
        raise RuntimeError(f"participant (partition {partition}) received a zero-shot message")
    data = job.federation.node_client(context.node_config, partition, heldout)
    model = build_with_arrays(job, msg.content["arrays"], None)
    seed = round_seed(job.cfg.run.seed, int(msg.content["config"]["server-round"]), partition)
    model, x, y = job.method.prepare_heldout(  # a no-op for every zero-shot method
        model, data.test_x, data.test_y, torch.Generator().manual_seed(seed))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return _evaluate_reply(msg, job, model, x, y, True, partition)
