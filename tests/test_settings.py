"""--list-presets and --show-config: settings a person can find without starting Flower."""

from __future__ import annotations

from hfz_app.launch import main
from hfz_app.settings import list_presets, resolved_settings


def test_list_presets_names_every_preset_with_one_line(capsys) -> None:
    assert main(["--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == [name for name, _ in list_presets()] and "mnist_mlp" in names
    tiny = next(line for line in lines if line.startswith("tiny "))
    assert tiny.split(None, 1)[1] == "Seconds-long smoke run on synthetic data: 3 participants " \
                                     "+ 1 held out, 2 rounds."
    opt1 = dict(list_presets())["ablation_input_conditioning"]
    assert opt1.startswith("Ablation (the paper's Opt. 1)")  # not cut at "Opt."


def test_show_config_says_where_each_value_comes_from(capsys) -> None:
    assert main(["--show-config", "--preset", "fashion_mnist_lenet_s",
                 "-c", "train.lr=0.1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.splitlines()
            if not line.startswith("#")}
    assert rows["train.lr"] == ["0.1", "override"]
    assert rows["model.target"] == ["'lenet_s'", "preset fashion_mnist_lenet_s"]
    assert rows["model.granularity"] == ["'client'", "preset hyperfedzero_recipe"]  # extends
    assert rows["run.seed"] == ["0", "default"]
    keys = {k for k, _, _ in resolved_settings("fashion_mnist_lenet_s")}
    assert set(rows) == keys  # every setting, once


def test_show_config_with_a_bad_override_is_one_line_and_exit_2(capsys) -> None:
    assert main(["--show-config", "-c", "train.lr=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train.lr: expected a value > 0, got -1.0"]
