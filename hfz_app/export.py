"""Export one plain personalised model for a new client: no labels, no gradient step.

Given a checkpoint of the shared modules and a client's unlabelled inputs, computes the client's
pooled distribution embedding ``e = mean_i embed(x_i)``, generates one weight set ``h(e)`` and
writes the plain target network:

- ``model.pt``: its state dict (load into ``hfz_app.models.build_target(target, input_shape,
  num_classes)``, named in ``export.json``);
- ``model.torchscript.pt``: the same model as TorchScript, which runs with ``torch`` alone
  (``torch.jit.load(path)(x)``, inputs float32 [n, C, H, W] in [0, 1]);
- ``export.json``: what was exported, and, when the data has labels, the exported model's
  accuracy beside per-sample HyperFedZero's on the same data (labels are used only here).

    python -m hfz_app.export --run mnist_mlp --partition 12 --out exports/client12
    python -m hfz_app.export --checkpoint outputs/mnist_mlp/checkpoints/round_0020.pt \\
        --data client.npz --out exports/mine      # npz: x [n, H, W] or [n, C, H, W], optional y

Any other zero-shot method's checkpoint already holds the module a new client runs (FedAvg: the
global model; Ditto, pFedMe: the shared model): it is exported as it is (no embedding).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hfz_app.arrays import ArrayMismatch
from hfz_app.checkpoint import load_checkpoint
from hfz_app.config import ConfigError
from hfz_app.data import DataSourceError
from hfz_app.hyper import HyperFedZeroModel, embedding_stats
from hfz_app.methods import runtime_for
from hfz_app.models import build_target
from hfz_app.zeroshot.checkpoint_config import ZeroShotError, checkpoint_config
from hfz_app.zeroshot.server import find_checkpoint, overridable_keys

BATCH = 512


def load_data_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (uint8 in 0..255 or float in [0, 1]; [n, H, W] or [n, C, H, W]) and optional ``y``."""
    if not path.is_file():
        raise ZeroShotError(f"--data: no file at {path}")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:  # noqa: BLE001 -- numpy raises many types for a damaged file
        raise ZeroShotError(f"--data: {path} is not an .npz file ({type(err).__name__})") from None
    if "x" not in arrays:
        raise ZeroShotError(f"--data: {path} has no array 'x' (found: {', '.join(arrays)})")
    x = arrays["x"]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) == 0:
        raise ZeroShotError(f"--data: x must be [n, H, W] or [n, C, H, W] with n > 0, "
                            f"got shape {list(arrays['x'].shape)}")
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    tensor = tensor.float().div_(255.0) if x.dtype == np.uint8 else tensor.float()
    y = arrays.get("y")
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64)) if y is not None else None
    if labels is not None and len(labels) != len(tensor):
        raise ZeroShotError(f"--data: {len(tensor)} inputs but {len(labels)} labels")
    return tensor, labels


