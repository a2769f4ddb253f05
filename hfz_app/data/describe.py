"""What each client holds: a text table and a clients x classes heatmap.

    python -m hfz_app.data.describe --preset mnist_mlp [--out outputs/partition.png] [-c k=v ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from hfz_app.data.federation import Federation

MAX_LISTED_CLASSES = 20  # beyond this, the table shows summaries instead of every count


def effective_classes(counts: np.ndarray) -> float:
    """exp(entropy) of the label histogram: 1 for a single class, C for a uniform spread."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0


def label_matrix(federation: Federation) -> np.ndarray:
    """[clients, classes] sample counts (local train + test) without building any tensor."""
    return np.stack([sum(federation.label_counts(pid)) for pid in range(federation.num_clients)])


def describe(federation: Federation, png_path: str | Path | None = None) -> str:
    """Per-client sizes, label histograms and shift parameters; optionally the heatmap PNG."""
    counts = label_matrix(federation)
    many = federation.num_classes > MAX_LISTED_CLASSES
    label_head = "classes present / top-3" if many else "label counts " + " ".join(
        federation.class_names[:MAX_LISTED_CLASSES])
    header = (f"{federation.dataset}: {federation.num_participants} participants + "
              f"{federation.num_heldout} held out, {federation.num_classes} classes, input "
              f"{'x'.join(map(str, federation.input_shape))}, seed {federation.seed}, "
              f"alpha_dir {federation.cfg.alpha_dir}")
    lines = [
        header,
        f"{'client':>6} {'role':<8} {'n_train':>7} {'n_test':>6} {'eff_cls':>7}  {label_head}",
    ]
    for pid in range(federation.num_clients):
        train, test = federation.label_counts(pid)
        row = counts[pid]
        if many:
            top = np.argsort(-row, kind="stable")[:3]
            labels = f"{int((row > 0).sum())} / " + ", ".join(
                f"{federation.class_names[c]}:{row[c]}" for c in top)
        else:
            labels = " ".join(str(c) for c in row)
        role = "held-out" if federation.is_heldout(pid) else "train"
        line = (f"{pid:>6} {role:<8} {int(train.sum()):>7} {int(test.sum()):>6} "
                f"{effective_classes(row):>7.2f}  {labels}")
        shift = federation.shift_params(pid)
        if shift:
            line += "  | " + " ".join(f"{k}={v:+.2f}" for k, v in shift.items())
        lines.append(line)
    x_test, _ = federation.global_test()
    lines.append(f"global test: {len(x_test)} samples; pooled train: {int(counts.sum())} samples")
    if png_path is not None:
        plot_heatmap(federation, counts, Path(png_path))
        lines.append(f"heatmap: {png_path}")
    return "\n".join(lines)


def plot_heatmap(federation: Federation, counts: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_clients, n_classes = counts.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * n_classes, 16), min(1.5 + 0.3 * n_clients, 20)))
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_yticks(range(n_clients), [
        f"{'h' if federation.is_heldout(p) else 'p'}{p}" for p in range(n_clients)])
    if n_classes <= MAX_LISTED_CLASSES:
        ax.set_xticks(range(n_classes), federation.class_names, rotation=90)
    if federation.num_heldout:
        ax.axhline(federation.num_participants - 0.5, color="white", linewidth=2)
    ax.set_xlabel("class")
    ax.set_ylabel("client (p: participant, h: held out)")
    ax.set_title(f"{federation.dataset}: label counts per client "
                 f"(Dirichlet {federation.cfg.alpha_dir}, seed {federation.seed})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from hfz_app.config import ConfigError, load_config, parse_overrides
    from hfz_app.data.federation import build_federation
    from hfz_app.outputs import resolve_output_root

    parser = argparse.ArgumentParser(prog="python -m hfz_app.data.describe",
                                     description="Print the clients' data and plot a heatmap.")
    parser.add_argument("--preset", default="mnist_mlp", help="preset name or YAML path")
    parser.add_argument("--out", default=None,
                        help="heatmap PNG (default: <run.output_dir>/<run.name>/partition.png)")
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. -c data.alpha_dir=0.1")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.preset, parse_overrides(args.run_config))
        federation = build_federation(cfg.data, cfg.run.seed)
    except ValueError as err:  # ConfigError, DataSourceError and split errors: one line
        kind = "config" if isinstance(err, ConfigError) else "data"
        print(f"{kind} error: {err}", file=sys.stderr)
        return 2
    out = args.out or resolve_output_root(cfg.run.output_dir) / cfg.run.name / "partition.png"
    print(describe(federation, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
