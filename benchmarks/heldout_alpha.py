"""zACC against the held-out clients' label skew, without retraining.

    python -m benchmarks.heldout_alpha    # after: python -m benchmarks.sweep --sweep mnist \
                                          #     --seeds 0,1,2 --keep-checkpoints

The held-out clients' Dirichlet alpha (``data.alpha_dir_heldout``) changes only how the held-out
pool is split: the participants' data, hence the trained shared arrays, do not depend on it (the
federation draws each decision from its own random stream). So instead of training the `mnist`
sweep's FedAvg / HyperFedZero / control once per alpha, this script takes their final checkpoints
(trained through ``flwr run``) and evaluates them frozen with the method runtime both apps use
(``hfz_app.methods.runtime``, so zACC is computed exactly as there) on the held-out clients drawn
with each alpha. At the training alpha (0.3) it must reproduce the sweep's recorded zACC: checked.

Writes the records of the `heldout_alpha` table (benchmarks/results/heldout_alpha.jsonl) for
``benchmarks.report``, which plots zACC against alpha.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import ROOT, command_line, git_commit, machine
from benchmarks.sweep import HELDOUT_ALPHAS, SWEEPS, append_record, read_results
from hfz_app.checkpoint import load_checkpoint
from hfz_app.data import build_federation
from hfz_app.methods import runtime_for
from hfz_app.zeroshot.checkpoint_config import checkpoint_config

TRAINED_CELLS = ("fedavg", "hyperfedzero", "control")  # cells of the `mnist` sweep
COMMAND = command_line("heldout_alpha", [])


def latest_checkpoint(run_dir: Path) -> Path:
    checkpoints = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    if not checkpoints:
        raise SystemExit(f"error: {run_dir}/checkpoints: no checkpoint (run the mnist sweep with "
                         f"--keep-checkpoints)")
    return checkpoints[-1]


@torch.no_grad()
def heldout_zacc(checkpoint: Path, alpha: float) -> tuple[float, float]:
    """Weighted zACC over the held-out clients drawn with ``alpha``, and its std across them."""
    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt.config, {"data.alpha_dir_heldout": alpha})
    fed = build_federation(cfg.data, cfg.run.seed)  # cached per (data, seed): methods share it
    runtime = runtime_for(cfg, fed.input_shape, fed.num_classes)
    model = runtime.frozen(ckpt.shared, f"checkpoint {checkpoint}")
    n_p = cfg.data.num_participants
    accs, sizes = [], []
    for partition in range(n_p, n_p + cfg.data.num_heldout):
        data = fed.client(partition)
        metrics = runtime.evaluate(model, data.test_x, data.test_y, zeroshot=True)
        accs.append(metrics["accuracy"])
        sizes.append(metrics["num-examples"])
    weighted = sum(a * n for a, n in zip(accs, sizes)) / sum(sizes)
    return weighted, statistics.pstdev(accs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trained", type=Path, default=ROOT / "benchmarks/results/mnist.jsonl")
    parser.add_argument("--results", type=Path,
                        default=ROOT / "benchmarks/results/heldout_alpha.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    latest = {r["key"]: r for r in read_results(args.trained) if "key" in r}  # a rerun wins
    trained = [r for r in latest.values()
               if r.get("status") == "ok" and r.get("cell") in TRAINED_CELLS]
    if not trained:
        raise SystemExit(f"error: {args.trained}: no finished fedavg/hyperfedzero/control runs")
    cells = {c.id: c for c in SWEEPS["heldout_alpha"].cells}
    if args.results.exists():
        args.results.unlink()  # a table from one invocation
    for alpha in HELDOUT_ALPHAS:
        for record in trained:
            start = time.perf_counter()
            checkpoint = latest_checkpoint(Path(record["output_dir"]))
            zacc, spread = heldout_zacc(checkpoint, alpha)
            if alpha == 0.3 and abs(zacc - record["zacc_weighted"]) > 1e-4:
                raise SystemExit(f"error: {checkpoint}: zACC {zacc:.4f} at the training alpha, "
                                 f"but the run recorded {record['zacc_weighted']:.4f}")
            cell = cells[f"a{alpha:g}-{record['cell']}"]
            append_record(args.results, {
                "key": f"heldout_alpha/{cell.id}/s{record['seed']}", "sweep": "heldout_alpha",
                "cell": cell.id, "label": cell.label, "method": cell.method,
                "preset": cell.preset, "seed": record["seed"], "rounds": record["rounds"],
                "variant": "", "extra": {}, "x": alpha, "series": cell.series,
                "reference": False, "status": "ok", "zacc_weighted": zacc, "zacc_std": spread,
                "trained_by": record["command"], "checkpoint": str(checkpoint),
                "table_command": f"{COMMAND}  # on the mnist sweep's checkpoints",
                "wall_s": round(time.perf_counter() - start, 2),
                "machine": machine(), "commit": git_commit(),
            })
            print(f"alpha {alpha:g} {record['cell']:>12} seed {record['seed']}: "
                  f"zACC {100 * zacc:.2f} (spread {100 * spread:.2f})", flush=True)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
