"""Methods side by side through the real ServerApp/ClientApp (in-process Grid, same data/seeds).

    python -m benchmarks.compare_methods --preset mnist_mlp --methods hyperfedzero,fedavg \
        --seeds 0 -c run.rounds=10 --variant "sgd-m0.9=" --variant "sgd-m0=train.momentum=0" \
        --out docs/compare_lr.md

Each ``--variant NAME=k=v,k=v`` adds overrides; every method runs under every variant. Prints
and writes a table of the last round's zACC / gACC / pACC (mean +- std over seeds) and wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import Table, command_line, parse_variants, run_training
from hfz_app.config import parse_overrides

METRICS = ("zacc_weighted", "gacc", "pacc_weighted")


def run_once(preset: str, overrides: dict, out_root: str) -> tuple[dict, float]:
    run = run_training(preset, {**overrides, "run.output_dir": out_root}, "inprocess")
    rows = run.rows
    metrics = {k: float(rows[-1][k]) for k in (*METRICS, "bytes_sent_per_client")}
    # zACC after each evaluated round, for tables that compare methods at fewer rounds too.
    metrics |= {f"zacc@{int(r['round'])}": float(r["zacc_weighted"]) for r in rows
                if r.get("zacc_weighted") not in (None, "")}
    return metrics, run.wall_s


def run_seeds(preset: str, overrides: dict, seeds: list[int], out_root: str,
              name: str, at_rounds: tuple[int, ...] = ()) -> tuple[str, float, float]:
    """One run per seed (named ``{name}-s{seed}``): the table cells ``zACC | gACC | pACC`` (then
    zACC after each of ``at_rounds``) as mean +- std, bytes sent per client per round, and the
    mean wall time of a run."""
    keys = (*METRICS, *(f"zacc@{r}" for r in at_rounds))
    results: dict[str, list[float]] = {k: [] for k in keys}
    walls, sent = [], 0.0
    for seed in seeds:
        metrics, wall = run_once(
            preset, {**overrides, "run.seed": seed, "run.name": f"{name}-s{seed}"}, out_root)
        for k in keys:
            results[k].append(metrics[k])
        walls.append(wall)
        sent = metrics["bytes_sent_per_client"]
    return " | ".join(fmt(results[k]) for k in keys), sent, statistics.mean(walls)


def fmt(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} +- {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mnist_mlp")
    parser.add_argument("--methods", default="hyperfedzero,fedavg")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("-c", action="append", default=[], help="override for every run")
    parser.add_argument("--variant", action="append", default=[], help="NAME=k=v,k=v")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, help="keep every run's outputs under this folder")
    args = parser.parse_args()
    common = parse_overrides(args.c)
    variants = parse_variants(args.variant, default="default")
    table = Table("| variant | method | zACC | gACC | pACC | MB sent/client/round | wall s/run |\n"
                  "|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out_root = str(args.keep) if args.keep else tmp
        for name, extra in variants.items():
            for method in args.methods.split(","):
                cells, sent, wall = run_seeds(
                    args.preset, {**common, **extra, "run.method": method},
                    [int(s) for s in args.seeds.split(",")], out_root, f"{name}-{method}")
                table.add(f"| {name} | {method} | {cells} | {sent / 1e6:.2f} | {wall:.0f} |")
    if args.out:
        table.write(args.out, command_line("compare_methods", sys.argv[1:]))


if __name__ == "__main__":
    main()
