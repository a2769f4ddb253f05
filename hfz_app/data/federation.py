"""Participating and held-out clients over one dataset, identical in every process for a seed.

The train split is (optionally) subsampled, then cut into a participant pool and a held-out pool
(stratified, the held-out pool getting M/(N+M) of it); each pool is split across its clients
with flwr-datasets' ``DirichletPartitioner`` (label skew), run on a tiny labels-only table, never
on the images. Participants then split their share into local train/test. Only row indices are
computed up front; a client's tensors (with its style and feature shift) are built on first
request.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hfz_app.config import DataSection, ShiftSection
from hfz_app.data.shift import apply_shift, draw_shift
from hfz_app.data.sources import DatasetArrays, DataSourceError, load_data, load_folder
from hfz_app.data.style import (
    ClientStyle,
    client_style,
    global_test_styles,
    parse_sources,
    style_images,
    styled_shape,
)

# Keep every client's tensors when the whole float32 train split fits in this and the federation
# has at most CLIENT_CACHE_ALL clients; else the CLIENT_CACHE_RECENT most recent ones.
CLIENT_CACHE_BYTES = 2 * 2**30
CLIENT_CACHE_ALL = 256
CLIENT_CACHE_RECENT = 8

# Independent random streams derived from the run seed, one per decision.
_SUBSAMPLE, _POOLS, _DIRICHLET_P, _DIRICHLET_H, _LOCAL, _TEST = range(6)


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *extra])


def _int_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def stratified_split(labels: np.ndarray, n_first: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``labels`` split into ``n_first`` and the rest, class proportions kept.

    Each class gets its proportional share rounded by largest remainder, so the sizes are exact.
    """
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * (n_first / max(len(labels), 1))
    take = np.floor(share).astype(int)
    extra = n_first - take.sum()
    if extra > 0:
        take[np.argsort(-(share - take), kind="stable")[:extra]] += 1
    first, second = [], []
    for cls, k in zip(classes, take):
        members = rng.permutation(np.flatnonzero(labels == cls))
        first.append(members[:k])
        second.append(members[k:])
    first_idx = rng.permutation(np.concatenate(first)) if first else np.empty(0, np.int64)
    second_idx = rng.permutation(np.concatenate(second)) if second else np.empty(0, np.int64)
    return first_idx.astype(np.int64), second_idx.astype(np.int64)


def _offline_imports() -> tuple[type, type]:
    """Import ``datasets`` with the hub switched off (we only ever build a local table).

    The variables are set for the import only (that is when the libraries read them), so an
    online source loaded later in the process is not silently disabled.
    """
    if "datasets" not in sys.modules:
        saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
        os.environ.update({k: v or "1" for k, v in saved.items()})
        try:
            import datasets  # noqa: F401 - heavy import, only needed here
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    return Dataset, DirichletPartitioner


def dirichlet_split(rows: np.ndarray, labels: np.ndarray, num_partitions: int, alpha: float,
                    min_size: int, seed: int, keys: str) -> list[np.ndarray]:
    """``rows`` split into label-skewed partitions by flwr-datasets' DirichletPartitioner.

    ``keys`` names the config keys to blame in the one-line error when it cannot succeed.
    """
    if len(rows) < num_partitions * min_size:
        raise ValueError(
            f"{keys}: {num_partitions} clients x at least {min_size} samples need "
            f"{num_partitions * min_size} samples, but the pool holds {len(rows)}; use fewer "
            f"clients, a smaller data.min_partition_size or a larger data.train_subsample"
        )
    Dataset, DirichletPartitioner = _offline_imports()

    partitioner = DirichletPartitioner(
        num_partitions=num_partitions, partition_by="label", alpha=float(alpha),
        min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed,
    )
    # Arrow format: the partitioner reads the label column as one array, not row by row.
    table = Dataset.from_dict({"label": labels, "row": rows}).with_format("arrow")
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one warning per retry; we report the outcome
            return [partitioner.load_partition(i)["row"].to_numpy().astype(np.int64)
                    for i in range(num_partitions)]
    except ValueError:
        raise ValueError(
            f"{keys}: the Dirichlet split of {len(rows)} samples into "
            f"{num_partitions} clients left one below {min_size} samples in 11 tries; lower "
            f"data.min_partition_size, raise the alpha or use fewer clients"
        ) from None


