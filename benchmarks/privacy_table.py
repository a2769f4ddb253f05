"""zACC / gACC / pACC under central DP (Flower's fixed-clipping wrappers), per noise multiplier.

    nice python -m benchmarks.privacy_table --preset mnist_mlp --methods hyperfedzero,fedavg \
        --noise 0,0.03,0.1,0.3 --clip 1.0 -c run.rounds=10 -c train.torch_threads=1 \
        --out docs/privacy_table.md

Every run goes through the real ServerApp/ClientApp (in-process Grid, as
``benchmarks.compare_methods``). For each method: one run without any wrapper, then one run
per noise multiplier with ``privacy.dp`` (default ``server``) and the given clipping norm. Epsilon
is the accountant's value after the last round at ``privacy.delta`` (``inf`` without noise).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.compare_methods import run_seeds
from benchmarks.harness import Table, command_line
from hfz_app.config import load_config, parse_overrides
from hfz_app.federation.privacy import planned_epsilon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mnist_mlp")
    parser.add_argument("--methods", default="hyperfedzero,fedavg")
    parser.add_argument("--noise", default="0,0.03,0.1,0.3", help="noise multipliers")
    parser.add_argument("--clip", type=float, default=1.0, help="clipping norm C")
    parser.add_argument("--dp", default="server", choices=("server", "client"))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--no-plain", action="store_true", help="skip the run without DP")
    parser.add_argument("-c", action="append", default=[], help="override for every run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    common = parse_overrides(args.c)
    settings: list[tuple[str, dict]] = [] if args.no_plain else [("no DP", {})]
    for sigma in (float(s) for s in args.noise.split(",")):
        settings.append((f"sigma {sigma:g}", {
            "privacy.dp": args.dp, "privacy.noise_multiplier": sigma,
            "privacy.clipping_norm": args.clip}))
    table = Table("| method | DP | epsilon | zACC | gACC | pACC | wall s/run |\n"
                  "|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for label, extra in settings:
                cells, _, wall = run_seeds(
                    args.preset, {**common, **extra, "run.method": method},
                    [int(s) for s in args.seeds.split(",")], tmp,
                    f"{method}-{label.replace(' ', '')}")
                cfg = load_config(args.preset, {**common, **extra})
                eps = "-" if not extra else f"{planned_epsilon(cfg):.3g}"
                dp = "none" if not extra else f"{args.dp}, C={args.clip:g}, {label}"
                table.add(f"| {method} | {dp} | {eps} | {cells} | {wall:.0f} |")
    if args.out:
        table.write(args.out, command_line("privacy_table", sys.argv[1:]))


if __name__ == "__main__":
    main()
