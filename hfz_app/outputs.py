"""Results written as the run goes: ``outputs/<run-name>/``.

- ``config.yaml``: the resolved configuration;
- ``metrics.csv`` (one row per round, fixed columns) and ``metrics.json`` (rows plus per-client
  evaluation replies), rewritten after every round so a crash loses nothing already computed;
- ``checkpoints/round_NNNN.pt``: the shared arrays after every round (``hfz_app.checkpoint``);
  ``run.resume=true`` continues the latest ``<run-name>[-N]`` folder from its last checkpoint
  (:func:`find_resume_point`, :meth:`RunOutputs.restore`);
- at the end ``curves.png`` (zACC, gACC, pACC against rounds; embedding usage) and a summary.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from hfz_app.config import Config, ConfigError, flatten

COLUMNS = [
    "round", "elapsed_s", "round_time_s",
    "train_loss", "train_ce", "train_balance", "train_sharpness", "train_embed_usage",
    "gacc", "gloss",
    "pacc_weighted", "pacc_mean", "pacc_std", "pacc_p10", "pacc_p90",
    "zacc_weighted", "zacc_mean", "zacc_std", "zacc_p10", "zacc_p90", "gap",
    "embed_usage_participants", "embed_entropy_participants",
    "embed_usage_heldout", "embed_entropy_heldout", "embed_distance_heldout",
    "bytes_sent", "bytes_received", "bytes_sent_per_client", "bytes_received_per_client",
    "n_train_sent", "n_train_replies", "n_dropped", "n_eval_sent", "bytes_sent_eval", "epsilon",
]
# timings.csv: where each round's time went, in seconds (differs from run to run, so it is kept
# out of metrics.csv/.json). train_s / evaluate_s: the ServerApp from configuring a phase to its
# replies (Flower's messaging and the ClientApps' work); aggregate_train_s: the aggregation;
# record_s: gACC (gacc_s of it), checkpoint and these files after the round (outside
# round_time_s); client_*_s:
# the ClientApps' own seconds summed over the round's replies (data, local training, scoring);
# end_unix: the ServerApp's Unix time when the round's record was done (to line up other
# measurements, e.g. benchmarks/scale.py's memory samples, with rounds).
TIMING_COLUMNS = ["round", "round_time_s", "train_s", "aggregate_train_s", "evaluate_s",
                  "record_s", "gacc_s", "client_data_s", "client_train_s", "client_eval_s",
                  "end_unix"]
# Settings a resumed run may change: they do not alter what the finished rounds computed.
RESUME_MAY_CHANGE = ("run.resume", "run.rounds", "run.output_dir", "server.timeout_s",
                     "train.torch_threads")


def resolve_output_root(output_dir: str) -> Path:
    """Relative output dirs resolve against $HFZ_OUTPUT_ROOT if set, else the working directory.

    (A ServerApp's working directory is the SuperLink's, so the launcher sets HFZ_OUTPUT_ROOT.)
    """
    path = Path(output_dir).expanduser()
    if not path.is_absolute():
        path = Path(os.environ.get("HFZ_OUTPUT_ROOT", os.getcwd())) / path
    return path


def check_output_dir(output_dir: str, key: str = "run.output_dir") -> Path:
    """The output root, created if missing and proven writable (a probe file): a bad
    ``run.output_dir`` is one line before any Flower process starts, not a ServerApp traceback."""
    root = resolve_output_root(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{key}: cannot create {root} ({err.strerror or type(err).__name__}); "
                          "expected a writable directory") from None
    if not root.is_dir():
        raise ConfigError(f"{key}: {root} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: {root} is not writable ({err.strerror or type(err).__name__})"
                          ) from None
    return root


def confined(root: Path, directory: Path, key: str = "run.name") -> Path:
    """``directory``, refused unless it lies inside ``root`` once symlinks are resolved: a run
    folder that is a symlink elsewhere would otherwise receive (and overwrite) files there."""
    real_root, real = root.resolve(), directory.resolve()
    if not real.is_relative_to(real_root):
        raise ConfigError(f"{key}: {directory} resolves to {real}, outside the output folder "
                          f"{real_root} (a symlink?); expected a folder inside it")
    return directory


def run_directory(cfg: Config) -> Path:
    """The folder a run writes: ``<output_dir>/<run.name>`` or a new ``-2``, ``-3`` suffix (with
    ``run.resume``: the latest of them); refused if a symlink takes it outside ``output_dir``."""
    root = resolve_output_root(cfg.run.output_dir)
    directory = root / cfg.run.name
    if cfg.run.resume:
        directory = latest_run_dir(cfg) or directory
    else:
        suffix = 2
        while (directory / "metrics.csv").exists():
            directory = root / f"{cfg.run.name}-{suffix}"
            suffix += 1
    return confined(root, directory)


class RunOutputs:
    """One run's output folder; a new ``-2``, ``-3`` ... suffix rather than overwriting a run."""

    def __init__(self, cfg: Config, directory: Path | None = None) -> None:
        self.cfg = cfg
        fresh = directory is None  # else a resumed run's folder: its timings.csv goes on
        if directory is None:
            directory = run_directory(cfg)
        self.dir = directory
        self.checkpoint_dir = directory / "checkpoints"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.rows: list[dict[str, Any]] = []
        # Byte range [start, end) of the per-client replies inside the current metrics.json: the
        # next rewrite copies it from the file instead of holding every round's replies in
        # memory, which grew with rounds x clients (docs/benchmarks/scale.md).
        self._clients_span: tuple[int, int] | None = None
        if fresh or not self.timings_csv.exists():
            self.timings_csv.write_text(",".join(TIMING_COLUMNS) + "\n")

    @property
    def timings_csv(self) -> Path:
        return self.dir / "timings.csv"

    def log_timings(self, row: dict[str, Any]) -> None:
        """Append one round's timings (``TIMING_COLUMNS``) to ``timings.csv``."""
        with self.timings_csv.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=TIMING_COLUMNS, extrasaction="ignore").writerow(
                {k: _csv_value(row.get(k)) for k in TIMING_COLUMNS})

    @property
    def metrics_csv(self) -> Path:
        return self.dir / "metrics.csv"

    @property
    def metrics_json(self) -> Path:
        return self.dir / "metrics.json"

    def log_round(self, row: dict[str, Any], clients: Any = None) -> None:
        """Add one round: its row to ``metrics.csv`` and ``metrics.json``, its per-client
        replies (if any) to ``metrics.json``'s ``clients``; both files are replaced whole."""
        self.rows.append(row)
        tmp = self.metrics_csv.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})
        tmp.replace(self.metrics_csv)
        self._write_metrics_json({} if clients is None else {int(row["round"]): clients},
                                 keep_previous=True)

    def _write_metrics_json(self, clients: dict[int, Any], keep_previous: bool) -> None:
        """``metrics.json`` = the rows, then ``clients``: one line per round. The earlier rounds'
        lines are copied from the previous file (``keep_previous``), so memory stays that of
        one round however many rounds ran."""
        head = json.dumps({"run": self.cfg.run.name, "columns": COLUMNS, "rounds": self.rows},
                          indent=1, default=float)
        new = [f'\n  "{r}": {json.dumps(c, default=float)}'.encode() for r, c in clients.items()]
        span = self._clients_span if keep_previous and self.metrics_json.exists() else None
        tmp = self.dir / "metrics.json.tmp"
        with tmp.open("wb") as out:
            out.write(f'{head[:-2]},\n "clients": {{'.encode())
            start = out.tell()
            copied = span is not None and span[1] > span[0]
            if copied:
                with self.metrics_json.open("rb") as previous:
                    previous.seek(span[0])
                    _copy_bytes(previous, out, span[1] - span[0])
            if new:
                out.write((b"," if copied else b"") + b",".join(new))
            self._clients_span = (start, out.tell())
            out.write(b"\n }\n}\n")
        tmp.replace(self.metrics_json)

    def checkpoint_path(self, server_round: int) -> Path:
        return self.checkpoint_dir / f"round_{server_round:04d}.pt"

    def restore(self, upto_round: int) -> None:
        """A resumed run: the rows and per-client replies of rounds 0..``upto_round`` from
        ``metrics.json`` (full precision), so that the files continue as if never interrupted."""
        payload = json.loads(self.metrics_json.read_text())
        self.rows = [row for row in payload["rounds"] if int(row["round"]) <= upto_round]
        self._write_metrics_json({int(r): c for r, c in payload.get("clients", {}).items()
                                  if int(r) <= upto_round}, keep_previous=False)

    def plot(self) -> list[Path]:
        """Accuracy curves and embedding usage against rounds (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_acc, ax_emb, ax_sep) = plt.subplots(1, 3, figsize=(16, 4))
        for key, label in (("zacc_weighted", "zACC (held-out)"), ("gacc", "gACC (global test)"),
                           ("pacc_weighted", "pACC (participants)")):
            points = [(r["round"], r[key]) for r in self.rows if _present(r.get(key))]
            if points:
                ax_acc.plot(*zip(*points), marker="o", ms=3, label=label)
        ax_acc.set(xlabel="round", ylabel="accuracy", title=self.cfg.run.name)
        ax_acc.grid(alpha=0.3)
        ax_acc.legend()
        for key, label in (("embed_usage_participants", "participants"),
                           ("embed_usage_heldout", "held-out")):
            points = [(r["round"], r[key]) for r in self.rows if _present(r.get(key))]
            if points:
                ax_emb.plot(*zip(*points), marker="o", ms=3, label=label)
        ax_emb.set(xlabel="round", ylabel="exp(H(mean e))",
                   title=f"embedding usage (of {self.cfg.model.embed_dim or 'one per class'} dims)")
        ax_emb.grid(alpha=0.3)
        if ax_emb.lines:
            ax_emb.legend()
        # collapse diagnostics: sharp per-sample embeddings, and held-out clients landing apart
        for key, label in (("embed_entropy_participants", "mean H(e), participants"),
                           ("embed_entropy_heldout", "mean H(e), held-out"),
                           ("embed_distance_heldout",
                            "distance between held-out clients' mean e")):
            points = [(r["round"], r[key]) for r in self.rows if _present(r.get(key))]
            if points:
                ax_sep.plot(*zip(*points), marker="o", ms=3, label=label)
        ax_sep.set(xlabel="round", title="collapse diagnostics (docs/DESIGN.md)")
        ax_sep.grid(alpha=0.3)
        if ax_sep.lines:
            ax_sep.legend(fontsize=8)
        fig.tight_layout()
        path = self.dir / "curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return [path]

    def summary(self) -> str:
        """The last evaluated round as a small table."""
        evaluated = [r for r in self.rows if _present(r.get("zacc_weighted"))
                     or _present(r.get("pacc_weighted"))]
        last = evaluated[-1] if evaluated else (self.rows[-1] if self.rows else {})
        lines = [(f"run {self.cfg.run.name} ({self.cfg.run.method}, {self.cfg.data.dataset}/"
                  f"{self.cfg.model.target}), round {last.get('round', '-')}:")]
        for label, key, spread in (
            ("zACC held-out (weighted)", "zacc_weighted", "zacc_std"),
            ("zACC mean over clients", "zacc_mean", None),
            ("zACC 10th / 90th pct", "zacc_p10", "zacc_p90"),
            ("gACC global test", "gacc", None),
            ("pACC participants", "pacc_weighted", "pacc_std"),
            ("gap pACC - zACC", "gap", None),
        ):
            value = last.get(key)
            if not _present(value):
                continue
            text = f"{100 * value:6.2f}"
            if spread and _present(last.get(spread)):
                sep = " / " if key.endswith("p10") else " +- "
                text += f"{sep}{100 * last[spread]:.2f}"
            lines.append(f"  {label:<26} {text}")
        if _present(last.get("epsilon")):
            lines.append(f"  {'epsilon (delta ' + f'{self.cfg.privacy.delta:g})':<26} "
                         f"{last['epsilon']:6.3g}")
        if _present(last.get("elapsed_s")):
            lines.append(f"  {'wall time':<26} {last['elapsed_s']:6.1f} s")
        lines.append(f"  results in {self.dir}")
        return "\n".join(lines)


def latest_run_dir(cfg: Config) -> Path | None:
    """The newest of ``<run-name>``, ``<run-name>-2``, ... that holds a ``metrics.csv``."""
    root = resolve_output_root(cfg.run.output_dir)
    latest, directory, suffix = None, root / cfg.run.name, 2
    while (directory / "metrics.csv").exists():
        latest, directory = directory, root / f"{cfg.run.name}-{suffix}"
        suffix += 1
    return confined(root, latest) if latest is not None else None


def find_resume_point(cfg: Config) -> tuple[Path, int]:
    """The folder and round a ``run.resume=true`` run continues from: the latest run folder's last
    round with both a checkpoint and a metrics row. Anything missing or inconsistent is a one-line
    :class:`ConfigError`."""
    from hfz_app.checkpoint import load_checkpoint

    directory = latest_run_dir(cfg)
    if directory is None:
        root = resolve_output_root(cfg.run.output_dir)
        raise ConfigError(f"run.resume: expected an earlier run in {root / cfg.run.name} "
                          f"(metrics.csv), found none")
    try:
        logged = {int(r["round"]) for r in json.loads((directory / "metrics.json").read_text())
                  ["rounds"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"run.resume: {directory / 'metrics.json'} is unreadable "
                          f"({type(err).__name__})") from None
    saved = sorted((int(p.stem.removeprefix("round_")) for p in
                    (directory / "checkpoints").glob("round_[0-9][0-9][0-9][0-9].pt")),
                   reverse=True)
    last = next((r for r in saved if r in logged), None)
    if last is None:
        raise ConfigError(f"run.resume: expected a checkpoint of a logged round in "
                          f"{directory / 'checkpoints'}, found none")
    ckpt = load_checkpoint(directory / "checkpoints" / f"round_{last:04d}.pt")
    if last > cfg.run.rounds:
        raise ConfigError(f"run.rounds: expected >= {last} (the round {directory} stopped at) "
                          f"to resume, got {cfg.run.rounds}")
    saved_cfg, now = flatten(ckpt.config), cfg.flat()
    for key in sorted(now):
        if key not in RESUME_MAY_CHANGE and key in saved_cfg and saved_cfg[key] != now[key]:
            raise ConfigError(f"{key}: expected {saved_cfg[key]!r} as in the run being resumed "
                              f"({directory}), got {now[key]!r}")
    return directory, last


def _copy_bytes(src: Any, dst: Any, count: int, chunk: int = 1 << 20) -> None:
    """Copy ``count`` bytes from ``src``'s position to ``dst``, ``chunk`` at a time."""
    while count > 0:
        data = src.read(min(chunk, count))
        if not data:
            raise OSError(f"{src.name}: ended {count} bytes early")
        dst.write(data)
        count -= len(data)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _csv_value(value: Any) -> Any:
    if not _present(value):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
