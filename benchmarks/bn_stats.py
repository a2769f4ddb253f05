"""gACC of a ResNet with its averaged BatchNorm statistics against the initial ones.

    python -m benchmarks.bn_stats [--rounds 5]

Until ``model.bn_stats`` existed, no method shared BatchNorm running statistics, so the server's
gACC and every held-out client evaluated a ResNet with the initial statistics (mean 0, variance
1). This script trains FedAvg / ResNet-20 (SGD, lr 0.01, momentum 0.9; the `tiny` preset's 3 participants +
1 held-out client) on CIFAR-10-shaped synthetic data (the ``synthetic_rgb`` source: 3x32x32, 10
classes, offline) with the statistics shared, then evaluates the
final global arrays on the global test set twice, in one process: as they are (the averaged
statistics) and with the statistics reset to their initial values (the old behaviour). It also
reports the held-out clients' zACC both ways, and with AdaBN (``eval.heldout_adapt=adabn``).
Writes docs/benchmarks/bn_stats.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from torch import nn

from benchmarks.harness import ROOT, Table, machine, run_training, written_by
from hfz_app.checkpoint import load_checkpoint
from hfz_app.config import from_dict
from hfz_app.data import build_federation
from hfz_app.methods import runtime_for

OUT = ROOT / "docs/benchmarks/bn_stats.md"


def reset_statistics(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"run.name": "bn", "run.output_dir": tmp, "run.rounds": args.rounds,
                     "run.seed": args.seed, "run.method": "fedavg", "data.dataset": "synthetic_rgb",
                     "model.target": "resnet20", "train.lr": 0.01, "train.torch_threads": 2}
        run = run_training("tiny", overrides)
        assert run.output_dir is not None, run.output
        ckpt = load_checkpoint(max((run.output_dir / "checkpoints").glob("round_*.pt")))
    cfg = from_dict(ckpt.config)
    fed = build_federation(cfg.data, cfg.run.seed)
    x, y = fed.global_test()
    heldout = [fed.client(p) for p in range(cfg.data.num_participants,
                                            cfg.data.num_participants + cfg.data.num_heldout)]
    rows = {}
    for label, adapt, reset in (("averaged statistics (model.bn_stats=shared)", "none", False),
                                ("initial statistics (before: never shared)", "none", True),
                                ("averaged, AdaBN on held-out clients", "adabn", False)):
        runtime = runtime_for(from_dict(ckpt.config, {"eval.heldout_adapt": adapt}),
                              fed.input_shape, fed.num_classes)
        model = runtime.frozen(ckpt.shared, "checkpoint")
        if reset:
            reset_statistics(model)
        gacc = runtime.evaluate(model, x, y, zeroshot=True, diagnostics=False)["accuracy"]
        correct = total = 0
        for client in heldout:
            clone = runtime.frozen(ckpt.shared, "checkpoint")
            if reset:
                reset_statistics(clone)
            m = runtime.evaluate_heldout(clone, client.test_x, client.test_y)
            correct += m["accuracy"] * m["num-examples"]
            total += m["num-examples"]
        rows[label] = (gacc, correct / total)
    argv_used = sys.argv[1:] if argv is None else argv
    table = Table(f"# BatchNorm statistics: ResNet-20 FedAvg, {args.rounds} rounds, seed "
                  f"{args.seed}", "", *written_by("bn_stats", argv_used),
                  f"Machine: {machine()}. Data: CIFAR-10-shaped synthetic images "
                  f"(`data.dataset=synthetic_rgb`), {cfg.data.num_participants} participants + "
                  f"{cfg.data.num_heldout} held out; one run, its final global arrays evaluated "
                  "three ways.", "",
                  "| evaluated with | gACC | zACC (held-out, weighted) |", "|---|---|---|")
    for label, (gacc, zacc) in rows.items():
        table.add(f"| {label} | {100 * gacc:.2f} | {100 * zacc:.2f} |")
    table.write(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
