"""The paper's online datasets: Hugging Face hub repositories decoded once into arrays.

Each ``HubSpec`` names a repository, its config, splits and columns as they are on the hub
(Parquet files of PNG/JPEG bytes, ``ClassLabel`` labels). ``load_hub`` checks that schema before
decoding and fails with one line naming the repository, split and column where it differs, then
decodes a chunk of rows at a time into one preallocated uint8 array (peak memory near the result's
size), with a progress bar on a terminal. The decoded arrays then live in the memory-mapped cache
(``hfz_app.data.sources``), so this runs once per machine.

``HFZ_HUB_MIRROR=<folder>`` reads repository ``owner/name`` from ``<folder>/owner/name`` (a copy
with the hub's layout) instead of the hub: for offline clusters and for the replica tests.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hfz_app.data.sources import DatasetArrays, DataSourceError, arrays_from_parts, register_source

MIRROR_ENV = "HFZ_HUB_MIRROR"
DECODE_CHUNK = 2048  # rows decoded at a time


@dataclass(frozen=True)
class HubSpec:
    repo: str
    config: str | None = None
    image: str = "image"
    label: str = "label"
    test_split: str = "test"
    mode: str = "L"  # PIL mode every image is converted to (Tiny-ImageNet mixes L and RGB)
    shape: tuple[int, int, int] | None = None  # (C, H, W) after decoding; data.synthetic's
    num_classes: int | None = None             # stand-in is generated with these
    note: str = ""

    @property
    def where(self) -> str:
        """How messages name it: ``repo`` or ``repo (config C)``."""
        return self.repo + (f" (config {self.config})" if self.config else "")


HUB_SOURCES = {
    "emnist_letters": HubSpec("tanganke/emnist_letters", shape=(1, 28, 28), num_classes=26,
                              note="EMNIST letters, 26 classes, 124,800 / 20,800"),
    "svhn": HubSpec("ufldl-stanford/svhn", "cropped_digits", mode="RGB",
                    shape=(3, 32, 32), num_classes=10, note="SVHN cropped digits"),
    "cifar10": HubSpec("uoft-cs/cifar10", "plain_text", image="img", mode="RGB",
                       shape=(3, 32, 32), num_classes=10, note="CIFAR-10"),
    "cifar100": HubSpec("uoft-cs/cifar100", "cifar100", image="img", label="fine_label",
                        mode="RGB", shape=(3, 32, 32), num_classes=100,
                        note="CIFAR-100, fine labels"),
    "tiny_imagenet": HubSpec("zh-plus/tiny-imagenet", test_split="valid", mode="RGB",
                             shape=(3, 64, 64), num_classes=200,
                             note="Tiny-ImageNet, 200 classes, test = the valid split"),
}
ALIASES = {"emnist": "emnist_letters"}  # the paper's EMNIST split is not stated: letters


def mirror_path(repo: str) -> Path | None:
    """Where ``HFZ_HUB_MIRROR`` holds ``repo``, or None without a mirror."""
    mirror = os.environ.get(MIRROR_ENV, "")
    return Path(mirror).expanduser() / repo if mirror else None


def hub_reachable(timeout_s: float = 3.0) -> str | None:
    """None if the hub answers within ``timeout_s``, else why not (offline mode, DNS, timeout)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(f"{endpoint}/api/datasets?limit=1", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # the server answered
    except (OSError, ValueError) as err:
        return f"{endpoint} unreachable: {getattr(err, 'reason', err)}"
    return None


def require_hub(name: str, repo: str, folder_hint: str) -> None:
    """Nothing if the hub answers; else the one-line error saying how to bring ``repo`` over
    (fetch elsewhere, then export/import, or the ``folder`` source with ``folder_hint``)."""
    why = hub_reachable()
    if why is not None:
        raise DataSourceError(
            f"{name}: needs internet to download {repo} from the Hugging Face hub ({why}); "
            f"offline, fetch it on a machine with internet (`python -m hfz_app.data fetch "
            f"{name}`, then `export`/`import`), or use data.dataset=folder "
            f"data.data_dir={folder_hint}")


def _open(name: str, spec: HubSpec) -> Any:
    """The repository's ``DatasetDict`` (from the mirror or the hub), or a one-line error."""
    local = mirror_path(spec.repo)
    if local is None:
        require_hub(name, spec.repo,
                    "<path> with an .npz (x_train, y_train, x_test, y_test)")
    elif not local.is_dir():
        raise DataSourceError(f"{name}: {MIRROR_ENV} has no copy of {spec.repo} (no folder {local})")
    import datasets  # heavy, and only online sources need it

    if local is None and datasets.config.HF_HUB_OFFLINE:
        raise DataSourceError(
            f"{name}: `datasets` was imported in offline mode in this process; load online "
            f"datasets before building a federation of another dataset, or in a fresh process")
    try:
        return datasets.load_dataset(str(local) if local else spec.repo, spec.config)
    except (ValueError, FileNotFoundError) as err:  # a config the repository does not have
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataSourceError(f"{name}: {spec.where} cannot be loaded: {reason}") from None


def _check_split(name: str, spec: HubSpec, dd: Any, split: str) -> Any:
    """The split, with its image and ClassLabel columns as the spec says, or a one-line error."""
    import datasets

    if split not in dd:
        raise DataSourceError(f"{name}: {spec.where} has no split {split!r} "
                              f"(splits: {', '.join(dd)})")
    ds = dd[split]
    for column, kind in ((spec.image, datasets.Image), (spec.label, datasets.ClassLabel)):
        if column not in ds.column_names:
            raise DataSourceError(f"{name}: {spec.where} split {split!r} has no column {column!r} "
                                  f"(columns: {', '.join(ds.column_names)})")
        if not isinstance(ds.features[column], kind):
            raise DataSourceError(f"{name}: {spec.where} split {split!r} column {column!r} is "
                                  f"{ds.features[column]!r}, expected a datasets.{kind.__name__}")
    classes = ds.features[spec.label].num_classes
    if spec.num_classes is not None and classes != spec.num_classes:
        raise DataSourceError(f"{name}: {spec.where} split {split!r} column {spec.label!r} has "
                              f"{classes} classes, expected {spec.num_classes}")
    return ds


def decode_images(name: str, spec: HubSpec, ds: Any, split: str) -> np.ndarray:
    """Every image of ``ds`` as uint8 [n, C, H, W], decoded ``DECODE_CHUNK`` rows at a time into
    one preallocated array (so peak memory stays near the result's size)."""
    from tqdm.auto import tqdm

    n = len(ds)
    channels = len(spec.mode)  # "L" -> 1, "RGB" -> 3
    first = np.asarray(ds[0][spec.image].convert(spec.mode)) if n else np.zeros((0, 0))
    size = first.shape[:2]
    if spec.shape is not None and (channels, *size) != tuple(spec.shape) and n:
        raise DataSourceError(f"{name}: {spec.where} split {split!r} column {spec.image!r}: "
                              f"images are {channels}x{size[0]}x{size[1]}, expected "
                              f"{'x'.join(map(str, spec.shape))}")
    out = np.empty((n, channels, *size), np.uint8)
    with tqdm(total=n, desc=f"decoding {name} {split}", unit="img", disable=None) as bar:
        for start in range(0, n, DECODE_CHUNK):
            for offset, image in enumerate(ds[start : start + DECODE_CHUNK][spec.image]):
                pixels = np.asarray(image.convert(spec.mode))
                if pixels.shape[:2] != size:
                    raise DataSourceError(
                        f"{name}: {spec.where} split {split!r} column {spec.image!r} row "
                        f"{start + offset}: image of {pixels.shape[1]}x{pixels.shape[0]} pixels, "
                        f"expected {size[1]}x{size[0]} like row 0")
                out[start + offset] = pixels.reshape(*size, channels).transpose(2, 0, 1)
            bar.update(min(DECODE_CHUNK, n - start))
    return out


def load_hub(name: str, spec: HubSpec) -> DatasetArrays:
    """Download (or read from the mirror) ``spec.repo``, check its schema, decode it to arrays."""
    dd = _open(name, spec)
    parts: dict[str, np.ndarray] = {}
    names: tuple[str, ...] | None = None
    for role, split in (("train", "train"), ("test", spec.test_split)):
        ds = _check_split(name, spec, dd, split)
        parts[f"x_{role}"] = decode_images(name, spec, ds, split)
        parts[f"y_{role}"] = np.asarray(ds.with_format("numpy")[spec.label], dtype=np.int64)
        names = tuple(ds.features[spec.label].names)
    return arrays_from_parts(name, parts, {k: f"{spec.repo}[{k}]" for k in parts}, names)


@dataclass(frozen=True)
class HubIdxSpec:
    """A repository holding a split's official idx files (EMNIST's distribution format):
    ``<prefix>-{train,test}-{images-idx3,labels-idx1}-ubyte.gz`` and ``<prefix>-mapping.txt``
    (``label ascii-code`` per line). EMNIST's idx images are stored transposed."""

    repo: str
    prefix: str
    num_classes: int
    note: str = ""
    shape: tuple[int, int, int] = (1, 28, 28)

    @property
    def where(self) -> str:
        return self.repo

    def files(self) -> dict[str, str]:
        return {"x_train": f"{self.prefix}-train-images-idx3-ubyte.gz",
                "y_train": f"{self.prefix}-train-labels-idx1-ubyte.gz",
                "x_test": f"{self.prefix}-test-images-idx3-ubyte.gz",
                "y_test": f"{self.prefix}-test-labels-idx1-ubyte.gz",
                "mapping": f"{self.prefix}-mapping.txt"}


HUB_IDX_SOURCES = {
    "emnist_balanced": HubIdxSpec("Royc30ne/emnist-balanced", "emnist-balanced", 47,
                                  note="EMNIST balanced, 47 classes, 112,800 / 18,800"),
}


def _download(name: str, spec: HubIdxSpec, filename: str) -> Path:
    """One file of ``spec.repo``: from the mirror, or downloaded (and cached) from the hub."""
    local = mirror_path(spec.repo)
    if local is not None:
        if not (local / filename).is_file():
            raise DataSourceError(f"{name}: {MIRROR_ENV} copy of {spec.repo} lacks {filename}")
        return local / filename
    require_hub(name, spec.repo, "<folder of its idx files>")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(spec.repo, filename, repo_type="dataset"))
    except (EntryNotFoundError, RepositoryNotFoundError) as err:
        raise DataSourceError(f"{name}: {spec.repo} has no file {filename} "
                              f"({type(err).__name__})") from None


