"""Reliability (issue 10): bad inputs stop with one line, a lost node, resume after a server
restart, determinism, non-finite replies.

The bad-input matrix goes through the real entry point (``python -m hfz_app.launch``), which
validates config, data and model before any Flower process starts and exits 2 with one line.
The rest runs the real ServerApp and ClientApp in-process (``InProcessGrid``) on ``tiny``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MessageType

from client_app import app as client_app
from hfz_app.checkpoint import load_checkpoint, save_checkpoint
from hfz_app.federation.inprocess import full_run_config, run_inprocess, simulation_node_configs
from hfz_app.launch import stop_process_groups
from server_app import app as server_app

ROOT = Path(__file__).resolve().parent.parent
N, M = 3, 1  # tiny: 3 participants + 1 held out
TIMING = {"elapsed_s", "round_time_s"}


# --- 1. bad inputs: exit 2, one line naming the key or file, no traceback ----------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "broken.yaml").write_text("run: {rounds: [1\n")
    (d / "loop_a.yaml").write_text(f"extends: {d / 'loop_b.yaml'}\n")
    (d / "loop_b.yaml").write_text(f"extends: {d / 'loop_a.yaml'}\n")
    (d / "list.yaml").write_text("- run\n- data\n")
    rng = np.random.default_rng(0)
    np.savez(d / "flat.npz", x_train=rng.integers(0, 255, (40, 5), dtype=np.uint8),
             y_train=np.zeros(40, np.int64), x_test=rng.integers(0, 255, (10, 5), dtype=np.uint8),
             y_test=np.zeros(10, np.int64))
    np.savez(d / "labels.npz", x_train=np.zeros((40, 8, 8), np.uint8),
             y_train=np.zeros(39, np.int64), x_test=np.zeros((10, 8, 8), np.uint8),
             y_test=np.zeros(10, np.int64))
    (d / "corrupt.pt").write_bytes(b"not a checkpoint\x00\x01")
    torch.save({"something": "else"}, d / "foreign.pt")
    # an earlier run with metrics but no checkpoint (for resume)
    (d / "nockpt" / "tiny" / "checkpoints").mkdir(parents=True)
    (d / "nockpt" / "tiny" / "metrics.csv").write_text("round\n0\n")
    (d / "nockpt" / "tiny" / "metrics.json").write_text(json.dumps({"rounds": [{"round": 0}]}))
    return d


def q(text: str) -> str:  # a TOML string for -c
    return json.dumps(text)


# (id, launcher arguments, what the one line must name); "{d}" is the bad_files folder
BAD_INPUTS = [
    ("unknown-top-key", ["-c", "foo.bar=1"], "foo: unknown key"),
    ("unknown-section-key", ["-c", "run.roundz=3"], "run.roundz: unknown key"),
    ("not-key-value", ["-c", "run.rounds"], "expected key=value"),
    ("wrong-type-int", ["-c", "run.rounds=" + q("three")], "run.rounds: expected an integer"),
    ("wrong-type-bool", ["-c", "model.noisy_embed=3"], "model.noisy_embed: expected true or false"),
    ("wrong-type-section", ["-c", "data.shift=1"], "data.shift: expected a section"),
    ("rounds-zero", ["-c", "run.rounds=0"], "run.rounds: expected a value >= 1, got 0"),
    ("rounds-negative", ["-c", "run.rounds=-1"], "run.rounds: expected a value >= 1, got -1"),
    ("alpha-zero", ["-c", "data.alpha_dir=0"], "data.alpha_dir: expected a value > 0"),
    ("participants-zero", ["-c", "data.num_participants=0"],
     "data.num_participants: expected a value >= 1"),
    ("too-many-heldout", ["-c", "data.num_heldout=500", "-c", "data.min_partition_size=500"],
     "data.num_heldout=500"),
    ("unknown-dataset", ["-c", "data.dataset=" + q("mnist2")], "data.dataset: unknown dataset"),
    ("unknown-target", ["-c", "model.target=" + q("vgg")], "model.target: expected one of"),
    ("unknown-method", ["-c", "run.method=" + q("fedsgd")], "run.method: expected one of"),
    ("device-unknown", ["-c", "run.device=" + q("gpu")], "run.device: expected auto, cpu, cuda"),
    *([("device-cuda-absent", ["-c", "run.device=" + q("cuda:0")],
        "run.device: 'cuda:0' asked for")] if not torch.cuda.is_available() else []),
    ("chunk-size-zero", ["-c", "model.chunk_size=0"], "model.chunk_size: expected a value >= 1"),
    ("embed-dim-one", ["-c", "model.embed_dim=1"], "model.embed_dim: expected 0"),
    ("hidden-not-ints", ["-c", "model.hidden=" + q("64,x")], "model.hidden: expected"),
    ("hidden-zero", ["-c", "model.hidden=" + q("0")], "model.hidden: expected positive"),
    ("generate-no-match", ["-c", "model.generate=" + q("nothing.")], "model.generate: prefix"),
    ("anchor-needs-classes", ["-c", "model.anchor=" + q("labels")], "model.embed_dim: anchor"),
    ("unknown-preset", ["--preset", "no_such_preset"], "preset: no preset named"),
    ("preset-bad-yaml", ["--preset", "{d}/broken.yaml"], "broken.yaml: line 2 is not valid YAML"),
    ("preset-not-mapping", ["--preset", "{d}/list.yaml"], "list.yaml: expected a mapping"),
    ("preset-extends-loop", ["--preset", "{d}/loop_a.yaml"], "'extends' loops back"),
    ("folder-no-data-dir", ["-c", "data.dataset=" + q("folder")], "set data.data_dir"),
    ("folder-missing-dir", ["-c", "data.dataset=" + q("folder"), "-c",
                            "data.data_dir=" + q("{d}/nowhere")], "nowhere does not exist"),
    ("folder-wrong-image-shape", ["-c", "data.dataset=" + q("folder"), "-c",
                                  "data.data_dir=" + q("{d}/flat.npz")], "flat.npz"),
    ("folder-wrong-label-count", ["-c", "data.dataset=" + q("folder"), "-c",
                                  "data.data_dir=" + q("{d}/labels.npz")], "expected 40 integer"),
    ("eval-every-above-rounds", ["-c", "run.eval_every=5"], "run.eval_every: expected <= run."),
    ("top-k-above-experts", ["-c", "fedjets.top_k=5"], "fedjets.top_k: expected <= fedjets."),
    ("lr-negative", ["-c", "train.lr=-0.1"], "train.lr: expected a value > 0"),
    ("momentum-above-one", ["-c", "train.momentum=1.5"], "train.momentum: expected a value <= 1"),
    ("fedadam-with-momentum", ["-c", "server.optimizer=fedadam", "-c", "server.server_momentum=0.5"],
     "server.server_momentum: expected 0 (and server.server_lr 1) with server.optimizer=fedadam"),
    ("unknown-server-optimizer", ["-c", "server.optimizer=sgd"],
     "server.optimizer: expected"),
    ("fraction-train-zero", ["-c", "server.fraction_train=0"], "server.fraction_train: expected"),
    ("min-train-nodes-above-participants", ["-c", "server.min_train_nodes=4"],
     "server.min_train_nodes: expected <="),
    ("dp-unknown", ["-c", "privacy.dp=" + q("local")], "privacy.dp: expected one of"),
    ("dp-noise-negative", ["-c", "privacy.noise_multiplier=-1"], "privacy.noise_multiplier"),
    ("dp-clipping-zero", ["-c", "privacy.clipping_norm=0"], "privacy.clipping_norm: expected"),
    ("dp-delta-too-large", ["-c", "privacy.delta=0.9"], "privacy.delta: expected a value <= 0.5"),
    ("bn-stats-unknown", ["-c", "model.bn_stats=" + q("global")], "model.bn_stats: expected"),
    ("heldout-adapt-unknown", ["-c", "eval.heldout_adapt=" + q("tent")],
     "eval.heldout_adapt: expected one of"),
    ("shift-rotation-too-large", ["-c", "data.shift.rotation_deg=200"],
     "data.shift.rotation_deg: expected a value <= 180"),
    ("resume-without-a-run", ["-c", "run.resume=true", "-c", "run.output_dir=" + q("{d}/none")],
     "run.resume: expected an earlier run"),
    ("resume-without-checkpoint", ["-c", "run.resume=true", "-c",
                                   "run.output_dir=" + q("{d}/nockpt")],
     "run.resume: expected a checkpoint"),
    ("zeroshot-missing-checkpoint", ["--app", "zeroshot", "-c",
                                     "checkpoint=" + q("{d}/missing.pt")],
     "checkpoint: no file at"),
    ("zeroshot-corrupt-checkpoint", ["--app", "zeroshot", "-c",
                                     "checkpoint=" + q("{d}/corrupt.pt")],
     "corrupt.pt is not a HyperFedZero checkpoint"),
    ("zeroshot-foreign-checkpoint", ["--app", "zeroshot", "-c",
                                     "checkpoint=" + q("{d}/foreign.pt")],
     "foreign.pt is not a HyperFedZero checkpoint"),
]


@pytest.mark.parametrize("args, needle", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_stops_with_one_line(bad_files: Path, args: list[str], needle: str) -> None:
    args = [a.replace("{d}", str(bad_files)) for a in args]
    if "--preset" not in args and "--app" not in args:
        args = ["--preset", "tiny", *args]
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    proc = subprocess.run([sys.executable, "-m", "hfz_app.launch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90, check=False)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "error" not in proc.stdout.lower(), proc.stdout


def test_the_matrix_is_large_enough() -> None:
    assert len(BAD_INPUTS) >= 20
    assert len({c[0] for c in BAD_INPUTS}) == len(BAD_INPUTS)


# --- in-process runs ---------------------------------------------------------------------------


def run_tiny(out: Path, client=client_app, grid: dict | None = None, **overrides) -> list[dict]:
    """``tiny`` for 3 rounds in-process; ``grid``: InProcessGrid hooks (drop_node, on_message)."""
    run_config = full_run_config({"run.output_dir": str(out), "run.rounds": 3,
                                  "train.torch_threads": 1, **overrides}, preset="tiny")
    run_inprocess(server_app, client, run_config, simulation_node_configs(N + M), **(grid or {}))
    return read_rows(out / "tiny")


def read_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_finite(row: dict, keys=("gacc", "gloss", "train_loss", "zacc_weighted",
                                   "pacc_weighted")) -> None:
    for key in keys:
        assert row[key] != "" and math.isfinite(float(row[key])), (key, row)


def partition_of(node: int) -> int:
    return node - 1001  # simulation_node_configs numbers nodes 1001, 1002, ...


# --- 2. determinism ----------------------------------------------------------------------------


def test_same_seed_gives_identical_metrics_and_another_seed_differs(tmp_path: Path) -> None:
    first = run_tiny(tmp_path / "a", **{"run.rounds": 2})
    second = run_tiny(tmp_path / "b", **{"run.rounds": 2})
    other = run_tiny(tmp_path / "c", **{"run.rounds": 2, "run.seed": 1})
    assert len(first) == 3 and all(r["gacc"] != "" for r in first)
    assert without_timing(first) == without_timing(second)
    assert [r["elapsed_s"] for r in first] != ["" for _ in first]  # timing columns exist
    assert without_timing(first) != without_timing(other)
    for a, c in zip(first[1:], other[1:]):
        assert a["train_loss"] != c["train_loss"]


# --- 3. a non-finite reply is dropped and logged; training goes on -----------------------------


class PoisoningClient:
    """The ClientApp; partition ``victim``'s train reply in ``round`` gets NaN in one array."""

    def __init__(self, victim: int = 1, server_round: int = 1) -> None:
        self.victim, self.round, self.poisoned = victim, server_round, []

    def __call__(self, msg, context):
        reply = client_app(msg, context)
        if (msg.metadata.message_type == MessageType.TRAIN
                and int(context.node_config["partition-id"]) == self.victim
                and int(msg.content["config"]["server-round"]) == self.round):
            arrays = reply.content["arrays"]
            key = next(iter(arrays.keys()))
            bad = arrays[key].numpy().copy()
            bad.flat[0] = np.nan
            arrays[key] = Array(bad)
            reply.content["arrays"] = arrays
            self.poisoned.append(key)
        return reply