@dataclass
class ClientData:
    """One client's tensors: float32 [n, C, H, W] in [0, 1] (after its shift), int64 labels.

    Held-out clients never train: their train tensors are empty and test holds all their data.
    """

    partition_id: int
    heldout: bool
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    shift: dict[str, float] = field(default_factory=dict)
    style: dict[str, float] = field(default_factory=dict)  # style source -> drawn mix share


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


class Federation:
    """The clients of one run: partition ids 0..N-1 participate, N..N+M-1 are held out."""

    def __init__(self, arrays: DatasetArrays, cfg: DataSection, seed: int,
                 train_rows: list[np.ndarray], test_rows: list[np.ndarray]) -> None:
        self.arrays, self.cfg, self.seed = arrays, cfg, seed
        self.dataset = arrays.name
        self.num_classes = arrays.num_classes
        self.input_shape = styled_shape(cfg, arrays.input_shape)  # 3xHxW with data.style
        self.style_sources = parse_sources(cfg.style_sources) if cfg.style else ()
        self.class_names = arrays.class_names
        self.num_participants = cfg.num_participants
        self.num_heldout = cfg.num_heldout
        self.num_clients = cfg.num_participants + cfg.num_heldout
        self._train_rows, self._test_rows = train_rows, test_rows
        # An in-process run visits every client each round: an LRU smaller than that would miss
        # on every call, so keep them all unless the data is large. With many clients (a
        # 1,000-client run samples 10% a round) a node rarely meets a client again, and keeping
        # all it met grew its process round after round, up to the whole split as float32
        # (~190 MB per ClientApp on MNIST); a miss costs ~1 ms there (MNIST, 55 samples).
        growth = np.prod(self.input_shape) / np.prod(arrays.input_shape)  # data.style: x3
        fits = (arrays.x_train.nbytes * 4 * growth <= CLIENT_CACHE_BYTES
                and self.num_clients <= CLIENT_CACHE_ALL)
        self._client = functools.lru_cache(maxsize=None if fits else CLIENT_CACHE_RECENT)(
            self._make_client)
        self._global_test: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (f"Federation({self.dataset}, {self.num_participants} participants + "
                f"{self.num_heldout} held out, seed {self.seed})")

    def _check(self, partition_id: int) -> None:
        if not 0 <= partition_id < self.num_clients:
            raise ValueError(f"partition_id: expected 0..{self.num_clients - 1}, "
                             f"got {partition_id}")

    def is_heldout(self, partition_id: int) -> bool:
        self._check(partition_id)
        return partition_id >= self.num_participants

    def indices(self, partition_id: int) -> np.ndarray:
        """All of the client's rows in the dataset's train split (local train, then local test)."""
        self._check(partition_id)
        return np.concatenate([self._train_rows[partition_id], self._test_rows[partition_id]])

    def split_indices(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The client's (local train rows, local test rows); held-out: (empty, all)."""
        self._check(partition_id)
        return self._train_rows[partition_id], self._test_rows[partition_id]

    def label_counts(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-class counts of the client's (train, test) rows, without building tensors."""
        y = self.arrays.y_train
        return tuple(np.bincount(y[rows], minlength=self.num_classes)  # type: ignore[return-value]
                     for rows in self.split_indices(partition_id))

    def shift_params(self, partition_id: int) -> dict[str, float]:
        self._check(partition_id)
        return draw_shift(self.cfg.shift, self.seed, partition_id)

    def style(self, partition_id: int) -> ClientStyle | None:
        """The client's style mix and each sample's style id (order of ``indices``); None
        without ``data.style``. Cheap: no image is touched."""
        self._check(partition_id)
        if not self.cfg.style:
            return None
        return client_style(self.cfg, self.seed, partition_id, len(self.indices(partition_id)),
                            self.is_heldout(partition_id))

    def client(self, partition_id: int) -> ClientData:
        """The client's tensors, built on first use (only this client's rows), then cached."""
        self._check(partition_id)
        return self._client(partition_id)

    def client_data(self, partition_id: int, heldout: bool, data_dir: str = "") -> ClientData:
        """Partition ``partition_id`` of this federation, or, with ``data_dir``, a client's own
        files (an .npz or idx folder, read with the ``folder`` source; ``x_train``/``y_train``
        train, ``x_test``/``y_test`` its local test split; a held-out client is evaluated on
        both)."""
        if not data_dir:
            return self.client(partition_id)
        return self._local_client(data_dir, partition_id, heldout)

    @functools.lru_cache(maxsize=2)  # noqa: B019 -- one federation per process, a few nodes
    def _local_client(self, data_dir: str, partition_id: int, heldout: bool) -> ClientData:
        arrays = load_folder(data_dir, whole_dataset=False)  # a client may hold a few classes
        if arrays.input_shape != self.input_shape or arrays.num_classes > self.num_classes:
            raise DataSourceError(
                f"{data_dir} holds {arrays.input_shape} inputs "
                f"with {arrays.num_classes} classes; the run expects {self.input_shape} and at "
                f"most {self.num_classes} ({self.dataset})")
        x_tr, y_tr = to_float(arrays.x_train), torch.from_numpy(arrays.y_train.astype(np.int64))
        x_te, y_te = to_float(arrays.x_test), torch.from_numpy(arrays.y_test.astype(np.int64))
        if heldout:
            empty_x, empty_y = x_tr[:0], y_tr[:0]
            return ClientData(partition_id, True, empty_x, empty_y,
                              torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te]))
        return ClientData(partition_id, False, x_tr, y_tr, x_te, y_te)

    def _make_client(self, partition_id: int) -> ClientData:
        train_rows, test_rows = self.split_indices(partition_id)
        rows = np.concatenate([train_rows, test_rows])
        params = self.shift_params(partition_id)
        x = to_float(self.arrays.x_train[rows])
        style = self.style(partition_id)
        if style is not None:  # the photo first: the client's camera (shift) sees the scene
            x = style_images(x, style.ids, self.cfg, self.seed, partition_id)
        x = apply_shift(x, params, self.seed, partition_id)
        y = torch.from_numpy(self.arrays.y_train[rows].copy())
        n = len(train_rows)
        mix = {} if style is None else dict(zip(self.style_sources, map(float, style.mix)))
        return ClientData(partition_id, self.is_heldout(partition_id),
                          x[:n], y[:n], x[n:], y[n:], params, mix)

    def _global_test_rows(self) -> np.ndarray:
        y = self.arrays.y_test
        rows = np.arange(len(y))
        if 0 < self.cfg.test_subsample < len(y):
            rows, _ = stratified_split(y, self.cfg.test_subsample, _rng(self.seed, _TEST))
            rows.sort()
        return rows

    def global_test_style_ids(self) -> np.ndarray | None:
        """Each global test sample's style id (the uniform mix); None without data.style."""
        if not self.cfg.style:
            return None
        return global_test_styles(self.cfg, self.seed, len(self._global_test_rows()))

    def global_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dataset's own test split (stratified subsample if data.test_subsample), unshifted;
        with data.style, blended into photographs of the uniform style mix."""
        if self._global_test is None:
            rows = self._global_test_rows()
            x = to_float(self.arrays.x_test[rows])
            ids = self.global_test_style_ids()
            if ids is not None:
                x = style_images(x, ids, self.cfg, self.seed, None)
            self._global_test = (x, torch.from_numpy(self.arrays.y_test[rows].copy()))
        return self._global_test


def _local_split(rows: np.ndarray, labels: np.ndarray, fraction: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A participant's local (train, test) rows: at least one of each, stratified."""
    n_test = min(max(round(len(rows) * fraction), 1), len(rows) - 1)
    test_pos, train_pos = stratified_split(labels, n_test, rng)
    return rows[train_pos], rows[test_pos]