def load_hub_idx(name: str, spec: HubIdxSpec) -> DatasetArrays:
    """The split's idx files, checked and decoded (images transposed back to MNIST's
    orientation); class names from the mapping file's character codes."""
    from hfz_app.data.sources import read_idx

    paths = {role: _download(name, spec, f) for role, f in spec.files().items()}
    parts = {role: read_idx(path) for role, path in paths.items() if role != "mapping"}
    for role in ("x_train", "x_test"):
        if parts[role].ndim != 3 or parts[role].shape[1:] != spec.shape[1:]:
            raise DataSourceError(f"{name}: {paths[role].name} holds images of shape "
                                  f"{parts[role].shape[1:]}, expected {spec.shape[1:]}")
        parts[role] = parts[role].transpose(0, 2, 1)
    try:
        rows = [line.split() for line in paths["mapping"].read_text().splitlines() if line]
        codes = {int(label): chr(int(code)) for label, code in rows}
    except ValueError:
        raise DataSourceError(f"{name}: {paths['mapping'].name}: expected lines "
                              f"'<label> <character code>'") from None
    if sorted(codes) != list(range(spec.num_classes)):
        raise DataSourceError(f"{name}: {paths['mapping'].name} maps labels "
                              f"{min(codes)}..{max(codes)} ({len(codes)}), expected "
                              f"0..{spec.num_classes - 1}")
    names = tuple(codes[i] for i in range(spec.num_classes))
    return arrays_from_parts(name, parts, {k: str(paths[k]) for k in parts}, names)


def _hub_loader(name: str, spec: HubSpec):
    return lambda data_dir="": load_hub(name, spec)


def register_hub_sources() -> None:
    """Every ``HUB_SOURCES`` entry as an online source, under its name and its aliases."""
    for name, spec in HUB_SOURCES.items():
        aliases = tuple(alias for alias, target in ALIASES.items() if target == name)
        register_source(name, _hub_loader(name, spec), online=True, aliases=aliases,
                        help=f"{spec.note} from the Hugging Face hub {spec.where} "
                             f"(needs internet once)",
                        shape=spec.shape, num_classes=spec.num_classes)
    for name, idx_spec in HUB_IDX_SOURCES.items():
        register_source(name, functools.partial(_idx_loader, name, idx_spec), online=True,
                        help=f"{idx_spec.note}: idx files from the Hugging Face hub "
                             f"{idx_spec.repo} (needs internet once)",
                        shape=idx_spec.shape, num_classes=idx_spec.num_classes)


def _idx_loader(name: str, spec: HubIdxSpec, data_dir: str = "") -> DatasetArrays:
    return load_hub_idx(name, spec)


register_hub_sources()
