"""Style shift in the spirit of MNIST-M (Ganin et al. 2016): grayscale images blended into crops
of real photographs, the photographs grouped into K style sources, each client with its own mix.

Each client draws a style mix ``pi ~ Dirichlet(data.style_alpha)`` over the K sources (held-out
clients ``data.style_alpha_heldout``) from a generator seeded by ``(seed, partition id)``; its
samples then get exactly ``round(n * pi_s)`` samples of style ``s`` (largest remainder), in a
seeded random order. A sample of style ``s`` is blended into a random crop of a random photograph
of source ``s``: ``out = |background - image|`` per RGB channel, as MNIST-M does, so inputs
become 3xHxW. The global test set (gACC) uses the uniform mix. The photographs ship inside
installed packages (scikit-image and scikit-learn sample images, public domain / CC0 / CC-BY 2.0,
listed in docs/DATA.md): nothing is downloaded. Each is decoded once, resized so that its shorter
side is ``PHOTO_SIDE_FACTOR`` times the image height (a crop then shows a recognisable part of
the photo, not a flat patch), and cached in ``$HFZ_CACHE/arrays/style_photos/`` as a ``.npy``
that later processes memory-map.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hfz_app.data.sources import DataSourceError, cache_dir

if TYPE_CHECKING:
    from hfz_app.config import DataSection

PHOTO_SIDE_FACTOR = 4  # a photo's shorter side after resizing, in image heights
PHOTO_CACHE_VERSION = 1  # bump when decoding or resizing changes: stale files are re-made
_STYLE_STREAM, _STYLE_TEST_STREAM = 0x571E, 0x571F  # apart from the seed's other uses


@dataclass(frozen=True)
class Photo:
    """One photograph inside an installed package, with its licence (docs/DATA.md lists them)."""

    package: str  # "skimage" or "sklearn"
    file: str  # path inside the package's sample-image folder
    licence: str


_SKI, _SKL = "skimage", "sklearn"
#: style source -> its photographs. Sources differ in palette and texture, not in content.
STYLE_SOURCES: dict[str, tuple[Photo, ...]] = {
    "space": (Photo(_SKI, "hubble_deep_field.jpg", "public domain (NASA)"),
              Photo(_SKI, "rocket.jpg", "public domain (SpaceX)"),
              Photo(_SKI, "astronaut.png", "public domain (NASA)")),
    "warm": (Photo(_SKI, "coffee.png", "CC0 (Rachel Michetti)"),
             Photo(_SKI, "chelsea.png", "CC0 (Stefan van der Walt)"),
             Photo(_SKI, "retina.jpg", "CC0 (Mikael Haggstrom)")),
    "texture": (Photo(_SKI, "brick.png", "CC0 (CC0Textures)"),
                Photo(_SKI, "grass.png", "CC0 (linolafett)"),
                Photo(_SKI, "gravel.png", "CC0 (CC0Textures)"),
                Photo(_SKI, "camera.png", "CC0 (Lav Varshney)")),
    "scenery": (Photo(_SKL, "china.jpg", "CC-BY 2.0 (danielbuechele)"),
                Photo(_SKL, "flower.jpg", "CC-BY 2.0 (vultilion)")),
}
_PACKAGE_DIRS = {_SKI: ("skimage", "data", "scikit-image==0.26.0"),
                 _SKL: ("sklearn", "datasets/images", "scikit-learn")}


def parse_sources(spec: str) -> tuple[str, ...]:
    """``data.style_sources`` (comma-separated source names) as a tuple; one-line error."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [n for n in names if n not in STYLE_SOURCES]
    if unknown or len(names) < 1 or len(set(names)) != len(names):
        raise DataSourceError(
            f"data.style_sources: expected distinct names from {', '.join(STYLE_SOURCES)} "
            f"(comma-separated), got {spec!r}")
    return names


