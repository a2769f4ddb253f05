"""Scale: FedAvg and HyperFedZero through `flwr run` with 1,000 participants + 100 held out.

    python -m benchmarks.scale                    # MNIST/MLP, 1,000 + 100 clients, 20 rounds
    python -m benchmarks.scale --participants 100 --heldout 10 --rounds 3 --out /tmp/scale.md

Each method runs through the launcher (``python -m hfz_app.launch``: its own SuperLink, Ray
SuperNodes) on the same data and seed, with ``server.fraction_train`` 0.1 and, on every
evaluation round, a sample of participants (pACC) and held-out clients (zACC)
(``eval.participants_sample``/``eval.heldout_sample``: 100 and 50). Two repeats by default,
the order alternating (FedAvg first, then HyperFedZero first) so that other jobs on the machine
weigh on both; medians over repeats. Measured per method:

- wall time per round: the difference of ``elapsed_s`` between consecutive ``metrics.csv`` rows
  (the round and the ServerApp's bookkeeping after the one before: gACC, checkpoint, files);
- peak RSS of the ServerApp process (``flwr-simulation``, which also holds Flower's simulation
  engine) and of the ClientApp processes (the Ray actors, ``ray::ClientAppActor``), read from
  ``/proc`` every ``--sample-s`` and attributed to rounds by the ServerApp's own clock (the
  ``end_unix`` of each round in ``timings.csv``; the progress lines reach the launcher up to a
  second late through Flower's log relay), and the peak after the last round (``curves.png``,
  the summary, shut-down) apart, since it does not recur with rounds;
- bytes per round: the train messages' arrays out and back and the evaluation messages' arrays;
- where a round's time goes, from the run's ``timings.csv``: the ClientApps' own seconds (data,
  local training, scoring) divided by the number of ClientApp processes that ran at once, the
  ServerApp's aggregation and bookkeeping, and Flower's messaging and scheduling as the rest of
  the train and evaluate phases.

Targets (issue 24): HyperFedZero's mean round time <= 1.3x FedAvg's, and no process's memory
growing with rounds: the peak RSS of the last 5 rounds exceeds that of rounds 3-5 by at most
``MEMORY_SLACK_MB`` for the ServerApp and for every ClientApp process (judged with >= 10 rounds).
Writes docs/benchmarks/scale.md. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, machine, run_training, written_by

TARGET_RATIO = 1.3
MEMORY_SLACK_MB = 32.0  # allocator noise; a leak of one reply per client per round is far more
EARLY, LATE = (3, 5), 5  # rounds 3-5 against the last 5 rounds
DEFAULTS = {"participants": 1000, "heldout": 100, "rounds": 20, "fraction": 0.1}
ROUND_LINE = re.compile(r"^\[round +(\d+)/")
SERVER_MARK, CLIENT_MARK = "flwr-simulation", "ray::ClientAppActor"
PHASES = ("data", "local training", "client scoring", "Flower messaging", "aggregation",
          "gACC", "bookkeeping", "other")


# -- memory: the run's processes from /proc -------------------------------------------------------


def processes() -> dict[int, tuple[int, str, int]]:
    """Every process: pid -> (parent pid, command line, RSS bytes); those that vanish mid-scan
    are left out."""
    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ")
            rss = int(Path(f"/proc/{entry.name}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in () may hold spaces
        table[int(entry.name)] = (ppid, cmdline.decode(errors="replace").strip(), rss)
    return table


def descendants(table: dict[int, tuple[int, str, int]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Sample:
    t: float  # seconds since the run started
    server: int  # RSS bytes of the ServerApp process (0: not found)
    clients: dict[int, int]  # ClientApp process id -> RSS bytes


class MemorySampler:
    """Samples the RSS of this process's descendants (the launcher and all it starts) every
    ``interval`` seconds in a thread, from ``start()`` to ``stop()``."""

    def __init__(self, interval: float) -> None:
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = self.unix0 = 0.0

    def start(self) -> None:
        self.t0, self.unix0 = time.perf_counter(), time.time()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            table = processes()
            server, clients = 0, {}
            for pid in descendants(table, os.getpid()):
                _, cmd, rss = table[pid]
                if cmd.startswith(CLIENT_MARK):
                    clients[pid] = rss
                elif any(part.endswith(SERVER_MARK) for part in cmd.split()[:2]):
                    server = max(server, rss)
            self.samples.append(Sample(time.perf_counter() - self.t0, server, clients))
            self._stop.wait(self.interval)


def round_peaks(samples: list[Sample], marks: dict[int, float]
                ) -> dict[int, tuple[float, dict[int, float]]]:
    """Per round r >= 1: (ServerApp peak MB, {ClientApp pid: peak MB}) over the samples between
    the ends of rounds r-1 and r."""
    out: dict[int, tuple[float, dict[int, float]]] = {}
    for r in sorted(marks):
        if r == 0 or r - 1 not in marks:
            continue
        inside = [s for s in samples if marks[r - 1] < s.t <= marks[r]]
        if not inside:
            continue
        clients: dict[int, float] = {}
        for s in inside:
            for pid, rss in s.clients.items():
                clients[pid] = max(clients.get(pid, 0.0), rss / 2**20)
        out[r] = (max(s.server for s in inside) / 2**20, clients)
    return out


def after_last_round(samples: list[Sample], marks: dict[int, float]
                     ) -> tuple[float, float] | None:
    """(ServerApp, largest ClientApp) peak MB after the last round's end: curves.png, the
    summary and shut-down, once per run; None if no sample came after it."""
    after = [s for s in samples if marks and s.t > max(marks.values())]
    if not after:
        return None
    return (max(s.server for s in after) / 2**20,
            max((max(s.clients.values(), default=0) for s in after), default=0) / 2**20)


def memory_growth(peaks: dict[int, tuple[float, dict[int, float]]], rounds: int
                  ) -> dict[str, float] | None:
    """MB by which the last ``LATE`` rounds' peak exceeds that of rounds ``EARLY``: for the
    ServerApp and the largest over ClientApp processes seen in both windows; None with too few
    rounds (fewer than 10) or samples."""
    if rounds < 10:
        return None
    early = [peaks[r] for r in range(EARLY[0], EARLY[1] + 1) if r in peaks]
    late = [peaks[r] for r in range(rounds - LATE + 1, rounds + 1) if r in peaks]
    if not early or not late:
        return None
    server = max(p[0] for p in late) - max(p[0] for p in early)
    pids = set().union(*(p[1] for p in early)) & set().union(*(p[1] for p in late))
    client = max((max(p[1].get(pid, 0.0) for p in late) - max(p[1].get(pid, 0.0) for p in early)
                  for pid in pids), default=float("nan"))
    return {"server": server, "client": client}


# -- one run --------------------------------------------------------------------------------------


@dataclass
class Result:
    method: str
    repeat: int
    wall_s: float
    rows: list[dict[str, str]]
    timings: list[dict[str, str]]
    marks: dict[int, float]
    samples: list[Sample]
    extra: dict[str, Any] = field(default_factory=dict)

    def rounds(self) -> list[int]:
        return [int(r["round"]) for r in self.rows if int(r["round"]) > 0]

    def wall_per_round(self) -> dict[int, float]:
        elapsed = {int(r["round"]): float(r["elapsed_s"]) for r in self.rows}
        return {r: elapsed[r] - elapsed[r - 1] for r in elapsed if r > 0 and r - 1 in elapsed}

    def workers(self) -> int:
        """ClientApp processes that ran at once (Ray's actor pool)."""
        return max((len(s.clients) for s in self.samples), default=0) or 1


def run_one(method: str, repeat: int, args: argparse.Namespace, extra: dict[str, Any],
            out_dir: Path) -> Result:
    name = f"{method}-{repeat}"
    overrides = {
        "run.method": method, "run.seed": args.seed, "run.rounds": args.rounds,
        "run.name": name, "run.output_dir": str(out_dir),
        "data.num_participants": args.participants, "data.num_heldout": args.heldout,
        "data.min_partition_size": args.min_partition_size,
        "server.fraction_train": args.fraction, "run.eval_every": args.eval_every,
        "eval.participants_sample": min(args.eval_participants, args.participants),
        "eval.heldout_sample": min(args.eval_heldout, args.heldout),
        "train.torch_threads": 1, **extra,
    }
    sampler = MemorySampler(args.sample_s)

    def on_line(now: float, line: str) -> None:
        if args.verbose or ROUND_LINE.match(line):
            print(f"  {name}: {line.rstrip()}", flush=True)

    sampler.start()
    try:
        run = run_training(args.preset, overrides, "flwr", on_line=on_line,
                           launch_args=["--cpus-per-client", str(args.cpus_per_client)],
                           timeout_s=args.timeout_s)
    finally:
        sampler.stop()
    if run.rc != 0 or not run.rows or run.output_dir is None:
        tail = "".join(run.output.splitlines(keepends=True)[-25:])
        raise SystemExit(f"error: {name} exited {run.rc}:\n{tail}")
    with (run.output_dir / "timings.csv").open() as f:
        timings = list(csv.DictReader(f))
    marks = {int(t["round"]): float(t["end_unix"]) - sampler.unix0
             for t in timings if t.get("end_unix")}
    return Result(method, repeat, run.wall_s, run.rows, timings, marks, sampler.samples)


# -- the report -----------------------------------------------------------------------------------


def number(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else 0.0
    except ValueError:
        return 0.0


def measured_rounds(result: Result) -> list[int]:
    """The rounds averaged: from round 2 when there are 3 or more (round 1 also starts the Ray
    actors and fills the caches)."""
    rounds = result.rounds()
    return [r for r in rounds if r >= 2] if len(rounds) >= 3 else rounds


def breakdown(result: Result) -> dict[int, dict[str, float]]:
    """Per round: its wall time split into ``PHASES`` (seconds)."""
    timing = {int(t["round"]): {k: number(v) for k, v in t.items()} for t in result.timings}
    wall = result.wall_per_round()
    workers = result.workers()
    out = {}
    for r, total in wall.items():
        t, before = timing.get(r, {}), timing.get(r - 1, {})
        parts = {"data": t.get("client_data_s", 0.0) / workers,
                 "local training": t.get("client_train_s", 0.0) / workers,
                 "client scoring": t.get("client_eval_s", 0.0) / workers}
        phases = t.get("train_s", 0.0) + t.get("evaluate_s", 0.0)
        parts["Flower messaging"] = phases - sum(parts.values())
        parts["aggregation"] = t.get("aggregate_train_s", 0.0)
        parts["gACC"] = before.get("gacc_s", 0.0)
        parts["bookkeeping"] = before.get("record_s", 0.0) - parts["gACC"]
        parts["other"] = total - sum(parts.values())
        out[r] = parts
    return out


def summarise(result: Result) -> dict[str, Any]:
    rounds = measured_rounds(result)
    wall = result.wall_per_round()
    rows = {int(r["round"]): r for r in result.rows}
    parts = breakdown(result)
    peaks = round_peaks(result.samples, result.marks)
    server_peak = max((s.server for s in result.samples), default=0) / 2**20
    client_peak = max((max(s.clients.values(), default=0) for s in result.samples),
                      default=0) / 2**20

    def mean(values: list[float]) -> float:
        return statistics.mean(values) if values else float("nan")

    return {
        "round_s": mean([wall[r] for r in rounds if r in wall]),
        "parts": {p: mean([parts[r][p] for r in rounds if r in parts]) for p in PHASES},
        "train_mb": mean([(number(rows[r].get("bytes_sent")) + number(rows[r].get(
            "bytes_received"))) / 1e6 for r in rounds]),
        "eval_mb": mean([number(rows[r].get("bytes_sent_eval")) / 1e6 for r in rounds]),
        "server_peak": server_peak, "client_peak": client_peak,
        "peaks": peaks, "growth": memory_growth(peaks, len(result.rounds())),
        "workers": result.workers(), "wall_s": result.wall_s,
        "training_s": number(result.rows[-1].get("elapsed_s")),
        "zacc": 100 * number(result.rows[-1].get("zacc_weighted")),  # percent, as every table
    }


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def report(args: argparse.Namespace, argv: list[str], results: list[Result],
           load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    methods = list(dict.fromkeys(r.method for r in results))
    stats = {m: [summarise(r) for r in results if r.method == m] for m in methods}
    smoke = any(getattr(args, k) != v for k, v in DEFAULTS.items())
    lines = ["# Scale: 1,000 participants + 100 held out through `flwr run`"
             + (" (SMOKE RUN)" if smoke else ""), "",
             *written_by("scale", argv, quote=True)]
    if smoke:
        lines += [(f"**Smoke run**: {args.participants} participants + {args.heldout} held "
                   f"out, {args.rounds} rounds, fraction {args.fraction}, not the benchmark's "
                   f"settings ({DEFAULTS}); its verdicts say nothing about the target."), ""]
    lines += [
        (f"Machine: {machine()}. Load average before / after: "
         f"{' '.join(f'{v:.2f}' for v in load[0])} / {' '.join(f'{v:.2f}' for v in load[1])} "
         f"(above ~{os.cpu_count()}, other jobs shared the cores)."), "",
        (f"Preset `{args.preset}` (MNIST, MLP 784-200-200-10), seed {args.seed}, "
         f"`data.num_participants={args.participants}`, `data.num_heldout={args.heldout}`, "
         f"`data.min_partition_size={args.min_partition_size}` (Dirichlet 0.3 over ~55 samples "
         f"a client leaves some below the default 20), `server.fraction_train={args.fraction}`, "
         f"{args.rounds} rounds, evaluation every {args.eval_every} round(s) on "
         f"`eval.participants_sample={min(args.eval_participants, args.participants)}` "
         f"participants and `eval.heldout_sample={min(args.eval_heldout, args.heldout)}` "
         f"held-out clients (a new sample each round), `train.torch_threads=1`, "
         f"{args.cpus_per_client} CPU per ClientApp, {args.repeats} repeat(s)"
         + (", the order alternating" if args.repeats > 1 else "") + "; medians over repeats."
         + (f" Means over rounds 2-{args.rounds} (round 1 also starts the actors)."
            if args.rounds >= 3 else "")), "",
        ("| method | mean round s | ratio to FedAvg | train MB / round (out + back) | "
         "eval MB / round (out) | ServerApp peak RSS MB | ClientApp peak RSS MB | RSS growth "
         "ServerApp / ClientApp MB (last 5 vs rounds 3-5) | run wall s | final zACC |"),
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    base = median([s["round_s"] for s in stats.get("fedavg", [])])
    verdicts = []
    for m in methods:
        st = stats[m]
        round_s = median([s["round_s"] for s in st])
        ratio = round_s / base if base > 0 else float("nan")  # nan > 0 is False
        growths = [s["growth"] for s in st if s["growth"] is not None]
        grow = (f"{max(g['server'] for g in growths):+.1f} / "
                f"{max(g['client'] for g in growths):+.1f}" if growths else "not judged "
                "(< 10 rounds)")
        lines.append(
            f"| {m} | {round_s:.2f} | {'-' if math.isnan(ratio) else f'{ratio:.2f}x'} | {median([s['train_mb'] for s in st]):.1f} "
            f"| {median([s['eval_mb'] for s in st]):.1f} | "
            f"{max(s['server_peak'] for s in st):.0f} | {max(s['client_peak'] for s in st):.0f} "
            f"| {grow} | {median([s['wall_s'] for s in st]):.0f} | {st[-1]['zacc']:.2f} |")
        if growths:
            worst = max(max(g["server"], g["client"]) for g in growths)
            verdicts.append(f"- memory, {m}: largest growth {worst:+.1f} MB (target <= "
                            f"{MEMORY_SLACK_MB:.0f} MB): {'met' if worst <= MEMORY_SLACK_MB else 'missed'}")
        else:
            verdicts.append(f"- memory, {m}: not judged (needs >= 10 rounds)")
    if "fedavg" in stats and "hyperfedzero" in stats:
        ratio = median([s["round_s"] for s in stats["hyperfedzero"]]) / base
        verdicts.insert(0, f"- round time: HyperFedZero / FedAvg = **{ratio:.2f}x** (target <= "
                           f"{TARGET_RATIO}x): **{'met' if ratio <= TARGET_RATIO else 'missed'}**")
    lines += ["", "Targets (issue 24):", "", *verdicts, "",
              "## Where a round's time goes (mean s per round)", "",
              ("The ClientApps' own seconds (from their replies, in the run's `timings.csv`) are "
               "divided by the ClientApp processes that ran at once; **Flower messaging** is the "
               "rest of the ServerApp's train and evaluate phases (sending, scheduling, "
               "replies); **aggregation**: the ServerApp's `aggregate_train`; **gACC**: its "
               "evaluation on the global test set after the round before, **bookkeeping**: "
               "the checkpoint, metrics files and progress line then; **other**: the rest of "
               "the wall time."), "",
              "| method | ClientApps at once | " + " | ".join(PHASES) + " | round |",
              "|---|---:|" + "---:|" * (len(PHASES) + 1)]
    for m in methods:
        st = stats[m]
        parts = {p: median([s["parts"][p] for s in st]) for p in PHASES}
        lines.append(f"| {m} | {st[0]['workers']} | " + " | ".join(
            f"{parts[p]:.2f}" for p in PHASES) + f" | {median([s['round_s'] for s in st]):.2f} |")
    if "fedavg" in stats and "hyperfedzero" in stats:
        diff = {p: median([s["parts"][p] for s in stats["hyperfedzero"]])
                - median([s["parts"][p] for s in stats["fedavg"]]) for p in PHASES}
        top = sorted(diff, key=diff.get, reverse=True)[:3]
        lines += ["", "HyperFedZero's extra time per round against FedAvg, largest first: "
                  + ", ".join(f"{p} {diff[p]:+.2f} s" for p in top) + "."]
    lines += ["", "## Per round", "",
              ("Wall s and peak RSS MB (ServerApp / largest ClientApp process) of each round, "
               "from the end of the round before to its own end by the ServerApp's clock; first "
               "repeat."), "",
              "| round | " + " | ".join(f"{m} wall s | {m} RSS MB" for m in methods) + " |",
              "|---:|" + "---:|---|" * len(methods)]
    firsts = {m: next(r for r in results if r.method == m) for m in methods}
    walls = {m: firsts[m].wall_per_round() for m in methods}
    peaks = {m: round_peaks(firsts[m].samples, firsts[m].marks) for m in methods}
    for r in range(1, args.rounds + 1):
        cells = []
        for m in methods:
            p = peaks[m].get(r)
            rss = f"{p[0]:.0f} / {max(p[1].values(), default=0):.0f}" if p else "-"
            cells.append(f"{walls[m].get(r, float('nan')):.2f} | {rss}")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    ends = {m: after_last_round(firsts[m].samples, firsts[m].marks) for m in methods}
    cells = [f"- | {e[0]:.0f} / {e[1]:.0f}" if e else "- | -" for e in ends.values()]
    lines.append("| after the last round (curves.png, summary, shut-down) | "
                 + " | ".join(cells) + " |")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mnist_mlp")
    parser.add_argument("--methods", default="fedavg,hyperfedzero")
    parser.add_argument("--participants", type=int, default=DEFAULTS["participants"])
    parser.add_argument("--heldout", type=int, default=DEFAULTS["heldout"])
    parser.add_argument("--rounds", type=int, default=DEFAULTS["rounds"])
    parser.add_argument("--fraction", type=float, default=DEFAULTS["fraction"],
                        help="server.fraction_train")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--eval-participants", type=int, default=100,
                        help="eval.participants_sample (0: all)")
    parser.add_argument("--eval-heldout", type=int, default=50,
                        help="eval.heldout_sample (0: all)")
    parser.add_argument("--min-partition-size", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per method; the order alternates between repeats")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling interval")
    parser.add_argument("--timeout-s", type=float, default=None, help="per run")
    parser.add_argument("--verbose", action="store_true", help="echo every line of the runs")
    parser.add_argument("-c", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "scale.md")
    args = parser.parse_args(argv)
    if not Path("/proc/self/statm").exists():
        print("error: benchmarks.scale reads process memory from /proc (Linux only)",
              file=sys.stderr)
        return 2
    for key in ("participants", "rounds", "repeats"):
        if getattr(args, key) < 1:
            print(f"error: --{key}: expected an integer >= 1, got {getattr(args, key)}",
                  file=sys.stderr)
            return 2
    from hfz_app.config import ConfigError, parse_overrides

    try:
        extra = parse_overrides(args.c)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    methods = args.methods.split(",")
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="hfz-scale-") as tmp:
        for rep in range(args.repeats):
            for method in methods if rep % 2 == 0 else methods[::-1]:
                start = time.perf_counter()
                result = run_one(method, rep, args, extra, Path(tmp))
                results.append(result)
                print(f"repeat {rep} {method}: {time.perf_counter() - start:.0f} s in all, "
                      f"mean round {summarise(result)['round_s']:.2f} s", flush=True)
    text = report(args, argv, results, (load_before, os.getloadavg()))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
