"""An in-process Flower Grid: the real ServerApp and ClientApp, no SuperLink, no Ray.

Used by the integration tests and by the overhead benchmark (``flwr run`` against the same
training in-process). Each node gets its own ``Context`` (node config, persistent state); message
contents are deep-copied on the way out and back, as serialisation would, so a client can never
mutate what the server holds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity  # internal; Message() needs a run id

from hfz_app.config import run_config_keys


def _set_task_identity() -> None:
    """Give this process a task identity (``Message()`` reads the run id from it), unless the
    Flower process it runs in already has one."""
    try:
        TaskIdentity.run_id  # noqa: B018 -- raises RuntimeError while unset
    except RuntimeError:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


class InProcessGrid(Grid):
    """A Grid whose nodes are ``client_app`` calls in this process."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Mapping[int, dict[str, Any]],
        run_config: dict[str, Any],
        on_message: Callable[[Message], None] | None = None,
        drop_node: Callable[[int, Message], bool] | None = None,
    ) -> None:
        _set_task_identity()
        self.client_app = client_app
        self.contexts = {
            node_id: Context(run_id=1, node_id=node_id, node_config=dict(config),
                             state=RecordDict(), run_config=run_config)
            for node_id, config in node_configs.items()
        }
        self.on_message = on_message
        self.drop_node = drop_node
        self.sent: list[tuple[int, str]] = []  # (destination node, message type), in order

    @property
    def run(self):  # type: ignore[override]
        return None

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        pass

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent.append((node, message.metadata.message_type))
            if self.on_message is not None:
                self.on_message(message)
            if self.drop_node is not None and self.drop_node(node, message):
                continue  # the node is gone: no reply, as with a lost SuperNode
            outgoing = Message(copy.deepcopy(message.content), dst_node_id=node,
                               message_type=message.metadata.message_type)
            reply = self.client_app(outgoing, self.contexts[node])
            if not reply.has_error():  # reply_to=outgoing makes `node` the reply's source
                reply = Message(copy.deepcopy(reply.content), reply_to=outgoing)
            replies.append(reply)
        return replies


class RecordingClientApp:
    """A ClientApp stand-in that records every reply it sends back (for tests and benchmarks:
    what left each node)."""

    def __init__(self, client_app: ClientApp) -> None:
        self.client_app = client_app
        self.replies: list[Message] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        reply = self.client_app(msg, context)
        self.replies.append(reply)
        return reply


def simulation_node_configs(num_nodes: int, first_id: int = 1001) -> dict[int, dict[str, Any]]:
    """Node configs as Flower's simulation engine makes them (partition-id, num-partitions)."""
    return {first_id + i: {"partition-id": i, "num-partitions": num_nodes}
            for i in range(num_nodes)}


def full_run_config(overrides: Mapping[str, Any], preset: str = "mnist_mlp") -> dict[str, Any]:
    """The run config Flower would pass: every declared key, unset ones as the "" sentinel."""
    return {key: "" for key in run_config_keys()} | {"preset": preset} | dict(overrides)


def run_inprocess(
    server_app: ServerApp,
    client_app: ClientApp,
    run_config: dict[str, Any],
    node_configs: Mapping[int, dict[str, Any]],
    **grid_kwargs: Any,
) -> InProcessGrid:
    """Run ``server_app`` against ``client_app`` nodes in this process; returns the grid."""
    grid = InProcessGrid(client_app, node_configs, run_config, **grid_kwargs)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    server_app(grid, context)
    return grid
