"""docs/RESULTS.md from the sweeps' JSONL results: one table per sweep, its command, plots.

    python -m benchmarks.report                                   # benchmarks/results/*.jsonl
    python -m benchmarks.report --results a.jsonl --results b.jsonl --out docs/RESULTS.md

A table is one sweep at one number of rounds with one set of ``-c`` overrides, from one results
file; its rows are the sweep's cells (times each ``--variant``) in the order ``benchmarks/
sweep.py`` defines them, each the mean +- std over the seeds that finished (population std: 0 for
one seed). The command above each table reruns exactly its rows. Cells skipped (data source
unavailable) and failed runs are listed under their table with their one-line message. Plots go
to ``docs/results/``: zACC by row with the std over seeds as error bars, and zACC against the
sweep's x value (e.g. the held-out clients' Dirichlet alpha) for sweeps that have one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT
from benchmarks.sweep import SWEEPS, read_results

DEFAULT_GLOB = "benchmarks/results/*.jsonl"
ACCURACIES = (("zACC", "zacc_weighted"), ("gACC", "gacc"), ("pACC", "pacc_weighted"))


def load(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every file's records, each tagged with its ``source`` file; for a key recorded more than
    once in a file (a resumed or rerun cell) the last record wins."""
    out: list[dict[str, Any]] = []
    for path in paths:
        latest: dict[str, dict[str, Any]] = {}
        for record in read_results(Path(path)):
            if "key" in record:
                latest.pop(record["key"], None)  # keep the order of the last record
                latest[record["key"]] = record | {"source": relative(Path(path))}
        out.extend(latest.values())
    return out


def relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


@dataclass
class Row:
    """One table row: a cell under a variant, over seeds."""

    sweep: str
    cell: str
    variant: str
    label: str
    method: str
    x: float | None = None
    series: str = ""
    reference: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return sorted((r for r in self.records if r.get("status") == "ok"), key=lambda r: r["seed"])

    def stat(self, key: str, scale: float = 100.0) -> tuple[float, float] | None:
        values = [scale * r[key] for r in self.ok if r.get(key) is not None]
        return mean_std(values) if values else None

    def not_ok(self, status: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == status]

    @property
    def title(self) -> str:
        return f"[{self.variant}] {self.label}" if self.variant else self.label


@dataclass
class Table:
    sweep: str
    rounds: int
    extra: dict[str, Any]
    source: str
    rows: list[Row]

    @property
    def seeds(self) -> list[int]:
        return sorted({r["seed"] for row in self.rows for r in row.records})

    @property
    def slug(self) -> str:
        """The plot's file name: unique per table (two tables of one sweep and rounds, e.g. a
        tuning screen in its own results file, must not overwrite each other's plot)."""
        base = f"{self.sweep}-r{self.rounds}" if self.rounds else self.sweep
        stem = Path(self.source).stem
        return base if stem in (self.sweep, "") else f"{base}-{stem}"

    def command(self) -> str:
        """The sweep command that reruns exactly this table's rows (or the one its records name:
        a table filled by another script, e.g. benchmarks.heldout_alpha)."""
        named = {r["table_command"] for row in self.rows for r in row.records
                 if r.get("table_command")}
        if len(named) == 1:
            return named.pop()
        parts = ["python -m benchmarks.sweep", f"--sweep {self.sweep}",
                 f"--seeds {','.join(str(s) for s in self.seeds)}"]
        if self.rounds:
            parts.append(f"--rounds {self.rounds}")
        variants: dict[str, dict[str, Any]] = {}
        for row in self.rows:
            for r in row.records:
                if r.get("variant"):
                    variants[r["variant"]] = r.get("variant_overrides", {})
        from hfz_app.launch import toml_value

        for name, overrides in variants.items():
            spec = ",".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
            parts.append(f"--variant '{name}={spec}'")
        for key, value in self.extra.items():
            value = toml_value(value)
            parts.append(f"-c '{key}={value}'" if '"' in value else f"-c {key}={value}")
        sweep = SWEEPS.get(self.sweep)
        cells = list(dict.fromkeys(row.cell for row in self.rows))
        if sweep is None or set(cells) != {c.id for c in sweep.cells}:
            parts.append(f"--only-cells {','.join(cells)}")
        parts.append(f"--results {self.source}")
        return " ".join(parts)


