"""Memory a run will need, estimated from its config before anything is allocated.

A config can ask for a model that no machine holds (``model.chunk_size=1e10`` in the flat layout,
``model.embed_dim=1e9``): building it dies in an allocation traceback, or worse, grows until the
machine swaps. The launcher calls :func:`check_fits` first: the method's model is built on
PyTorch's ``meta`` device (shapes only, no memory, milliseconds), its parameters counted, a
training step's largest activations estimated, and a config whose estimate exceeds the memory
available here is one :class:`~hfz_app.config.ConfigError` naming the key that makes it large.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from hfz_app.config import Config, ConfigError

BYTES = 4  # float32
# Keys that make a model or a step large, sizes before switches: the first whose default would
# fit is named (else the one whose default shrinks the estimate most).
SIZE_KEYS = ("model.chunk_size", "model.embed_dim", "model.hidden", "model.chunk_embed_dim",
             "model.extractor_hidden", "train.batch_size", "fedjets.num_experts",
             "fedjets.gate_hidden", "model.chunk_layout", "model.granularity", "model.factorised",
             "model.target")


@dataclass(frozen=True)
class Estimate:
    """One process's memory for a training step: parameters (weights, gradients, optimiser
    state) and the step's activations (every layer's output, weights generated per sample)."""

    parameters: int
    activations: int  # values one training step keeps for its backward pass
    optimiser_states: int

    @property
    def bytes(self) -> int:
        """Weights + gradients + optimiser state, and the activations saved for the backward
        pass (their gradients are freed layer by layer as it goes)."""
        return BYTES * ((2 + self.optimiser_states) * self.parameters + self.activations)


def _forward_values(model: torch.nn.Module, batch: int, input_shape: tuple[int, ...]) -> int:
    """Values every leaf module outputs in one training forward of ``batch`` inputs, run on the
    meta device (shapes only); 0 where a model's forward cannot run there."""
    total = 0

    def count(module: torch.nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else [output]
        total += sum(o.numel() for o in outputs if isinstance(o, torch.Tensor))

    hooks = [m.register_forward_hook(count) for m in model.modules() if not any(m.children())]
    try:
        model.train()
        model(torch.zeros(batch, *input_shape, device="meta"))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return 0
    finally:
        for hook in hooks:
            hook.remove()
    return total


def estimate(cfg: Config, input_shape: tuple[int, int, int], num_classes: int) -> Estimate:
    """The model of ``cfg`` built on the meta device: its parameter count, and the values one
    training step holds: every layer's output in a forward of ``train.batch_size`` inputs, at
    least the generated weights (``granularity: sample`` materialises one weight set per sample
    in the flat layout or without ``factorised``; the flat layout pads to whole chunks).
    Model settings only a build can check raise their own one-line ValueError here."""
    from hfz_app.methods import get_method

    with torch.device("meta"):
        model = get_method(cfg.run.method)(cfg, input_shape, num_classes).build_model()
    parameters = sum(p.numel() for p in model.parameters())
    generated = 0
    shapes = getattr(model, "generate_shapes", None)
    if shapes is not None and getattr(model, "hyper", None) is not None:
        per_set = sum(s.numel() for s in shapes().values())
        m = cfg.model
        if m.chunk_layout == "flat":
            per_set = math.ceil(per_set / m.chunk_size) * m.chunk_size
        per_sample = m.granularity == "sample" and (m.chunk_layout == "flat" or not m.factorised)
        generated = per_set * (cfg.train.batch_size if per_sample else 1)
    with torch.device("meta"):
        forward = _forward_values(model, cfg.train.batch_size, input_shape)
    return Estimate(parameters, max(generated, forward), 2 if cfg.train.optimizer == "adam" else 1)


def available_bytes(device: str = "cpu") -> int:
    """Memory this run can use: the GPU's total on CUDA, else the host's available memory."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[1]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _with_default(cfg: Config, dotted: str) -> Config | None:
    """``cfg`` with one key back at its default (``None`` if it already is, or that is invalid)."""
    from hfz_app.config import from_dict

    section, _, key = dotted.rpartition(".")
    default = getattr(getattr(Config(), section), key)
    if getattr(getattr(cfg, section), key) == default:
        return None
    try:
        return from_dict(cfg.to_dict(), {dotted: default})
    except ConfigError:
        return None


def check_fits(cfg: Config, input_shape: tuple[int, int, int], num_classes: int, *,
               processes: int = 1, limit_bytes: int | None = None) -> Estimate:
    """Refuse a config whose ``processes`` copies (the ServerApp and the ClientApps that run at
    once) of one training step cannot fit in ``limit_bytes`` (default: :func:`available_bytes`):
    one ConfigError naming the key that makes it large, the estimate and the limit."""
    est = estimate(cfg, input_shape, num_classes)
    limit = available_bytes(cfg.run.device) if limit_bytes is None else limit_bytes
    need = processes * est.bytes
    if need <= limit:
        return est
    culprit, smallest = "model.target", need
    for key in SIZE_KEYS:
        other = _with_default(cfg, key)
        if other is None:
            continue
        try:
            size = processes * estimate(other, input_shape, num_classes).bytes
        except (ConfigError, ValueError):
            continue
        if size < smallest:
            culprit, smallest = key, size
        if size <= limit:
            break
    section, _, key = culprit.rpartition(".")
    value = getattr(getattr(cfg, section), key)
    raise ConfigError(
        f"{culprit}: {value!r} needs an estimated {_gib(need)} ({est.parameters:,} parameters, "
        f"{est.activations:,} activation values per step, x{processes} processes), more "
        f"than the {_gib(limit)} of memory available here")


__all__ = ["Estimate", "available_bytes", "check_fits", "estimate"]
