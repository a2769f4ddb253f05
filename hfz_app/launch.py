"""`make run`: `flwr run` in local simulation with Flower's traps handled.

- runtime dependency installation off (it would pull a CUDA torch per run);
- a private FLWR_HOME and a SuperLink of our own on a free port, stopped when we are done (the
  managed local SuperLink keeps running with a stale environment);
- `flwr run` exits 0 for a failed run: we read the run's status and exit non-zero on failure.
- ClientApp resources: --cpus-per-client, --gpus-per-client (default 0 without a GPU); a
  run with 0 GPUs per ClientApp hides the GPUs from all of its processes (ray_environment).

    python -m hfz_app.launch --preset mnist_mlp -c 'run.rounds=5' -c 'data.alpha_dir=0.1'
    python -m hfz_app.launch --app zeroshot -c 'run-name="mnist_mlp"'   # the zero-shot app
    python -m hfz_app.launch --gpus-per-client 0.25   # four ClientApps share each GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch

from hfz_app import console
from hfz_app.config import Config, ConfigError, load_config, parse_overrides
from hfz_app.data import DataSourceError, build_federation, load_data
from hfz_app.data.describe import describe
from hfz_app.data.style import styled_shape
from hfz_app.federation.job import PLAN_CACHE_ENV
from hfz_app.methods import get_method, resolve_device
from hfz_app.models import target_factory
from hfz_app.outputs import check_output_dir, run_directory
from hfz_app.resources import check_fits
from hfz_app.settings import format_settings, list_presets, resolved_settings

APP_DIR = Path(__file__).resolve().parent.parent
APPS = {"train": APP_DIR, "zeroshot": APP_DIR / "zeroshot_app"}  # --app: which Flower app runs
BIN = Path(sys.executable).parent
LISTED_CLIENTS = 50  # the partition table's rows before the run; the rest as one summary line


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ResourceError(ValueError):
    """A --cpus-per-client / --gpus-per-client value the launcher refuses: one line, exit 2."""


def visible_gpus() -> int:
    """CUDA devices torch can use here (CUDA_VISIBLE_DEVICES applied, as Ray applies it)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_gpus_per_client(gpus: int, cpus: int, cpus_per_client: int) -> float:
    """No GPU: 0, a CPU-only run as before. With GPUs: 1, 1/2 or 1/4 GPU per ClientApp, so that
    each GPU hosts as many ClientApps as the CPUs run at once, at most 4.

    Flower sizes the actor pool as min(CPUs / num_cpus, GPUs / num_gpus) per Ray node
    (flwr/simulation/ray_transport/ray_actor.py lines 113-121): a share of 1/k GPU leaves the
    CPU-bound concurrency whole while k <= the CPU slots per GPU. The cap bounds the CUDA contexts
    on one GPU (one per actor process, a few hundred MB each, which Ray does not count: num_gpus
    is a scheduling share, not a memory limit). Powers of two: exact in Ray's 1e-4 units.
    """
    if gpus <= 0:
        return 0.0
    slots_per_gpu = cpus // max(1, cpus_per_client) // gpus  # CPU slots per GPU
    share = 4 if slots_per_gpu >= 4 else 2 if slots_per_gpu >= 2 else 1
    return 1.0 / share


def client_resources(cpus_per_client: int, gpus_per_client: float | None, *, gpus: int,
                     cpus: int) -> tuple[int, float]:
    """(CPUs, GPUs) that each ClientApp actor asks Ray for; ``gpus_per_client=None``: the
    default above. A value Flower or Ray would refuse mid-run is a ResourceError now."""
    if cpus_per_client < 1:
        raise ResourceError("--cpus-per-client: expected an integer >= 1 (Flower's "
                            f"client-resources-num-cpus), got {cpus_per_client}")
    if gpus_per_client is None:
        return cpus_per_client, default_gpus_per_client(gpus, cpus, cpus_per_client)
    share = gpus_per_client
    if not math.isfinite(share) or share < 0:
        raise ResourceError(f"--gpus-per-client: expected a value >= 0, got {share:g}")
    if share > 0 and gpus == 0:
        raise ResourceError(f"--gpus-per-client {share:g}: no GPU visible here (torch "
                            f"{torch.__version__} finds no CUDA device); leave it out or pass 0")
    if share > 1 and share != int(share):
        raise ResourceError(f"--gpus-per-client {share:g}: above 1, a whole number of GPUs")
    if share > gpus:
        raise ResourceError(f"--gpus-per-client {share:g}: more than the {gpus} GPU(s) "
                            "visible here")
    return cpus_per_client, float(share)


