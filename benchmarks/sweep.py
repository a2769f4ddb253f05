"""Benchmark sweeps through `flwr run`: method x preset x seed (x variants), one JSONL line per run.

    python -m benchmarks.sweep --sweep mnist --seeds 0,1,2     # -> benchmarks/results/mnist.jsonl
    python -m benchmarks.sweep --sweep scale --seeds 0 --rounds 10 --resume
    python -m benchmarks.sweep --sweep mnist --dry-run          # print the commands only
    python -m benchmarks.report                                 # docs/RESULTS.md from the JSONL

Every run is ``python -m hfz_app.launch --preset P -c run.method=M -c run.seed=S ...`` as a
subprocess (benchmarks.harness's ``flwr`` mode): the path a user takes (`make run`), with its own
SuperLink and simulated SuperNodes.
Each finished run's last evaluated metrics row (zACC, its spread across held-out clients, gACC,
pACC, bytes per client) and the launch's wall time are appended to the results file at once, so an
interrupted sweep keeps what it measured; ``--resume`` skips the cells the file already holds
(same sweep, cell, preset, seed, rounds and overrides). A cell whose data source is unavailable
(the online datasets without internet: launch exits with ``hfz_app.data``'s one-line
``DataSourceError``) is recorded as ``skipped`` with that line, and the sweep goes on.

Sweeps are the named tables in ``SWEEPS`` below; ``--variant NAME=k=v,k=v`` runs every cell once
more per variant with those overrides, ``-c k=v`` sets a key in every run.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    ROOT,
    git_commit,
    launch_command,
    machine,
    parse_variants,
    run_training,
)
from hfz_app.api import recipe_options
from hfz_app.config import CONF_DIR, parse_overrides

RESULTS_DIR = ROOT / "benchmarks" / "results"  # default: <sweep>[+<sweep>...].jsonl here
DEFAULT_RUNS = ROOT / "outputs" / "sweeps"
# Keys the sweep sets per run that say where and how fast, not what is computed: not part of a
# cell's identity (a rerun with another output folder or thread count is the same cell).
NOT_IDENTITY = ("run.name", "run.output_dir", "train.torch_threads")
METRIC_KEYS = ("zacc_weighted", "zacc_mean", "zacc_std", "zacc_p10", "zacc_p90", "gacc",
               "pacc_weighted", "pacc_std", "gap", "bytes_sent_per_client",
               "bytes_received_per_client", "elapsed_s", "embed_usage_heldout")


@dataclass(frozen=True)
class Cell:
    """One row of a sweep's table: a method on a preset with overrides (seeds multiply it)."""

    id: str  # short, unique within the sweep: run names, --only-cells
    label: str  # the table's row label
    method: str
    preset: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    x: float | None = None  # the plotted x value (e.g. the held-out clients' Dirichlet alpha)
    series: str = ""  # the plotted line it belongs to (default: the label)
    reference: bool = False  # not zero-shot (the labelled fine-tuning reference)


@dataclass(frozen=True)
class Sweep:
    title: str
    about: str
    rounds: int
    cells: tuple[Cell, ...]
    x_label: str = ""  # set: report.py plots zACC against Cell.x, one line per Cell.series


HFZ = "hyperfedzero"
# Server momentum 0.5 (FedAvgM) is the presets' value (conf/hyperfedzero_recipe.yaml) and the
# FedAvg-family baselines' best server setting (docs/RECIPE_table.md); every cell states it, so a
# row means the same whatever a preset holds later.
M05 = {"server.server_momentum": 0.5}
UNIFORM = {"model.embedding": "uniform"}
EM_PRIOR = {"eval.heldout_adapt": "em_prior"}  # label-free test-time prior correction


def fedavg_em(preset: str) -> Cell:
    """FedAvg whose held-out clients correct the global model to their own label prior by EM on
    their unlabelled inputs (the same training as the FedAvg row: only zACC differs)."""
    return Cell("fedavg-em", "FedAvg + EM prior", "fedavg", preset, M05 | EM_PRIOR)
BASELINES = ("fedavg", "fedprox", "ditto", "pfedme", "fedjets")
# The rest of the paper's comparison set (issue 22), also in the `fashion` table.
PAPER_BASELINES = ("scaffold", "fedamp", "pefll")


