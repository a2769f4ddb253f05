"""Checkpoints of the shared arrays: what a held-out client or the zero-shot app needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord


@dataclass
class Checkpoint:
    server_round: int
    shared: dict[str, torch.Tensor]
    config: dict[str, Any]


def save_checkpoint(path: Path, arrays: ArrayRecord, config: dict[str, Any], server_round: int):
    tmp = path.with_suffix(".tmp")
    torch.save({"round": server_round, "shared": arrays.to_torch_state_dict(), "config": config},
               tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint; a missing or unreadable file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(int(payload["round"]), dict(payload["shared"]), dict(payload["config"]))
    except Exception as err:  # noqa: BLE001 -- torch raises many types for a damaged file
        raise ValueError(f"checkpoint: {path} is not a HyperFedZero checkpoint ({type(err).__name__})") \
            from None
