"""Flower's overhead: `flwr run` (hfz_app.launch, as `make run`) against the same training run
in-process (the real ServerApp/ClientApp on hfz_app.federation.inprocess's Grid), side by side.

    python -m benchmarks.flower_overhead                      # mnist_mlp, 20 rounds, 2 repeats
    python -m benchmarks.flower_overhead --rounds 2 --repeats 1 --out /tmp/overhead.md

Both run in a fresh process each time (``benchmarks.harness.run_training``'s two modes), with
the same preset, seed, rounds and settings, and the repeats interleave (in-process, flwr, then
flwr, in-process, ...) so that other jobs on the machine weigh on both alike. Reported per method: the whole process's wall time (what a user
waits), the training part (``elapsed_s`` of the last ``metrics.csv`` row: from the ServerApp's
first round to its last) and the mean round time, each as flwr / in-process; the rest is start-up
and teardown. Both runs of a seed must give the same metrics (every column of ``metrics.csv``
but the timing ones); the script checks and says. Writes docs/benchmarks/flower_overhead.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, machine, run_training, written_by

TIMING = ("elapsed_s", "round_time_s")
TARGET = 1.2  # issue 8: overhead <= 1.2x on a 20-round MNIST run
MARKERS = {  # launch output lines -> a timeline of one flwr run (as the launcher saw them)
    "launch_ready": re.compile(r"^flwr run: \d+ simulated nodes"),
    "server_started": re.compile(r"^hyperfedzero: \w+ on "),
    "round0": re.compile(r"^\[round +0/"),
    "last_round": None,  # filled per run
    "completed": re.compile(r"^run \d+ completed in"),
}


def run_mode(mode: str, preset: str, overrides: dict[str, Any], out_dir: Path, name: str,
             cpus_per_client: int) -> dict[str, Any]:
    """One run in a fresh process; its wall time, timeline and metrics rows."""
    overrides = overrides | {"run.name": name, "run.output_dir": str(out_dir)}
    rounds = overrides["run.rounds"]
    markers = dict(MARKERS, last_round=re.compile(rf"^\[round +{rounds}/"))
    seen: dict[str, float] = {}

    def mark(now: float, line: str) -> None:
        for key, pattern in markers.items():
            if key not in seen and pattern.search(line):
                seen[key] = now

    launch_args = ["--cpus-per-client", str(cpus_per_client)] if mode == "flwr" else []
    run = run_training(preset, overrides, mode, fresh_process=True, launch_args=launch_args,
                       on_line=mark)
    if run.rc != 0 or not run.rows:
        tail = "".join(run.output.splitlines(keepends=True)[-20:])
        raise SystemExit(f"error: {mode} run {name} exited {run.rc}:\n{tail}")
    return {"mode": mode, "wall_s": run.wall_s, "timeline": seen, "rows": run.rows} | run.child


def training_s(run: dict[str, Any]) -> float:
    return float(run["rows"][-1]["elapsed_s"])


def round_times(run: dict[str, Any]) -> list[float]:
    return [float(r["round_time_s"]) for r in run["rows"]]


def compare_rows(a: list[dict[str, str]], b: list[dict[str, str]]) -> list[str]:
    """Differences between two metrics.csv files, timing columns aside (empty: identical)."""
    if len(a) != len(b):
        return [f"{len(a)} rows against {len(b)}"]
    diffs: dict[str, float] = {}
    for ra, rb in zip(a, b):
        for key in ra:
            if key in TIMING or ra[key] == rb.get(key):
                continue
            try:
                gap = abs(float(ra[key]) - float(rb[key]))
            except ValueError:
                gap = float("inf")
            diffs[key] = max(diffs.get(key, 0.0), gap)
    return [f"{k} (max |diff| {v:.3g})" for k, v in diffs.items()]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mnist_mlp")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--methods", default="fedavg,hyperfedzero")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpus-per-client", type=int, default=1,
                        help="Ray CPUs per ClientApp (launch's default: 1)")
    parser.add_argument("-c", action="append", default=[], metavar="KEY=VALUE",
                        help="override for both runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" /
                        "flower_overhead.md")
    args = parser.parse_args(argv)
    from hfz_app.config import parse_overrides

    extra = parse_overrides(args.c)
    methods = args.methods.split(",")
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {"inprocess": [], "flwr": []} for m in methods}
    with tempfile.TemporaryDirectory(prefix="hfz-overhead-") as tmp:
        for rep in range(args.repeats):
            for method in methods:
                overrides = {"run.method": method, "run.seed": args.seed,
                             "run.rounds": args.rounds, "train.torch_threads": 1, **extra}
                order = ("inprocess", "flwr") if rep % 2 == 0 else ("flwr", "inprocess")
                for mode in order:
                    run = run_mode(mode, args.preset, overrides, Path(tmp),
                                   f"{method}-{mode}-{rep}", args.cpus_per_client)
                    runs[method][mode].append(run)
                    print(f"repeat {rep} {method:>12} {mode:>9}: wall {run['wall_s']:6.1f} s, "
                          f"training {training_s(run):6.1f} s, final zACC "
                          f"{run['rows'][-1].get('zacc_weighted', '-')}", flush=True)
    load_after = os.getloadavg()
    text = report(args, runs, load_before, load_after)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


def report(args: argparse.Namespace, runs: dict[str, dict[str, list[dict[str, Any]]]],
           load_before: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    parallel = max(1, (os.cpu_count() or 1) // args.cpus_per_client)
    lines = [
        "# Flower's overhead: `flwr run` against the same training in-process", "",
        *written_by("flower_overhead", sys.argv[1:], quote=True),
        (f"Machine: {machine()}. Load average before / after: "
        f"{' '.join(f'{v:.2f}' for v in load_before)} / "
        f"{' '.join(f'{v:.2f}' for v in load_after)} (above ~2, other jobs shared the cores)."), "",
        (f"Preset `{args.preset}`, {args.rounds} rounds, seed {args.seed}, "
        f"`train.torch_threads=1`, {args.repeats} repeat(s) per mode, interleaved (in-process "
        f"first on even repeats, flwr first on odd ones); medians over repeats. **flwr**: "
        f"`python -m hfz_app.launch` (its own SuperLink, Ray simulation, "
        f"{args.cpus_per_client} CPU per ClientApp: up to {parallel} "
        f"ClientApps at once on {os.cpu_count()} cores). **in-process**: the same ServerApp and "
        f"ClientApp on `hfz_app.federation.inprocess`'s Grid, one node after the other, in a "
        f"fresh Python process. **training**: `elapsed_s` of the last `metrics.csv` row (the "
        f"ServerApp's rounds, after node discovery); **start-up + teardown** = wall - training."),
        "",
        ("| method | wall s in-process | wall s flwr | **wall ratio** | training s in-process | "
        "training s flwr | training ratio | start-up + teardown s in-process / flwr | "
        "mean round s in-process / flwr | same metrics |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    verdicts, details = [], []
    for method, modes in runs.items():
        ip, fl = modes["inprocess"], modes["flwr"]
        wall_ip, wall_fl = median([r["wall_s"] for r in ip]), median([r["wall_s"] for r in fl])
        tr_ip, tr_fl = median([training_s(r) for r in ip]), median([training_s(r) for r in fl])
        rt_ip = median([statistics.mean(round_times(r)[1:]) for r in ip])
        rt_fl = median([statistics.mean(round_times(r)[1:]) for r in fl])
        reference = ip[0]["rows"]
        diffs = {f"{r['mode']} #{i}": compare_rows(reference, r["rows"])
                 for i, r in enumerate(ip + fl) if r is not ip[0]}
        different = {k: v for k, v in diffs.items() if v}
        same = "identical" if not different else "**differ**: " + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in different.items())
        lines.append(
            f"| {method} | {wall_ip:.1f} | {wall_fl:.1f} | **{wall_fl / wall_ip:.2f}x** | "
            f"{tr_ip:.1f} | {tr_fl:.1f} | {tr_fl / tr_ip:.2f}x | {wall_ip - tr_ip:.1f} / "
            f"{wall_fl - tr_fl:.1f} | {rt_ip:.2f} / {rt_fl:.2f} | {same} |")
        met = "met" if wall_fl / wall_ip <= TARGET else "missed"
        verdicts.append(f"- {method}: flwr / in-process wall {wall_fl / wall_ip:.2f}x "
                        f"(target <= {TARGET}x: {met}); "
                        f"training alone {tr_fl / tr_ip:.2f}x; final zACC in-process "
                        f"{reference[-1].get('zacc_weighted', '-')}, flwr "
                        f"{fl[0]['rows'][-1].get('zacc_weighted', '-')} ({same})")
        details += [f"### {method}: every run", "",
                    ("| repeat | mode | wall s | training s | import s (in-process) | "
                    "flwr: launch ready / ServerApp up / round 0 / last round / completed (s "
                    "after start, as printed) |"), "|---|---|---:|---:|---:|---|"]
        for rep in range(len(ip)):
            for run in (ip[rep], fl[rep]):
                tl = run["timeline"]
                marks = " / ".join(f"{tl[k]:.1f}" if k in tl else "-" for k in
                                   ("launch_ready", "server_started", "round0", "last_round",
                                    "completed")) if run["mode"] == "flwr" else ""
                imp = f"{run['import_s']:.1f}" if "import_s" in run else ""
                details.append(f"| {rep} | {run['mode']} | {run['wall_s']:.1f} | "
                               f"{training_s(run):.1f} | {imp} | {marks} |")
        details += ["", "Per round (median over repeats; round 0 = the initial gACC only):", "",
                    "| round | in-process s | flwr s | ratio |", "|---:|---:|---:|---:|"]
        n = min(len(ip[0]["rows"]), len(fl[0]["rows"]))
        for i in range(n):
            a = median([round_times(r)[i] for r in ip])
            b = median([round_times(r)[i] for r in fl])
            details.append(f"| {i} | {a:.2f} | {b:.2f} | {b / a:.2f}x |" if a > 0 else
                           f"| {i} | {a:.2f} | {b:.2f} | - |")
        details.append("")
    lines += ["", *verdicts, "", *details]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
