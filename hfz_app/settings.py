"""Settings a person can find: the presets with one line each, and a preset's resolved settings
with where each value comes from (``python -m hfz_app.launch --list-presets`` / ``--show-config``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hfz_app.config import CONF_DIR, flatten, load_config, preset_path, read_yaml


def preset_summary(path: Path) -> str:
    """The first sentence of a preset file's leading comment (its one-line description)."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("# ").strip())
    text = " ".join(w for w in words if w)
    end = re.search(r"\.\s+(?=[A-Z])", text)  # a sentence's end, not "Opt. 1"
    return text if end is None else text[: end.start() + 1]


def list_presets() -> list[tuple[str, str]]:
    """(name, one line) of every preset in ``conf/``."""
    return [(p.stem, preset_summary(p)) for p in sorted(CONF_DIR.glob("*.yaml"))]


def preset_chain(preset: str) -> list[tuple[str, dict[str, Any]]]:
    """The preset and the ones it extends, leaf first: (name, its own flat keys)."""
    chain, seen = [], set()
    while preset and preset not in seen:
        seen.add(preset)
        tree = read_yaml(preset_path(preset))
        base = tree.pop("extends", None)
        chain.append((preset_path(preset).stem, flatten(tree)))
        preset = base
    return chain


def resolved_settings(preset: str, overrides: Mapping[str, Any] | None = None
                      ) -> list[tuple[str, Any, str]]:
    """Every setting of ``preset`` with ``overrides``: (key, value, source), source being
    ``override``, ``preset NAME`` (the file in the ``extends`` chain that sets it) or
    ``default``. Raises the config's one-line ConfigError for a bad preset or override."""
    overrides = dict(overrides or {})
    cfg = load_config(preset, overrides)
    chain = preset_chain(preset)
    rows = []
    for key, value in flatten(cfg.to_dict()).items():
        if key in overrides:
            source = "override"
        else:
            source = next((f"preset {name}" for name, keys in chain if key in keys), "default")
        rows.append((key, value, source))
    return rows


def format_settings(rows: list[tuple[str, Any, str]]) -> str:
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"{key:<{width}}  {value!r:<24}  {source}" for key, value, source in rows)
