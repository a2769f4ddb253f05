"""Style shift (MNIST-M-like): the style split is deterministic, complete, disjoint and follows
each client's Dirichlet mix; a sample's background comes from a photograph of its style source;
inputs become 3xHxW everywhere, including a one-round run of the style preset."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hfz_app.config import ConfigError, DataSection, load_config
from hfz_app.data import DataSourceError, build_federation
from hfz_app.data.describe import describe, main, plot_samples, style_matrix
from hfz_app.data.federation import _build_cached
from hfz_app.data.style import (
    STYLE_SOURCES,
    blend,
    client_style,
    crop_backgrounds,
    exact_counts,
    photo_bank,
    style_images,
)

STYLED = DataSection(dataset="synthetic", num_participants=6, num_heldout=3, alpha_dir=0.5,
                     min_partition_size=10, style=True, style_alpha=0.5)


def pairs(federation) -> list[tuple[int, int]]:
    """(train row, style id) for every sample of every client."""
    return [(int(r), int(s)) for p in range(federation.num_clients)
            for r, s in zip(federation.indices(p), federation.style(p).ids)]


def test_style_split_is_complete_disjoint_and_follows_each_clients_mix():
    federation = build_federation(STYLED, 0)
    assert federation.style_sources == tuple(STYLE_SOURCES)
    seen = pairs(federation)
    rows = [r for r, _ in seen]
    assert len(rows) == len(set(rows)) == 3000  # every pooled sample has exactly one style
    k = len(STYLE_SOURCES)
    for pid in range(federation.num_clients):
        style = federation.style(pid)
        n = len(federation.indices(pid))
        assert len(style.ids) == n and style.mix.shape == (k,)
        assert abs(style.mix.sum() - 1) < 1e-9 and (style.mix >= 0).all()
        counts = np.bincount(style.ids, minlength=k)
        assert counts.tolist() == exact_counts(n, style.mix).tolist()  # the mix, to rounding
        assert np.abs(counts / n - style.mix).max() <= 1 / n
    matrix = style_matrix(federation)
    assert matrix.sum() == 3000 and matrix.shape == (federation.num_clients, k)


def test_style_split_is_deterministic_from_the_seed():
    federation = build_federation(STYLED, 3)
    first, x = pairs(federation), federation.client(7).test_x.clone()
    _build_cached.cache_clear()  # a fresh process rebuilds everything
    again = build_federation(STYLED, 3)
    assert again is not federation and pairs(again) == first
    assert torch.equal(again.client(7).test_x, x)
    assert torch.equal(again.global_test()[0], federation.global_test()[0])
    other = build_federation(STYLED, 4)
    assert not np.allclose(other.style(0).mix, federation.style(0).mix)


def test_alpha_sets_how_concentrated_the_mixes_are_heldout_apart():
    cfg = dataclasses.replace(STYLED, style_alpha=100.0, style_alpha_heldout=0.05)
    flat = [client_style(cfg, 0, pid, 500, heldout=False).mix.max() for pid in range(100)]
    peaked = [client_style(cfg, 0, pid, 500, heldout=True).mix.max() for pid in range(100)]
    assert np.mean(flat) < 0.35 and np.mean(peaked) > 0.9  # uniform is 0.25 for K = 4
    federation = build_federation(cfg, 0)
    assert all(federation.style(p).mix.max() < 0.5 for p in range(6))
    assert all(federation.style(p).mix.max() > 0.8 for p in range(6, 9))
    unset = dataclasses.replace(cfg, style_alpha_heldout=0.0)  # 0: the participants' alpha
    assert client_style(unset, 0, 7, 50, True).mix.tolist() == \
        client_style(unset, 0, 7, 50, False).mix.tolist()


def test_each_background_is_a_crop_of_its_sources_photographs():
    # Constant photographs of different sizes: a crop's colour names the source it came from.
    bank = [[np.full((40 + 7 * p, 30 + 5 * s, 3), 10 * (s + 1), np.uint8) for p in range(2)]
            for s in range(3)]
    styles = np.array([0, 2, 1, 1, 2, 0, 0, 2])
    crops = crop_backgrounds(bank, styles, 28, 28, np.random.default_rng(0))
    assert crops.shape == (8, 3, 28, 28)
    assert all((crops[i] == 10 * (s + 1)).all() for i, s in enumerate(styles))
    # And with the real photographs: a blank image's background is found in its source's photo.
    federation = build_federation(STYLED, 0)
    ids = federation.style(0).ids[:6]
    out = style_images(torch.zeros(6, 1, 28, 28), ids, STYLED, 0, 0)
    bank = photo_bank(federation.style_sources, 28)
    for image, s in zip((out * 255).round().byte().numpy().transpose(0, 2, 3, 1), ids):
        windows = [np.lib.stride_tricks.sliding_window_view(photo, (28, 28, 3))
                   for photo in bank[s]]
        assert any((w == image).all(axis=(-3, -2, -1)).any() for w in windows)


def test_blend_is_mnist_m_difference():
    digit = torch.tensor([0.0, 1.0, 0.25]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    background = np.full((3, 3, 2, 2), 51, np.uint8)  # 0.2
    out = blend(digit, background)
    assert out.shape == (3, 3, 2, 2)
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([0.2, 0.8, 0.05]))


def test_clients_and_global_test_are_rgb_composites():
    federation = build_federation(STYLED, 0)
    assert federation.input_shape == (3, 28, 28)
    data = federation.client(0)
    assert data.train_x.shape[1:] == (3, 28, 28) and data.test_x.shape[1:] == (3, 28, 28)
    assert data.train_x.min() >= 0 and data.train_x.max() <= 1
    assert set(data.style) == set(STYLE_SOURCES)
    assert not torch.equal(data.train_x[:, 0], data.train_x[:, 2])  # colour, not gray copies
    x, _ = federation.global_test()
    assert x.shape == (600, 3, 28, 28)
    assert np.bincount(federation.global_test_style_ids()).tolist() == [150] * 4  # uniform
    plain = build_federation(dataclasses.replace(STYLED, style=False), 0)
    assert plain.input_shape == (1, 28, 28) and plain.client(0).style == {}
    # the feature shift still applies, on top of the composite
    shifted = build_federation(dataclasses.replace(
        STYLED, shift=dataclasses.replace(STYLED.shift, enabled=True)), 0)
    assert shifted.client(0).train_x.shape == data.train_x.shape
    assert not torch.equal(shifted.client(0).train_x, data.train_x)


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"style_sources": "space,nebula"}, "data.style_sources: expected distinct names"),
    ({"style_sources": "warm,warm"}, "data.style_sources: expected distinct names"),
    ({"dataset": "synthetic_rgb"}, "data.style: needs a grayscale dataset"),
])
def test_bad_style_settings_are_one_line(changes, fragment):
    with pytest.raises(DataSourceError, match=fragment) as err:
        build_federation(dataclasses.replace(STYLED, **changes), 0)
    assert "\n" not in str(err.value)


def test_bad_style_input_exits_2_with_one_line(capsys):
    with pytest.raises(ConfigError, match="data.style_alpha: expected a value > 0"):
        load_config("style_mnist_lenet", {"data.style_alpha": 0})
    code = main(["--preset", "tiny", "-c", "data.style=true", "-c", 'data.style_sources="sky"'])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("data error: data.style_sources") and "\n" not in err


def test_describe_shows_the_style_mix_and_draws_both_pictures(tmp_path: Path):
    federation = build_federation(STYLED, 0)
    text = describe(federation, tmp_path / "partition.png")
    assert "style: 4 photo sources (space, warm, texture, scenery), Dirichlet 0.5" in text
    assert "style % space/warm/texture/scenery" in text
    shares = federation.style(0).mix
    line = text.splitlines()[3]  # client 0
    assert line.rsplit("| ", 1)[1] == "/".join(f"{100 * s:.0f}" for s in
                                               np.bincount(federation.style(0).ids, minlength=4)
                                               / len(federation.style(0).ids))
    assert abs(shares.sum() - 1) < 1e-9
    plot_samples(federation, tmp_path / "samples.png", per_client=3)
    assert (tmp_path / "partition.png").stat().st_size > 10_000
    assert (tmp_path / "samples.png").stat().st_size > 10_000


def test_style_preset_runs_one_round_with_rgb_inputs(tmp_path: Path):
    from client_app import app as client_app
    from hfz_app.federation.inprocess import full_run_config, run_inprocess, simulation_node_configs
    from server_app import app as server_app

    overrides = {"data.synthetic": True, "data.num_participants": 3, "data.num_heldout": 1,
                 "data.train_subsample": 400, "data.test_subsample": 100,
                 "data.min_partition_size": 10, "run.rounds": 1, "train.torch_threads": 1,
                 "run.output_dir": str(tmp_path)}
    cfg = load_config("style_mnist_lenet", overrides)
    assert cfg.data.style and cfg.model.target == "lenet"
    assert build_federation(cfg.data, cfg.run.seed).input_shape == (3, 28, 28)
    run_inprocess(server_app, client_app, full_run_config(overrides, preset="style_mnist_lenet"),
                  simulation_node_configs(4))
    with (tmp_path / cfg.run.name / "metrics.csv").open() as f:
        row = list(csv.DictReader(f))[-1]
    for key in ("zacc_weighted", "gacc", "pacc_weighted"):
        assert math.isfinite(float(row[key])) and 0 <= float(row[key]) <= 1


def test_photographs_are_cached_memory_mapped_and_redecoded_when_damaged(tmp_path, monkeypatch):
    from hfz_app.data.style import load_photo

    monkeypatch.setenv("HFZ_CACHE", str(tmp_path))
    photo = STYLE_SOURCES["scenery"][0]
    load_photo.cache_clear()
    first = np.array(load_photo(photo, 112))
    (cached,) = (tmp_path / "arrays" / "style_photos").glob("*.npy")
    assert first.dtype == np.uint8 and min(first.shape[:2]) == 112 and first.shape[2] == 3
    load_photo.cache_clear()
    mapped = load_photo(photo, 112)  # a later process maps the file instead of decoding
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, first)
    cached.write_bytes(cached.read_bytes()[:200])  # truncated: decoded again, not an error
    load_photo.cache_clear()
    assert np.array_equal(load_photo(photo, 112), first)
    load_photo.cache_clear()