def check_client_device(device: str, gpus_per_client: float) -> None:
    """``run.device`` against what a ClientApp actor sees: no GPU with 0, else only its own
    GPU(s), numbered from cuda:0 (Ray sets CUDA_VISIBLE_DEVICES per actor)."""
    if not device.startswith("cuda"):
        return
    if gpus_per_client == 0:
        raise ResourceError(f"run.device: {device!r} with --gpus-per-client 0: the ClientApps "
                            "get no GPU; pass --gpus-per-client, or run.device=auto or cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= max(1, int(gpus_per_client)):
        raise ResourceError(f"run.device: {device!r}, but each ClientApp sees only the GPU "
                            "Ray gives it, as cuda:0; use auto or cuda")


def federation_config(num_nodes: int, cpus: int, gpus: float) -> str:
    """``flwr run --federation-config``: Flower's SimulationConfig keys (uint32 CPUs, float
    GPUs). No GPU key for 0 GPUs: the CPU-only command line stays as it was (Flower's default
    client-resources-num-gpus is 0.0, flwr/supercore/constant.py)."""
    config = f"num-supernodes={num_nodes} client-resources-num-cpus={cpus}"
    return config + (f" client-resources-num-gpus={float(gpus)!r}" if gpus else "")


def ray_environment(gpus_per_client: float) -> dict[str, str]:
    """The accelerator visibility the launcher gives the simulation (SuperLink -> superexec ->
    flwr-simulation -> Ray actors inherit it).

    Ray 2.55 (ray/_private/utils.py lines 270-294, ``set_visible_accelerator_ids``) sets each
    actor's CUDA_VISIBLE_DEVICES to the GPU ids it was assigned whenever it has some, whatever
    RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO says; for an actor with num_gpus=0 it sets
    CUDA_VISIBLE_DEVICES="" only while that variable is unset or 1 (line 287), and
    ``ray.init`` then prints a FutureWarning (ray/_private/worker.py lines 2043-2056; the
    variable: ray/_private/accelerators/accelerator.py line 15): later Ray versions flip the
    default (ray-project/ray#62492) and leave a num_gpus=0 actor seeing every GPU. So the variable is 0 (Ray's future
    default, no warning) and a run with 0 GPUs per ClientApp hides the GPUs itself, from
    Ray's GPU count and from every process of the run (the ServerApp too): a CPU-only run
    whatever the Ray version. With GPUs per ClientApp > 0, Ray gives each actor only its own.
    """
    env = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    if gpus_per_client == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def flwr(*args: str, env: dict[str, str], capture: bool = True,
         cwd: Path = APP_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, text=True, cwd=cwd,
                          capture_output=capture, check=False)


def stage_app(app_dir: Path, dest: Path) -> list[str]:
    """Copy the files Flower would put in the app's FAB to ``dest``; their relative paths.

    ``flwr run <dir>`` walks every file under ``<dir>`` (a project's ``.venv`` too, ~47,000
    files here: ~3 s) before its include/exclude rules drop them. This walk skips directories
    that Flower's exclude rules or the app's ``.gitignore`` drop whole, then applies Flower's
    own rules (``filter_paths_for_publish``) to what is left, so ``flwr run dest`` builds the
    same FAB (tests/test_flwr_run.py compares the bytes).
    """
    from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    ignore = app_dir / ".gitignore"
    specs = [build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS),
             build_pathspec(load_gitignore_patterns(ignore.read_bytes() if ignore.is_file()
                                                    else b""))]
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
        rel_dir = Path(dirpath).relative_to(app_dir)
        dirnames[:] = [d for d in dirnames
                       if not any(spec.match_file(f"{(rel_dir / d).as_posix()}/") for spec in specs)]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():  # Flower skips symlinks too
                files[(rel_dir / name).as_posix()] = path
    kept = sorted(filter_paths_for_publish(files))
    for rel in kept:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[rel], target)
    return kept