def styled_shape(cfg: DataSection, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The input shape the models see: 3xHxW with ``data.style``, else the source's own.
    One-line error for a source that is not grayscale (the blend needs a single channel)."""
    if not cfg.style:
        return shape
    parse_sources(cfg.style_sources)
    if shape[0] != 1:
        raise DataSourceError(
            f"data.style: needs a grayscale dataset (1xHxW, e.g. mnist or fashion_mnist), "
            f"{cfg.dataset!r} gives {'x'.join(map(str, shape))}")
    return (3, shape[1], shape[2])


def _package_file(photo: Photo) -> Path:
    module, folder, install = _PACKAGE_DIRS[photo.package]
    spec = importlib.util.find_spec(module)  # not imported: only its data folder is read
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(f"data.style: the {photo.file} photograph ships with {install}, "
                              f"which is not installed (pip install -c constraints.txt {install})")
    path = Path(spec.submodule_search_locations[0]) / folder / photo.file
    if not path.is_file():
        raise DataSourceError(f"data.style: {path} is missing from the installed {install}")
    return path


def _decode(photo: Photo, side: int) -> np.ndarray:
    """The photograph as uint8 RGB [h, w, 3], its shorter side resized to ``side`` pixels."""
    from PIL import Image

    with Image.open(_package_file(photo)) as image:
        image = image.convert("RGB")  # grayscale textures become gray RGB: a style of its own
        scale = side / min(image.size)
        size = (max(side, round(image.size[0] * scale)), max(side, round(image.size[1] * scale)))
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


@functools.lru_cache(maxsize=64)
def load_photo(photo: Photo, side: int) -> np.ndarray:
    """``_decode``, cached on disk as a memory-mapped ``.npy`` (written atomically: several
    client processes may decode at once). An unwritable cache only costs decoding time."""
    path = (cache_dir() / "arrays" / "style_photos" /
            f"v{PHOTO_CACHE_VERSION}-{photo.package}-{Path(photo.file).stem}-{side}.npy")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.ndim == 3 and array.shape[2] == 3 and min(array.shape[:2]) == side:
            return array
    except (OSError, ValueError):
        pass
    array = _decode(photo, side)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, path)
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError:
        pass
    array.setflags(write=False)
    return array


def photo_bank(sources: tuple[str, ...], height: int) -> list[list[np.ndarray]]:
    """Per style source, its photographs as uint8 RGB [h, w, 3] arrays."""
    side = PHOTO_SIDE_FACTOR * height
    return [[load_photo(photo, side) for photo in STYLE_SOURCES[name]] for name in sources]


def draw_mix(alpha: float, num_sources: int, rng: np.random.Generator) -> np.ndarray:
    """A style mix from Dirichlet(alpha) over the sources (a one-hot one should numpy's draw
    underflow to all zeros at a tiny alpha)."""
    mix = rng.dirichlet(np.full(num_sources, float(alpha)))
    if not np.isfinite(mix).all() or mix.sum() <= 0:
        mix = np.eye(num_sources)[rng.integers(num_sources)]
    return mix


def exact_counts(n: int, mix: np.ndarray) -> np.ndarray:
    """``n`` split by ``mix`` into integer counts summing to ``n`` (largest remainder)."""
    share = n * np.asarray(mix, dtype=np.float64) / max(float(np.sum(mix)), 1e-300)
    counts = np.floor(share).astype(np.int64)
    extra = n - int(counts.sum())
    if extra > 0:
        counts[np.argsort(-(share - counts), kind="stable")[:extra]] += 1
    return counts


def assign_styles(n: int, mix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Style ids for ``n`` samples: exactly ``exact_counts(n, mix)`` of each, in seeded order."""
    ids = np.repeat(np.arange(len(mix)), exact_counts(n, mix))
    return rng.permutation(ids).astype(np.int64)


def crop_backgrounds(bank: list[list[np.ndarray]], styles: np.ndarray, height: int, width: int,
                     rng: np.random.Generator) -> np.ndarray:
    """For each sample, a random ``height`` x ``width`` crop of a random photograph of its style
    source: uint8 [n, 3, H, W]. Gathered with one fancy index per photograph."""
    n = len(styles)
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    photo_of = np.empty(n, dtype=np.int64)
    for s, photos in enumerate(bank):
        members = np.flatnonzero(styles == s)
        photo_of[members] = rng.integers(len(photos), size=len(members))
    tops, lefts = rng.random(n), rng.random(n)  # scaled to each photo's free range below
    dy, dx = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    for s, photos in enumerate(bank):
        for p, photo in enumerate(photos):
            members = np.flatnonzero((styles == s) & (photo_of == p))
            if not len(members):
                continue
            y0 = (tops[members] * (photo.shape[0] - height + 1)).astype(np.int64)
            x0 = (lefts[members] * (photo.shape[1] - width + 1)).astype(np.int64)
            out[members] = photo[y0[:, None, None] + dy, x0[:, None, None] + dx]
    return out.transpose(0, 3, 1, 2)


def blend(images: torch.Tensor, backgrounds: np.ndarray) -> torch.Tensor:
    """MNIST-M's blend: ``|background - image|`` per channel; float32 [n, 3, H, W] in [0, 1]."""
    bg = torch.from_numpy(np.ascontiguousarray(backgrounds)).float().div_(255.0)
    return (bg - images.expand(-1, 3, -1, -1)).abs_()


@dataclass(frozen=True)
class ClientStyle:
    """A client's drawn mix over the sources and the style id of each of its samples (in the
    order of ``Federation.indices``: local train rows, then local test rows)."""

    mix: np.ndarray
    ids: np.ndarray


def client_style(cfg: DataSection, seed: int, partition_id: int, n: int,
                 heldout: bool) -> ClientStyle:
    """The client's style mix and per-sample style ids, drawn from ``(seed, partition_id)``."""
    k = len(parse_sources(cfg.style_sources))
    alpha = (cfg.style_alpha_heldout or cfg.style_alpha) if heldout else cfg.style_alpha
    rng = np.random.default_rng([seed, _STYLE_STREAM, partition_id])
    mix = draw_mix(alpha, k, rng)
    return ClientStyle(mix, assign_styles(n, mix, rng))


def style_images(images: torch.Tensor, ids: np.ndarray, cfg: DataSection, seed: int,
                 partition_id: int | None) -> torch.Tensor:
    """``images`` (float [n, 1, H, W]) blended into crops of their styles' photographs; the
    crops come from a generator seeded by ``(seed, partition_id)`` (``None``: the global test
    set), apart from the one that drew the mix, so a rebuild is identical."""
    _, _, height, width = images.shape
    bank = photo_bank(parse_sources(cfg.style_sources), height)
    stream = [_STYLE_TEST_STREAM] if partition_id is None else [_STYLE_STREAM, partition_id]
    rng = np.random.default_rng([seed, *stream, 1])
    return blend(images, crop_backgrounds(bank, ids, height, width, rng))


def global_test_styles(cfg: DataSection, seed: int, n: int) -> np.ndarray:
    """Style ids of the global test set: the uniform mix, exact counts, seeded order."""
    k = len(parse_sources(cfg.style_sources))
    return assign_styles(n, np.full(k, 1.0 / k), np.random.default_rng([seed, _STYLE_TEST_STREAM]))