def test_non_finite_reply_is_dropped_and_logged(tmp_path: Path, caplog) -> None:
    client = PoisoningClient()
    with caplog.at_level(logging.WARNING, logger="hfz_app"):
        rows = run_tiny(tmp_path, client)
    assert len(client.poisoned) == 1
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert (rows[1]["n_train_sent"], rows[1]["n_train_replies"], rows[1]["n_dropped"]) == \
        ("3", "2", "1")
    for r in rows[2:]:
        assert (r["n_train_replies"], r["n_dropped"]) == ("3", "0")
    for r in rows[1:]:
        assert_finite(r)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("non-finite values" in w and client.poisoned[0] in w for w in warnings), warnings
    for r in (1, 2, 3):
        ckpt = load_checkpoint(tmp_path / "tiny" / "checkpoints" / f"round_{r:04d}.pt")
        assert all(torch.isfinite(v).all() for v in ckpt.shared.values())


# --- 4. a node lost mid-round (in-process) -----------------------------------------------------


def test_lost_node_round_completes_with_the_others(tmp_path: Path, caplog) -> None:
    def lost(node: int, msg) -> bool:  # partition 1 vanishes during round 1's training
        return (msg.metadata.message_type == MessageType.TRAIN and partition_of(node) == 1
                and int(msg.content["config"]["server-round"]) == 1)

    with caplog.at_level(logging.WARNING, logger="hfz_app"):
        rows = run_tiny(tmp_path, grid={"drop_node": lost})
    assert (rows[1]["n_train_sent"], rows[1]["n_train_replies"], rows[1]["n_dropped"]) == \
        ("3", "2", "0")
    assert rows[2]["n_train_replies"] == rows[3]["n_train_replies"] == "3"
    for r in rows[1:]:
        assert_finite(r)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("round 1: 1 of 3 train replies missing" in w for w in warnings), warnings


