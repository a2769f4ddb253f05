"""What the benchmark scripts share: the run harness and one copy of each helper.

``run_training`` runs one configured training run of the real ServerApp/ClientApp, either
in-process (``hfz_app.federation.inprocess``'s Grid, in this process or a fresh one) or through
``flwr run`` (``python -m hfz_app.launch``: its own SuperLink and simulated SuperNodes), and
returns a ``Run``: the run's output folder, its ``metrics.csv`` rows, wall time and output.

Scripts run from the repository root as modules: ``python -m benchmarks.<name> ...``.
"""

from __future__ import annotations

import json
import os
import platform
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, "-m", "hfz_app.launch"]  # tests swap in a stand-in
MODES = ("inprocess", "flwr")


# -- helpers --------------------------------------------------------------------------------------


def machine() -> str:
    """CPU model, core count, OS, Python, torch and flwr (for records and tables' headers)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        torch = f"torch {version('torch')}, flwr {version('flwr')}"
    except Exception:  # noqa: BLE001
        torch = "torch ?"
    return f"{cpu}, {os.cpu_count()} cores; {platform.system()} {platform.release()}; " \
           f"Python {platform.python_version()}; {torch}"


def git_commit() -> str:
    """The checkout's short commit, ``+dirty`` with uncommitted changes to tracked files."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, check=False).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def accuracy(logits, y) -> float:
    """Top-1 accuracy of ``logits`` [n, k] against labels ``y`` [n] (torch tensors)."""
    return float((logits.argmax(1) == y).float().mean())


def checkpoint_probe(description: str, argv: list[str] | None = None):
    """For the probes that evaluate a trained checkpoint (``--checkpoint PATH``): its Config,
    federation, method runtime and frozen model (what a held-out client runs)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", required=True)
    path = parser.parse_args(argv).checkpoint
    from hfz_app.checkpoint import load_checkpoint
    from hfz_app.config import from_dict
    from hfz_app.data import build_federation
    from hfz_app.methods import runtime_for

    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt.config)
    fed = build_federation(cfg.data, cfg.run.seed)
    runtime = runtime_for(cfg, fed.input_shape, fed.num_classes)
    return cfg, fed, runtime, runtime.frozen(ckpt.shared, f"checkpoint {path}")


def parse_variants(specs: Iterable[str], default: str = "") -> dict[str, dict[str, Any]]:
    """``--variant NAME=k=v,k=v`` options -> {NAME: overrides}; none: one variant ``default``
    without overrides."""
    from hfz_app.config import parse_overrides

    specs = list(specs)
    if not specs:
        return {default: {}}
    variants = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: --variant {spec!r}: expected NAME=k=v,k=v")
        variants[name] = parse_overrides([p for p in rest.split(",") if p])
    return variants


def command_line(script: str, argv: Iterable[str], quote: bool = False) -> str:
    """How a table records the command that wrote it: ``python -m benchmarks.<script> ARGS``
    (the arguments shell-quoted with ``quote``, else joined as given)."""
    parts = ["python", "-m", f"benchmarks.{script}", *argv]
    return shlex.join(parts) if quote else " ".join(parts)


def written_by(script: str, argv: Iterable[str], quote: bool = False) -> list[str]:
    """The lines under a generated document's title: the script that wrote it, its command."""
    return [f"Written by `benchmarks/{script}.py`; do not edit by hand.", "",
            f"Command: `{command_line(script, argv, quote)}`", ""]


