"""Which node is a participant and which is held out.

The ServerApp never sees a node's ``node_config``; it only gets random node ids. So it asks: one
``query`` message per node, answered from the node's own config. In a deployment a SuperNode says
``held-out=true`` in ``--node-config``; in simulation (where node_config holds only ``partition-id``
and ``num-partitions``) partitions ``>= data.num_participants`` are the held-out clients.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("hfz_app")

ZEROSHOT_MESSAGE_TYPE = f"{MessageType.EVALUATE}.zeroshot"
ROLE_RECORD = "role"
# Node config key naming a SuperNode's own data files (deploy/supernode.sh --data-dir).
NODE_DATA_DIR_KEY = "data-dir"


@dataclass(frozen=True)
class Roles:
    """Node ids by role, each list in partition order (node ids are random per run)."""

    participants: tuple[int, ...]
    heldout: tuple[int, ...]
    partition_of: Mapping[int, int] = field(default_factory=dict)


def node_role(node_config: Mapping[str, Any], num_participants: int) -> tuple[int, bool]:
    """(partition id, held out?) of this node, from its node config."""
    if "partition-id" not in node_config:
        raise ValueError("node config: expected 'partition-id' (e.g. --node-config 'partition-id=0')")
    partition = int(node_config["partition-id"])
    if "held-out" in node_config:
        value = node_config["held-out"]
        heldout = value if isinstance(value, bool) else str(value).lower() == "true"
    else:
        heldout = partition >= num_participants
    return partition, heldout


def node_data_dir(node_config: Mapping[str, Any]) -> str:
    """The node's own data folder or file (node config ``data-dir``), or "" for its partition."""
    return str(node_config.get(NODE_DATA_DIR_KEY, "") or "")


def role_reply(msg: Message, node_config: Mapping[str, Any], num_participants: int) -> Message:
    """The ClientApp's answer to the role query."""
    partition, heldout = node_role(node_config, num_participants)
    record = ConfigRecord({"partition-id": partition, "held-out": heldout})
    return Message(RecordDict({ROLE_RECORD: record}), reply_to=msg)


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float, hint: str) -> list[int]:
    """The connected node ids, once at least ``expected`` are connected; a ``TimeoutError`` naming
    ``hint`` (the setting that says how many to expect) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of {expected} nodes connected within "
                               f"{timeout_s:.0f}s ({hint})")
        log.info("waiting for nodes: %d of %d connected", len(node_ids), expected)
        time.sleep(1.0)
    return node_ids


def discover_roles(grid: Grid, expected_nodes: int, timeout_s: float = 600.0,
                   content: RecordDict | None = None,
                   hint: str = "data.num_participants + data.num_heldout") -> Roles:
    """Wait for ``expected_nodes`` nodes, ask each for its role (the query carries ``content``),
    return them grouped."""
    node_ids = wait_for_nodes(grid, expected_nodes, timeout_s, hint)
    queries = [Message(copy.deepcopy(content) if content is not None else RecordDict(),
                       dst_node_id=node, message_type=MessageType.QUERY, group_id="roles")
               for node in node_ids]
    partition_of: dict[int, int] = {}
    heldout: set[int] = set()
    for reply in grid.send_and_receive(queries, timeout=timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %s did not answer the role query: %s", node, reply.error.reason)
            continue
        role = reply.content.config_records[ROLE_RECORD]
        partition_of[node] = int(role["partition-id"])
        if bool(role["held-out"]):
            heldout.add(node)
    by_partition = sorted(partition_of, key=partition_of.__getitem__)
    roles = Roles(
        participants=tuple(n for n in by_partition if n not in heldout),
        heldout=tuple(n for n in by_partition if n in heldout),
        partition_of=partition_of,
    )
    log.info("roles: %d participants, %d held out", len(roles.participants), len(roles.heldout))
    return roles