def test_round_with_no_replies_keeps_the_model(tmp_path: Path) -> None:
    """``server.min_train_nodes`` is how many participants are asked each round, not a quorum on
    replies: a round aggregates whatever valid replies arrive, and with none the global arrays
    stay as they were (Flower's ``start`` keeps them when ``aggregate_train`` returns None)."""
    def all_lost(node: int, msg) -> bool:
        return (msg.metadata.message_type == MessageType.TRAIN
                and int(msg.content["config"]["server-round"]) == 1)

    rows = run_tiny(tmp_path, grid={"drop_node": all_lost},
                    **{"run.rounds": 2, "server.min_train_nodes": 3})
    assert (rows[1]["n_train_sent"], rows[1]["n_train_replies"]) == ("3", "0")
    assert rows[1]["train_loss"] == ""
    assert rows[1]["gacc"] == rows[0]["gacc"] and rows[1]["gloss"] == rows[0]["gloss"]
    assert rows[2]["n_train_replies"] == "3"
    assert_finite(rows[2])


# --- 5. resume after a server restart ----------------------------------------------------------


class ServerKilled(Exception):
    pass


def kill_server_before(server_round: int):
    """A grid hook that ends the ServerApp when round ``server_round``'s first train message
    goes out: everything after round ``server_round - 1``'s checkpoint is lost."""
    def hook(msg) -> None:
        if (msg.metadata.message_type == MessageType.TRAIN
                and int(msg.content["config"]["server-round"]) == server_round):
            raise ServerKilled(f"server killed before round {server_round}")
    return hook


