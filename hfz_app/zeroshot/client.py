"""The zero-shot app's node side: answer the role query, evaluate the frozen modules.

A node needs no run config of the training app: the server's query says how many partitions
participate (so a simulated node knows whether it is held out), and the ``evaluate.zeroshot``
message carries the frozen shared arrays and the checkpoint's Config as JSON. The reply holds one
MetricRecord and nothing else: no gradient is computed, no optimiser exists, and the weights the
hypernetwork generates never leave the node.
"""

from __future__ import annotations

import functools

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from hfz_app.config import Config
from hfz_app.data import Federation, build_federation
from hfz_app.federation.roles import node_role, role_reply
from hfz_app.zeroshot.frozen import build_frozen_model, config_from_json, frozen_metrics

CONFIG_RECORD = "config"
CONFIG_JSON_KEY = "hfz-config"
NUM_PARTICIPANTS_KEY = "num-participants"


@functools.lru_cache(maxsize=4)
def _job(config_json: str) -> tuple[Config, Federation]:
    cfg = config_from_json(config_json)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    return cfg, build_federation(cfg.data, cfg.run.seed)


def handle_query(msg: Message, context: Context) -> Message:
    """This node's partition id and whether it is held out."""
    num_participants = int(msg.content.config_records[CONFIG_RECORD][NUM_PARTICIPANTS_KEY])
    return role_reply(msg, context.node_config, num_participants)


def handle_zeroshot(msg: Message, context: Context) -> Message:
    """zACC of the frozen modules on this held-out client's whole data; metrics only."""
    config = msg.content.config_records[CONFIG_RECORD]
    cfg, federation = _job(str(config[CONFIG_JSON_KEY]))
    partition, heldout = node_role(context.node_config, cfg.data.num_participants)
    if not heldout:
        raise RuntimeError(f"participant (partition {partition}) received a zero-shot message")
    data = federation.node_client(context.node_config, partition, heldout)
    model = build_frozen_model(cfg, federation.input_shape, federation.num_classes,
                               msg.content["arrays"].to_torch_state_dict())
    metrics = frozen_metrics(model, data.test_x, data.test_y, partition)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
