"""The ServerApp's job: roles, strategy, per-round metrics and outputs. ``server_app.py`` calls
``run_server``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hfz_app.arrays import ArrayMismatch
from hfz_app.checkpoint import load_checkpoint, save_checkpoint
from hfz_app.config import Config, ConfigError, from_run_config
from hfz_app.federation.job import Job, job_for
from hfz_app.federation.privacy import wrap_strategy
from hfz_app.federation.roles import discover_roles
from hfz_app.federation.strategy import SharedKeys
from hfz_app.outputs import RunOutputs, find_resume_point

log = logging.getLogger("hfz_app")


class NoProgress(RuntimeError):
    """``server.max_failed_rounds`` consecutive rounds without a train reply to average: the
    model stopped changing, so the run stops (one line) instead of reporting success."""


class RoundRecorder:
    """Flower's ``evaluate_fn``: after every round, gACC on the global test set, then one row of
    every metric to ``metrics.csv``/``metrics.json``, a checkpoint, and one progress line."""

    def __init__(self, job: Job, strategy: SharedKeys, outputs: RunOutputs) -> None:
        self.cfg, self.runtime, self.strategy, self.outputs = job.cfg, job.runtime, strategy, outputs
        self.global_test = job.federation.global_test()
        self.num_classes = job.federation.num_classes
        self.start = self.last = time.monotonic()
        self.failed_rounds: list[int] = []  # the current streak of rounds without a valid reply

    def global_accuracy(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        """gACC: the shared model a new client would get, on the global test set."""
        model = self.runtime.frozen(arrays, f"global arrays of round {server_round}")
        x, y = self.global_test
        metrics = self.runtime.evaluate(model, x, y, zeroshot=True, diagnostics=False)
        return {"gacc": metrics["accuracy"], "gloss": metrics["loss"]}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        now = time.monotonic()
        row: dict[str, Any] = {"round": server_round, "elapsed_s": now - self.start,
                               "round_time_s": now - self.last}
        row |= self.strategy.round_stats.get(server_round, {})
        gacc_s = 0.0
        if server_round == 0 or self.strategy.is_eval_round(server_round):
            row |= self.global_accuracy(server_round, arrays)
            gacc_s = time.monotonic() - now
        if server_round > 0:
            sent, got = row.get("n_train_sent"), row.get("n_train_replies", 0)
            missing = (sent or 0) - got - row.get("n_dropped", 0)
            if missing > 0:  # a node lost mid-round: its reply never came (no error reply either)
                log.warning("round %d: %d of %d train replies missing; aggregated the %d that "
                            "arrived", server_round, missing, sent, got)
            save_checkpoint(self.outputs.checkpoint_path(server_round), arrays,
                            self.cfg.to_dict(), server_round, server_state(self.strategy))
        # popped: a round's replies and timings are written once, not kept for the whole run
        self.outputs.log_round(row, self.strategy.client_metrics.pop(server_round, None))
        print(progress_line(row, self.cfg, self.num_classes), flush=True)
        self.last = time.monotonic()
        self.outputs.log_timings({"round": server_round, "round_time_s": row["round_time_s"],
                                  "record_s": self.last - now, "gacc_s": gacc_s,
                                  **self.strategy.round_timings.pop(server_round, {}),
                                  "end_unix": f"{time.time():.3f}"})
        if server_round > 0:
            self.check_progress(server_round, row)
        return MetricRecord({k: float(row[k]) for k in ("gacc", "gloss") if k in row})


    def check_progress(self, server_round: int, row: dict[str, Any]) -> None:
        """Raise :class:`NoProgress` after ``server.max_failed_rounds`` rounds in a row whose
        train replies all failed, went missing or were dropped (e.g. non-finite with
        ``train.lr=inf``); the rounds so far stay logged and checkpointed."""
        if row.get("n_train_replies"):
            self.failed_rounds = []
            return
        self.failed_rounds.append(server_round)
        limit = self.cfg.server.max_failed_rounds
        if len(self.failed_rounds) >= limit:
            dropped = sum(int(self.strategy.round_stats.get(r, {}).get("n_dropped", 0))
                          for r in self.failed_rounds)
            raise NoProgress(
                f"server.max_failed_rounds: {limit} rounds in a row "
                f"({self.failed_rounds[0]}-{server_round}) without a train reply that could be "
                f"averaged ({dropped} dropped as non-finite or mismatched, the others failed or "
                f"lost; see the log above), so the model stopped changing; stopped. Rounds so far "
                f"are in {self.outputs.dir}")


def progress_line(row: dict[str, Any], cfg: Config, num_classes: int = 0) -> str:
    parts = [f"[round {row['round']:>3}/{cfg.run.rounds}]"]
    if "train_loss" in row:
        parts.append(f"loss {row['train_loss']:.3f}")
    for label, key in (("gACC", "gacc"), ("pACC", "pacc_weighted"), ("zACC", "zacc_weighted")):
        if key in row:
            parts.append(f"{label} {100 * row[key]:5.2f}")
    if "zacc_std" in row:
        parts[-1] += f" +- {100 * row['zacc_std']:.2f}"
    if "embed_usage_heldout" in row:
        dims = cfg.model.embed_dim or num_classes  # 0: one dimension per class
        parts.append(f"usage {row['embed_usage_heldout']:.1f}/{dims}")
    if "epsilon" in row:
        parts.append(f"eps {row['epsilon']:.3g}")
    if row.get("n_dropped"):
        parts.append(f"dropped {int(row['n_dropped'])}")
    parts.append(f"{row['round_time_s']:.1f}s")
    elapsed, done = float(row.get("elapsed_s") or 0.0), int(row["round"])
    if done > 0:  # the rounds so far predict the rest (round 0 is only the initial evaluation)
        left = elapsed / done * (cfg.run.rounds - done)
        parts.append(f"{clock(elapsed)} elapsed, ~{clock(left)} left")
    return " | ".join(parts)


def clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def server_state(strategy: SharedKeys) -> dict[str, Any]:
    """What a restarted ServerApp needs beyond the arrays: the server optimiser's state, if any."""
    return {name: {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
            for name, arrays in strategy.server_state().items()}


def restore_server_state(strategy: SharedKeys, state: dict[str, Any]) -> None:
    strategy.load_server_state({name: {k: v.numpy() for k, v in arrays.items()}
                                for name, arrays in state.items()})


class ResumedRounds(Strategy):
    """Runs rounds ``offset + 1 .. offset + num_rounds`` of ``inner`` through Flower's own
    ``Strategy.start`` loop, which always counts from 1: every round number the loop hands over
    (configure/aggregate, hence the ``server-round`` the nodes seed from) is shifted by
    ``offset``. The loop's evaluation of the initial arrays (round 0) is skipped: the resumed run
    already logged it."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.inner.summary()

    def shifted(self, evaluate_fn):
        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            return evaluate_fn(server_round + self.offset, arrays) if server_round else None
        return evaluate


def run_server(grid: Grid, context: Context) -> RunOutputs:
    """Train with the configured method, evaluating pACC, zACC and gACC as configured.

    ``run.resume=true``: continue the latest ``outputs/<run.name>[-N]`` from its last checkpoint
    (shared arrays, server momentum, metrics rows) to ``run.rounds``; see docs/RELIABILITY.md."""
    job = job_for(from_run_config(context.run_config))
    cfg, runtime = job.cfg, job.runtime
    resume_dir, done = find_resume_point(cfg) if cfg.run.resume else (None, 0)
    initial = runtime.initial_arrays()
    outputs = RunOutputs(cfg, resume_dir)
    if done:
        path = outputs.checkpoint_path(done)
        ckpt = load_checkpoint(path)
        try:
            runtime.check(ckpt.shared, f"checkpoint {path}")
        except ArrayMismatch as err:
            raise ConfigError(f"{err} ({cfg.run.method}/{cfg.model.target})") from None
        initial = ArrayRecord({k: ckpt.shared[k] for k in runtime.shared_keys()})
        outputs.restore(done)
        print(f"resuming {outputs.dir} after round {done} of {cfg.run.rounds}", flush=True)
    print(f"hyperfedzero: {cfg.run.method} on {cfg.data.dataset}/{cfg.model.target}, "
          f"{cfg.data.num_participants} participants + {cfg.data.num_heldout} held out, "
          f"{cfg.run.rounds} rounds; shared {initial.count_bytes() / 1e6:.2f} MB; "
          f"results -> {outputs.dir}", flush=True)
    if cfg.model.bn_stats == "local" and runtime.batchnorm_keys():
        heldout = ("their own, re-estimated from their inputs (eval.heldout_adapt=adabn)"
                   if "adabn" in cfg.eval.heldout_adapt else "the initial ones too")
        print(f"BatchNorm statistics stay on each participant (model.bn_stats=local): gACC uses "
              f"the initial statistics; held-out clients use {heldout}", flush=True)
    roles = discover_roles(
        grid, cfg.data.num_participants + cfg.data.num_heldout, cfg.server.timeout_s
    )
    if not roles.participants:
        raise RuntimeError("no participating node answered the role query")
    strategy = job.method.strategy(runtime.shared_keys(), roles)
    recorder = RoundRecorder(job, strategy, outputs)
    wrapped = wrap_strategy(strategy, cfg)  # Flower's DP wrapper if privacy.dp is set
    evaluate_fn = recorder
    if done:
        restore_server_state(strategy, ckpt.server_state)
        released = sum(1 for r in outputs.rows if r["round"] and r.get("n_train_replies"))
        if getattr(wrapped, "ledger", None) is not None and released:  # DP: releases so far
            wrapped.ledger.compose(wrapped.event, released)
        recorder.start -= float(outputs.rows[-1].get("elapsed_s") or 0.0)
        wrapped = ResumedRounds(wrapped, done)
        evaluate_fn = wrapped.shifted(recorder)
    wrapped.start(
        grid=grid, initial_arrays=initial, num_rounds=cfg.run.rounds - done,
        timeout=cfg.server.timeout_s, evaluate_fn=evaluate_fn,
    )
    outputs.plot()
    print(outputs.summary(), flush=True)
    return outputs
