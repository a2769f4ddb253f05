"""The paper's five hub datasets through the project's real loading path, offline.

Each test builds, in a temporary folder, a small replica of the Hugging Face repository with its
real layout (configs, split names, columns, ``ClassLabel`` names, Parquet files of PNG/JPEG bytes,
grayscale images mixed into Tiny-ImageNet) and points ``HFZ_HUB_MIRROR`` at it: only the hub
address changes; ``datasets.load_dataset``, the schema checks, chunked decoding and the
memory-mapped cache are the ones a real download goes through.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
from PIL import Image  # Pillow comes with datasets

from hfz_app.data import hub, sources
from hfz_app.data.__main__ import main as data_cli
from hfz_app.data.sources import DataSourceError, load_dataset

ROWS = {"train": 14, "test": 6}  # per split; enough to cover every branch, fast to build


def encode(pixels: np.ndarray, fmt: str) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return {"bytes": buffer.getvalue(), "path": None}


def image_column(n: int, size: int, mode: str, fmt: str, seed: int, gray_every: int = 0):
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    column = []
    for i in range(n):
        if gray_every and i % gray_every == 0:  # Tiny-ImageNet holds some grayscale JPEGs
            column.append(encode(rng.integers(0, 256, (size, size), dtype=np.uint8), fmt))
        else:
            column.append(encode(rng.integers(0, 256, shape, dtype=np.uint8), fmt))
    return column


def write_repo(root: Path, repo: str, configs: dict[str, dict[str, dict]],
               features: dict[str, datasets.Features], default: str | None = None) -> None:
    """``configs``: config -> split -> column data; Parquet files under ``<config>/`` and a
    README whose YAML declares the configs as the hub's dataset cards do."""
    folder = root / repo
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}"] + (["  default: true"] if config == default else [])
        card.append("  data_files:")
        for split, columns in splits.items():
            path = f"{config}/{split}-00000-of-00001.parquet"
            (folder / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(columns, features=features[config]).to_parquet(
                str(folder / path))
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    card.append("---")
    (folder / "README.md").write_text("\n".join(card) + "\n")


def labels(n: int, classes: int, seed: int) -> list[int]:
    return [int(v) for v in np.random.default_rng(seed).integers(0, classes, n)]


def build_replicas(root: Path, *, drop: tuple[str, ...] = ()) -> None:
    """The five repositories as the hub holds them (``drop``: which ones to leave out)."""
    label = datasets.ClassLabel
    if "emnist" not in drop:  # tanganke/emnist_letters: one default config
        letters = [chr(ord("A") + i) for i in range(26)]
        feats = datasets.Features({"image": datasets.Image(), "label": label(names=letters)})
        write_repo(root, "tanganke/emnist_letters", {"emnist-letters": {
            s: {"image": image_column(n, 28, "L", "PNG", i), "label": labels(n, 26, i)}
            for i, (s, n) in enumerate(ROWS.items())}}, {"emnist-letters": feats},
            default="emnist-letters")
    if "svhn" not in drop:  # ufldl-stanford/svhn: two configs, no default, an `extra` split
        digits = label(names=[str(i) for i in range(10)])
        cropped = datasets.Features({"image": datasets.Image(), "label": digits})
        full = datasets.Features({"image": datasets.Image(), "digits": datasets.Sequence(
            {"bbox": datasets.Sequence(datasets.Value("int32"), length=4), "label": digits})})
        splits = {**ROWS, "extra": 4}
        write_repo(root, "ufldl-stanford/svhn", {
            "cropped_digits": {s: {"image": image_column(n, 32, "RGB", "PNG", i),
                                   "label": labels(n, 10, i)}
                               for i, (s, n) in enumerate(splits.items())},
            "full_numbers": {s: {"image": image_column(n, 40, "RGB", "PNG", i),
                                 "digits": [{"bbox": [[1, 2, 3, 4]], "label": [1]}] * n}
                             for i, (s, n) in enumerate(ROWS.items())},
        }, {"cropped_digits": cropped, "full_numbers": full})
    cifar10_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"]
    if "cifar10" not in drop:  # uoft-cs/cifar10: config plain_text, column `img`
        feats = datasets.Features({"img": datasets.Image(), "label": label(names=cifar10_names)})
        write_repo(root, "uoft-cs/cifar10", {"plain_text": {
            s: {"img": image_column(n, 32, "RGB", "PNG", i), "label": labels(n, 10, i)}
            for i, (s, n) in enumerate(ROWS.items())}}, {"plain_text": feats})
    if "cifar100" not in drop:  # uoft-cs/cifar100: `img`, `fine_label` (100), `coarse_label`
        feats = datasets.Features({"img": datasets.Image(),
                                   "fine_label": label(names=[f"fine{i}" for i in range(100)]),
                                   "coarse_label": label(names=[f"coarse{i}" for i in range(20)])})
        write_repo(root, "uoft-cs/cifar100", {"cifar100": {
            s: {"img": image_column(n, 32, "RGB", "PNG", i), "fine_label": labels(n, 100, i),
                "coarse_label": labels(n, 20, i)}
            for i, (s, n) in enumerate(ROWS.items())}}, {"cifar100": feats})
    if "tiny_imagenet" not in drop:  # zh-plus/tiny-imagenet: train / valid, JPEG, some gray
        wnids = [f"n{i:08d}" for i in range(200)]
        feats = datasets.Features({"image": datasets.Image(), "label": label(names=wnids)})
        write_repo(root, "zh-plus/tiny-imagenet", {"default": {
            s: {"image": image_column(n, 64, "RGB", "JPEG", i, gray_every=3),
                "label": labels(n, 200, i)}
            for i, (s, n) in enumerate({"train": ROWS["train"], "valid": ROWS["test"]}.items())}},
            {"default": feats}, default="default")


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch) -> Path:
    """An empty array cache, `datasets` caching under tmp, and the hub redirected to tmp."""
    monkeypatch.setenv("HFZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))  # read at import time, so:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path / "hub"))
    load_dataset.cache_clear()
    yield tmp_path / "hub"
    load_dataset.cache_clear()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    build_replicas(root)
    return root


EXPECTED = {  # name -> (shape, classes, first class name, test rows)
    "emnist_letters": ((1, 28, 28), 26, "A", ROWS["test"]),
    "svhn": ((3, 32, 32), 10, "0", ROWS["test"]),
    "cifar10": ((3, 32, 32), 10, "airplane", ROWS["test"]),
    "cifar100": ((3, 32, 32), 100, "fine0", ROWS["test"]),
    "tiny_imagenet": ((3, 64, 64), 200, "n00000000", ROWS["test"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_hub_dataset_decodes_from_a_replica_of_its_repository(name, replicas, mirror,
                                                                   monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, str(replicas))
    shape, classes, first, n_test = EXPECTED[name]
    data = load_dataset(name)
    assert data.x_train.shape == (ROWS["train"], *shape) and data.x_test.shape == (n_test, *shape)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    assert data.num_classes == classes and data.class_names[0] == first
    assert 0 <= data.y_train.min() and data.y_train.max() < classes
    assert isinstance(data.x_train, np.memmap)  # served from the memory-mapped cache
    assert (sources.array_cache_path(name) / "meta.json").exists()
    spec = hub.HUB_SOURCES[name]
    expected_labels = datasets.load_dataset(str(replicas / spec.repo), spec.config)["train"]
    assert data.y_train.tolist() == expected_labels[spec.label]
    if name == "tiny_imagenet":  # a grayscale JPEG becomes three equal channels
        assert np.array_equal(data.x_train[0, 0], data.x_train[0, 1])
    if name == "cifar10":  # PNG is lossless: the decoded pixels are the stored ones
        stored = np.asarray(expected_labels[0]["img"]).transpose(2, 0, 1)
        assert np.array_equal(data.x_train[0], stored)


def test_emnist_is_an_alias_of_the_letters_split(replicas, mirror, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, str(replicas))
    alias, letters = load_dataset("emnist"), load_dataset("emnist_letters")
    assert alias.name == letters.name == "emnist_letters" and alias.num_classes == 26
    assert sources.array_cache_path("emnist") == sources.array_cache_path("emnist_letters")


def replace_repo(root: Path, name: str, **change) -> None:
    """A replica of ``name``'s repository with one thing changed (``change`` says what)."""
    build_replicas(root, drop=tuple(n for n in EXPECTED if n != name))
    repo = root / hub.HUB_SOURCES[name].repo
    card = repo / "README.md"
    if "rename_split" in change:
        old, new = change["rename_split"]
        card.write_text(card.read_text().replace(f"split: {old}", f"split: {new}"))
    if "rename_config" in change:
        old, new = change["rename_config"]
        card.write_text(card.read_text().replace(f"config_name: {old}", f"config_name: {new}"))


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_a_renamed_column_names_repository_split_and_column(mirror):
    build_replicas(mirror, drop=("emnist", "svhn", "cifar100", "tiny_imagenet"))
    repo = mirror / "uoft-cs/cifar10"
    for part in (repo / "plain_text").glob("*.parquet"):  # img -> image, as a schema change
        ds = datasets.Dataset.from_parquet(str(part)).rename_column("img", "image")
        ds.to_parquet(str(part) + ".new")
        Path(str(part) + ".new").replace(part)
    with pytest.raises(DataSourceError) as err:
        load_dataset("cifar10")
    assert one_line(err).startswith(
        "cifar10: uoft-cs/cifar10 (config plain_text) split 'train' has no column 'img'")


def test_a_renamed_split_names_the_missing_one(mirror):
    replace_repo(mirror, "tiny_imagenet", rename_split=("valid", "validation"))
    with pytest.raises(DataSourceError) as err:
        load_dataset("tiny_imagenet")
    assert one_line(err) == ("tiny_imagenet: zh-plus/tiny-imagenet has no split 'valid' "
                             "(splits: train, validation)")


def test_a_missing_config_is_one_line_naming_it(mirror):
    replace_repo(mirror, "svhn", rename_config=("cropped_digits", "cropped"))
    with pytest.raises(DataSourceError) as err:
        load_dataset("svhn")
    assert one_line(err).startswith(
        "svhn: ufldl-stanford/svhn (config cropped_digits) cannot be loaded:")


def test_labels_that_are_no_longer_a_classlabel_are_refused(mirror):
    build_replicas(mirror, drop=("emnist", "svhn", "cifar10", "tiny_imagenet"))
    for part in (mirror / "uoft-cs/cifar100" / "cifar100").glob("*.parquet"):
        ds = datasets.Dataset.from_parquet(str(part))
        ds = ds.cast_column("fine_label", datasets.Value("int64"))
        ds.to_parquet(str(part) + ".new")
        Path(str(part) + ".new").replace(part)
    with pytest.raises(DataSourceError) as err:
        load_dataset("cifar100")
    message = one_line(err)
    assert message.startswith("cifar100: uoft-cs/cifar100 (config cifar100) split 'train' column "
                              "'fine_label' is Value(")
    assert message.endswith("expected a datasets.ClassLabel")


def test_an_image_of_another_size_names_its_row(mirror):
    build_replicas(mirror, drop=("svhn", "cifar10", "cifar100", "tiny_imagenet"))
    part = next((mirror / "tanganke/emnist_letters" / "emnist-letters").glob("test-*.parquet"))
    ds = datasets.Dataset.from_parquet(str(part))
    odd = encode(np.zeros((32, 32), np.uint8), "PNG")
    ds = ds.map(lambda row, i: {"image": odd} if i == 4 else {}, with_indices=True)
    ds.to_parquet(str(part) + ".new")
    Path(str(part) + ".new").replace(part)
    with pytest.raises(DataSourceError) as err:
        load_dataset("emnist_letters")
    assert one_line(err) == ("emnist_letters: tanganke/emnist_letters split 'test' column "
                             "'image' row 4: image of 32x32 pixels, expected 28x28 like row 0")


def test_decoding_goes_chunk_by_chunk_into_one_array(replicas, mirror, monkeypatch):
    """With chunks smaller than the split, every row still lands where it belongs."""
    monkeypatch.setenv(hub.MIRROR_ENV, str(replicas))
    whole = np.array(load_dataset("cifar10").x_train)
    load_dataset.cache_clear()
    sources.shutil.rmtree(sources.array_cache_path("cifar10"))
    monkeypatch.setattr(hub, "DECODE_CHUNK", 4)
    assert np.array_equal(load_dataset("cifar10").x_train, whole)


def test_fetch_export_import_moves_a_dataset_to_an_offline_machine(replicas, mirror, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setenv(hub.MIRROR_ENV, str(replicas))
    assert data_cli(["fetch", "cifar100"]) == 0
    assert f"cache: {sources.array_cache_path('cifar100')}" in capsys.readouterr().out
    archive = tmp_path / "cifar100.tar"
    assert data_cli(["export", "cifar100", str(archive)]) == 0
    original = np.array(load_dataset("cifar100").x_test)

    # The other machine: an empty cache, no mirror, no internet.
    monkeypatch.setenv("HFZ_CACHE", str(tmp_path / "offline-cache"))
    monkeypatch.delenv(hub.MIRROR_ENV)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_dataset.cache_clear()
    assert data_cli(["fetch", "cifar100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cifar100: needs internet")
    assert data_cli(["import", str(archive)]) == 0
    assert "imported: cifar100 ->" in capsys.readouterr().out
    moved = load_dataset("cifar100")
    assert np.array_equal(moved.x_test, original) and moved.num_classes == 100

    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar file")
    assert data_cli(["import", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad}: not a readable export")


def test_a_missing_mirror_copy_is_one_line(mirror):
    with pytest.raises(DataSourceError) as err:
        load_dataset("svhn")
    assert one_line(err) == (f"svhn: {hub.MIRROR_ENV} has no copy of ufldl-stanford/svhn "
                             f"(no folder {mirror / 'ufldl-stanford/svhn'})")



def idx_gz(array: np.ndarray) -> bytes:
    import gzip
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_emnist_balanced_decodes_from_a_replica_of_its_idx_repository(mirror):
    """Royc30ne/emnist-balanced holds the official idx files (images transposed) and the
    mapping file; the loader transposes back and names the 47 classes by their characters."""
    spec = hub.HUB_IDX_SOURCES["emnist_balanced"]
    repo = mirror / spec.repo
    repo.mkdir(parents=True)
    rng = np.random.default_rng(0)
    mnist_oriented = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
                      for s, n in ROWS.items()}
    labels_of = {s: rng.integers(0, 47, n).astype(np.uint8) for s, n in ROWS.items()}
    files = spec.files()
    for split in ROWS:
        (repo / files[f"x_{split}"]).write_bytes(idx_gz(mnist_oriented[split].transpose(0, 2, 1)))
        (repo / files[f"y_{split}"]).write_bytes(idx_gz(labels_of[split]))
    chars = [str(d) for d in range(10)] + [chr(c) for c in range(65, 91)] + list("abdefghnqrt")
    (repo / files["mapping"]).write_text("".join(f"{i} {ord(c)}\n" for i, c in enumerate(chars)))

    data = load_dataset("emnist_balanced")
    assert data.x_train.shape == (ROWS["train"], 1, 28, 28) and data.num_classes == 47
    assert np.array_equal(data.x_test[:, 0], mnist_oriented["test"])  # transposed back
    assert data.y_train.tolist() == labels_of["train"].tolist()
    assert data.class_names[:3] == ("0", "1", "2") and data.class_names[-1] == "t"

    (repo / files["mapping"]).write_text("0 48\n1 49\n")  # a mapping of another split
    load_dataset.cache_clear()
    sources.shutil.rmtree(sources.array_cache_path("emnist_balanced"))
    with pytest.raises(DataSourceError) as err:
        load_dataset("emnist_balanced")
    assert one_line(err) == ("emnist_balanced: emnist-balanced-mapping.txt maps labels 0..1 (2), "
                             "expected 0..46")
