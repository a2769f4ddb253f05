"""The zero-shot app's node side: answer the role query, evaluate the frozen modules.

A node needs no run config of the training app: the server's query says how many partitions
participate (so a simulated node knows whether it is held out), and the ``evaluate.zeroshot``
message carries the frozen shared arrays and the checkpoint's Config as JSON. The reply holds one
MetricRecord and nothing else: no gradient is computed, no optimiser exists, and the weights the
hypernetwork generates never leave the node. The model is built, loaded and evaluated by the same
runtime as in the training app, so both apps' zACC agree for the same checkpoint and clients.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict

from hfz_app.federation.job import node_job
from hfz_app.federation.roles import node_role, role_reply
from hfz_app.zeroshot.checkpoint_config import config_from_json

CONFIG_RECORD = "config"
CONFIG_JSON_KEY = "hfz-config"
NUM_PARTICIPANTS_KEY = "num-participants"


def handle_query(msg: Message, context: Context) -> Message:
    """This node's partition id and whether it is held out."""
    num_participants = int(msg.content.config_records[CONFIG_RECORD][NUM_PARTICIPANTS_KEY])
    return role_reply(msg, context.node_config, num_participants)


def handle_zeroshot(msg: Message, context: Context) -> Message:
    """zACC of the frozen modules on this held-out client's whole data; metrics only."""
    config = msg.content.config_records[CONFIG_RECORD]
    job = node_job(config_from_json(str(config[CONFIG_JSON_KEY])))
    partition, heldout = node_role(context.node_config, job.cfg.data.num_participants)
    if not heldout:
        raise RuntimeError(f"participant (partition {partition}) received a zero-shot message")
    data = job.node_data(context.node_config, partition, heldout)
    model = job.runtime.frozen(msg.content["arrays"], "the checkpoint's arrays")
    metrics = job.runtime.evaluate_heldout(model, data.test_x, data.test_y,
                                           tags={"partition-id": partition})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
