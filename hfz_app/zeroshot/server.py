"""The zero-shot app's ServerApp: a trained checkpoint, evaluated frozen on held-out nodes.

1. Read the run config (``zeroshot_app/pyproject.toml``): a checkpoint path, or a run name whose
   latest (or given) ``checkpoints/round_NNNN.pt`` is taken; data-level overrides.
2. Rebuild the Config saved in the checkpoint, apply the overrides.
3. Ask every node for its role; send ``evaluate.zeroshot`` (the frozen shared arrays and the
   Config) to the held-out nodes only. No train message exists in this app.
4. Summarise the replies (``summarise_evaluation``) and write ``outputs/<name>/`` as the training
   app does: ``config.yaml``, ``metrics.csv``/``metrics.json`` (per-client replies), plus
   ``clients.csv`` and ``zeroshot.json`` (the checkpoint it came from and the summary).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from hfz_app.arrays import ArrayMismatch
from hfz_app.checkpoint import Checkpoint, load_checkpoint
from hfz_app.config import Config, ConfigError, check_run_name, run_config_keys
from hfz_app.evaluation.metrics import summarise_evaluation
from hfz_app.federation.roles import ZEROSHOT_MESSAGE_TYPE, discover_roles
from hfz_app.methods import runtime_for
from hfz_app.outputs import RunOutputs, resolve_output_root
from hfz_app.zeroshot.checkpoint_config import ZeroShotError, checkpoint_config, config_to_json
from hfz_app.zeroshot.client import CONFIG_JSON_KEY, CONFIG_RECORD, NUM_PARTICIPANTS_KEY

log = logging.getLogger("hfz_app")

# The app's own run-config keys with their defaults ("" = not set).
OWN_KEYS: dict[str, Any] = {
    "checkpoint": "",     # path to a round_NNNN.pt (relative: against the output root)
    "run-name": "",       # or: a training run's name under output-dir (its latest checkpoint)
    "round": 0,           # with run-name: this round's checkpoint (0: the latest)
    "output-dir": "outputs",
    "name": "",           # results folder (default: <trained run name>-zeroshot)
    "seed": "",           # run.seed: the client split (default: the checkpoint's)
    "min-nodes": "",      # nodes to wait for (default: data.num_participants + data.num_heldout)
    "timeout-s": "",      # default: the checkpoint's server.timeout_s
}
# Overrides of the checkpoint's config that do not change the model.
OVERRIDABLE_PREFIXES = ("data.", "eval.")
OVERRIDABLE_KEYS = ("train.torch_threads", "run.device")


# The training app's evaluation schedule: this app scores every held-out client once.
NOT_OVERRIDABLE = ("eval.participants_sample", "eval.heldout_sample")


def overridable_keys() -> list[str]:
    return [k for k in run_config_keys() if k not in NOT_OVERRIDABLE
            and (k.startswith(OVERRIDABLE_PREFIXES) or k in OVERRIDABLE_KEYS)]


@dataclass
class ZeroShotPlan:
    """What a zero-shot run evaluates, resolved before any node is contacted."""

    checkpoint_path: Path
    checkpoint: Checkpoint
    cfg: Config            # the checkpoint's Config with the overrides: what nodes rebuild
    out_cfg: Config        # the same, naming the results folder
    overrides: dict[str, Any]
    min_nodes: int
    timeout_s: float

    def describe(self) -> str:
        cfg = self.cfg
        return (f"zero-shot: {cfg.run.method} on {cfg.data.dataset}/{cfg.model.target}, "
                f"checkpoint {self.checkpoint_path} (run {self.checkpoint.config['run']['name']}, "
                f"round {self.checkpoint.server_round}); {cfg.data.num_heldout} held-out clients"
                + (f"; overrides {self.overrides}" if self.overrides else ""))


def _set(value: Any) -> bool:
    return value is not None and value != ""


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Round -> checkpoint file of one training run's folder."""
    found = {}
    for path in (run_dir / "checkpoints").glob("round_*.pt"):
        match = re.fullmatch(r"round_(\d+)\.pt", path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def find_checkpoint(checkpoint: str, run_name: str, server_round: int, output_dir: str) -> Path:
    """The checkpoint file named by a path, or by a run name (+ round) under ``output_dir``."""
    if _set(checkpoint) and _set(run_name):
        raise ZeroShotError("zero-shot: give checkpoint or run-name, not both")
    if _set(checkpoint):
        path = Path(str(checkpoint)).expanduser()
        return path if path.is_absolute() else resolve_output_root(".") / path
    if not _set(run_name):
        raise ZeroShotError(
            "zero-shot: no checkpoint given: set checkpoint=\"PATH\" or run-name=\"NAME\" "
            "(a training run under output-dir)")
    root = resolve_output_root(str(output_dir))
    run_dir = root / str(run_name)
    if not run_dir.is_dir():
        runs = sorted(p.name for p in root.glob("*") if (p / "checkpoints").is_dir()) \
            if root.is_dir() else []
        raise ZeroShotError(f"zero-shot: no run named {run_name!r} in {root} (runs there: "
                            f"{', '.join(runs) or 'none'})")
    rounds = list_checkpoints(run_dir)
    if not rounds:
        raise ZeroShotError(f"zero-shot: run {run_name!r} has no checkpoints in "
                            f"{run_dir / 'checkpoints'}")
    if not server_round:
        return rounds[max(rounds)]
    if server_round not in rounds:
        raise ZeroShotError(f"zero-shot: run {run_name!r} has no checkpoint of round "
                            f"{server_round} (rounds: {', '.join(map(str, rounds))})")
    return rounds[server_round]


def plan_zeroshot(run_config: Mapping[str, Any]) -> ZeroShotPlan:
    """Resolve the run config: checkpoint, Config with overrides, nodes to wait for."""
    allowed = set(overridable_keys())
    unknown = sorted(set(run_config) - set(OWN_KEYS) - allowed)
    if unknown:
        raise ZeroShotError(
            f"{unknown[0]}: not a zero-shot run-config key (keys: {', '.join(OWN_KEYS)}, and "
            f"data.* / eval.* / train.torch_threads / run.device overrides of the checkpoint's "
            f"config)")
    own = OWN_KEYS | {k: v for k, v in run_config.items() if k in OWN_KEYS}
    overrides = {k: v for k, v in run_config.items() if k in allowed and _set(v)}
    if _set(own["seed"]):
        overrides["run.seed"] = own["seed"]
    try:
        server_round = int(own["round"] or 0)
    except (TypeError, ValueError):
        raise ZeroShotError(f"round: expected an integer, got {own['round']!r}") from None
    path = find_checkpoint(own["checkpoint"], own["run-name"], server_round, own["output-dir"])
    try:
        checkpoint = load_checkpoint(path)
    except (OSError, ValueError) as err:
        raise ZeroShotError(str(err)) from None
    cfg = checkpoint_config(checkpoint.config, overrides)
    if cfg.data.num_heldout < 1:
        raise ZeroShotError("data.num_heldout: expected >= 1 held-out client to evaluate, got "
                            f"{cfg.data.num_heldout} (the checkpoint's config, {path}); set "
                            "-c data.num_heldout=N")
    name = str(own["name"]) if _set(own["name"]) else f"{cfg.run.name}-zeroshot"
    try:
        check_run_name(name, "name")
    except ConfigError as err:
        raise ZeroShotError(str(err)) from None
    out_cfg = dataclasses.replace(cfg, run=dataclasses.replace(
        cfg.run, name=name, output_dir=str(own["output-dir"]), resume=False))
    nodes = cfg.data.num_participants + cfg.data.num_heldout
    min_nodes = int(own["min-nodes"]) if _set(own["min-nodes"]) else nodes
    timeout_s = float(own["timeout-s"]) if _set(own["timeout-s"]) else cfg.server.timeout_s
    return ZeroShotPlan(path, checkpoint, cfg, out_cfg, overrides, min_nodes, timeout_s)


def check_data_fits(plan: ZeroShotPlan, input_shape: tuple[int, ...], num_classes: int) -> None:
    """The zero-shot data (the checkpoint's dataset, or its ``data.*`` overrides) against the
    checkpoint's model: another image shape or class count is one line here, as in export,
    instead of a traceback on every held-out node."""
    runtime = runtime_for(plan.cfg, tuple(input_shape), num_classes, device="cpu")
    try:
        runtime.check(plan.checkpoint.shared, f"checkpoint {plan.checkpoint_path}")
    except (ArrayMismatch, ValueError) as err:
        raise ZeroShotError(
            f"data.dataset: {plan.cfg.data.dataset!r} gives inputs of shape {list(input_shape)} "
            f"with {num_classes} classes, which the checkpoint's {plan.cfg.run.method}/"
            f"{plan.cfg.model.target} model does not fit ({err})") from None


def discover_heldout(grid: Grid, plan: ZeroShotPlan) -> dict[int, int]:
    """Held-out node id -> partition id, from a role query to every connected node."""
    content = RecordDict({CONFIG_RECORD: ConfigRecord(
        {NUM_PARTICIPANTS_KEY: plan.cfg.data.num_participants})})
    roles = discover_roles(grid, plan.min_nodes, plan.timeout_s, content, hint="set min-nodes")
    if not roles.heldout:
        raise ZeroShotError(
            f"zero-shot: none of the {len(roles.partition_of)} nodes is held out (simulation: more "
            f"than data.num_participants={plan.cfg.data.num_participants} supernodes; deployment: "
            f"--node-config 'held-out=true')")
    return {node: roles.partition_of[node] for node in roles.heldout}


def evaluate_heldout(grid: Grid, plan: ZeroShotPlan, heldout: Mapping[int, int]
                     ) -> list[dict[str, Any]]:
    """Send the frozen modules to the held-out nodes; their metric replies in partition order."""
    arrays = ArrayRecord(dict(plan.checkpoint.shared))
    config = ConfigRecord({"server-round": plan.checkpoint.server_round,
                           CONFIG_JSON_KEY: config_to_json(plan.cfg)})
    messages = [
        Message(RecordDict({"arrays": arrays, CONFIG_RECORD: config}), dst_node_id=node,
                message_type=ZEROSHOT_MESSAGE_TYPE, group_id="zeroshot")
        for node in heldout
    ]
    rows = []
    for reply in grid.send_and_receive(messages, timeout=plan.timeout_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("held-out node %s failed: %s", node, reply.error.reason)
            print(f"  node {node}: failed ({reply.error.reason.splitlines()[0][:200]})", flush=True)
            continue
        content = reply.content
        if content.array_records or len(content.metric_records) != 1:
            log.warning("dropped reply from node %s: expected one MetricRecord and no arrays", node)
            continue
        row = dict(next(iter(content.metric_records.values())))
        row["node-id"] = node
        rows.append(row)
    rows.sort(key=lambda r: r.get("partition-id", 0))
    return rows


def write_results(plan: ZeroShotPlan, rows: list[dict[str, Any]], summary: dict[str, float],
                  started: float) -> RunOutputs:
    outputs = RunOutputs(plan.out_cfg)
    if not any(outputs.checkpoint_dir.iterdir()):
        outputs.checkpoint_dir.rmdir()  # this app writes no checkpoints
    elapsed = time.monotonic() - started
    arrays_bytes = ArrayRecord(dict(plan.checkpoint.shared)).count_bytes()
    row = {"round": plan.checkpoint.server_round, "elapsed_s": elapsed, "round_time_s": elapsed,
           "bytes_sent": float(arrays_bytes * len(rows)),
           "bytes_sent_per_client": float(arrays_bytes), "bytes_received": 0.0, **summary}
    outputs.log_round(row, {"participants": [], "heldout": rows})
    columns = ["partition-id", "node-id", "num-examples", "accuracy", "loss",
               "embed_usage", "embed_entropy"]
    with (outputs.dir / "clients.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (outputs.dir / "zeroshot.json").write_text(json.dumps({
        "checkpoint": str(plan.checkpoint_path),
        "checkpoint_round": plan.checkpoint.server_round,
        "trained_run": plan.checkpoint.config["run"]["name"],
        "overrides": plan.overrides,
        "summary": summary,
        "clients": rows,
    }, indent=1, default=float))
    return outputs


def run_zeroshot(grid: Grid, context: Context) -> RunOutputs:
    """The zero-shot ServerApp's main: plan, roles, frozen evaluation, results."""
    started = time.monotonic()
    plan = plan_zeroshot(context.run_config)
    print(plan.describe(), flush=True)
    heldout = discover_heldout(grid, plan)
    print(f"roles: {len(heldout)} held-out nodes (partitions "
          f"{', '.join(map(str, heldout.values()))}); sending the frozen modules", flush=True)
    rows = evaluate_heldout(grid, plan, heldout)
    if not rows:
        raise ZeroShotError("zero-shot: no held-out node replied")
    for r in rows:
        usage = f" | usage {r['embed_usage']:.1f}" if "embed_usage" in r else ""
        print(f"  client {int(r['partition-id']):>3}: zACC {100 * r['accuracy']:6.2f} "
              f"({int(r['num-examples'])} samples){usage}", flush=True)
    summary = summarise_evaluation([], [{k: v for k, v in r.items() if k != "node-id"}
                                        for r in rows])
    outputs = write_results(plan, rows, summary, started)
    print(outputs.summary(), flush=True)
    return outputs

