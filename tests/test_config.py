"""Config: presets, overrides, one-line errors, and pyproject.toml declaring every key."""

import tomllib
from pathlib import Path

import pytest

from hfz_app.config import (
    CONF_DIR,
    Config,
    ConfigError,
    flatten,
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
        ({"model.granularity": "dataset"}, "model.granularity: expected one of"),
        ({"model.chunk_size": 0}, "model.chunk_size: expected a value >= 1"),
        ({"model.hidden": "64,x"}, "model.hidden: expected comma-separated positive integers"),
        ({"data.shift": 3}, "data.shift: expected a section"),
        ({"run.resume": "maybe"}, "run.resume: expected true or false"),
        ({"run.eval_every": 50}, "run.eval_every: expected <= run.rounds"),
        ({"eval.participants_sample": -1}, "eval.participants_sample: expected a value >= 0"),
        ({"eval.participants_sample": 11},
         "eval.participants_sample: expected 0 (all) or at most data.num_participants (10)"),
        ({"eval.heldout_sample": 6},
         "eval.heldout_sample: expected 0 (all) or at most data.num_heldout (5)"),
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

    declared = flatten(app_config)
    assert declared.pop("preset") == "mnist_mlp"
    assert set(declared) == set(run_config_keys())
    assert set(declared.values()) == {""}


def test_extends_starts_from_the_base_preset(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("extends: tiny\nmodel: {alpha: 0.0}\n")
    cfg, base = load_config(str(child)), load_config("tiny")
    assert cfg.model.alpha == 0.0 and cfg.data == base.data and cfg.model.hidden == base.model.hidden
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(loop))


@pytest.mark.parametrize("preset, key, value", [
    ("ablation_no_noisy_embed", "noisy_embed", False),
    ("ablation_no_balance", "alpha", 0.0),
    ("ablation_input_conditioning", "conditioning", "input"),
    ("ablation_batch_granularity", "granularity", "batch"),
    ("ablation_flat_chunks", "chunk_layout", "flat"),
    ("control_uniform_embedding", "embedding", "uniform"),
])
def test_ablation_presets_change_one_thing_and_train(preset: str, key: str, value) -> None:
    import dataclasses

    import torch

    from hfz_app.hyper import build_model

    cfg, base = load_config(preset), load_config("mnist_mlp")
    assert getattr(cfg.model, key) == value != getattr(base.model, key)
    assert dataclasses.replace(cfg.model, **{key: getattr(base.model, key)}) == base.model
    assert (cfg.data, cfg.train, cfg.run.rounds) == (base.data, base.train, base.run.rounds)
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28), 10)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss, _ = model.loss(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.parameters())
