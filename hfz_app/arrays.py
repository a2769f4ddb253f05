"""Shared and personal arrays: the one place that checks what crosses the network.

A model's state dict is split into *shared* keys (what the strategy averages and sends) and
*personal* keys (what stays on a node, in ``context.state``). Every array that arrives -- a
train reply on the server, the global arrays on a node, a checkpoint in the zero-shot app or in
export, a user's :func:`hfz_app.load_shared` -- goes through :func:`check_arrays`, which reports
the first problem in one line: a foreign or missing key, a shape, a dtype, a non-finite value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

#: The ``context.state`` entry holding a node's personal arrays (every app and the public API).
PERSONAL_RECORD = "hfz.personal"


class ArrayMismatch(ValueError):
    """Received arrays that do not fit the model they are meant for (one line)."""


def _meta(value: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a torch tensor, numpy array or Flower ``Array``."""
    dtype = str(value.dtype).removeprefix("torch.")
    return tuple(int(d) for d in value.shape), dtype


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return not np.issubdtype(array.dtype, np.inexact) or bool(np.isfinite(array).all())


def check_arrays(received: Mapping[str, Any], expected: Mapping[str, Any], what: str, *,
                 finite: bool = True) -> None:
    """Raise :class:`ArrayMismatch` unless ``received`` has exactly ``expected``'s keys, each with
    its shape and dtype (and, with ``finite``, no NaN or infinity).

    ``expected`` maps each key to a reference array (tensor, numpy array or Flower ``Array``;
    ``None``: any shape and dtype); ``what`` names the source in the message (``"arrays of round
    3"``, ``"checkpoint x.pt"``).
    """
    foreign = sorted(set(received) - set(expected))
    missing = sorted(set(expected) - set(received))
    if foreign or missing:
        key = foreign[0] if foreign else missing[0]
        why = "is not a shared key of this model" if foreign else "is missing"
        raise ArrayMismatch(
            f"{what}: '{key}' {why} ({len(foreign)} foreign, {len(missing)} missing of "
            f"{len(expected)} shared keys; every node and the server must build the same model)")
    for key, reference in expected.items():
        value = received[key]
        if reference is not None:
            (shape, dtype), (want_shape, want_dtype) = _meta(value), _meta(reference)
            if shape != want_shape:
                raise ArrayMismatch(f"{what}: '{key}' has shape {list(shape)}, expected "
                                    f"{list(want_shape)}")
            if dtype != want_dtype:
                raise ArrayMismatch(f"{what}: '{key}' has dtype {dtype}, expected {want_dtype}")
        if finite and not _finite(value):
            raise ArrayMismatch(f"{what}: '{key}' holds non-finite values")


def select(model: nn.Module, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The model's state-dict entries for ``keys``, in that order."""
    state = model.state_dict()
    return {k: state[k] for k in keys}


def to_record(arrays: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as an ``ArrayRecord`` (copied to the host: a record is what crosses the network)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in arrays.items()})


def load_arrays(model: nn.Module, shared_keys: Iterable[str], received: ArrayRecord | Mapping,
                what: str, state: RecordDict | None = None) -> None:
    """Check ``received`` against ``model``'s shared keys and load it; then, with ``state``
    (``context.state``), the node's own personal arrays kept there by :func:`keep_personal`."""
    tensors = received.to_torch_state_dict() if isinstance(received, ArrayRecord) else received
    check_arrays(tensors, select(model, shared_keys), what)
    model.load_state_dict(dict(tensors), strict=False)
    if state is not None and PERSONAL_RECORD in state:
        model.load_state_dict(state[PERSONAL_RECORD].to_torch_state_dict(), strict=False)


def keep_personal(model: nn.Module, personal_keys: Iterable[str], state: RecordDict) -> None:
    """Store the node's personal arrays in ``context.state`` for its next message (never sent)."""
    personal = select(model, personal_keys)
    if personal:
        state[PERSONAL_RECORD] = to_record(personal)