def _logits(fn, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def to_torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.script``, or a trace where scripting fails (the result runs on torch alone)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in favour of torch.export
        try:
            return torch.jit.script(model)
        except Exception:  # noqa: BLE001 -- fall back to tracing for unscriptable code
            return torch.jit.trace(model, example)


def export(
    checkpoint_path: Path,
    out: Path,
    *,
    partition: int | None = None,
    data_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Write ``model.pt``, ``model.torchscript.pt`` and ``export.json`` to ``out``; returns the
    report."""
    try:
        ckpt = load_checkpoint(checkpoint_path)
    except (OSError, ValueError) as err:
        raise ZeroShotError(str(err)) from None
    cfg = checkpoint_config(ckpt.config, overrides)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    if (partition is None) == (data_file is None):
        raise ZeroShotError("give exactly one of --partition and --data")
    if partition is not None:
        from hfz_app.data import build_federation

        federation = build_federation(cfg.data, cfg.run.seed)
        client = federation.client(partition)
        x = torch.cat([client.train_x, client.test_x])
        y: torch.Tensor | None = torch.cat([client.train_y, client.test_y])
        input_shape, classes = federation.input_shape, federation.num_classes
        source: dict[str, Any] = {"partition": partition, "heldout": client.heldout}
    else:
        assert data_file is not None
        x, y = load_data_file(data_file)
        input_shape = tuple(x.shape[1:])
        if num_classes is None:
            from hfz_app.data.sources import load_data

            num_classes = load_data(cfg.data).num_classes
        classes = num_classes
        source = {"data": str(data_file)}
    runtime = runtime_for(cfg, tuple(input_shape), classes)
    try:
        model = runtime.frozen(ckpt.shared, f"checkpoint {checkpoint_path}")
    except ArrayMismatch as err:  # e.g. the data's shape or classes are not the model's
        raise ZeroShotError(f"the checkpoint does not fit a {cfg.run.method}/{cfg.model.target} "
                            f"model for inputs of shape {list(input_shape)} with {classes} "
                            f"classes ({err})") from None

    report: dict[str, Any] = {
        "checkpoint": str(checkpoint_path), "checkpoint_round": ckpt.server_round,
        "trained_run": cfg.run.name, "method": cfg.run.method, "target": cfg.model.target,
        "input_shape": list(input_shape), "num_classes": classes, **source,
        "num_samples": len(x), "labels": y is not None, "device": str(runtime.device),
    }
    x = x.to(runtime.device)
    y = y.to(runtime.device) if y is not None else None
    if isinstance(model, HyperFedZeroModel):
        e = model.pooled_embedding(x)
        state = model.generate(e)
        plain = build_target(cfg.model.target, tuple(input_shape), classes).to(runtime.device)
        plain.load_state_dict(state)
        with torch.inference_mode():
            usage = embedding_stats(e.reshape(1, -1))
        report |= {"embedding": [float(v) for v in e], "embedding_entropy":
                   usage["embed_entropy"], "granularity": cfg.model.granularity}
        pooled = _logits(lambda b: model(b, embedding=e).logits, x)
    else:  # the method's zero-shot module already is a plain model (FedAvg: the global one)
        plain = runtime.method.zeroshot_module(model, x)
        state, pooled = plain.state_dict(), None
    plain.eval()
    for parameter in plain.parameters():
        parameter.requires_grad_(False)
    exported = _logits(plain, x)
    if pooled is not None:
        report["max_abs_logit_diff_vs_generated"] = float((exported - pooled).abs().max())

    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, out / "model.pt")
    to_torchscript(plain.cpu(), x[:2].cpu()).save(str(out / "model.torchscript.pt"))
    report["files"] = {"state_dict": str(out / "model.pt"),
                       "torchscript": str(out / "model.torchscript.pt")}
    report["parameters"] = sum(v.numel() for v in plain.parameters())
    if y is not None:
        report["accuracy_exported"] = _accuracy(exported, y)
        if isinstance(model, HyperFedZeroModel):
            # The zero-shot app's metric on the same data (granularity sample: each input
            # generates its own weights).
            report["accuracy_hyperfedzero"] = runtime.evaluate(model, x, y, zeroshot=True,
                                                               diagnostics=False)["accuracy"]
            report["accuracy_generated_pooled"] = _accuracy(pooled, y)
    (out / "export.json").write_text(json.dumps(report, indent=1))
    return report


def summary(report: dict[str, Any]) -> str:
    where = (f"partition {report['partition']}" if "partition" in report
             else f"data {report['data']}")
    lines = [(f"export: {report['method']} {report['target']} from {report['checkpoint']} "
              f"(round {report['checkpoint_round']}), {where}, {report['num_samples']} samples")]
    if "accuracy_exported" in report:
        lines.append(f"  exported plain model accuracy   {100 * report['accuracy_exported']:6.2f}")
    if "accuracy_hyperfedzero" in report:
        label = ("per-sample HyperFedZero" if report["granularity"] == "sample"
                 else f"HyperFedZero ({report['granularity']})")
        lines.append(f"  {label:<31} {100 * report['accuracy_hyperfedzero']:6.2f}  "
                     f"(as the zero-shot app evaluates it)")
    if not report["labels"]:
        lines.append("  no labels in the data: no accuracy reported")
    if "max_abs_logit_diff_vs_generated" in report:
        lines.append(f"  |exported - generated| logits  "
                     f"{report['max_abs_logit_diff_vs_generated']:.2e}")
    lines.append(f"  wrote {report['files']['state_dict']}, {report['files']['torchscript']}, "
                 f"export.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="a checkpoints/round_NNNN.pt file")
    which.add_argument("--run", help="a training run's name under --output-dir (its checkpoint)")
    parser.add_argument("--round", type=int, default=0, help="with --run: this round (0: latest)")
    parser.add_argument("--output-dir", default="outputs", help="where --run is looked up")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--partition", type=int, help="a client of the checkpoint's federation")
    data.add_argument("--data", type=Path, help=".npz with x (and optionally y, for the report)")
    parser.add_argument("--num-classes", type=int, help="with --data: default the dataset's")
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="data.* / eval.* / train.torch_threads / run.device override of "
                             "the checkpoint's config")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        from hfz_app.config import parse_overrides

        overrides = parse_overrides(args.run_config)
        bad = sorted(set(overrides) - set(overridable_keys()))
        if bad:
            raise ZeroShotError(f"{bad[0]}: only data.*, eval.*, train.torch_threads and run.device "
                                "can be overridden")
        path = (args.checkpoint if args.checkpoint is not None
                else find_checkpoint("", args.run, args.round, args.output_dir))
        report = export(path, args.out, partition=args.partition, data_file=args.data,
                        overrides=overrides, num_classes=args.num_classes)
    except (ZeroShotError, ConfigError, DataSourceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
