"""Methods side by side through the real ServerApp/ClientApp (in-process Grid, same data/seeds).

    python benchmarks/compare_methods.py --preset mnist_mlp --methods hyperfedzero,fedavg \
        --seeds 0 -c run.rounds=10 --variant "sgd-m0.9=" --variant "sgd-m0=train.momentum=0" \
        --out docs/compare_lr.md

Each ``--variant NAME=k=v,k=v`` adds overrides; every method runs under every variant. Prints
and writes a table of the last round's zACC / gACC / pACC (mean +- std over seeds) and wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client_app import app as client_app
from hfz_app.config import load_config
from hfz_app.federation.inprocess import full_run_config, run_inprocess, simulation_node_configs
from hfz_app.config import parse_overrides
from server_app import app as server_app

METRICS = ("zacc_weighted", "gacc", "pacc_weighted")


def run_once(preset: str, overrides: dict, out_root: str) -> tuple[dict, float]:
    cfg = load_config(preset, overrides)
    overrides = {**overrides, "run.output_dir": out_root}
    run_config = full_run_config(overrides, preset=preset)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        run_inprocess(server_app, client_app, run_config,
                      simulation_node_configs(cfg.data.num_participants + cfg.data.num_heldout))
    wall = time.perf_counter() - start
    runs = sorted(Path(out_root).glob(f"{cfg.run.name}*/metrics.csv"),
                  key=lambda p: p.stat().st_mtime)
    with runs[-1].open() as f:
        rows = list(csv.DictReader(f))
    metrics = {k: float(rows[-1][k]) for k in (*METRICS, "bytes_sent_per_client")}
    # zACC after each evaluated round, for tables that compare methods at fewer rounds too.
    metrics |= {f"zacc@{int(r['round'])}": float(r["zacc_weighted"]) for r in rows
                if r.get("zacc_weighted") not in (None, "")}
    return metrics, wall


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
    variants = {"default": {}}
    if args.variant:
        variants = {}
        for spec in args.variant:
            name, _, rest = spec.partition("=")
            variants[name] = parse_overrides([p for p in rest.split(",") if p])
    header = ("| variant | method | zACC | gACC | pACC | MB sent/client/round | wall s/run |\n"
              "|---|---|---|---|---|---|---|")
    lines = [header]
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_root = str(args.keep) if args.keep else tmp
        for name, extra in variants.items():
            for method in args.methods.split(","):
                cells, sent, wall = run_seeds(
                    args.preset, {**common, **extra, "run.method": method},
                    [int(s) for s in args.seeds.split(",")], out_root, f"{name}-{method}")
                line = f"| {name} | {method} | {cells} | {sent / 1e6:.2f} | {wall:.0f} |"
                lines.append(line)
                print(line, flush=True)
    if args.out:
        command = "python benchmarks/compare_methods.py " + " ".join(sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"`{command}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
