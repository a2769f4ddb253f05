"""Datasets on this machine: list them, fetch one once, move it to a machine without internet.

    python -m hfz_app.data list                     # every source, cached or not
    python -m hfz_app.data fetch cifar10            # download + decode once; prints the cache
    python -m hfz_app.data export cifar10 FILE.tar  # the decoded arrays as one file
    python -m hfz_app.data import FILE.tar          # on another machine: into its cache

``make data DATASET=cifar10`` runs ``fetch``. Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
from pathlib import Path

from hfz_app.data.sources import (
    CACHE_ARRAYS,
    DataSourceError,
    array_cache_path,
    available_sources,
    cache_dir,
    load_dataset,
    read_cache,
    source_info,
)

MEMBERS = ("meta.json", *(f"{key}.npy" for key in CACHE_ARRAYS))


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return f"{total / 2**20:,.1f} MiB"


def fetch(name: str) -> Path:
    """Decode ``name`` into the cache (downloading it if it is online); its cache folder."""
    source = source_info(name)
    if not source.disk_cache:
        raise DataSourceError(f"{name}: not cached on disk (it is built on the fly); nothing to "
                              f"fetch")
    arrays = load_dataset(name)
    path = array_cache_path(name)
    if read_cache(path, source.name) is None:
        raise DataSourceError(f"{name}: decoded, but the cache {path} could not be written "
                              f"(check HFZ_CACHE's permissions)")
    print(f"{source.name}: {len(arrays.x_train):,} train / {len(arrays.x_test):,} test images "
          f"{'x'.join(map(str, arrays.input_shape))}, {arrays.num_classes} classes")
    print(f"cache: {path} ({_size(path)})")
    return path


def export(name: str, file: Path) -> None:
    """Write the cached arrays of ``name`` (fetched first if needed) to one tar file."""
    path = fetch(name)
    file.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(file, "w") as tar:
        for member in MEMBERS:
            tar.add(path / member, arcname=f"{path.name}/{member}")
    print(f"exported: {file} ({file.stat().st_size / 2**20:,.1f} MiB); on the other machine: "
          f"python -m hfz_app.data import {file.name}")


def import_(file: Path) -> Path:
    """Install an exported tar file into this machine's cache; the dataset's cache folder."""
    try:
        tar = tarfile.open(file)  # noqa: SIM115 -- closed by the with below; only open() fails here
    except (OSError, tarfile.TarError) as err:
        raise DataSourceError(f"{file}: not a readable export ({err})") from None
    with tar:
        names = tar.getnames()
        folders = {n.split("/", 1)[0] for n in names}
        if len(folders) != 1:
            raise DataSourceError(f"{file}: expected one dataset folder, found {sorted(folders)}")
        (name,) = folders
        expected = {f"{name}/{member}" for member in MEMBERS}
        if set(names) != expected:
            raise DataSourceError(f"{file}: expected exactly {sorted(expected)}, found "
                                  f"{sorted(names)}")
        source = source_info(name)  # only a known dataset's cache is installed
        target = array_cache_path(name)
        tmp = target.with_name(f".{name}.{os.getpid()}.import")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            tar.extractall(tmp, filter="data")
            if read_cache(tmp / name, source.name) is None:
                raise DataSourceError(f"{file}: the arrays inside are damaged or of another "
                                      f"cache version; export them again")
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp / name, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    load_dataset.cache_clear()
    print(f"imported: {name} -> {target} ({_size(target)})")
    return target


def list_sources() -> None:
    for name in available_sources():
        source = source_info(name)
        cached = source.disk_cache and read_cache(array_cache_path(name), source.name) is not None
        alias = f" (alias of {source.name})" if source.name != name else ""
        state = "cached" if cached else ("online" if source.online else "offline")
        print(f"{name:16s} {state:8s} {source.help}{alias}")
    print(f"cache: {cache_dir() / 'arrays'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hfz_app.data",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every dataset source and whether it is cached").set_defaults(
        run=lambda a: list_sources())
    fetch_cmd = sub.add_parser("fetch", help="download and decode once")
    fetch_cmd.add_argument("name")
    fetch_cmd.set_defaults(run=lambda a: fetch(a.name))
    export_cmd = sub.add_parser("export", help="write a cached dataset to one file")
    export_cmd.add_argument("name")
    export_cmd.add_argument("file", type=Path)
    export_cmd.set_defaults(run=lambda a: export(a.name, a.file))
    import_cmd = sub.add_parser("import", help="install an exported file")
    import_cmd.add_argument("file", type=Path)
    import_cmd.set_defaults(run=lambda a: import_(a.file))
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except DataSourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
