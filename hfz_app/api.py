"""The few calls an existing Flower PyTorch project needs to switch to HyperFedZero.

Server side, the strategy only ever holds the *shared* arrays; client side, a node loads them into
its model, trains, and sends back exactly those keys, keeping its personal arrays (BatchNorm
buffers that option ``bn_stats`` keeps local) in ``context.state``. These helpers make that a one-line change each::

    model = hyperfedzero(Net(), input_shape=(1, 28, 28), num_classes=10)   # was: Net()
    load_shared(model, msg.content["arrays"], context.state)   # was: model.load_state_dict(...)
    ...train with HyperFedZeroLoss(model) and model.param_groups(lr)...
    reply = shared_arrays(model, context.state)                # was: ArrayRecord(model.state_dict())

The recipe behind the reported numbers: ``recipe_options()`` (model options),
``recipe_options("train")`` (``param_groups(..., hyper_output_lr_scale=)``,
``LabelPriorBatchSampler``), ``recipe_options("server")`` (the strategy). Worked example:
``examples/existing-project/``; the whole path with zero-shot evaluation and export:
``docs/ADOPTING.md``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import Tensor, nn
from torch.utils.data import Sampler

from hfz_app.arrays import keep_personal, load_arrays, select, to_record
from hfz_app.config import CONF_DIR, ConfigError, ModelSection, _build, read_yaml
from hfz_app.hyper.wrapper import HFZOutput, HyperFedZeroModel
from hfz_app.training import batch_indices

_NOT_OPTIONS = {"target": "the module you pass is the target"}


def model_options() -> list[str]:
    """The keyword options :func:`hyperfedzero` accepts (the ``model.`` config keys)."""
    return sorted(f.name for f in dataclasses.fields(ModelSection) if f.name not in _NOT_OPTIONS)


RECIPE_FILE = CONF_DIR / "hyperfedzero_recipe.yaml"
RECIPE_SECTIONS = ("model", "train", "server")


def recipe_options(section: str = "model") -> dict[str, Any]:
    """One section of the recipe every reported number uses (``conf/hyperfedzero_recipe.yaml``,
    read on each call so that it cannot drift from the presets):

    - ``"model"``: the keyword options of :func:`hyperfedzero`
      (``hyperfedzero(Net(), shape, classes, **recipe_options())``);
    - ``"train"``: ``hyper_output_lr_scale`` (for ``model.param_groups``) and ``prior_alpha``
      (for :class:`LabelPriorBatchSampler`);
    - ``"server"``: ``server_momentum`` (for :class:`~hfz_app.HyperFedZeroStrategy`).
    """
    if section not in RECIPE_SECTIONS:
        raise ConfigError(f"section: expected one of {', '.join(RECIPE_SECTIONS)}, got {section!r}")
    tree = read_yaml(RECIPE_FILE).get(section) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{RECIPE_FILE}: {section}: expected a mapping of keys")
    return dict(tree)


def hyperfedzero(
    module: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    **options: Any,
) -> HyperFedZeroModel:
    """Wrap your own torch ``module`` (left unmodified) as a HyperFedZero model.

    ``input_shape`` is one sample's ``(channels, height, width)`` (flat features: ``(1, 1, F)``);
    ``options`` are the ``model.`` keys of docs/DESIGN.md's "The keys" (``embed_dim=16``,
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


class LabelPriorBatchSampler(Sampler[list[int]]):
    """Label-prior batches for a ``DataLoader(dataset, batch_sampler=...)``: each batch first
    draws its label mix ``q ~ Dir(prior_alpha)`` over the client's classes, then ``batch_size``
    indices (with replacement) whose labels follow ``q``.

    Why: trained with ``granularity: client``, the hypernetwork sees the embedding pooled over
    a batch; with every batch of a client alike it has nothing to learn from it (docs/RECIPE.md).
    ``prior_alpha=0``: plain shuffled batches, every sample once. Each pass (epoch) draws new
    batches; ``seed=None`` seeds from torch's global generator (``torch.manual_seed``).
    """

    def __init__(self, labels: Sequence[int] | Tensor, batch_size: int, prior_alpha: float = 1.0,
                 seed: int | None = None) -> None:
        self.labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if len(self.labels) == 0:
            raise ValueError("labels: expected at least one label, got none")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not float(prior_alpha) >= 0:
            raise ValueError(f"prior_alpha: expected >= 0, got {prior_alpha}")
        self.batch_size, self.prior_alpha = int(batch_size), float(prior_alpha)
        if seed is None:
            seed = int(torch.randint(2**31 - 1, (1,)))
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for idx in batch_indices(self.labels, self.batch_size, self.generator, self.prior_alpha):
            yield idx.tolist()


@torch.no_grad()
def client_embedding(model: nn.Module, inputs: Tensor | Iterable[Tensor],
                     batch_size: int = 512) -> Tensor:
    """A client's distribution embedding [d]: the mean of ``e`` over *all* of its unlabelled
    ``inputs`` (one tensor, or batches of it, e.g. ``(b["img"] for b in loader)``).

    Why: ``model(x)`` pools over the batch ``x`` it is given, so evaluating batch by batch
    conditions each batch on itself; ``model(x, embedding=client_embedding(model, all_x))``
    uses the one weight set the client gets (``granularity: client``). Puts ``model`` in eval
    mode (no noise); the sum runs in float64, so batching does not change the result.
    """
    hfz = _check_model(model, "client_embedding")
    hfz.eval()
    param = next(hfz.parameters())  # follow the model's device and dtype (float64 too)
    batches = [inputs] if isinstance(inputs, Tensor) else inputs
    total = torch.zeros(hfz.embed_dim, dtype=torch.float64, device=param.device)
    count = 0
    for batch in batches:
        if not isinstance(batch, Tensor):
            raise TypeError(f"inputs: expected tensors of inputs, got a {type(batch).__name__} "
                            "(pass the images only, e.g. b['img'] for b in loader)")
        x = batch.to(param.device, param.dtype if batch.is_floating_point() else None)
        for i in range(0, len(x), batch_size):
            total += hfz.embed(x[i : i + batch_size]).double().sum(0)
        count += len(x)
    if count == 0:
        raise ValueError("inputs: expected at least one input, got none")
    return (total / count).to(param.dtype)


@torch.no_grad()
def zero_shot_model(
    model: HyperFedZeroModel, module: nn.Module, x_unlabelled: Tensor | Iterable[Tensor],
    batch_size: int = 512,
) -> nn.Module:
    """Deploy: ``module`` (your bare class, e.g. ``Net()``) loaded with the one weight set the
    frozen shared model generates from a client's pooled embedding (:func:`client_embedding` of
    its unlabelled inputs: one tensor or batches); no labels, no gradient step. Puts ``model`` in
    eval mode (no noise). Checkpoint-based export of the app's own runs: ``python -m
    hfz_app.export``."""
    hfz = _check_model(model, "zero_shot_model")
    weights = hfz.generate(client_embedding(hfz, x_unlabelled, batch_size))
    module.load_state_dict(weights)
    return module.to(next(hfz.parameters()).device).eval()
