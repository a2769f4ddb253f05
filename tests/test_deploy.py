"""deploy/: TLS + SuperNode authentication on loopback, and a simulation on a 2-node Ray cluster.

The slow tests run the real scripts (no mocks): ``deploy/loopback.sh`` (CA and server certificate,
node keys, a SuperLink with ``--enable-supernode-auth``, 3 participant + 1 held-out registered
SuperNodes, one SuperNode with an unregistered key, the training app, then the zero-shot app),
and ``deploy/ray_node.sh`` + ``deploy/sim_superlink.sh`` (a Ray head and a Ray worker node on this
host, a simulation SuperLink joined to them). Every process they start is stopped by its process
group; the tests check that none is left.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hfz_app.launch import stop_process_groups

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
PARTICIPANTS, HELDOUT = 3, 1


def missing_tools(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def script(name: str, *args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEPLOY / name), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, **kwargs)


def live_processes_mentioning(text: str) -> list[str]:
    """Processes (not zombies) whose command line contains ``text``."""
    out = subprocess.run(["ps", "-e", "-o", "stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines()
            if text in line and not line.lstrip().startswith("Z") and "pytest" not in line]


def wait_until_gone(text: str, timeout_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := live_processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# --- fast checks of the scripts -----------------------------------------------------------------

@pytest.mark.skipif(bool(missing_tools("openssl")), reason="openssl is not installed")
def test_certificates_carry_the_hosts_and_verify(tmp_path: Path) -> None:
    proc = script("make_certs.sh", str(tmp_path / "certs"), "10.1.2.3", "link.example.org")
    assert proc.returncode == 0, proc.stderr
    certs = tmp_path / "certs"
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    san = re.search(r"Subject Alternative Name:.*\n\s*(.*)", text).group(1)
    for entry in ("IP Address:127.0.0.1", "DNS:localhost", "IP Address:10.1.2.3",
                  "DNS:link.example.org"):
        assert entry in san, san
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"),
                             str(certs / "server.pem")], capture_output=True, text=True,
                            check=False)
    assert verify.returncode == 0 and "OK" in verify.stdout
    for key in ("ca.key", "server.key"):
        assert (certs / key).stat().st_mode & 0o077 == 0, f"{key} readable by others"


@pytest.mark.skipif(bool(missing_tools("ssh-keygen")), reason="ssh-keygen is not installed")
def test_node_keys_are_ecdsa_in_openssh_format(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    proc = script("make_node_keys.sh", str(tmp_path), "node-0", "node-1")
    assert proc.returncode == 0, proc.stderr
    for name in ("node-0", "node-1"):
        private = load_ssh_private_key((tmp_path / name).read_bytes(), password=None)
        public = load_ssh_public_key((tmp_path / f"{name}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
    assert (tmp_path / "node-0").read_bytes() != (tmp_path / "node-1").read_bytes()


@pytest.mark.parametrize("name, args, expected", [
    ("supernode.sh", ["--superlink", "127.0.0.1:9093", "--key", "k"],
     "error: supernode.sh: --ca FILE (the CA certificate, ca.crt) is required"),
    ("supernode.sh", ["--superlink", "h:1", "--ca", "/nonexistent/ca.crt", "--key", "k"],
     "error: --ca: no file at /nonexistent/ca.crt"),
    ("superlink.sh", ["--certs", "/nonexistent"], "error: --certs: no file at /nonexistent/ca.crt"),
    ("superlink.sh", ["--bogus"], "error: superlink.sh: unknown argument '--bogus'"),
    ("register_nodes.sh", ["conn", "/nonexistent/node.pub"],
     "error: public key: no file at /nonexistent/node.pub"),
    ("sim_superlink.sh", [], "error: sim_superlink.sh: --ray-address HEAD_IP:PORT is required"),
    ("ray_node.sh", ["worker"], "error: ray_node.sh worker: --address HEAD_IP:PORT is required"),
])
def test_script_errors_are_one_line(name: str, args: list[str], expected: str) -> None:
    proc = script(name, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr


def test_supernode_partition_must_be_below_the_partition_count(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "key").write_text("x")
    proc = script("supernode.sh", "--superlink", "h:1", "--ca", str(tmp_path / "ca.crt"),
                  "--key", str(tmp_path / "key"), "--partition-id", "4", "--num-partitions", "4")
    assert proc.returncode == 2
    assert proc.stderr.strip() == \
        "error: supernode.sh: --partition-id 4 must be < --num-partitions 4"


# --- the whole deployment on 127.0.0.1 ----------------------------------------------------------

@pytest.fixture(scope="module")
def loopback(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    absent = missing_tools("openssl", "ssh-keygen", "setsid")
    if absent:
        pytest.skip(f"deploy/loopback.sh needs {', '.join(absent)}")
    work = tmp_path_factory.mktemp("deploy")
    started = time.monotonic()
    proc = subprocess.run(
        ["nice", "-n", "5", str(DEPLOY / "loopback.sh"), "--work", str(work), "--rounds", "1",
         "--participants", str(PARTICIPANTS), "--heldout", str(HELDOUT)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "HFZ_VENV": str(BIN.parent)},
    )
    return work, proc, time.monotonic() - started


def node_log(work: Path, i: int) -> str:
    return (work / "logs" / f"node-{i}.log").read_text()


def received_by_run(log: str) -> dict[str, list[str]]:
    """Message types a SuperNode received, per run id, from its log ("[RUN id ...]" precedes
    each "Receiving: <type> message")."""
    out: dict[str, list[str]] = {}
    run = None
    for line in log.splitlines():
        if m := re.search(r"\[RUN (\d+)", line):
            run = m.group(1)
        elif m := re.search(r"Receiving: (\S+) message", line):
            out.setdefault(run, []).append(m.group(1))
    return out


@pytest.mark.slow
def test_loopback_deployment_completes(loopback) -> None:
    work, proc, wall = loopback
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    statuses = re.findall(r"^run \d+: (\S+)", proc.stdout, re.MULTILINE)
    assert statuses == ["finished:completed", "finished:completed"], statuses
    with (work / "outputs" / "tiny" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1]
    assert int(float(rows[1]["n_train_replies"])) == PARTICIPANTS
    assert int(float(rows[1]["n_dropped"])) == 0
    print(f"loopback deployment: {wall:.0f} s")


@pytest.mark.slow
def test_only_participants_train_and_the_heldout_node_is_evaluated_zero_shot(loopback) -> None:
    work, proc, _ = loopback
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_run, zeroshot_run = re.findall(r"^run (\d+) submitted", proc.stdout, re.MULTILINE)
    for i in range(PARTICIPANTS + HELDOUT):
        received = received_by_run(node_log(work, i))
        assert set(received) == {train_run, zeroshot_run}, (i, received)
        if i < PARTICIPANTS:  # training: role query, 1 round, evaluation; zero-shot: role query
            assert received[train_run] == ["query", "train", "evaluate"], (i, received)
            assert received[zeroshot_run] == ["query"], (i, received)
        else:  # never a train message; zero-shot evaluation in both apps
            assert received[train_run] == ["query", "evaluate.zeroshot"], (i, received)
            assert received[zeroshot_run] == ["query", "evaluate.zeroshot"], (i, received)
    training = json.loads((work / "outputs" / "tiny" / "metrics.json").read_text())
    last = training["clients"]["1"]
    assert [c["partition-id"] for c in last["participants"]] == list(range(PARTICIPANTS))
    assert [c["partition-id"] for c in last["heldout"]] == [PARTICIPANTS]
    zeroshot = json.loads((work / "outputs" / "tiny-zeroshot" / "zeroshot.json").read_text())
    assert [c["partition-id"] for c in zeroshot["clients"]] == [PARTICIPANTS]
    assert zeroshot["summary"]["zacc_weighted"] == pytest.approx(
        training["rounds"][-1]["zacc_weighted"], abs=1e-9)


@pytest.mark.slow
def test_unregistered_supernode_is_refused(loopback) -> None:
    work, proc, _ = loopback
    assert proc.returncode == 0, proc.stderr[-3000:]
    ended = (work / "unregistered.txt").read_text().split()
    assert ended[0] == "exited" and int(ended[1]) != 0, ended
    assert "[code: 2004] Failed to activate SuperNode" in (work / "logs" / "unregistered.log").read_text()
    assert "No SuperNode found with the given public key" in \
        (work / "logs" / "superlink.log").read_text()
    nodes = json.loads((work / "supernodes.json").read_text())["nodes"]
    assert len(nodes) == PARTICIPANTS + HELDOUT  # the registered ones only
    for i in range(PARTICIPANTS + HELDOUT):
        assert "Failed to activate" not in node_log(work, i)


@pytest.mark.slow
def test_loopback_leaves_no_process_behind(loopback) -> None:
    work, _, _ = loopback
    assert wait_until_gone(str(work)) == []


# --- a simulation on a 2-node Ray cluster (head + worker on this host) --------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def actor_logs(temp_dir: Path) -> list[Path]:
    """Ray worker logs of ClientAppActors written on the node whose temp dir this is."""
    return [p for p in temp_dir.glob("session_*/logs/worker-*.out")
            if ":actor_name:ClientAppActor" in p.read_text(errors="replace")]


@pytest.mark.slow
def test_simulation_on_a_two_node_ray_cluster(tmp_path: Path) -> None:
    if missing_tools("setsid") or not (BIN / "ray").exists():
        pytest.skip("needs setsid and the ray CLI in the virtualenv")
    # Short temp dirs: Ray's Unix sockets live there (path limit ~107 characters).
    head_dir = Path(tempfile.mkdtemp(prefix="hfzray-h-", dir="/tmp"))
    worker_dir = Path(tempfile.mkdtemp(prefix="hfzray-w-", dir="/tmp"))
    env = {**os.environ, "HFZ_VENV": str(BIN.parent), "FLWR_HOME": str(tmp_path / "cli")}
    procs: list[subprocess.Popen] = []

    def start(log: Path, *cmd: str) -> subprocess.Popen:
        proc = subprocess.Popen(["nice", "-n", "5", *cmd], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        head = start(tmp_path / "head.log", str(DEPLOY / "ray_node.sh"), "head",
                     "--port", str(free_port()), "--client-port", str(free_port()),
                     "--num-cpus", "1", "--temp-dir", str(head_dir),
                     "--", "--object-store-memory", "100000000")
        if not wait_for_text(tmp_path / "head.log", "Ray runtime started", head, 90):
            pytest.skip("a Ray head does not start here: "
                        + (tmp_path / "head.log").read_text()[-500:])
        address = (head_dir / "ray_current_cluster").read_text().strip()
        worker = start(tmp_path / "worker.log", str(DEPLOY / "ray_node.sh"), "worker",
                       "--address", address, "--num-cpus", "1", "--temp-dir", str(worker_dir),
                       "--", "--object-store-memory", "100000000")
        assert wait_for_text(tmp_path / "worker.log", "Ray runtime started", worker, 90), \
            (tmp_path / "worker.log").read_text()[-2000:]
        count = ("import ray; ray.init(logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()), ray.cluster_resources().get('CPU'))")
        nodes = subprocess.run(
            [sys.executable, "-c", count], env={**env, "RAY_ADDRESS": address},
            capture_output=True, text=True, timeout=120, check=False,
        ).stdout.split()
        assert nodes == ["2", "2.0"], nodes  # 2 live nodes, 1 CPU each

        port = free_port()
        superlink = start(tmp_path / "superlink.log", str(DEPLOY / "sim_superlink.sh"),
                          "--ray-address", address, "--insecure", "--port", str(port),
                          "--state-dir", str(tmp_path / "superlink"))
        proc = script("connect.sh", "ray", f"127.0.0.1:{port}", "--insecure", env=env)
        assert proc.returncode == 0, proc.stderr
        for _ in range(120):
            if superlink.poll() is not None:
                pytest.fail((tmp_path / "superlink.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        out = tmp_path / "outputs"
        run = script(
            "run_training.sh", "ray", "--federation-config",
            f"num-supernodes={PARTICIPANTS + HELDOUT} client-resources-num-cpus=1",
            "--run-config", f'preset="tiny" run.rounds=1 run.output_dir="{out}" '
            "train.torch_threads=1", env=env, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        assert re.search(r"^run \d+: finished:completed", run.stdout, re.MULTILINE)
        with (out / "tiny" / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [int(r["round"]) for r in rows] == [0, 1] and rows[-1]["zacc_weighted"] != ""
        # Each node has 1 CPU and an actor needs 1: the 2 ClientAppActors ran one on each node.
        assert actor_logs(head_dir) and actor_logs(worker_dir), \
            (actor_logs(head_dir), actor_logs(worker_dir))
    finally:
        stop_process_groups(list(reversed(procs)))
        left = wait_until_gone(str(head_dir)) + wait_until_gone(str(worker_dir))
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)
    assert left == [], left
