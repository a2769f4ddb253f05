"""Config: presets, overrides, one-line errors, and pyproject.toml declaring every key."""

import tomllib
from pathlib import Path

import pytest

from hfz_app.config import (
    CONF_DIR,
    Config,
    ConfigError,
    from_run_config,
    load_config,
    run_config_keys,
)

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_preset() -> None:
    cfg = load_config("mnist_mlp")
    assert isinstance(cfg, Config)
    assert cfg.data.dataset == "mnist"
    assert (cfg.data.num_participants, cfg.data.num_heldout) == (10, 5)


def test_every_preset_loads() -> None:
    presets = sorted(CONF_DIR.glob("*.yaml"))
    assert presets
    for path in presets:
        load_config(path.stem)


def test_overrides_win_and_are_coerced() -> None:
    cfg = load_config("mnist_mlp", {"train.lr": 1, "data.shift.enabled": "true", "run.rounds": 3.0})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.shift.enabled is True
    assert cfg.run.rounds == 3 and isinstance(cfg.run.rounds, int)


def test_run_config_sentinel_keeps_preset_value() -> None:
    run_config = {key: "" for key in run_config_keys()} | {"preset": "mnist_mlp", "run.rounds": 2}
    cfg = from_run_config(run_config)
    assert cfg.run.rounds == 2
    assert cfg.data.alpha_dir == load_config("mnist_mlp").data.alpha_dir


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"train.lrr": 0.1}, "train.lrr: unknown key"),
        ({"nosuch.key": 1}, "nosuch: unknown key"),
        ({"train.lr": "fast"}, "train.lr: expected a number"),
        ({"run.rounds": 0}, "run.rounds: expected a value >= 1"),
        ({"run.rounds": 2.5}, "run.rounds: expected an integer"),
        ({"data.alpha_dir": 0}, "data.alpha_dir: expected a value > 0"),
        ({"data.num_participants": 0}, "data.num_participants: expected a value >= 1"),
        ({"model.granularity": "client"}, "model.granularity: expected one of"),
        ({"model.chunk_size": 0}, "model.chunk_size: expected a value >= 1"),
        ({"model.hidden": "64,x"}, "model.hidden: expected comma-separated positive integers"),
        ({"data.shift": 3}, "data.shift: expected a section"),
        ({"run.resume": "maybe"}, "run.resume: expected true or false"),
        ({"run.eval_every": 50}, "run.eval_every: expected <= run.rounds"),
    ],
)
def test_bad_values_give_one_line_errors(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("mnist_mlp", overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_preset_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="preset: no preset named 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"train.epochs: unknown key in .*typo.yaml"):
        load_config(str(typo))


def test_pyproject_declares_exactly_the_config_keys() -> None:
    """Flower rejects run-config keys pyproject.toml does not declare, so the two must match."""
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    def flatten(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out |= flatten(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    declared = flatten(app_config)
    assert declared.pop("preset") == "mnist_mlp"
    assert set(declared) == set(run_config_keys())
    assert set(declared.values()) == {""}
