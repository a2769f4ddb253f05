"""zACC against rounds, mean and std over seeds, one band per sweep cell, from the sweep's run
folders (each run's ``metrics.csv``).

    python -m benchmarks.sweep --sweep mnist --seeds 0,1,2 --only-cells fedavg,hyperfedzero,control \\
        --results outputs/curves/curves.jsonl --runs-dir outputs/curves
    python -m benchmarks.curves --sweep mnist --cells fedavg,fedavg-em,hyperfedzero,control \\
        --runs outputs/curves --runs outputs/sweeps --out docs/results/mnist-zacc-rounds.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchmarks.harness import ROOT, read_metrics
from benchmarks.sweep import SWEEPS


def cell_runs(roots: list[Path], sweep: str, cell: str, rounds: int) -> list[Path]:
    """The ``metrics.csv`` of every seed of ``cell`` found under ``roots`` (first root wins)."""
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.glob(f"{sweep}--{cell}--s*--r{rounds}/metrics.csv")):
            found.setdefault(path.parent.name, path)
    return list(found.values())


def band(paths: list[Path], key: str = "zacc_weighted") -> tuple[list[int], list[float],
                                                                list[float]]:
    """Rounds evaluated in every run, and the mean and std (population) of ``key`` there, in %."""
    series = []
    for path in paths:
        rows = read_metrics(path)
        series.append({int(r["round"]): 100 * float(r[key]) for r in rows if r.get(key)})
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    means = [statistics.fmean(s[r] for s in series) for r in common]
    stds = [statistics.pstdev([s[r] for s in series]) for r in common]
    return common, means, stds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default="mnist")
    parser.add_argument("--cells", default="fedavg,fedavg-em,hyperfedzero,control")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=Path, action="append", default=[],
                        help="a --runs-dir of the sweep (repeatable; default outputs/sweeps)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/mnist-zacc-rounds.png")
    parser.add_argument("--from-round", type=int, default=1)
    args = parser.parse_args(argv)
    roots = [r if r.is_absolute() else ROOT / r for r in (args.runs or [Path("outputs/sweeps")])]
    labels = {c.id: c.label.replace("`", "") for c in SWEEPS[args.sweep].cells}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cell in args.cells.split(","):
        paths = cell_runs(roots, args.sweep, cell, args.rounds)
        if not paths:
            print(f"error: no runs of {args.sweep}/{cell} (r{args.rounds}) under "
                  f"{', '.join(map(str, roots))}", file=sys.stderr)
            return 2
        rounds, means, stds = band(paths)
        keep = [i for i, r in enumerate(rounds) if r >= args.from_round]
        x = [rounds[i] for i in keep]
        m, s = [means[i] for i in keep], [stds[i] for i in keep]
        line, = ax.plot(x, m, marker="o", ms=2.5, label=f"{labels.get(cell, cell)} "
                        f"({len(paths)} seeds): {means[-1]:.2f}")
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                        color=line.get_color(), alpha=0.2)
        print(f"{cell}: {len(paths)} seeds, round {rounds[-1]} zACC {means[-1]:.2f} +- "
              f"{stds[-1]:.2f}")
    ax.set(xlabel="round", ylabel="zACC on held-out clients (%)",
           title=f"{args.sweep}: zACC against rounds, mean +- std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