def three(preset: str, extra: Mapping[str, Any] | None = None, prefix: str = "",
          x: float | None = None) -> tuple[Cell, ...]:
    """FedAvg, HyperFedZero and its no-conditioning control (``e`` uniform) on one setting."""
    extra = dict(extra or {})
    tag = f"{prefix}-" if prefix else ""
    name = f"{prefix}: " if prefix else ""
    return (
        Cell(f"{tag}fedavg", f"{name}FedAvg", "fedavg", preset, M05 | extra, x, "FedAvg"),
        Cell(f"{tag}hyperfedzero", f"{name}HyperFedZero", HFZ, preset, M05 | extra, x,
             "HyperFedZero"),
        Cell(f"{tag}control", f"{name}HyperFedZero, `e` uniform (control)", HFZ, preset,
             M05 | UNIFORM | extra, x, "control (`e` uniform)"),
    )


def ablation_cells() -> tuple[Cell, ...]:
    """HyperFedZero on the recipe preset, each ``conf/ablation_*.yaml`` and the control preset
    (found on disk, so a new ablation preset joins the sweep)."""
    presets = ["mnist_mlp", *sorted(p.stem for p in CONF_DIR.glob("ablation_*.yaml")),
               "control_uniform_embedding"]
    return tuple(Cell(p, "recipe (`mnist_mlp`)" if p == "mnist_mlp" else f"`{p}`", HFZ, p, M05)
                 for p in presets)


# HyperFedZero as the paper describes it: per-sample weights from an unanchored NoisyEmbed with the
# balancing penalty, every layer generated (hfz_app/config.py's defaults), undoing the recipe keys
# the dataset presets set (conf/hyperfedzero_recipe.yaml).
PAPER_HFZ = {"model.anchor": "none", "model.embed_dim": 16, "model.granularity": "sample",
             "model.generate": "all", "model.hyper_input": "prob", "model.alpha": 0.01,
             "train.hyper_output_lr_scale": 0.01, "train.prior_alpha": 0.0}


# The presets' recipe (conf/hyperfedzero_recipe.yaml) as overrides, for presets whose own default
# is another setting (style_mnist_lenet: the one that won on the participants' pACC there).
RECIPE_HFZ = {f"{section}.{key}": value for section in ("model", "train")
              for key, value in recipe_options(section).items()}


def style_cells(preset: str) -> tuple[Cell, ...]:
    """The zero-shot comparison on the style-shift data: baselines, label-free test-time
    adaptation, HyperFedZero as in the paper and as the recipe, each with its control."""
    base = M05
    return (
        Cell("fedavg", "FedAvg", "fedavg", preset, base),
        fedavg_em(preset),
        Cell("ditto", "Ditto (shared model)", "ditto", preset, base),
        Cell("pfedme", "pFedMe (shared model)", "pfedme", preset, base),
        Cell("fedjets", "FedJets", "fedjets", preset, base),
        Cell("hfz-paper", "HyperFedZero as in the paper (per-sample, unanchored; the preset's)", HFZ, preset,
             base | PAPER_HFZ),
        Cell("hfz-paper-control", "HyperFedZero as in the paper, `e` uniform (control)", HFZ,
             preset, base | PAPER_HFZ | UNIFORM),
        Cell("hyperfedzero", "HyperFedZero recipe (label-anchored, pooled)", HFZ, preset,
             base | RECIPE_HFZ),
        Cell("control", "HyperFedZero recipe, `e` uniform (control)", HFZ, preset,
             base | RECIPE_HFZ | UNIFORM),
        Cell("hyperfedzero-em", "HyperFedZero recipe + EM prior", HFZ, preset,
             base | RECIPE_HFZ | EM_PRIOR),
        Cell("finetune", "*finetune (labelled reference)*", "finetune", preset, base,
             reference=True),
    )


HELDOUT_ALPHAS = (0.1, 0.3, 1.0, 10.0)
ONLINE_PRESETS = ("emnist_mlp", "svhn_lenet", "cifar10_zenkenet", "cifar100_resnet",
                  "tiny_imagenet_resnet")
SCALE = {"data.num_participants": 100, "data.num_heldout": 15}

