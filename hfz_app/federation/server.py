"""The ServerApp's job: roles, strategy, per-round metrics and outputs. ``server_app.py`` calls
``run_server``."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid

from hfz_app.checkpoint import save_checkpoint
from hfz_app.config import Config, from_run_config
from hfz_app.data import build_federation
from hfz_app.federation.privacy import wrap_strategy
from hfz_app.federation.roles import discover_roles
from hfz_app.federation.strategy import HyperFedZeroStrategy
from hfz_app.methods import Method, get_method
from hfz_app.outputs import RunOutputs
from hfz_app.training import evaluate

log = logging.getLogger("hfz_app")


class RoundRecorder:
    """Flower's ``evaluate_fn``: after every round, gACC on the global test set, then one row of
    every metric to ``metrics.csv``/``metrics.json``, a checkpoint, and one progress line."""

    def __init__(
        self,
        cfg: Config,
        method: Method,
        strategy: HyperFedZeroStrategy,
        outputs: RunOutputs,
        global_test: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        self.cfg, self.method, self.strategy, self.outputs = cfg, method, strategy, outputs
        self.global_test = global_test
        self.start = self.last = time.monotonic()

    def global_accuracy(self, arrays: ArrayRecord) -> dict[str, float]:
        torch.manual_seed(self.cfg.run.seed)
        model = self.method.build_model()
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        model.eval()
        x, y = self.global_test
        result = evaluate(self.method.predictor(model, x, zeroshot=True), x, y)
        return {"gacc": result.accuracy, "gloss": result.loss}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        now = time.monotonic()
        row: dict[str, Any] = {"round": server_round, "elapsed_s": now - self.start,
                               "round_time_s": now - self.last}
        row |= self.strategy.round_stats.get(server_round, {})
        if server_round == 0 or self.strategy.is_eval_round(server_round):
            row |= self.global_accuracy(arrays)
        if server_round > 0:
            save_checkpoint(self.outputs.checkpoint_path(server_round), arrays,
                            self.cfg.to_dict(), server_round)
        self.outputs.log_round(row, self.strategy.client_metrics.get(server_round))
        print(progress_line(row, self.cfg), flush=True)
        self.last = time.monotonic()
        return MetricRecord({k: float(row[k]) for k in ("gacc", "gloss") if k in row})


def progress_line(row: dict[str, Any], cfg: Config) -> str:
    parts = [f"[round {row['round']:>3}/{cfg.run.rounds}]"]
    if "train_loss" in row:
        parts.append(f"loss {row['train_loss']:.3f}")
    for label, key in (("gACC", "gacc"), ("pACC", "pacc_weighted"), ("zACC", "zacc_weighted")):
        if key in row:
            parts.append(f"{label} {100 * row[key]:5.2f}")
    if "zacc_std" in row:
        parts[-1] += f" +- {100 * row['zacc_std']:.2f}"
    if "embed_usage_heldout" in row:
        parts.append(f"usage {row['embed_usage_heldout']:.1f}/{cfg.model.embed_dim or 'classes'}")
    if "epsilon" in row:
        parts.append(f"eps {row['epsilon']:.3g}")
    if row.get("n_dropped"):
        parts.append(f"dropped {int(row['n_dropped'])}")
    parts.append(f"{row['round_time_s']:.1f}s")
    return " | ".join(parts)


def run_server(grid: Grid, context: Context) -> RunOutputs:
    """Train with the configured method, evaluating pACC, zACC and gACC as configured."""
    cfg = from_run_config(context.run_config)
    federation = build_federation(cfg.data, cfg.run.seed)
    method = get_method(cfg.run.method)(cfg, federation.input_shape, federation.num_classes)
    torch.manual_seed(cfg.run.seed)
    model = method.build_model()
    shared_keys = method.shared_keys(model)
    state = model.state_dict()
    initial = ArrayRecord({k: state[k] for k in shared_keys})
    outputs = RunOutputs(cfg)
    print(f"hyperfedzero: {cfg.run.method} on {cfg.data.dataset}/{cfg.model.target}, "
          f"{cfg.data.num_participants} participants + {cfg.data.num_heldout} held out, "
          f"{cfg.run.rounds} rounds; shared {initial.count_bytes() / 1e6:.2f} MB; "
          f"results -> {outputs.dir}", flush=True)
    roles = discover_roles(
        grid, cfg.data.num_participants + cfg.data.num_heldout, cfg.server.timeout_s
    )
    strategy = method.strategy(shared_keys, roles)
    recorder = RoundRecorder(cfg, method, strategy, outputs, federation.global_test())
    wrap_strategy(strategy, cfg).start(  # Flower's DP wrapper if privacy.dp is set
        grid=grid, initial_arrays=initial, num_rounds=cfg.run.rounds,
        timeout=cfg.server.timeout_s, evaluate_fn=recorder,
    )
    outputs.plot()
    print(outputs.summary(), flush=True)
    return outputs