RESUME_SETTINGS = {"server.server_momentum": 0.5}  # server state that must survive the restart
FEDADAM = {"server.optimizer": "fedadam"}
# server-side DP noise: drawn per round from (run.seed, round), so a resumed run adds the same
DP_NOISE = RESUME_SETTINGS | {"privacy.dp": "server", "privacy.noise_multiplier": 0.3,
                              "privacy.clipping_norm": 0.5}


FEDPROX = RESUME_SETTINGS | {"run.method": "fedprox"}  # Flower's FedProx hook over FedAvgM


@pytest.mark.parametrize(("settings", "state_key"), [(RESUME_SETTINGS, "velocity"),
                                                     (FEDADAM, "fedadam_v"),
                                                     (FEDPROX, "velocity"),
                                                     (DP_NOISE, "velocity")],
                         ids=["fedavgm", "fedadam", "fedprox", "dp-noise"])
def test_resume_after_a_server_restart_matches_an_uninterrupted_run(
        tmp_path: Path, settings: dict, state_key: str) -> None:
    straight = run_tiny(tmp_path / "straight", **settings)
    with pytest.raises(ServerKilled):
        run_tiny(tmp_path / "restarted", grid={"on_message": kill_server_before(3)}, **settings)
    run_dir = tmp_path / "restarted" / "tiny"
    assert [int(r["round"]) for r in read_rows(run_dir)] == [0, 1, 2]
    assert state_key in load_checkpoint(run_dir / "checkpoints" / "round_0002.pt").server_state
    # a new ServerApp (fresh grid and node contexts), resuming the same run name
    resumed = run_tiny(tmp_path / "restarted", **settings, **{"run.resume": True})
    assert not (tmp_path / "restarted" / "tiny-2").exists()
    assert [int(r["round"]) for r in resumed] == [0, 1, 2, 3]
    assert without_timing(resumed) == without_timing(straight)
    payload = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(payload["clients"], key=int) == ["1", "2", "3"]
    final = load_checkpoint(run_dir / "checkpoints" / "round_0003.pt").shared
    expected = load_checkpoint(tmp_path / "straight" / "tiny" / "checkpoints" /
                               "round_0003.pt").shared
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_resume_without_server_momentum_state_would_differ(tmp_path: Path) -> None:
    """The check above can fail: dropping the checkpointed velocity changes the result."""
    straight = run_tiny(tmp_path / "straight", **RESUME_SETTINGS)
    run_dir = tmp_path / "restarted" / "tiny"
    shutil.copytree(tmp_path / "straight" / "tiny", run_dir)
    (run_dir / "checkpoints" / "round_0003.pt").unlink()
    ckpt = load_checkpoint(run_dir / "checkpoints" / "round_0002.pt")
    save_checkpoint(run_dir / "checkpoints" / "round_0002.pt", ArrayRecord(ckpt.shared),
                    ckpt.config, 2)  # an old-style checkpoint: no server_state
    resumed = run_tiny(tmp_path / "restarted", **RESUME_SETTINGS, **{"run.resume": True})
    assert without_timing(resumed[:3]) == without_timing(straight[:3])
    assert resumed[3]["train_loss"] == straight[3]["train_loss"]  # same arrays sent in round 3
    assert resumed[3]["gacc"] != straight[3]["gacc"] or resumed[3]["gloss"] != straight[3]["gloss"]


