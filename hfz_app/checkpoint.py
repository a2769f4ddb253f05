"""Checkpoints of the shared arrays: what a held-out client or the zero-shot app needs, and what a
restarted ServerApp resumes from (``run.resume``; with the server's own state, e.g. momentum)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord


@dataclass
class Checkpoint:
    server_round: int
    shared: dict[str, torch.Tensor]
    config: dict[str, Any]
    # The strategy's state beyond the arrays (``{"velocity": {key: tensor}}`` with server
    # momentum); empty in checkpoints written before it existed.
    server_state: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: Path, arrays: ArrayRecord, config: dict[str, Any], server_round: int,
                    server_state: dict[str, Any] | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    payload = {"round": server_round, "shared": arrays.to_torch_state_dict(), "config": config}
    if server_state:
        payload["server_state"] = server_state
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint; a missing or unreadable file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(int(payload["round"]), dict(payload["shared"]), dict(payload["config"]),
                          dict(payload.get("server_state") or {}))
    except Exception as err:  # noqa: BLE001 -- torch raises many types for a damaged file
        raise ValueError(f"checkpoint: {path} is not a HyperFedZero checkpoint ({type(err).__name__})") \
            from None
