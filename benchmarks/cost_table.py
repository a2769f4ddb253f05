"""What each method costs a client: bytes per round, peak memory and time of one local round,
parameters shared and kept personal. Writes docs/benchmarks/cost_table.md.

    python -m benchmarks.cost_table                       # mnist_mlp, the six methods
    python -m benchmarks.cost_table --methods fedavg,hyperfedzero --out /tmp/cost.md

One fresh process per method, so that memory peaks never mix:

1. **peak memory of one local round**: client 0's ``Method.local_train`` (one round: the received
   model, ``train.local_epochs`` over its data, as a ClientApp's train handler runs it). Freed heap
   is returned to the OS first (``malloc_trim``), the process's peak resident set is reset
   (``/proc/self/clear_refs``, Linux), and the peak after the call minus the resident set before
   it is the round's extra memory (model, optimiser state, activations, gradients). Its wall time
   is measured too (one call: noisy on a shared machine).
2. **bytes per client per round**: a 1-round in-process run through the real ServerApp/ClientApp
   (``benchmarks.harness.run_training``; the strategy counts the train message's arrays each way: ``bytes_sent_per_client``, server ->
   participant; ``bytes_received_per_client``, participant -> server; evaluation messages, which
   carry the same shared arrays to each evaluated node, are not counted there).
3. **parameters**: the model's state-dict entries the method shares (averaged by the server) and
   keeps personal (``context.state``, never sent).

The per-step time ratios of HyperFedZero's variants against the plain target are in
docs/benchmarks/step_time.md (quoted at the end of the table).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, child_result, machine, run_process, run_training, written_by

METHODS = ("fedavg", "fedprox", "ditto", "pfedme", "fedjets", "hyperfedzero")
STEP_TIME = ROOT / "docs" / "benchmarks" / "step_time.md"


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM (the peak resident set) to the current resident set (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _client(cfg: Any, federation: Any, partition: int) -> tuple[Any, Any, Any]:
    """``cfg.run.method``'s method, its freshly built model and ``partition``'s data, as a
    ClientApp holds them before a round."""
    import torch

    from hfz_app.methods import get_method

    method = get_method(cfg.run.method)(cfg, federation.input_shape, federation.num_classes)
    torch.manual_seed(cfg.run.seed)
    return method, method.build_model(), federation.client(partition)


def _train_once(cfg: Any, method: Any, model: Any, data: Any) -> float:
    """One local round of ``model`` as the train handler runs it; its wall seconds."""
    import torch

    start = time.perf_counter()
    method.local_train(model, data.train_x, data.train_y,
                       torch.Generator().manual_seed(cfg.run.seed),
                       {"server-round": 1, "proximal-mu": cfg.fedprox.mu})
    return time.perf_counter() - start


def child(spec: dict[str, Any]) -> None:
    """One method, in a fresh process: memory and time of one local round, then the bytes run."""
    import torch

    from hfz_app.config import load_config
    from hfz_app.data import build_federation

    preset, overrides = spec["preset"], spec["overrides"]
    cfg = load_config(preset, overrides)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    method, model, data = _client(cfg, build_federation(cfg.data, cfg.run.seed),
                                  spec["partition"])
    state = model.state_dict()
    shared, personal = method.shared_keys(model), method.personal_keys(model)
    out: dict[str, Any] = {
        "shared_params": sum(state[k].numel() for k in shared),
        "personal_params": sum(state[k].numel() for k in personal),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_samples": len(data.train_x),
    }

    def one_round(m: torch.nn.Module) -> tuple[float, float, float]:
        """Extra peak MB, resident MB before, wall s of one local round of ``m``."""
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        rss_before = proc_status_kb("VmRSS")
        out["peak_reset"] = reset_peak()
        wall = _train_once(cfg, method, m, data)
        return (proc_status_kb("VmHWM") - rss_before) / 1024, rss_before / 1024, wall

    # The process's first round also pays torch's one-off start-up (autograd engine, kernels'
    # lazy init): measured apart ("cold"), on a copy; then the round proper ("warm").
    out["cold_peak_extra_mb"], _, out["cold_round_s"] = one_round(copy.deepcopy(model))
    out["peak_extra_mb"], out["rss_before_mb"], first = one_round(copy.deepcopy(model))
    walls = [first] + [one_round(copy.deepcopy(model))[2] for _ in range(spec["repeats"] - 1)]
    out["local_round_s"] = statistics.median(walls)

    with tempfile.TemporaryDirectory() as tmp:
        run = run_training(preset, overrides | {"run.output_dir": tmp, "run.name": "cost"},
                           "inprocess")
        last = run.rows[-1]
    for key in ("bytes_sent_per_client", "bytes_received_per_client"):
        out[key] = float(last[key])
    print("CHILD " + json.dumps(out), flush=True)


def interleaved_child(spec: dict[str, Any]) -> None:
    """FedAvg's and HyperFedZero's local rounds on the same client, in one process, alternating
    (``repeats`` each, after one warm-up each): the ratio of their medians, side by side."""
    import torch

    from hfz_app.config import load_config
    from hfz_app.data import build_federation

    torch.set_num_threads(1)
    runs, federation = {}, None
    for name in ("fedavg", "hyperfedzero"):
        cfg = load_config(spec["preset"], spec["overrides"] | {"run.method": name})
        federation = federation or build_federation(cfg.data, cfg.run.seed)  # the same data
        runs[name] = (cfg, *_client(cfg, federation, spec["partition"]))

    def one_round(name: str) -> float:
        cfg, method, model, data = runs[name]
        return _train_once(cfg, method, copy.deepcopy(model), data)

    walls: dict[str, list[float]] = {name: [] for name in runs}
    for name in runs:  # warm-up
        one_round(name)
    for _ in range(spec["repeats"]):
        for name in runs:
            walls[name].append(one_round(name))
    print("CHILD " + json.dumps({k: statistics.median(v) for k, v in walls.items()}), flush=True)


def measure(method: str, preset: str, rounds: int, extra: dict[str, Any],
            repeats: int = 5, partition: int = 0) -> dict[str, Any]:
    overrides = {"run.method": method, "run.rounds": rounds, "train.torch_threads": 1, **extra}
    spec = json.dumps({"preset": preset, "overrides": overrides, "repeats": repeats,
                       "partition": partition})
    rc, output, _, _ = run_process([sys.executable, "-m", "benchmarks.cost_table", "--child", spec])
    result = child_result(output)
    if result is None:
        raise SystemExit(f"error: {method}: exit {rc}\n{output[-3000:]}")
    return result


LOCAL_ROUND_GOAL = 1.3  # the recipe's local round against FedAvg's (same preset, same client)


def measure_side_by_side(preset: str, extra: dict[str, Any], repeats: int, partition: int
                         ) -> dict[str, float]:
    """Median local-round seconds of FedAvg and HyperFedZero timed alternately in one process."""
    spec = json.dumps({"preset": preset, "overrides": {"train.torch_threads": 1, **extra},
                       "repeats": repeats, "partition": partition})
    rc, output, _, _ = run_process([sys.executable, "-m", "benchmarks.cost_table",
                                    "--interleaved-child", spec])
    result = child_result(output)
    if result is None:
        raise SystemExit(f"error: side-by-side local rounds: exit {rc}\n{output[-3000:]}")
    return result


def step_time_quote(path: Path = STEP_TIME, target: str = "mlp") -> list[str]:
    """The ratio rows of step_time.md's first table for ``target``: the recipe's (``### mlp``)
    where the file has it, else every variant's (``## mlp 1x28x28``)."""
    if not path.exists():
        return [f"({path.relative_to(ROOT)} not found: run `python -m benchmarks.step_time`)"]
    lines = path.read_text().splitlines()
    out, inside = [], False
    for line in lines:
        if line.startswith("#"):
            if out:
                break
            words = line.lstrip("#").split()
            inside = bool(words) and words[0] == target
            continue
        if out and not line.startswith("|"):  # the table ended
            break
        if inside and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] == "variant" or len(cells) < 3:
                continue
            out.append(f"| {cells[0]} | {cells[1]} | {cells[2]} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mnist_mlp")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the bytes run")
    parser.add_argument("--partition", type=int, default=0,
                        help="the participant whose local round is measured")
    parser.add_argument("--repeats", type=int, default=5,
                        help="warm local rounds timed per method (median)")
    parser.add_argument("-c", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "cost_table.md")
    parser.add_argument("--side-by-side", type=int, default=21, metavar="N",
                        help="local rounds of FedAvg and HyperFedZero timed alternately in one "
                             "process, N each (the goal's ratio; 0: skip)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--interleaved-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.interleaved_child:
        interleaved_child(json.loads(args.interleaved_child))
        return 0
    from hfz_app.config import parse_overrides

    extra = parse_overrides(args.c)
    results = {}
    for method in args.methods.split(","):
        results[method] = r = measure(method, args.preset, args.rounds, extra, args.repeats,
                                       args.partition)
        print(f"{method:>12}: shared {r['shared_params']:,} personal {r['personal_params']:,} | "
              f"sent {r['bytes_sent_per_client'] / 1e6:.3f} MB received "
              f"{r['bytes_received_per_client'] / 1e6:.3f} MB | peak +{r['peak_extra_mb']:.1f} MB "
              f"| local round {r['local_round_s']:.3f} s (cold {r['cold_round_s']:.2f} s)",
              flush=True)
    base = results.get("fedavg")
    first = next(iter(results.values()))
    lines = [
        "# Cost per client: bytes, memory, parameters", "",
        *written_by("cost_table", argv if argv is not None else sys.argv[1:], quote=True),
        f"Machine: {machine()}. Preset `{args.preset}`"
        + (", " + ", ".join(f"`{k}={v}`" for k, v in extra.items()) if extra else "")
        + f", `train.torch_threads=1`; participant {args.partition} ({first['train_samples']} "
          f"training samples) for the local round.", "",
        ("- **MB sent / received**: per participant per training round, server -> participant and "
        "participant -> server (the train messages' arrays, from a "
        f"{args.rounds}-round in-process run's `metrics.csv`; evaluation messages carry the "
        "shared arrays once more to each evaluated node and are not counted)."),
        "- **peak extra MB**: the peak resident set during one `Method.local_train` call (one "
        "local round) minus the resident set before it, in a fresh process per method, after a "
        "first round on a copy of the model (**cold**: that first round's, which also pays "
        "torch's one-off start-up)"
        + ("" if all(r["peak_reset"] for r in results.values()) else
           " (**peak reset unavailable here: the peak is the process's, from its start**)")
        + "; the process holds the dataset and the model before the call (`RSS before`). "
        "Resident-set pages and the allocator's arenas make differences of ~1 MB noise.",
        (f"- **local round s**: the median wall time of {args.repeats} warm calls (each on a "
        "fresh copy of the received model; a shared machine makes it indicative only), against "
        "FedAvg's; **cold s**: the first call in the process."),
        ("- **shared / personal**: state-dict entries the server averages / the client keeps in "
        "`context.state` (Ditto's and pFedMe's personal model, BatchNorm statistics)."), "",
        ("| method | shared params | personal params | MB sent | MB received | peak extra MB | "
        "cold peak extra MB | RSS before MB | local round s | vs FedAvg | cold s |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in results.items():
        ratio = f"{r['local_round_s'] / base['local_round_s']:.2f}x" if base else "-"
        lines.append(
            f"| {method} | {r['shared_params']:,} | {r['personal_params']:,} | "
            f"{r['bytes_sent_per_client'] / 1e6:.3f} | {r['bytes_received_per_client'] / 1e6:.3f} "
            f"| {r['peak_extra_mb']:.1f} | {r['cold_peak_extra_mb']:.1f} | "
            f"{r['rss_before_mb']:.0f} | {r['local_round_s']:.3f} | {ratio} | "
            f"{r['cold_round_s']:.2f} |")
    if base and "hyperfedzero" in results and args.side_by_side > 0:
        pair = measure_side_by_side(args.preset, extra, args.side_by_side, args.partition)
        ratio = pair["hyperfedzero"] / pair["fedavg"]
        goal = LOCAL_ROUND_GOAL
        verdict = "met" if ratio <= goal else f"missed by {ratio / goal:.2f}x"
        lines += ["", (f"- goal: HyperFedZero's local round <= {goal}x FedAvg's: "
                       f"**{ratio:.2f}x**, {verdict} (medians of {args.side_by_side} rounds each, "
                       f"timed alternately in one process: {pair['hyperfedzero']:.4f} against "
                       f"{pair['fedavg']:.4f} s; the table's per-method times come from separate "
                       "processes and move by tenths between runs)")]
    quote = step_time_quote()
    lines += ["", ("Training-step time against FedAvg's MLP step (batch 64, forward + backward + "
              "step), quoted from [step_time.md](step_time.md) (`python -m benchmarks.step_time`"
              "; where the time goes, and the other targets, there):"), ""]
    if quote and quote[0].startswith("|"):
        lines += ["| variant | wall ms | wall ratio |", "|---|---:|---:|", *quote]
    else:
        lines += quote
    text = "\n".join(lines).rstrip() + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
