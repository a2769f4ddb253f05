"""The Config a checkpoint was trained with, as the zero-shot app and export rebuild it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from hfz_app.config import Config, ConfigError, from_dict
from hfz_app.methods import METHODS, get_method


class ZeroShotError(ValueError):
    """A problem with the zero-shot app's or export's input, reported as one line."""


def checkpoint_config(tree: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
                      ) -> Config:
    """The Config saved in a checkpoint (``Config.to_dict()``), with flat dotted overrides, for a
    method whose frozen shared arrays alone make a new client's model."""
    try:
        cfg = from_dict(tree, overrides)
        method = get_method(cfg.run.method)
    except ConfigError as err:
        raise ZeroShotError(f"checkpoint config: {err}") from None
    if not method.zero_shot:
        raise ZeroShotError(
            f"run.method: {cfg.run.method!r} is not zero-shot (it needs labels or a gradient step "
            f"on the new client); the zero-shot app and export take the checkpoints of "
            f"{', '.join(name for name, m in METHODS.items() if m.zero_shot)}")
    return cfg


def config_to_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def config_from_json(text: str) -> Config:
    return checkpoint_config(json.loads(text))
