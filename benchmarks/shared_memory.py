"""Memory of N processes holding one dataset: the old ``.npz`` cache against the memory-mapped one.

Every Flower ClientApp process (one per Ray worker, one per SuperNode) loads the dataset. With the
version-1 cache, ``np.load`` of an ``.npz`` reads the arrays into each process's private memory;
with the memory-mapped ``.npy`` cache (``hfz_app.data.sources.read_cache``) every process maps the
same file read-only and the kernel keeps one copy in the page cache.

For 1, 2 and 4 processes started together, each loads the dataset the way the cache says and reads
every byte (as clients that draw samples from all over the arrays do), then waits while this
script reads their ``/proc/<pid>/smaps_rollup``: RSS (resident pages, shared file pages included,
so a mapped copy counts in every process), PSS (shared pages divided among the processes that map
them) and USS (private pages: what the process alone costs), and the machine's ``MemAvailable``
drop while they all hold it. Datasets: MNIST (the real cache) and a synthetic 1 GB stand-in.

    python -m benchmarks.shared_memory                # writes docs/benchmarks/shared_memory.md
    python -m benchmarks.shared_memory --size-gb 0.1  # quicker
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT, Table, machine, written_by
from hfz_app.data.sources import CACHE_ARRAYS, DatasetArrays, load_dataset, write_cache

CHILD = textwrap.dedent("""
    import sys, numpy as np
    kind, path = sys.argv[1], sys.argv[2]
    if kind == "npz":  # the version-1 cache: arrays read into this process
        with np.load(path) as z:
            arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    else:  # the memory-mapped cache
        arrays = [np.load(f"{path}/{k}.npy", mmap_mode="r")
                  for k in ("x_train", "y_train", "x_test", "y_test")]
    total = sum(int(a.sum(dtype=np.int64)) for a in arrays)  # every byte read once
    print("ready", total, flush=True)
    sys.stdin.readline()
""")


def smaps(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) of ``pid`` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])  # kB
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"rss": fields["Rss"] // 1024, "pss": fields["Pss"] // 1024, "uss": uss // 1024}


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def hold(kind: str, path: Path, n: int) -> dict[str, float]:
    """Start ``n`` processes holding the dataset at ``path``; their memory while all hold it."""
    before = mem_available()
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, kind, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if not proc.stdout.readline().startswith("ready"):
                raise RuntimeError(f"a {kind} reader failed")
        time.sleep(0.2)
        stats = [smaps(p.pid) for p in procs]
        used = before - mem_available()
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait()
    return {"rss_first": stats[0]["rss"], "rss_last": stats[-1]["rss"],
            "uss_last": stats[-1]["uss"], "pss_sum": sum(s["pss"] for s in stats),
            "used": used}


def write_both(arrays: DatasetArrays, folder: Path) -> tuple[Path, Path]:
    """The dataset as the version-1 ``.npz`` and as the memory-mapped cache folder."""
    mapped = folder / arrays.name
    if not write_cache(mapped, arrays):  # (it deletes a version-1 file of the same name)
        raise RuntimeError(f"could not write {mapped}")
    npz = folder / f"{arrays.name}.npz"
    np.savez(npz, **{k: getattr(arrays, k) for k in CACHE_ARRAYS})
    return npz, mapped


def synthetic(size_gb: float) -> DatasetArrays:
    """Random uint8 images 1x32x32 (10 classes) making ``size_gb`` GB in all, 1/6 of it test."""
    rng = np.random.default_rng(0)
    n = int(size_gb * 1e9) // 1024
    n_test = n // 6
    x = rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    return DatasetArrays(f"synthetic-{size_gb:g}GB", x[n_test:], y[n_test:], x[:n_test],
                         y[:n_test], tuple(str(i) for i in range(10)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="the synthetic stand-in")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/shared_memory.md")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.processes.split(",")]
    table = Table(
        "| dataset | cache | processes | RSS 1st | RSS last | USS last | PSS, all | "
        "machine memory used |",
        "|---|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs" if (ROOT / "outputs").exists()
                                     else None) as tmp:
        for arrays in (load_dataset("mnist"), synthetic(args.size_gb)):
            size = sum(getattr(arrays, k).nbytes for k in CACHE_ARRAYS) / 2**20
            npz, mapped = write_both(arrays, Path(tmp))
            del arrays
            for kind, path in (("npz", npz), ("mmap", mapped)):
                subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], input="\n",
                               capture_output=True, text=True, check=True)  # warm page cache
                for n in counts:
                    r = hold(kind, path, n)
                    label = ".npz (before)" if kind == "npz" else "memory-mapped (after)"
                    table.add(f"| {path.stem} ({size:,.0f} MiB) | {label} | {n} | "
                              f"{r['rss_first']:,} | {r['rss_last']:,} | {r['uss_last']:,} | "
                              f"{r['pss_sum']:,} | {r['used']:,} |")
    header = ["# Memory of processes sharing one dataset", "",
              *written_by("shared_memory", argv), f"Machine: {machine()}", "",
              ("MiB. Each process loads the dataset and reads every byte; all N hold it while "
              "their memory is read. RSS counts shared file pages in every process that maps "
              "them, so with the memory-mapped cache it stays near the dataset's size in each; "
              "USS (the process's private pages) and PSS (shared pages split among the "
              "processes) show what each costs, and the machine's `MemAvailable` drop what all "
              "N cost together (page-cache pages of the mapped file are counted once there, "
              "and not at all if they were cached before)."), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + table.lines) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
