"""What each client holds: a text table and a clients x classes heatmap (with ``data.style``, a
clients x style sources heatmap beside it, and optionally a picture grid of samples per client).

    python -m hfz_app.data.describe --preset mnist_mlp [--out outputs/partition.png] [-c k=v ...]
    python -m hfz_app.data.describe --preset style_mnist_lenet --samples docs/style_samples.png
"""

from __future__ import annotations

import argparse
import io
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


def style_matrix(federation: Federation) -> np.ndarray | None:
    """[clients, style sources] sample counts (no image is built); None without data.style."""
    if not federation.style_sources:
        return None
    k = len(federation.style_sources)
    return np.stack([np.bincount(federation.style(pid).ids, minlength=k)  # type: ignore[union-attr]
                     for pid in range(federation.num_clients)])


def describe(federation: Federation, png_path: str | Path | None = None,
             max_rows: int | None = None) -> str:
    """Per-client sizes, label histograms, style mixes and shift parameters; optionally the
    heatmap PNG. ``max_rows``: list at most this many clients (the launcher's output of a
    1,000-client run would otherwise open with 1,000 lines), then say how many are left."""
    counts = label_matrix(federation)
    styles = style_matrix(federation)
    many = federation.num_classes > MAX_LISTED_CLASSES
    label_head = "classes present / top-3" if many else "label counts " + " ".join(
        federation.class_names[:MAX_LISTED_CLASSES])
    header = (f"{federation.dataset}: {federation.num_participants} participants + "
              f"{federation.num_heldout} held out, {federation.num_classes} classes, input "
              f"{'x'.join(map(str, federation.input_shape))}, seed {federation.seed}, "
              f"alpha_dir {federation.cfg.alpha_dir}")
    lines = [header]
    if styles is not None:
        cfg = federation.cfg
        lines.append(f"style: {len(styles[0])} photo sources ({', '.join(federation.style_sources)}),"
                     f" Dirichlet {cfg.style_alpha} (held out "
                     f"{cfg.style_alpha_heldout or cfg.style_alpha}); global test: uniform mix")
    lines.append(f"{'client':>6} {'role':<8} {'n_train':>7} {'n_test':>6} {'eff_cls':>7}  "
                 f"{label_head}" + ("  | style % " + "/".join(federation.style_sources)
                                    if styles is not None else ""))
    listed = federation.num_clients if max_rows is None else min(max_rows,
                                                                   federation.num_clients)
    for pid in range(listed):
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
        if styles is not None:
            line += "  | " + "/".join(f"{100 * c / max(row.sum(), 1):.0f}" for c in styles[pid])
        shift = federation.shift_params(pid)
        if shift:
            line += "  | " + " ".join(f"{k}={v:+.2f}" for k, v in shift.items())
        lines.append(line)
    if listed < federation.num_clients:
        sizes = counts.sum(axis=1)
        lines.append(f"... {federation.num_clients - listed} more clients not listed "
                     f"(python -m hfz_app.data.describe lists all); samples per client "
                     f"min {sizes.min()}, median {np.median(sizes):g}, max {sizes.max()}")
    x_test, _ = federation.global_test()
    lines.append(f"global test: {len(x_test)} samples; pooled train: {int(counts.sum())} samples")
    if png_path is not None:
        plot_heatmap(federation, counts, Path(png_path), styles)
        lines.append(f"heatmap: {png_path}")
    return "\n".join(lines)


def _client_labels(federation: Federation) -> list[str]:
    return [f"{'h' if federation.is_heldout(p) else 'p'}{p}" for p in range(federation.num_clients)]


def plot_heatmap(federation: Federation, counts: np.ndarray, path: Path,
                 styles: np.ndarray | None = None) -> None:
    """Clients x classes sample counts; with ``styles``, clients x style sources beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_clients, n_classes = counts.shape
    width = min(2 + 0.35 * n_classes, 16)
    height = min(1.5 + 0.3 * n_clients, 20)
    if styles is None:
        fig, ax = plt.subplots(figsize=(width, height))
    else:
        fig, (ax, style_ax) = plt.subplots(
            1, 2, figsize=(width + 2 + 0.6 * styles.shape[1], height),
            gridspec_kw={"width_ratios": [n_classes, max(styles.shape[1], 2)]})
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_yticks(range(n_clients), _client_labels(federation))
    if n_classes <= MAX_LISTED_CLASSES:
        ax.set_xticks(range(n_classes), federation.class_names, rotation=90)
    if federation.num_heldout:
        ax.axhline(federation.num_participants - 0.5, color="white", linewidth=2)
    ax.set_xlabel("class")
    ax.set_ylabel("client (p: participant, h: held out)")
    ax.set_title(f"{federation.dataset}: label counts per client "
                 f"(Dirichlet {federation.cfg.alpha_dir}, seed {federation.seed})")
    if styles is not None:
        shares = styles / np.maximum(styles.sum(axis=1, keepdims=True), 1)
        image = style_ax.imshow(shares, aspect="auto", cmap="magma", vmin=0, vmax=1,
                                interpolation="nearest")
        fig.colorbar(image, ax=style_ax, label="share of the client's samples")
        style_ax.set_yticks(range(n_clients), _client_labels(federation))
        style_ax.set_xticks(range(styles.shape[1]), federation.style_sources, rotation=90)
        if federation.num_heldout:
            style_ax.axhline(federation.num_participants - 0.5, color="white", linewidth=2)
        style_ax.set_xlabel("style source (photographs)")
        style_ax.set_title(f"style mix (Dirichlet {federation.cfg.style_alpha})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(federation: Federation, path: Path, per_client: int = 8) -> None:
    """A picture grid: ``per_client`` samples of every client (its first ones, already in
    seeded random order), one row per client, labelled with its role and largest style share.
    Builds every client's tensors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = federation.num_clients
    fig, axes = plt.subplots(rows, per_client, squeeze=False,
                             figsize=(0.75 * per_client + 1.6, 0.8 * rows + 0.5))
    for pid in range(rows):
        data = federation.client(pid)
        x, y = (data.test_x, data.test_y) if data.heldout else (data.train_x, data.train_y)
        for j, ax in enumerate(axes[pid]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(x):
                image = x[j].permute(1, 2, 0).numpy()
                ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image,
                          cmap="gray", vmin=0, vmax=1)
                ax.set_title(federation.class_names[int(y[j])], fontsize=6, pad=1)
        label = _client_labels(federation)[pid]
        if data.style:
            top = max(data.style, key=data.style.get)
            label += f"\n{top} {100 * data.style[top]:.0f}%"
        axes[pid][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"{federation.dataset}: {per_client} samples per client (seed {federation.seed})",
                 fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.4 / (0.8 * rows + 0.5)))
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=85)
    plt.close(fig)
    from PIL import Image  # 256 colours: a third of the size, for a picture kept in docs/

    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True)


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
    parser.add_argument("--samples", default=None, metavar="PNG",
                        help="also draw a picture grid of a few samples per client into PNG "
                             "(builds every client), e.g. docs/style_samples.png")
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
    if args.samples:
        plot_samples(federation, Path(args.samples))
        print(f"samples: {args.samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