def tables(records: Iterable[Mapping[str, Any]]) -> list[Table]:
    """Group records into tables (sweep, rounds, -c overrides, file) and rows (variant, cell),
    rows in the sweep's own cell order, tables in SWEEPS order."""
    grouped: dict[tuple, dict[tuple[str, str], Row]] = {}
    for r in records:
        tkey = (r["sweep"], int(r.get("rounds") or 0),
                json.dumps(r.get("extra") or {}, sort_keys=True), r.get("source", ""))
        rows = grouped.setdefault(tkey, {})
        rkey = (r.get("variant", ""), r["cell"])
        if rkey not in rows:
            rows[rkey] = Row(r["sweep"], r["cell"], r.get("variant", ""), r.get("label", r["cell"]),
                             r.get("method", ""), r.get("x"), r.get("series") or r.get("label", ""),
                             bool(r.get("reference")))
        rows[rkey].records.append(dict(r))
    sweep_order = {name: i for i, name in enumerate(SWEEPS)}
    out = []
    for (sweep, rounds, extra, source), rows in grouped.items():
        order = {c.id: i for i, c in enumerate(SWEEPS[sweep].cells)} if sweep in SWEEPS else {}
        variants = list(dict.fromkeys(v for v, _ in rows))
        ordered = sorted(rows.values(), key=lambda row: (variants.index(row.variant),
                                                         order.get(row.cell, len(order))))
        out.append(Table(sweep, rounds, json.loads(extra), source, ordered))
    out.sort(key=lambda t: (sweep_order.get(t.sweep, len(sweep_order)), t.sweep, t.rounds,
                            t.source))
    return out


def cell(stat: tuple[float, float] | None, digits: int = 2) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def table_markdown(table: Table, plot: str | None = None) -> list[str]:
    sweep = SWEEPS.get(table.sweep)
    title = sweep.title if sweep else table.sweep
    rounds = (f"{table.rounds} round{'s' if table.rounds != 1 else ''}" if table.rounds
              else "the presets' rounds")
    lines = [f"## {title} (`{table.sweep}`, {rounds})", ""]
    if sweep:
        lines += [sweep.about, ""]
    lines += ["```bash", table.command(), "```", ""]
    if table.extra:
        lines += ["Every run also sets " + ", ".join(f"`{k}={v}`" for k, v in table.extra.items())
                  + ".", ""]
    lines += [("| row | method | zACC | zACC spread | gACC | pACC | seeds | MB/client/round | "
              "wall s/run |"), "|---|---|---|---|---|---|---|---|---|"]
    for row in table.rows:
        if not row.ok:
            continue
        mb = row.stat("bytes_sent_per_client", 1e-6)
        wall = row.stat("wall_s", 1.0)
        lines.append(" | ".join([
            f"| {row.title}", f"`{row.method}`", cell(row.stat("zacc_weighted")),
            f"{row.stat('zacc_std')[0]:.2f}" if row.stat("zacc_std") else "-",
            cell(row.stat("gacc")), cell(row.stat("pacc_weighted")),
            f"{len(row.ok)} ({','.join(str(r['seed']) for r in row.ok)})",
            f"{mb[0]:.2f}" if mb else "-", f"{wall[0]:.0f}" if wall else "-"]) + " |")
    if not any(row.ok for row in table.rows):
        lines = lines[:-2] + ["No run of this table finished."]
    lines.append("")
    if plot:
        lines += [f"![zACC, {table.sweep}]({plot})", ""]
    for status, heading in (("skipped", "Skipped (data unavailable here)"), ("failed", "Failed")):
        # One bullet per message, naming the rows and seeds it stopped.
        by_message: dict[str, dict[str, list[int]]] = {}
        for row in table.rows:
            for r in row.not_ok(status):
                by_message.setdefault(r.get("message", ""), {}).setdefault(
                    row.title, []).append(r["seed"])
        if by_message:
            lines += [f"{heading}:", ""]
            for message, rows in by_message.items():
                named = "; ".join(f"{title} (seeds {','.join(map(str, sorted(seeds)))})"
                                  for title, seeds in rows.items())
                lines.append(f"- {named}: {message or '(no message)'}")
            lines.append("")
    return lines


def bar_colour(row: Row) -> str:
    if row.reference:
        return "#bbbbbb"
    if "control" in row.cell or "uniform" in row.cell:
        return "C2"
    return "C1" if row.method == "hyperfedzero" else "C0"