def wait_healthy(port: int, superlink: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if superlink.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {superlink.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"the SuperLink did not become healthy on port {port} in {timeout_s:.0f}s")


def stop_process_groups(procs: list[subprocess.Popen], timeout_s: float = 30.0) -> None:
    """SIGTERM the process group of each process we started (``start_new_session``) that still
    runs, then wait for each and SIGKILL its group if it outlives ``timeout_s``."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_processes(marker: str | tuple[str, ...]) -> list[int]:
    """Live processes (not zombies) whose environment holds ``marker`` (``FLWR_HOME=<this run's
    private home>``), or any of several: every process the run started however deep, also those
    reparented away from the SuperLink's process group (Ray's daemons start their own sessions).
    Linux /proc; elsewhere none are found and only the SuperLink's group is stopped."""
    markers = (marker,) if isinstance(marker, str) else marker
    needles, pids = [b"\0" + m.encode() + b"\0" for m in markers], []
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        if int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()  # empty for a zombie
        except OSError:
            continue
        if any(needle in b"\0" + environ + b"\0" for needle in needles):
            pids.append(int(name))
    return pids


def with_raylet_children(marker: str, pids: list[int]) -> tuple[str, ...]:
    """``marker`` and ``RAY_RAYLET_PID=<pid>`` for each of ``pids`` that is a Ray raylet: the
    processes a raylet starts carry its pid, and Ray's agents (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``) were once seen outliving a stop without ``marker`` in their
    environment as ``/proc`` showed it."""
    raylets = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if b"raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                raylets.append(f"RAY_RAYLET_PID={pid}")
    return (marker, *raylets)


def stop_run(procs: list[subprocess.Popen], marker: str, timeout_s: float = 30.0) -> None:
    """Stop everything this run started: the SuperLink's process group and every process that
    carries the run's ``marker``. ``flower-superexec`` starts a session of its own, so the
    simulation and Ray (its daemons and ClientApp actors) are not in the SuperLink's group and
    outlived a stop of that group alone. SIGTERM to all, SIGKILL what outlives a grace period."""
    left = run_processes(marker)
    markers = with_raylet_children(marker, left)
    left = run_processes(markers)
    for proc in procs:  # all at once: the SuperLink's group and the rest
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = run_processes(markers)
    kill_late_spawns(markers)
    stop_process_groups(procs, timeout_s)  # reap ours (SIGKILL if still running)