SWEEPS: dict[str, Sweep] = {
    "mnist": Sweep(
        "MNIST / MLP, 10 participants + 5 held out, Dirichlet 0.3",
        "Every method through the app on preset `mnist_mlp`, server momentum 0.5 for all. "
        "`finetune` is the labelled reference (20 SGD steps on 20 % of each held-out client), "
        "not zero-shot.",
        20,
        tuple(Cell(m, m, m, "mnist_mlp", M05) for m in BASELINES + PAPER_BASELINES)
        + (Cell("hyperfedzero", "hyperfedzero", HFZ, "mnist_mlp", M05),
           Cell("control", "hyperfedzero, `e` uniform (control)", HFZ, "mnist_mlp", M05 | UNIFORM),
           Cell("finetune", "*finetune (labelled reference)*", "finetune", "mnist_mlp", M05,
                reference=True),
           fedavg_em("mnist_mlp")),
    ),
    "fashion": Sweep(
        "Fashion-MNIST / LeNet-S, 10 + 5, Dirichlet 0.3",
        "Preset `fashion_mnist_lenet_s` (Debian's dataset-fashion-mnist).", 20,
        three("fashion_mnist_lenet_s") + (fedavg_em("fashion_mnist_lenet_s"),)
        + tuple(Cell(m, m, m, "fashion_mnist_lenet_s", M05) for m in PAPER_BASELINES),
    ),
    "digits": Sweep(
        "8x8 digits / MLP, 10 + 5, Dirichlet 0.3",
        "Preset `digits_mlp` (scikit-learn's digits: 1,437 train images, about 65 per "
        "participant; batch 32).", 30,
        three("digits_mlp"),
    ),
    "ablations": Sweep(
        "HyperFedZero ablations on MNIST / MLP",
        "HyperFedZero on each ablation preset, each one key away from `mnist_mlp` "
        "(`conf/ablation_*.yaml`), and the no-conditioning control preset.", 20,
        ablation_cells(),
    ),
    "scale": Sweep(
        "MNIST / MLP, 100 participants + 15 held out",
        "`data.num_participants=100 data.num_heldout=15` on `mnist_mlp`; every participant trains "
        "every round (same data per round as 10 clients, in smaller shards).", 10,
        three("mnist_mlp", SCALE),
    ),
    "shift": Sweep(
        "MNIST / MLP with per-client feature shift",
        "`data.shift.enabled=true` on `mnist_mlp` (rotation, brightness, contrast, blur, noise "
        "drawn per client).", 20,
        three("mnist_mlp", {"data.shift.enabled": True}),
    ),
    "heldout_alpha": Sweep(
        "MNIST / MLP, held-out clients' label skew",
        "`data.alpha_dir_heldout` (the held-out clients' Dirichlet alpha; participants keep 0.3) "
        "on `mnist_mlp`. Small alpha: few classes per held-out client. The participants' data "
        "do not depend on it, so `benchmarks/heldout_alpha.py` fills this table from the `mnist` "
        "sweep's checkpoints with the zero-shot app's frozen evaluation, instead of training "
        "each cell again (this sweep's own cells do the same by retraining).", 20,
        tuple(c for a in HELDOUT_ALPHAS
              for c in three("mnist_mlp", {"data.alpha_dir_heldout": a}, f"a{a:g}", x=a)),
        x_label="held-out clients' Dirichlet alpha",
    ),
    "style": Sweep(
        "MNIST-M-like style shift / LeNet, 10 + 5, label and style Dirichlet 0.3",
        "Preset `style_mnist_lenet`: every client's digits blended into crops of photographs "
        "from 4 style sources, its style mix and its labels each drawn from Dirichlet(0.3) "
        "(docs/DATA.md). Server momentum 0.5 for all; LeNet has no BatchNorm, so AdaBN does not "
        "apply. `finetune` is the labelled reference, not zero-shot.", 15,
        style_cells("style_mnist_lenet"),
    ),
    "online": Sweep(
        "The paper's online datasets",
        "Presets that need internet (the Hugging Face hub through `datasets`); offline each cell "
        "is recorded as skipped with the data source's message.", 0,
        tuple(c for p in ONLINE_PRESETS for c in three(p, prefix=p)),
    ),
}