class Table:
    """A markdown table's lines, printed as they are measured; ``write`` saves them (under the
    command that measured them, if given)."""

    def __init__(self, *lines: str) -> None:
        self.lines: list[str] = []
        for line in lines:
            self.add(line)

    def add(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def write(self, path: Path, command: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((f"`{command}`\n\n" if command else "") + "\n".join(self.lines) + "\n")


# -- the run harness ------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run: where it wrote, what it measured, how it went."""

    mode: str
    command: list[str]  # the process run ([] in-process in this process)
    output_dir: Path | None  # <run.output_dir>/<run.name>[-N], None without a metrics.csv
    rows: list[dict[str, str]]  # metrics.csv rows (strings, as written), [] without one
    wall_s: float  # the run alone (a subprocess: start to exit)
    rc: int = 0
    output: str = ""  # its stdout (and stderr, for a subprocess)
    timed_out: bool = False
    child: dict[str, Any] = field(default_factory=dict)  # a fresh in-process run's own timings


def launch_command(preset: str, overrides: Mapping[str, Any],
                   launch_args: Iterable[str] = ()) -> list[str]:
    """``python -m hfz_app.launch --preset P [launch args] -c k=v ...``, as a user types it."""
    from hfz_app.launch import toml_value

    cmd = [*LAUNCH, "--preset", preset, *launch_args]
    for key, value in overrides.items():
        cmd += ["-c", f"{key}={toml_value(value)}"]
    return cmd


def read_metrics(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def run_folder(root: Path, name: str) -> Path | None:
    """The newest folder a run named ``name`` wrote under ``root``: ``name``, or ``name-2``,
    ``name-3`` ... where one already held a run (hfz_app.outputs.RunOutputs); None if none."""
    import glob

    found = [p for p in (root / name, *root.glob(f"{glob.escape(name)}-[0-9]*"))
             if (p / "metrics.csv").exists()]
    return max(found, key=lambda p: (p / "metrics.csv").stat().st_mtime) if found else None


def run_process(cmd: list[str], log_path: Path | None = None, timeout_s: float | None = None,
                echo: bool = False, on_line: Callable[[float, str], None] | None = None,
                ) -> tuple[int, str, bool, float]:
    """Run ``cmd`` from the repository root, its stdout and stderr into ``log_path`` (and the
    terminal with ``echo``; ``on_line(seconds since start, line)`` for each line). Returns the
    exit code, the output, whether it timed out (SIGINT, then SIGKILL: launch stops its
    SuperLink on SIGINT) and its wall time."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    lines: list[str] = []
    timed_out = False
    with open(log_path if log_path is not None else os.devnull, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                if deadline is not None and time.monotonic() > deadline and not timed_out:
                    timed_out = True
                    proc.send_signal(signal.SIGINT)
                    deadline = time.monotonic() + 60  # then SIGKILL
                elif timed_out and deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    deadline = None
                if not sel.select(timeout=1.0):
                    if proc.poll() is not None:
                        break
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                if on_line is not None:
                    on_line(time.perf_counter() - start, line)
                lines.append(line)
                log.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        proc.wait()
        wall = time.perf_counter() - start
    return proc.returncode, "".join(lines), timed_out, wall


def run_training(preset: str, overrides: Mapping[str, Any], mode: str = "inprocess", *,
                 fresh_process: bool = False, launch_args: Iterable[str] = (),
                 log_path: Path | None = None, timeout_s: float | None = None,
                 echo: bool = False, on_line: Callable[[float, str], None] | None = None) -> Run:
    """One training run of ``preset`` with ``overrides`` (which name ``run.name`` and
    ``run.output_dir``: the run writes ``<run.output_dir>/<run.name>``).

    ``mode="inprocess"``: the ServerApp and ClientApp on hfz_app.federation.inprocess's Grid (one
    node after the other), in this process with its stdout captured, or with ``fresh_process`` in
    a new Python process (``python -m benchmarks.harness``). ``mode="flwr"``: ``python -m
    hfz_app.launch`` with ``launch_args``. A subprocess's output goes to ``log_path``, stops after
    ``timeout_s`` and is echoed with ``echo``; an in-process run raises what the run raises."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    overrides = dict(overrides)
    root, name = Path(str(overrides["run.output_dir"])), str(overrides["run.name"])
    if mode == "inprocess" and not fresh_process:
        import contextlib
        import io

        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            wall = _inprocess(preset, overrides)
        folder = run_folder(root, name)
        return Run(mode, [], folder, read_metrics(folder / "metrics.csv") if folder else [],
                   wall, output=output.getvalue())
    if mode == "flwr":
        cmd = launch_command(preset, overrides, launch_args)
    else:
        cmd = [sys.executable, "-m", "benchmarks.harness",
               json.dumps({"preset": preset, "overrides": overrides})]
    rc, output, timed_out, wall = run_process(cmd, log_path, timeout_s, echo, on_line)
    folder = run_folder(root if root.is_absolute() else ROOT / root, name)
    return Run(mode, cmd, folder, read_metrics(folder / "metrics.csv") if folder else [],
               wall, rc, output, timed_out, child_result(output) or {})


def child_result(output: str) -> dict[str, Any] | None:
    """What a child process reported on its ``CHILD {json}`` line (the last one), if any."""
    found = [ln for ln in output.splitlines() if ln.startswith("CHILD ")]
    return json.loads(found[-1][len("CHILD "):]) if found else None


def _inprocess(preset: str, overrides: Mapping[str, Any]) -> float:
    """The in-process run itself; its wall time (the apps' rounds, config loaded first)."""
    from client_app import app as client_app
    from hfz_app.config import load_config
    from hfz_app.federation.inprocess import full_run_config, run_inprocess, simulation_node_configs
    from server_app import app as server_app

    cfg = load_config(preset, dict(overrides))
    run_config = full_run_config(overrides, preset=preset)
    start = time.perf_counter()
    run_inprocess(server_app, client_app, run_config,
                  simulation_node_configs(cfg.data.num_participants + cfg.data.num_heldout))
    return time.perf_counter() - start


def _child(spec: Mapping[str, Any]) -> None:
    """A fresh process's in-process run (``run_training(..., fresh_process=True)``): prints the
    time its imports took and the run's, as ``CHILD {json}``."""
    t0 = time.perf_counter()
    import contextlib
    import io

    import client_app  # noqa: F401  (the apps' imports, timed apart from the run)
    import hfz_app.federation.inprocess  # noqa: F401
    import server_app  # noqa: F401

    t_import = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        _inprocess(spec["preset"], spec["overrides"])
    t_end = time.perf_counter()
    print("CHILD " + json.dumps({"import_s": t_import - t0, "run_s": t_end - t_import}),
          flush=True)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