def kill_late_spawns(marker: str | tuple[str, ...], quiet_s: float = 1.0,
                     timeout_s: float = 10.0) -> None:
    """SIGKILL what still carries ``marker`` until none has for ``quiet_s``: a process can start
    while the others stop (a Ray worker or ClientApp process requested just before), after the
    last scan above."""
    deadline, quiet_since = time.monotonic() + timeout_s, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
        late = run_processes(marker)
        for pid in late:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if late:
            quiet_since = time.monotonic()
        time.sleep(0.1)


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the launcher: stop the run, keep its checkpoints."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    # Ignore a second signal while the run is being stopped, so that cleanup completes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT/SIGTERM raise :class:`Interrupted` inside (main thread only); handlers restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def preflight(args: argparse.Namespace, overrides: dict[str, object], cpus_per_client: int
              ) -> Config:
    """Everything checkable before a Flower process starts (one-line errors): the config, the
    names registries own, the device, the output folder, the data, and whether the model and a
    training step fit in this machine's memory (estimated on the meta device)."""
    if args.app == "zeroshot":  # checkpoint and config resolved here: one-line errors
        from hfz_app.zeroshot.server import check_data_fits, plan_zeroshot

        plan = plan_zeroshot(overrides)
        print(plan.describe(), flush=True)
        cfg, out_cfg = plan.cfg, plan.out_cfg
        check_output_dir(out_cfg.run.output_dir, "output-dir")
    else:
        cfg = out_cfg = load_config(args.preset, overrides)
        get_method(cfg.run.method)  # names the registries own: one line, before Flower
        target_factory(cfg.model.target)
        check_output_dir(cfg.run.output_dir)
    run_directory(out_cfg)  # a run folder that a symlink takes elsewhere
    resolve_device(cfg.run.device)  # a GPU asked for where there is none: before Flower
    data = load_data(cfg.data)  # a missing source (or stand-in), bad files: before Flower
    shape = styled_shape(cfg.data, data.input_shape)  # 3xHxW with data.style
    if args.app == "zeroshot":
        check_data_fits(plan, shape, data.num_classes)
    else:
        nodes = cfg.data.num_participants + cfg.data.num_heldout
        at_once = max(1, min(nodes, usable_cpus() // max(1, cpus_per_client)))
        check_fits(cfg, shape, data.num_classes, processes=1 + at_once)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """The launcher; SIGINT/SIGTERM stop every process of the run and exit 130/143 with one line
    (the checkpoints written so far stay: ``-c run.resume=true`` continues)."""
    with interruptible():
        try:
            return _main(argv)
        except Interrupted as sig:  # while the run was already being stopped
            print(f"error: interrupted ({sig})", file=sys.stderr)
            return 128 + sig.signum


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--app", choices=sorted(APPS), default="train",
                        help="train: the training app (.); zeroshot: the zero-shot evaluation "
                             "app (zeroshot_app/), whose -c keys are its own (docs/ZEROSHOT.md)")
    parser.add_argument("--preset", default="mnist_mlp", help="name in conf/ or a .yaml path")
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. -c run.rounds=5")
    parser.add_argument("--cpus-per-client", type=int, default=1,
                        help="Ray CPUs per ClientApp actor (1 on a 2-core box: 2 in parallel)")
    parser.add_argument("--gpus-per-client", type=float, default=None,
                        help="Ray GPUs per ClientApp actor, fractions shared (0.25: four per "
                             "GPU). Default: 0 without a visible GPU, else 1, 0.5 or 0.25 (as "
                             "many per GPU as the CPUs run at once, at most 4); 0: CPU only")
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary FLWR_HOME")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Flower's INFO log (strategy banners, every aggregated "
                             "MetricRecord); its warnings and errors are always shown")
    parser.add_argument("--list-presets", action="store_true",
                        help="list the presets (conf/*.yaml) with one line each, then exit")
    parser.add_argument("--show-config", action="store_true",
                        help="print the preset's resolved settings with -c overrides, each with "
                             "where its value comes from (default, preset, override), then exit")
    args = parser.parse_args(argv)
    if args.list_presets:
        width = max(len(name) for name, _ in list_presets())
        print("\n".join(f"{name:<{width}}  {line}" for name, line in list_presets()))
        return 0
    if args.show_config:
        try:
            rows = resolved_settings(args.preset, parse_overrides(args.run_config))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"# preset {args.preset}" + (" + overrides" if args.run_config else ""))
        print(format_settings(rows))
        return 0
    try:  # the flags first: one line, before the config, the data and Flower
        cpus_per_client, gpus_per_client = client_resources(
            args.cpus_per_client, args.gpus_per_client, gpus=visible_gpus(), cpus=usable_cpus())
    except ResourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    try:
        overrides = parse_overrides(args.run_config)
        cfg = preflight(args, overrides, cpus_per_client)
    except (ConfigError, DataSourceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as sig:
        print(f"error: interrupted ({sig}) before the run started", file=sys.stderr)
        return 128 + sig.signum
    try:
        check_client_device(cfg.run.device, gpus_per_client)
    except ResourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    num_nodes = cfg.data.num_participants + cfg.data.num_heldout

    home = Path(tempfile.mkdtemp(prefix="hfz-flwr-"))
    port = free_port()
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HFZ_OUTPUT_ROOT=str(Path.cwd()),
        # The partition plan computed below, shared with the ServerApp and every ClientApp
        # process of this run.
        **{PLAN_CACHE_ENV: env.get(PLAN_CACHE_ENV) or str(home / "plans")},
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the SuperLink spawns flower-superexec
        **ray_environment(gpus_per_client),  # which GPUs the run's processes and actors see
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "hfz"\n[superlink.hfz]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    log_path = home / "superlink.log"
    # Started before the partition plan and the model are built: it boots meanwhile.
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
         "--port", str(port), "--database", str(home / "state.db"),
         "--disable-runtime-dependency-installation"],
        env=env, cwd=Path.cwd(), stdout=log_path.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        try:
            if args.app == "train" and cfg.run.resume:  # the run and its checkpoint exist
                from hfz_app.outputs import find_resume_point

                print("resume: {} after round {}".format(*find_resume_point(cfg)), flush=True)
            # Fails fast (one line) on an impossible split, shows the clients, and leaves the
            # plan in the plan cache for the run's other processes.
            federation = build_federation(cfg.data, cfg.run.seed, env[PLAN_CACHE_ENV])
            print(describe(federation, max_rows=LISTED_CLIENTS), flush=True)
        except (ConfigError, DataSourceError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        app_dir = home / "app"  # what the FAB holds, without the walk over .venv
        stage_app(APPS[args.app], app_dir)
        wait_healthy(port, superlink)
        preset = [f"preset={toml_value(args.preset)}"] if args.app == "train" else []
        run_config = " ".join(preset + [f"{k}={toml_value(v)}" for k, v in overrides.items()])
        resources = federation_config(num_nodes, cpus_per_client, gpus_per_client)
        what = f"preset {args.preset}" if args.app == "train" else "zero-shot app"
        on_gpu = (f", {gpus_per_client:g} GPU + {cpus_per_client} CPU per ClientApp"
                  if gpus_per_client else "")
        print(f"flwr run: {num_nodes} simulated nodes, {what}{on_gpu}", flush=True)
        started = time.monotonic()
        submitted = flwr("run", str(app_dir), "hfz", "--format", "json",
                         "--federation-config", resources,
                         *(["--run-config", run_config] if run_config else []),
                         env=env, cwd=APPS[args.app])
        try:
            run_id = str(json.loads(submitted.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError):
            print(f"error: flwr run did not start a run:\n{submitted.stdout}{submitted.stderr}",
                  file=sys.stderr)
            return 1
        console.stream([str(BIN / "flwr"), "log", run_id, "hfz", "--stream"], env,
                       verbose=args.verbose)
        status = json.loads(flwr("ls", "hfz", "--run-id", run_id, "--format", "json",
                                 env=env).stdout)["runs"][0]
        wall = time.monotonic() - started
        if status["status"] != "finished:completed":
            print(f"error: run {run_id} ended as {status['status']}: "
                  f"{status.get('status-details', '')} (SuperLink log: {log_path})",
                  file=sys.stderr)
            args.keep_home = True
            return 1
        print(f"run {run_id} completed in {wall:.0f} s", flush=True)
        return 0
    except Interrupted as sig:
        stop_run([superlink], f"FLWR_HOME={home}")
        kept = ""
        if args.app == "train":
            from hfz_app.outputs import latest_run_dir

            with contextlib.suppress(ConfigError):
                where = latest_run_dir(cfg)
                kept = (f"; checkpoints so far kept in {where}, continue with -c run.resume=true"
                        if where else "")
        print(f"error: interrupted ({sig}); stopped every process of the run{kept}",
              file=sys.stderr)
        return 128 + sig.signum
    finally:
        stop_run([superlink], f"FLWR_HOME={home}")
        if not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
