"""What a node does with each message; ``client_app.py`` only routes to these functions.

Every handler rebuilds the method's model (cheap) through the job's runtime, which checks the
received shared arrays and restores the node's personal arrays from ``context.state`` (kept for
the run, never sent); replies hold the shared arrays and metrics only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from hfz_app.federation.job import job_from_run_config
from hfz_app.federation.roles import node_role, role_reply
from hfz_app.training import round_seed


def _metrics_reply(msg: Message, metrics: Mapping[str, Any]) -> Message:
    return Message(RecordDict({"metrics": MetricRecord(dict(metrics))}), reply_to=msg)


def _timings(start: float, loaded: float, work: str) -> dict[str, float]:
    """This handler's own seconds: getting the node's data (``client_data_s``, the config and
    job included) and the rest (``work``); the ServerApp sums them per round (timings.csv) and
    keeps them out of the metrics."""
    return {"client_data_s": loaded - start, work: time.perf_counter() - loaded}


def _received(msg: Message) -> str:
    return f"arrays of round {msg.content['config']['server-round']}"


def handle_query(msg: Message, context: Context) -> Message:
    """Answer the server's role query from this node's config."""
    cfg = job_from_run_config(context.run_config).cfg
    return role_reply(msg, context.node_config, cfg.data.num_participants)


def handle_train(msg: Message, context: Context) -> Message:
    """One round of local training on a participant."""
    start = time.perf_counter()
    job = job_from_run_config(context.run_config)
    partition, heldout = node_role(context.node_config, job.cfg.data.num_participants)
    if heldout:
        raise RuntimeError(f"held-out node (partition {partition}) received a train message")
    data = job.node_data(context.node_config, partition, heldout)
    loaded = time.perf_counter()
    config = msg.content["config"]
    model = job.runtime.receive(msg.content["arrays"], _received(msg), context.state)
    job.method.receive_extras(model, msg.content.array_records)
    seed = round_seed(job.cfg.run.seed, int(config["server-round"]), partition)
    torch.manual_seed(seed)
    device = job.runtime.device
    metrics = job.method.local_train(model, data.train_x.to(device), data.train_y.to(device),
                                     torch.Generator().manual_seed(seed), dict(config))
    shared = job.runtime.reply(model, context.state)
    metrics = {**metrics, "num-examples": len(data.train_x), "partition-id": partition,
               **_timings(start, loaded, "client_train_s")}
    return Message(RecordDict({"arrays": shared, **job.method.reply_extras(model),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """pACC: a participant's own model (shared arrays + personal state) on its local test split."""
    start = time.perf_counter()
    job = job_from_run_config(context.run_config)
    partition, heldout = node_role(context.node_config, job.cfg.data.num_participants)
    data = job.node_data(context.node_config, partition, heldout)
    loaded = time.perf_counter()
    model = job.runtime.receive(msg.content["arrays"], _received(msg), context.state)
    metrics = job.runtime.evaluate(model, data.test_x, data.test_y, zeroshot=heldout,
                                   tags={"partition-id": partition})
    return _metrics_reply(msg, {**metrics, **_timings(start, loaded, "client_eval_s")})


def handle_zeroshot(msg: Message, context: Context) -> Message:
    """zACC: frozen shared modules on a held-out client's whole data; no optimiser, no gradient
    (only the labelled fine-tuning reference, not a zero-shot method, adapts here).

    Only metrics go back: the weights the hypernetwork generates here never leave the node.
    """
    start = time.perf_counter()
    job = job_from_run_config(context.run_config)
    partition, heldout = node_role(context.node_config, job.cfg.data.num_participants)
    if not heldout:
        raise RuntimeError(f"participant (partition {partition}) received a zero-shot message")
    data = job.node_data(context.node_config, partition, heldout)
    loaded = time.perf_counter()
    seed = round_seed(job.cfg.run.seed, int(msg.content["config"]["server-round"]), partition)
    model = job.runtime.receive(msg.content["arrays"], _received(msg))
    device = job.runtime.device
    model, x, y = job.method.prepare_heldout(  # a no-op for every zero-shot method
        model, data.test_x.to(device), data.test_y.to(device),
        torch.Generator().manual_seed(seed))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    metrics = job.runtime.evaluate_heldout(model, x, y, tags={"partition-id": partition})
    return _metrics_reply(msg, {**metrics, **_timings(start, loaded, "client_eval_s")})