def plan_rows(y: np.ndarray, cfg: DataSection,
              seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per client (participants first), its local train rows and local test rows into ``y``."""
    n, m = cfg.num_participants, cfg.num_heldout
    pool = np.arange(len(y))
    if 0 < cfg.train_subsample < len(y):
        pool, _ = stratified_split(y, cfg.train_subsample, _rng(seed, _SUBSAMPLE))
    n_heldout_pool = round(len(pool) * m / (n + m))
    heldout_pos, participant_pos = stratified_split(y[pool], n_heldout_pool, _rng(seed, _POOLS))
    participant_rows, heldout_rows = pool[participant_pos], pool[heldout_pos]

    min_size = max(cfg.min_partition_size, 2)  # room for one local train and one test sample
    for role, clients, size, need in (("participant", n, len(participant_rows), min_size),
                                      ("held-out", m, len(heldout_rows), cfg.min_partition_size)):
        if clients * need > size:
            raise ValueError(
                f"data.num_participants={n} / data.num_heldout={m} / data.min_partition_size="
                f"{cfg.min_partition_size}: the {role} pool gets {size} of {len(pool)} train "
                f"samples, but {clients} {role} clients need at least {clients * need}; use "
                f"fewer clients, a smaller data.min_partition_size or more data"
            )
    keys = (f"data.num_participants={n} / data.min_partition_size={cfg.min_partition_size} / "
            f"data.alpha_dir={cfg.alpha_dir}")
    shares = dirichlet_split(participant_rows, y[participant_rows], n, cfg.alpha_dir, min_size,
                             _int_seed(seed, _DIRICHLET_P), keys)
    train_rows, test_rows = [], []
    for pid, rows in enumerate(shares):
        tr, te = _local_split(rows, y[rows], cfg.local_test_fraction, _rng(seed, _LOCAL, pid))
        train_rows.append(tr)
        test_rows.append(te)
    if m:
        alpha = cfg.alpha_dir_heldout or cfg.alpha_dir
        keys = (f"data.num_heldout={m} / data.min_partition_size={cfg.min_partition_size} / "
                f"data.alpha_dir_heldout={cfg.alpha_dir_heldout}")
        for rows in dirichlet_split(heldout_rows, y[heldout_rows], m, alpha,
                                    cfg.min_partition_size, _int_seed(seed, _DIRICHLET_H), keys):
            train_rows.append(rows[:0])
            test_rows.append(rows)
    return train_rows, test_rows


def cached_plan_rows(y: np.ndarray, cfg: DataSection, seed: int, plan_cache: str | None = None
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``plan_rows``, kept in the folder ``plan_cache`` when given (else computed each time):
    processes of one run that share the folder partition once.

    The file's key hashes everything the plan depends on: the data section, the seed, the labels,
    this module's source and the flwr-datasets version. It is written to a temporary name and
    renamed, so a concurrent reader sees a whole file or none; an unreadable one is recomputed.
    """
    if not plan_cache:
        return plan_rows(y, cfg, seed)
    digest = hashlib.sha256()
    for part in (json.dumps([dataclasses.asdict(cfg), seed], sort_keys=True).encode(),
                 np.ascontiguousarray(y).tobytes(), str(y.dtype).encode(),
                 Path(__file__).read_bytes(), importlib.metadata.version("flwr-datasets").encode()):
        digest.update(part)
    path = Path(plan_cache) / f"plan-{digest.hexdigest()[:32]}.npz"
    n = cfg.num_participants + cfg.num_heldout
    try:
        with np.load(path) as saved:
            return ([saved[f"train_{i}"] for i in range(n)], [saved[f"test_{i}"] for i in range(n)])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):  # absent or partial
        pass
    train_rows, test_rows = plan_rows(y, cfg, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **{f"train_{i}": r for i, r in enumerate(train_rows)},
             **{f"test_{i}": r for i, r in enumerate(test_rows)})
    os.replace(tmp, path)
    return train_rows, test_rows


def build_federation(data_cfg: DataSection, seed: int, plan_cache: str | None = None
                     ) -> Federation:
    """The run's federation; cached per process on (config, seed), so repeated calls are free.
    ``plan_cache``: a folder where the partition plan is kept for the run's other processes."""
    return _build_cached(json.dumps(dataclasses.asdict(data_cfg), sort_keys=True), seed,
                         plan_cache or None)


@functools.lru_cache(maxsize=4)
def _build_cached(cfg_json: str, seed: int, plan_cache: str | None) -> Federation:
    tree = json.loads(cfg_json)
    shift = tree.pop("shift")
    cfg = DataSection(**tree, shift=ShiftSection(**shift))
    arrays = load_data(cfg)  # data.synthetic: the dataset's generated stand-in
    train_rows, test_rows = cached_plan_rows(arrays.y_train, cfg, seed, plan_cache)
    return Federation(arrays, cfg, seed, train_rows, test_rows)
