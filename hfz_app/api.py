"""The few calls an existing Flower PyTorch project needs to switch to HyperFedZero.

Server side, the strategy only ever holds the *shared* arrays; client side, a node loads them into
its model, trains, and sends back exactly those keys, keeping its personal arrays (BatchNorm
buffers that option ``bn_stats`` keeps local) in ``context.state``. These helpers make that a one-line change each::

    model = hyperfedzero(Net(), input_shape=(1, 28, 28), num_classes=10)   # was: Net()
    load_shared(model, msg.content["arrays"], context.state)   # was: model.load_state_dict(...)
    ...train with HyperFedZeroLoss(model) and model.param_groups(lr)...
    reply = shared_arrays(model, context.state)                # was: ArrayRecord(model.state_dict())

Worked example: ``examples/existing-project/``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import Tensor, nn

from hfz_app.arrays import keep_personal, load_arrays, select, to_record
from hfz_app.config import ConfigError, ModelSection, _build
from hfz_app.hyper.wrapper import HFZOutput, HyperFedZeroModel

_NOT_OPTIONS = {"target": "the module you pass is the target"}


def model_options() -> list[str]:
    """The keyword options :func:`hyperfedzero` accepts (the ``model.`` config keys)."""
    return sorted(f.name for f in dataclasses.fields(ModelSection) if f.name not in _NOT_OPTIONS)


def hyperfedzero(
    module: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    **options: Any,
) -> HyperFedZeroModel:
    """Wrap your own torch ``module`` (left unmodified) as a HyperFedZero model.

    ``input_shape`` is one sample's ``(channels, height, width)`` (flat features: ``(1, 1, F)``);
    ``options`` are the ``model.`` keys of the README's design table (``embed_dim=16``,
    ``generate="head"``, ``alpha=0.01``...). An unknown or invalid option raises a one-line
    :class:`~hfz_app.config.ConfigError` naming it. Every node must build the model with the same
    options, since they fix the shared keys.
    """
    for name, why in _NOT_OPTIONS.items():
        if name in options:
            raise ConfigError(f"{name}: not an option of hyperfedzero() ({why})")
    known = model_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown option of hyperfedzero() (options: {', '.join(known)})"
        )
    if "hidden" in options and not isinstance(options["hidden"], str):  # 64 or (64, 64)
        hidden = options["hidden"]
        widths = hidden if isinstance(hidden, Sequence) else [hidden]
        options = {**options, "hidden": ",".join(str(w) for w in widths)}
    cfg = _build(ModelSection, options, "", "hyperfedzero() options")
    cfg.hidden_widths()  # validates the comma-separated widths
    if cfg.embed_dim == 1:
        raise ConfigError("embed_dim: expected 0 (one per class) or >= 2, got 1")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(
            f"input_shape: expected (channels, height, width) of one sample, got {tuple(input_shape)}"
            " (flat features: (1, 1, F))"
        )
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes: expected >= 2, got {num_classes}")
    device = next(module.parameters(), torch.empty(0)).device
    if device.type == "cpu":
        return HyperFedZeroModel(module, shape, int(num_classes), cfg)  # type: ignore[arg-type]
    # A module already on an accelerator: built from a CPU copy (the wrapper copies it anyway,
    # and its dry runs and calibration happen on the CPU), then moved to the module's device.
    cpu_copy = copy.deepcopy(module).cpu()
    return HyperFedZeroModel(cpu_copy, shape, int(num_classes), cfg).to(device)


class HyperFedZeroLoss(nn.Module):
    """Drop-in for ``nn.CrossEntropyLoss()`` in a training loop: ``criterion(model(x), y)``.

    Adds the embedding-balancing (``alpha``) and sharpness (``beta``) terms of ``model``'s options
    to the cross-entropy, so that the distribution embedding does not collapse. The parts of the
    last call (detached: ``ce``, ``balance``, ``sharpness``) are kept in ``self.parts``.
    """

    def __init__(self, model: HyperFedZeroModel) -> None:
        super().__init__()
        # Not a submodule: the loss must not own (or move, or list) the model's parameters.
        object.__setattr__(self, "model", _check_model(model, "HyperFedZeroLoss"))
        self.parts: dict[str, Tensor] = {}

    def forward(self, output: HFZOutput, target: Tensor) -> Tensor:
        if not isinstance(output, HFZOutput):
            raise TypeError(
                f"HyperFedZeroLoss: expected the model's HFZOutput, got {type(output).__name__}"
                " (pass model(x), not model(x).logits)"
            )
        total, self.parts = self.model.loss(output, target)  # incl. the label anchor, if on
        return total


def _check_model(model: nn.Module, caller: str) -> HyperFedZeroModel:
    if not isinstance(model, HyperFedZeroModel):
        raise TypeError(
            f"{caller}: expected a HyperFedZeroModel (wrap your module with hyperfedzero()), "
            f"got {type(model).__name__}"
        )
    return model


def shared_arrays(model: nn.Module, state: RecordDict | None = None) -> ArrayRecord:
    """The arrays to send: exactly ``model.shared_keys()``.

    With ``state`` (a ClientApp's ``context.state``), the personal arrays (BatchNorm buffers
    that ``bn_stats`` keeps local: the step counter, or with ``local`` the statistics too) are stored
    there for the next round instead of being sent.
    """
    hfz = _check_model(model, "shared_arrays")
    if state is not None:
        keep_personal(hfz, hfz.personal_keys(), state)
    return to_record(select(hfz, hfz.shared_keys()))


def load_shared(model: nn.Module, arrays: ArrayRecord, state: RecordDict | None = None) -> None:
    """Load received shared arrays into ``model``; they must be exactly ``model.shared_keys()``
    with the model's shapes and dtypes, and finite.

    Anything else (e.g. a personal BatchNorm statistic, another model's array, a NaN) raises a
    one-line :class:`~hfz_app.arrays.ArrayMismatch` (a ``ValueError``) naming the key: different
    options or a different module on the server and the client would otherwise train silently on
    a half-loaded model. With ``state`` (``context.state``), the node's own personal arrays saved
    by :func:`shared_arrays` are loaded too.
    """
    hfz = _check_model(model, "load_shared")
    load_arrays(hfz, hfz.shared_keys(), arrays, "load_shared", state)


@torch.no_grad()
def zero_shot_model(
    model: HyperFedZeroModel, module: nn.Module, x_unlabelled: Tensor, batch_size: int = 512
) -> nn.Module:
    """Deploy: ``module`` (your bare class, e.g. ``Net()``) loaded with the one weight set the
    frozen shared model generates from a client's pooled embedding (mean of ``e`` over its
    unlabelled inputs); no labels, no gradient step. Puts ``model`` in eval mode (no noise).
    Checkpoint-based export of the app's own runs: ``python -m hfz_app.export``."""
    hfz = _check_model(model, "zero_shot_model")
    hfz.eval()
    param = next(hfz.parameters())  # follow the model's device and dtype (float64 too)
    x = x_unlabelled.to(param.device, param.dtype if x_unlabelled.is_floating_point() else None)
    weights = hfz.generate(hfz.pooled_embedding(x, batch_size))
    module.load_state_dict(weights)
    return module.to(param.device).eval()
