"""Offline-first federated data: named datasets, participant/held-out clients, feature shift."""

from hfz_app.data import hub  # noqa: F401 -- registers the online (hub) sources
from hfz_app.data.federation import ClientData, Federation, build_federation
from hfz_app.data.shift import apply_shift, draw_shift
from hfz_app.data.sources import (
    DatasetArrays,
    DataSourceError,
    available_sources,
    cache_dir,
    load_data,
    load_dataset,
    register_source,
)

__all__ = [
    "ClientData",
    "DataSourceError",
    "DatasetArrays",
    "Federation",
    "apply_shift",
    "available_sources",
    "build_federation",
    "cache_dir",
    "draw_shift",
    "load_data",
    "load_dataset",
    "register_source",
]