def plot_table(table: Table, path: Path) -> bool:
    """zACC with the std over seeds: against the sweep's x value (one line per series) where the
    sweep has one, else one bar per row. False when nothing finished."""
    rows = [row for row in table.rows if row.ok and row.stat("zacc_weighted")]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = SWEEPS.get(table.sweep)
    if sweep and sweep.x_label and all(row.x is not None for row in rows):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        series: dict[str, list[Row]] = {}
        for row in rows:
            name = (f"[{row.variant}] {row.series}" if row.variant else row.series).replace("`", "")
            series.setdefault(name, []).append(row)
        for name, members in series.items():
            members.sort(key=lambda r: r.x)
            stats = [r.stat("zacc_weighted") for r in members]
            ax.errorbar([r.x for r in members], [s[0] for s in stats], yerr=[s[1] for s in stats],
                        marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set(xlabel=sweep.x_label, ylabel="zACC (%)")
        ax.legend()
    else:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 4))
        stats = [row.stat("zacc_weighted") for row in rows]
        bars = ax.bar(range(len(rows)), [s[0] for s in stats], yerr=[s[1] for s in stats],
                      capsize=4, color=[bar_colour(r) for r in rows])
        for bar, row in zip(bars, rows):
            if row.reference:
                bar.set_hatch("//")
        low = min(s[0] - s[1] for s in stats)
        high = max(s[0] + s[1] for s in stats)
        ax.set_ylim(max(0.0, low - max(1.0, 0.1 * (high - low))), min(100.0, high + 0.5))
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([row.title.replace("`", "").replace("*", "") for row in rows],
                           rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("zACC (%), mean +- std over seeds")
    ax.set_title(f"{table.sweep}: zACC, seeds {','.join(map(str, table.seeds))}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(tabs: list[Table], sources: list[str], plots_dir: Path | None, out: Path) -> str:
    machines = sorted({r.get("machine", "?") for t in tabs for row in t.rows for r in row.records
                       if r.get("status") == "ok"})
    commits = sorted({r.get("commit", "?") for t in tabs for row in t.rows for r in row.records
                      if r.get("status") == "ok"})
    rounds = ", ".join(f"`{t.sweep}` {t.rounds or 'preset'}" for t in tabs)
    lines = [
        "# Benchmark results", "",
        "Written by `benchmarks/report.py` from " + ", ".join(f"`{s}`" for s in sources)
        + "; do not edit by hand. Rerun a table with the command above it (add `--resume` to "
          "continue an interrupted sweep), then `python -m benchmarks.report`.", "",
        ("Every run goes through `flwr run` as a user runs it (`python -m hfz_app.launch`: its "
        "own SuperLink, one simulated SuperNode per client on Ray, `train.torch_threads=1`, one "
        "CPU per ClientApp). Accuracies are the last evaluated round's, in %, mean +- std over "
        "seeds (population std; 0 for one seed). **zACC spread**: the std of zACC across the "
        "held-out clients within a run, averaged over seeds. **wall s/run**: the whole launch, "
        "SuperLink start to stop, so it includes Flower's start-up "
        "([docs/benchmarks/flower_overhead.md](benchmarks/flower_overhead.md))."), "",
        "Machine: " + ("; ".join(machines) if machines else "-") + ".", "",
        "Rounds per table: " + (rounds or "-") + ". Code: commit "
        + (", ".join(commits) if commits else "-") + ".", "",
    ]
    for table in tabs:
        plot = None
        if plots_dir is not None:
            path = plots_dir / f"{table.slug}.png"
            if plot_table(table, path):
                plot = relative_to(path, out.parent)
        lines += table_markdown(table, plot)
    lines += also_measured(out)
    return "\n".join(lines).rstrip() + "\n"


# Tables that other scripts write (each with its command), shown here so that the report is whole.
EMBEDDED = ((("Defaults: one key of the recipe at a time, chosen on the participants' pACC "
              "(in-process Grid, which gives the same numbers as `flwr run`)"),
             "docs/DEFAULTS_sweep.md"),)
LINKED = (("Cost per method: bytes, peak memory, parameters, step time",
           "docs/benchmarks/cost_table.md"),
          ("Flower's overhead: `flwr run` against the same training in-process",
           "docs/benchmarks/flower_overhead.md"),
          ("Training-step time of every layout against the plain target",
           "docs/benchmarks/step_time.md"))


def also_measured(out: Path) -> list[str]:
    lines: list[str] = []
    for title, rel in EMBEDDED:
        path = ROOT / rel
        if path.exists():
            lines += [f"## {title}", "", f"From [{rel}]({relative_to(path, out.parent)}):", "",
                      path.read_text().rstrip(), ""]
    linked = [(t, ROOT / rel) for t, rel in LINKED if (ROOT / rel).exists()]
    if linked:
        lines += ["## Cost tables", ""]
        lines += [f"- {t}: [{p.relative_to(ROOT)}]({relative_to(p, out.parent)})" for t, p in linked]
        lines.append("")
    return lines


def relative_to(path: Path, base: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), base.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", action="append", type=Path,
                        help=f"JSONL file (repeatable; default {DEFAULT_GLOB})")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "results",
                        help="folder for the PNG plots")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    paths = args.results or sorted(ROOT.glob(DEFAULT_GLOB))
    if not paths:
        print(f"error: no results files ({DEFAULT_GLOB}); run `python -m benchmarks.sweep` first",
              file=sys.stderr)
        return 2
    tabs = tables(load(paths))
    text = render(tabs, [relative(Path(p)) for p in paths],
                  None if args.no_plots else args.plots, args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"{args.out}: {len(tabs)} tables from {len(paths)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