# -- planning -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One run: a cell under a variant for one seed."""

    sweep: str
    cell: Cell
    seed: int
    rounds: int  # 0: the preset's own
    variant: str = ""
    variant_overrides: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # -c for every run

    def overrides(self) -> dict[str, Any]:
        """What the run computes: method, seed, rounds, the cell's, the variant's, then -c keys."""
        out: dict[str, Any] = {"run.method": self.cell.method, "run.seed": self.seed}
        if self.rounds:
            out["run.rounds"] = self.rounds
        return out | dict(self.cell.overrides) | dict(self.variant_overrides) | dict(self.extra)

    def identity(self) -> dict[str, Any]:
        overrides = {k: v for k, v in self.overrides().items() if k not in NOT_IDENTITY}
        return {"sweep": self.sweep, "cell": self.cell.id, "variant": self.variant,
                "preset": self.cell.preset, "overrides": dict(sorted(overrides.items()))}

    @property
    def key(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """The run's folder name: unique per cell, variant, seed and rounds."""
        parts = [self.sweep, self.variant, self.cell.id, f"s{self.seed}",
                 f"r{self.rounds}" if self.rounds else ""]
        return "--".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", p) for p in parts if p)


def plan(sweeps: Iterable[str], seeds: Iterable[int], rounds: int | None = None,
         variants: Mapping[str, Mapping[str, Any]] | None = None,
         extra: Mapping[str, Any] | None = None, only_methods: Iterable[str] | None = None,
         only_cells: Iterable[str] | None = None) -> list[Job]:
    """Every run of the sweeps, cell-major then seed (a cell's seeds run back to back)."""
    variants = variants or {"": {}}
    methods = set(only_methods) if only_methods else None
    patterns = list(only_cells or [])
    jobs = []
    for name in sweeps:
        if name not in SWEEPS:
            raise SystemExit(f"error: --sweep: unknown sweep {name!r} (known: {', '.join(SWEEPS)})")
        sweep = SWEEPS[name]
        for variant, variant_overrides in variants.items():
            for cell in sweep.cells:
                if methods is not None and cell.method not in methods:
                    continue
                if patterns and not any(fnmatch.fnmatch(cell.id, p) for p in patterns):
                    continue
                for seed in seeds:
                    jobs.append(Job(name, cell, seed, sweep.rounds if rounds is None else rounds,
                                    variant, dict(variant_overrides), dict(extra or {})))
    return jobs


def command(job: Job, runs_dir: Path, torch_threads: int = 1,
            launch_args: Iterable[str] = ()) -> list[str]:
    """The launch command of one run (`python -m hfz_app.launch ...`), as a user would type it."""
    return launch_command(job.cell.preset, settings(job, runs_dir, torch_threads), launch_args)


def settings(job: Job, runs_dir: Path, torch_threads: int = 1) -> dict[str, Any]:
    """The run's overrides, then where it writes and its thread count."""
    return job.overrides() | {"run.name": job.name, "run.output_dir": str(runs_dir),
                              "train.torch_threads": torch_threads}


def display(cmd: list[str]) -> str:
    """``cmd`` as a shell line to copy: ``python`` for this interpreter, paths under the repo
    relative to it (the command runs from the repository root)."""
    parts = ["python" if part == sys.executable else part for part in cmd]
    return shlex.join(parts).replace(str(ROOT) + "/", "")


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results file; a torn last line (a killed sweep) is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def done_keys(records: Iterable[Mapping[str, Any]], retry_skipped: bool = False) -> set[str]:
    """Keys ``--resume`` skips: runs that finished (and skipped cells, unless retried). A failed
    run is always run again; the last record of a key wins."""
    latest = {r["key"]: r for r in records if "key" in r}
    ok = {"ok"} if retry_skipped else {"ok", "skipped"}
    return {k for k, r in latest.items() if r.get("status") in ok}


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:  # after a torn last line (a killed sweep), start a new line
        f.write(("\n" if torn else "") + json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# -- running --------------------------------------------------------------------------------------


def last_metrics(rows: list[dict[str, str]]) -> dict[str, float]:
    """The last evaluated round's metrics (floats; empty cells left out) and its round, from a
    run's metrics.csv rows."""
    evaluated = [r for r in rows if r.get("zacc_weighted") or r.get("gacc")] or rows
    last = evaluated[-1]
    out: dict[str, float] = {"round": int(last["round"])}
    for key in METRIC_KEYS:
        if last.get(key) not in (None, ""):
            out[key] = float(last[key])
    times = [float(r["round_time_s"]) for r in rows[1:] if r.get("round_time_s")]
    if times:
        out["round_time_s_mean"] = sum(times) / len(times)
    return out


def data_unavailable(preset: str, overrides: Mapping[str, Any]) -> str | None:
    """The data source's one-line DataSourceError if this run's dataset cannot be loaded here,
    else None (a run that failed for another reason is a failure, not a skip)."""
    from hfz_app.config import ConfigError, load_config
    from hfz_app.data import DataSourceError
    from hfz_app.data.sources import load_data

    try:
        cfg = load_config(preset, dict(overrides))
        load_data(cfg.data)
    except DataSourceError as err:
        return str(err)
    except ConfigError:
        return None
    return None


def error_line(output: str) -> str:
    errors = [ln.strip() for ln in output.splitlines() if ln.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    tail = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return tail[-1] if tail else ""


def run_job(job: Job, runs_dir: Path, torch_threads: int = 1, launch_args: Iterable[str] = (),
            timeout_s: float | None = None, keep_checkpoints: bool = False, echo: bool = False,
            unavailable: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one job through launch and return its record (status ok, skipped or failed)."""
    cmd = command(job, runs_dir, torch_threads, launch_args)
    record: dict[str, Any] = {
        "key": job.key, "sweep": job.sweep, "cell": job.cell.id, "label": job.cell.label,
        "method": job.cell.method, "preset": job.cell.preset, "seed": job.seed,
        "rounds": job.rounds, "variant": job.variant,
        "variant_overrides": dict(job.variant_overrides), "extra": dict(job.extra),
        "overrides": job.identity()["overrides"], "x": job.cell.x,
        "series": job.cell.series or job.cell.label, "reference": job.cell.reference,
        "command": display(cmd), "machine": machine(), "commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # Cells on the same data share its availability: one launch tells for all of them.
    preset_key = json.dumps([job.cell.preset, {k: v for k, v in job.overrides().items()
                                               if k in ("data.dataset", "data.data_dir")}])
    if unavailable is not None and preset_key in unavailable:  # known: do not launch again
        return record | {"status": "skipped", "message": unavailable[preset_key], "wall_s": 0.0}
    run_dir = runs_dir / job.name
    for old in (run_dir, *runs_dir.glob(f"{job.name}-[0-9]*")):
        shutil.rmtree(old, ignore_errors=True)  # a partial run of this cell: start clean
    log = runs_dir / "logs" / f"{job.name}.log"
    run = run_training(job.cell.preset, settings(job, runs_dir, torch_threads), "flwr",
                       launch_args=launch_args, log_path=log, timeout_s=timeout_s, echo=echo)
    rc, output = run.rc, run.output
    record["wall_s"] = round(run.wall_s, 2)
    record["log"] = str(log)
    completed = re.findall(r"run \d+ completed in (\d+) s", output)
    if completed:
        record["flwr_s"] = float(completed[-1])
    metrics_csv = run_dir / "metrics.csv"
    if rc == 0 and run.output_dir is not None:
        record |= {"status": "ok", "output_dir": str(run.output_dir), **last_metrics(run.rows)}
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return record
    message = error_line(output)
    if run.timed_out:
        return record | {"status": "failed", "message": f"timed out after {timeout_s:.0f} s"}
    why = data_unavailable(job.cell.preset, job.overrides()) if rc != 0 else None
    if why is not None:
        if unavailable is not None:
            unavailable[preset_key] = message or why
        return record | {"status": "skipped", "message": message or why}
    if rc == 0:
        message = f"exit 0 but no {metrics_csv}"
    return record | {"status": "failed", "rc": rc, "message": message}


def run_sweep(jobs: list[Job], results: Path, runs_dir: Path, resume: bool = False,
              retry_skipped: bool = False, **run_kwargs: Any) -> Iterator[dict[str, Any]]:
    """Run the jobs not already done, appending each record to ``results`` as it finishes."""
    done = done_keys(read_results(results), retry_skipped) if resume else set()
    unavailable: dict[str, str] = {}
    for job in jobs:
        if job.key in done:
            continue
        record = run_job(job, runs_dir, unavailable=unavailable, **run_kwargs)
        append_record(results, record)
        yield record


def summary_line(i: int, n: int, record: Mapping[str, Any]) -> str:
    head = f"[{i}/{n}] {record['sweep']} {record['variant'] + ' ' if record['variant'] else ''}" \
           f"{record['cell']} seed {record['seed']}:"
    if record["status"] == "ok":
        def pct(key: str) -> str:
            return f"{100 * record[key]:.2f}" if key in record else "-"
        spread = f" +- {100 * record['zacc_std']:.2f}" if "zacc_std" in record else ""
        return (f"{head} zACC {pct('zacc_weighted')}{spread} | gACC {pct('gacc')} | pACC "
                f"{pct('pacc_weighted')} | {record.get('bytes_sent_per_client', 0) / 1e6:.2f} MB"
                f"/client/round | round {record['round']} | {record['wall_s']:.0f} s")
    return f"{head} {record['status'].upper()}: {record.get('message', '')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="sweeps: " + "; ".join(f"{k}: {v.title}" for k, v in SWEEPS.items()))
    parser.add_argument("--sweep", required=True, help="NAME[,NAME] (see below)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, help="override every cell's rounds (default: the "
                        "sweep's own; 0 for the online sweep: the presets')")
    parser.add_argument("--results", type=Path,
                        help="JSONL file, one line per run (default "
                             "benchmarks/results/<sweep>.jsonl)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a results file: skip the cells it holds (finished or "
                             "skipped); failed ones run again")
    parser.add_argument("--rerun", action="store_true",
                        help="run the selected cells again and append them to the results file "
                             "even if it holds them (e.g. after a preset changed); the report "
                             "keeps the last record of each cell and seed")
    parser.add_argument("--retry-skipped", action="store_true",
                        help="with --resume, run the skipped cells again (e.g. now online)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--only-methods", help="run.method values to keep, e.g. "
                        "fedavg,hyperfedzero (the control is a hyperfedzero cell)")
    parser.add_argument("--only-cells",
                        help="cell ids to keep (shell patterns), e.g. control,a0.1-*")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=k=v,k=v: every cell again with these overrides (repeatable)")
    parser.add_argument("-c", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run (TOML values, strings quoted)")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS,
                        help="where the runs write <name>/ and logs/ (default outputs/sweeps)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--cpus-per-client", type=int,
                        help="passed to launch (default its own: 1)")
    parser.add_argument("--timeout-s", type=float, help="stop a run after this long (failed)")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--echo", action="store_true", help="show each run's output as it goes")
    args = parser.parse_args(argv)
    if args.results is None:
        args.results = RESULTS_DIR / f"{args.sweep.replace(',', '+')}.jsonl"

    if args.rerun and args.resume:
        print("error: --rerun and --resume: pass one (--rerun runs held cells again, --resume "
              "skips them)", file=sys.stderr)
        return 2
    try:
        extra = parse_overrides(args.c)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = plan(args.sweep.split(","), [int(s) for s in args.seeds.split(",")], args.rounds,
                parse_variants(args.variant), extra,
                args.only_methods.split(",") if args.only_methods else None,
                args.only_cells.split(",") if args.only_cells else None)
    launch_args = ["--cpus-per-client", str(args.cpus_per_client)] if args.cpus_per_client else []
    runs_dir = args.runs_dir.resolve()
    if args.dry_run:
        done = done_keys(read_results(args.results), args.retry_skipped) if args.resume else set()
        for job in jobs:
            mark = "# done: " if job.key in done else ""
            print(mark + display(command(job, runs_dir, args.torch_threads, launch_args)))
        print(f"# {len(jobs)} runs, {sum(j.key in done for j in jobs)} already in {args.results}")
        return 0
    if read_results(args.results) and not (args.resume or args.rerun):
        print(f"error: --results: {args.results} already holds results; pass --resume to continue "
              f"it (skips the cells it holds), --rerun to run them again, or name another file",
              file=sys.stderr)
        return 2
    print(f"{len(jobs)} runs -> {args.results} (outputs and logs in {runs_dir})", flush=True)
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    done = done_keys(read_results(args.results), args.retry_skipped) if args.resume else set()
    todo = [j for j in jobs if j.key not in done]
    if len(todo) < len(jobs):
        print(f"resume: {len(jobs) - len(todo)} runs already in {args.results}", flush=True)
    for i, record in enumerate(run_sweep(
            todo, args.results, runs_dir, torch_threads=args.torch_threads,
            launch_args=launch_args, timeout_s=args.timeout_s,
            keep_checkpoints=args.keep_checkpoints, echo=args.echo), 1):
        counts[record["status"]] += 1
        print(summary_line(i, len(todo), record), flush=True)
    print(f"done: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; "
          f"`python -m benchmarks.report --results {args.results}` writes the tables", flush=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