def test_resume_refuses_a_changed_setting(tmp_path: Path) -> None:
    from hfz_app.config import ConfigError, load_config
    from hfz_app.outputs import find_resume_point

    run_tiny(tmp_path, **{"run.rounds": 1})
    cfg = load_config("tiny", {"run.output_dir": str(tmp_path), "run.resume": True,
                               "run.rounds": 3, "train.torch_threads": 1})
    assert find_resume_point(cfg) == (tmp_path / "tiny", 1)
    changed = load_config("tiny", {"run.output_dir": str(tmp_path), "run.resume": True,
                                   "train.lr": 0.01, "train.torch_threads": 1})
    with pytest.raises(ConfigError, match=r"^train.lr: expected 0.05 as in the run being resumed"):
        find_resume_point(changed)


# --- 6. a SuperNode killed mid-round in a real loopback deployment (slow) ----------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


@pytest.mark.slow
def test_supernode_killed_mid_round_in_a_loopback_deployment(tmp_path: Path) -> None:
    """A plain (insecure) SuperLink and 3 + 1 SuperNodes on 127.0.0.1; partition 1's SuperNode
    (and its ClientApp) gets SIGKILL while it trains in round 1. The SuperLink answers for it with
    an error reply once its heartbeat lapses (Flower: 2 x 30 s), the strategy drops and logs it,
    and both rounds complete with the other participants."""
    import signal
    import time
    import urllib.request

    bindir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    port = _free_port()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, home: str, *cmd: str) -> subprocess.Popen:
        (tmp_path / home).mkdir(exist_ok=True)
        procs[name] = subprocess.Popen(
            ["nice", "-n", "5", *cmd], stdout=(logs / f"{name}.log").open("w"),
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**env, "FLWR_HOME": str(tmp_path / home)}, cwd=tmp_path)
        return procs[name]

    cli_env = {**env, "FLWR_HOME": str(tmp_path / "cli")}
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "t"\n[superlink.t]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n")

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / "flwr"), *args], env=cli_env, cwd=ROOT, text=True,
                              capture_output=True, timeout=120, check=False)

    def healthy() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return True
        except OSError:
            return False

    try:
        start("superlink", "link", str(bindir / "flower-superlink"), "--insecure", "--host",
              "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "link" / "state.db"),
              "--disable-runtime-dependency-installation")
        _wait(healthy, 90, "the SuperLink")
        for i in range(N + M):
            held = " held-out=true" if i >= N else ""
            start(f"node-{i}", f"node-{i}", str(bindir / "flower-supernode"), "--insecure",
                  "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
                  "--node-config", f"partition-id={i} num-partitions={N + M}{held}")
        run_config = (f'preset="tiny" run.rounds=2 run.output_dir="{tmp_path / "outputs"}" '
                      "train.torch_threads=1")
        submitted = flwr("run", ".", "t", "--format", "json", "--run-config", run_config)
        run_id = str(json.loads(submitted.stdout)["run-id"])
        victim = logs / "node-1.log"
        _wait(lambda: "Receiving: train message" in victim.read_text(), 300,
              "node 1 to receive its round-1 train message")
        os.killpg(procs["node-1"].pid, signal.SIGKILL)  # the SuperNode and its ClientApp
        killed_at = time.monotonic()

        def status() -> str:
            listed = flwr("ls", "t", "--run-id", run_id, "--format", "json")
            try:
                return json.loads(listed.stdout)["runs"][0]["status"]
            except (ValueError, KeyError, IndexError):
                return ""

        _wait(lambda: status().startswith("finished"), 420, "the run to finish", poll_s=3)
        after_kill = time.monotonic() - killed_at
        final = status()
        server_log = flwr("log", run_id, "t", "--show").stdout
    finally:
        stop_process_groups(list(procs.values()))
    assert final == "finished:completed", (final, server_log[-3000:])
    rows = read_rows(tmp_path / "outputs" / "tiny")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    for r in rows[1:]:  # the lost node's reply is an error reply: dropped, the others aggregated
        assert (r["n_train_sent"], r["n_train_replies"], r["n_dropped"]) == ("3", "2", "1"), r
        assert_finite(r)
    payload = json.loads((tmp_path / "outputs" / "tiny" / "metrics.json").read_text())
    assert [c["partition-id"] for c in payload["clients"]["2"]["participants"]] == [0, 2]
    assert "round reply from node" in server_log and "Node Unavailable" in server_log, \
        server_log[-3000:]
    print(f"loopback with a killed SuperNode: run finished {after_kill:.0f} s after the kill")


def test_resume_with_dp_keeps_the_privacy_ledger(tmp_path: Path) -> None:
    """DP noise is unseeded (Flower's), so two runs differ; what must survive a restart is the
    accounting: every round's epsilon is that of all releases so far (rounds with a valid reply),
    those before the restart included."""
    from hfz_app.federation.privacy import epsilon

    dp = {"privacy.dp": "server", "privacy.noise_multiplier": 0.3, "run.method": "fedavg"}
    with pytest.raises(ServerKilled):
        run_tiny(tmp_path, grid={"on_message": kill_server_before(3)}, **dp)
    rows = run_tiny(tmp_path, **dp, **{"run.resume": True})
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    released = 0
    for r in rows[1:]:
        released += int(r["n_train_replies"]) > 0
        expected = epsilon(0.3, released, sample_size=N, population=N, delta=1e-5)
        assert float(r["epsilon"]) == pytest.approx(expected, rel=1e-5), (r, released)
    assert released >= 2
