"""Reliability, second pass (issue 21): what a new user's mistakes still broke.

1. A matrix of bad inputs through the launcher's real entry point, called in-process
   (``hfz_app.launch.main``) with process creation forbidden: each exits 2 with one line naming
   the key or file, before any Flower process could start. Classes: writing outside the output
   folder (``..``, absolute names, symlinks, unwritable or non-directory ``run.output_dir``),
   runaway model or step sizes, non-finite numbers, data that would be reinterpreted, and
   zero-shot inputs that used to fail on every node.
2. What can only fail at run time: a run whose replies are all dropped stops after
   ``server.max_failed_rounds``; template evaluation keys; a float64 model in the public API.
3. One real launcher run interrupted with SIGINT: non-zero exit, one line, no process left
   behind, and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from client_app import app as client_app
from hfz_app.checkpoint import save_checkpoint
from hfz_app.config import load_config
from hfz_app.data import load_data
from hfz_app.federation.inprocess import full_run_config, run_inprocess, simulation_node_configs
from hfz_app.federation.server import NoProgress
from hfz_app.launch import main as launch
from hfz_app.launch import run_processes, stop_run
from hfz_app.methods import runtime_for
from hfz_app.outputs import check_output_dir, run_directory
from server_app import app as server_app

ROOT = Path(__file__).resolve().parent.parent
HUGE = 10**10  # any size key at this value needs terabytes


def q(text: str) -> str:  # a TOML string for -c
    return json.dumps(text)


def npz(path: Path, *, x_train=None, y_train=None, x_test=None, y_test=None, **extra) -> None:
    rng = np.random.default_rng(0)
    np.savez(path,
             x_train=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8) if x_train is None
             else x_train,
             y_train=np.arange(40) % 4 if y_train is None else y_train,
             x_test=rng.integers(0, 255, (12, 8, 8), dtype=np.uint8) if x_test is None
             else x_test,
             y_test=np.arange(12) % 4 if y_test is None else y_test, **extra)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad21")
    (d / "afile.txt").write_text("not a folder\n")
    (d / "elsewhere").mkdir()
    (d / "link_out").mkdir()
    (d / "link_out" / "tiny").symlink_to(d / "elsewhere")  # the run folder points outside
    (d / "elsewhere_run").mkdir()  # an earlier run's folder outside, reached by resume
    (d / "elsewhere_run" / "metrics.csv").write_text("round\n0\n")
    (d / "resume_out").mkdir()
    (d / "resume_out" / "tiny").symlink_to(d / "elsewhere_run")
    (d / "dangling_out").mkdir()
    (d / "dangling_out" / "tiny").symlink_to("/nonexistent-hfz-21/tiny")
    (d / "up_out").mkdir()
    (d / "up_out" / "tiny").symlink_to("../elsewhere")  # relative symlink, '..' inside it
    floats = np.random.default_rng(1).random((40, 8, 8))
    npz(d / "labels_past_names.npz", y_train=np.arange(40) % 6,
        class_names=np.array(["a", "b", "c", "d"]))
    npz(d / "test_past_names.npz", y_test=np.arange(12) % 5,
        class_names=np.array(["a", "b", "c", "d"]))
    npz(d / "sparse_labels.npz", y_train=np.where(np.arange(40) == 0, 42, np.arange(40) % 10))
    npz(d / "single_class.npz", y_train=np.zeros(40, np.int64), y_test=np.zeros(12, np.int64))
    npz(d / "negative_labels.npz", y_train=np.arange(40) % 4 - 1)
    npz(d / "nan_pixels.npz", x_train=np.where(floats > 0.99, np.nan, floats))
    npz(d / "inf_test_pixels.npz", x_test=np.full((12, 8, 8), np.inf))
    npz(d / "pixels_0_255.npz", x_train=floats * 255)
    npz(d / "test_shape.npz", x_test=np.zeros((12, 9, 9), np.uint8))
    npz(d / "ok_8x8.npz")  # valid, but not the checkpoint's 1x28x28 inputs
    npz(d / "float_labels.npz", y_train=(np.arange(40) % 4).astype(np.float32))
    # a checkpoint of `tiny` (synthetic 1x28x28, 10 classes), for the zero-shot app
    cfg = load_config("tiny")
    data = load_data(cfg.data)
    runtime = runtime_for(cfg, data.input_shape, data.num_classes, device="cpu")
    save_checkpoint(d / "tiny.pt", runtime.initial_arrays(), cfg.to_dict(), 1)
    return d


FOLDER = ["-c", "data.dataset=" + q("folder"), "-c"]  # + data.data_dir=...
ZEROSHOT = ["--app", "zeroshot", "-c", "checkpoint=" + q("{d}/tiny.pt")]

# (id, launcher arguments, what the one line must name); "{d}" is the files folder
BAD = [
    # -- writing outside the output folder
    ("name-dotdot", ["-c", "run.name=" + q("../../escaped")], "run.name: expected a plain folder"),
    ("name-nested", ["-c", "run.name=" + q("a/b")], "run.name: expected a plain folder"),
    ("name-parent", ["-c", "run.name=" + q("..")], "run.name: expected a plain folder"),
    ("name-dot", ["-c", "run.name=" + q(".")], "run.name: expected a plain folder"),
    ("name-absolute", ["-c", "run.name=" + q("/tmp/hfz-escaped")], "run.name: expected a plain"),
    ("name-backslash", ["-c", "run.name=" + q("a\\..\\b")], "run.name: expected a plain folder"),
    ("name-nul", ["-c", "run.name=" + q("tiny\0")], "run.name: expected a plain folder"),
    ("output-dir-is-a-file", ["-c", "run.output_dir=" + q("{d}/afile.txt")],
     "run.output_dir: cannot create"),
    ("output-dir-under-a-file", ["-c", "run.output_dir=" + q("{d}/afile.txt/out")],
     "run.output_dir: cannot create"),
    ("output-dir-unwritable", ["-c", "run.output_dir=" + q("/proc/hfz-out")],
     "run.output_dir: cannot create /proc/hfz-out"),
    ("run-folder-symlink-outside", ["-c", "run.output_dir=" + q("{d}/link_out")],
     "run.name: {d}/link_out/tiny resolves to {d}/elsewhere, outside the output folder"),
    ("run-folder-symlink-dotdot", ["-c", "run.output_dir=" + q("{d}/up_out")],
     "resolves to {d}/elsewhere, outside the output folder"),
    ("run-folder-symlink-dangling", ["-c", "run.output_dir=" + q("{d}/dangling_out")],
     "outside the output folder"),
    ("resume-through-symlink", ["-c", "run.output_dir=" + q("{d}/resume_out"), "-c",
                                "run.resume=true"], "resolves to {d}/elsewhere_run, outside"),
    ("zeroshot-name-dotdot", [*ZEROSHOT, "-c", "name=" + q("../escaped")],
     "name: expected a plain folder"),
    ("zeroshot-output-dir-file", [*ZEROSHOT, "-c", "output-dir=" + q("{d}/afile.txt")],
     "output-dir: cannot create"),
    # -- runaway resources: estimated on the meta device, refused before anything is built
    ("flat-chunk-size", ["-c", "model.chunk_layout=" + q("flat"), "-c",
                         f"model.chunk_size={HUGE}"], "model.chunk_size: 10000000000 needs"),
    ("embed-dim-float", ["-c", "model.embed_dim=1e10"], "model.embed_dim: 10000000000 needs"),
    ("hidden-widths", ["-c", "model.hidden=" + q("10000000,10000000")], "model.hidden: '100"),
    ("chunk-embed-dim", ["-c", f"model.chunk_embed_dim={HUGE}"], "model.chunk_embed_dim:"),
    ("extractor-hidden", ["-c", f"model.extractor_hidden={HUGE}"], "model.extractor_hidden:"),
    ("per-sample-batch", ["-c", "model.factorised=false", "-c", "train.batch_size=100000000"],
     "train.batch_size: 100000000 needs"),
    ("flat-per-sample-batch", ["-c", "model.chunk_layout=" + q("flat"), "-c",
                               "train.batch_size=100000000"], "train.batch_size: 100000000"),
    ("resnet-activations", ["--preset", "tiny_imagenet_resnet", "-c", "data.synthetic=true",
                            "-c", "train.batch_size=10000000"],
     "train.batch_size: 10000000 needs"),  # parameters unchanged: the activations are too many
    ("fedjets-experts", ["-c", "run.method=" + q("fedjets"), "-c",
                         "fedjets.num_experts=100000000", "-c", "fedjets.top_k=1"],
     "fedjets.num_experts: expected a value <= 4096"),
    ("fedjets-gate", ["-c", "run.method=" + q("fedjets"), "-c", f"fedjets.gate_hidden={HUGE}"],
     "fedjets.gate_hidden:"),
    # -- non-finite numbers (nan passed every range check; inf trained to nothing)
    ("lr-inf", ["-c", "train.lr=inf"], "train.lr: expected a finite number, got inf"),
    ("alpha-nan", ["-c", "model.alpha=nan"], "model.alpha: expected a finite number, got nan"),
    ("mu-inf", ["-c", "fedprox.mu=inf"], "fedprox.mu: expected a finite number"),
    ("timeout-inf", ["-c", "server.timeout_s=inf"], "server.timeout_s: expected a finite"),
    ("noise-std-nan", ["-c", "data.shift.noise_std=nan"], "data.shift.noise_std: expected a fin"),
    ("rounds-inf", ["-c", "run.rounds=inf"], "run.rounds: expected an integer, got inf"),
    ("batch-nan", ["-c", "train.batch_size=nan"], "train.batch_size: expected an integer"),
    ("max-failed-rounds-zero", ["-c", "server.max_failed_rounds=0"],
     "server.max_failed_rounds: expected a value >= 1"),
    # -- data that would be silently reinterpreted
    ("labels-past-class-names", [*FOLDER, "data.data_dir=" + q("{d}/labels_past_names.npz")],
     "labels_past_names.npz[y_train]: expected labels in [0, 4)"),
    ("test-labels-past-names", [*FOLDER, "data.data_dir=" + q("{d}/test_past_names.npz")],
     "test_past_names.npz[y_test]: expected labels in [0, 4)"),
    ("labels-with-gaps", [*FOLDER, "data.data_dir=" + q("{d}/sparse_labels.npz")],
     "sparse_labels.npz[y_train]: expected labels 0..K-1"),
    ("single-class", [*FOLDER, "data.data_dir=" + q("{d}/single_class.npz")],
     "single_class.npz[y_train]: expected at least 2 classes, got 1"),
    ("negative-labels", [*FOLDER, "data.data_dir=" + q("{d}/negative_labels.npz")],
     "negative_labels.npz[y_train]: expected labels >= 0"),
    ("nan-pixels", [*FOLDER, "data.data_dir=" + q("{d}/nan_pixels.npz")],
     "nan_pixels.npz[x_train]: expected finite pixel values"),
    ("inf-test-pixels", [*FOLDER, "data.data_dir=" + q("{d}/inf_test_pixels.npz")],
     "inf_test_pixels.npz[x_test]: expected finite pixel values"),
    ("pixels-0-255-as-floats", [*FOLDER, "data.data_dir=" + q("{d}/pixels_0_255.npz")],
     "pixels_0_255.npz[x_train]: expected uint8 images or floats in [0, 1]"),
    ("test-image-shape", [*FOLDER, "data.data_dir=" + q("{d}/test_shape.npz")],
     "test_shape.npz[x_test]: expected test images of shape"),
    ("float-labels", [*FOLDER, "data.data_dir=" + q("{d}/float_labels.npz")],
     "float_labels.npz[y_train]: expected 40 integer labels"),
    # -- zero-shot inputs that failed late, on every node
    ("zeroshot-no-heldout", [*ZEROSHOT, "-c", "data.num_heldout=0"],
     "data.num_heldout: expected >= 1 held-out client"),
    ("zeroshot-other-image-shape", [*ZEROSHOT, "-c", "data.dataset=" + q("digits")],
     "data.dataset: 'digits' gives inputs of shape [1, 8, 8]"),
    ("zeroshot-folder-other-shape", [*ZEROSHOT, "-c", "data.dataset=" + q("folder"), "-c",
                                     "data.data_dir=" + q("{d}/ok_8x8.npz")],
     "data.dataset: 'folder' gives inputs of shape [1, 8, 8] with 4 classes"),
    ("zeroshot-lr-is-not-a-key", [*ZEROSHOT, "-c", "train.lr=inf"],
     "train.lr: not a zero-shot run-config key"),
]


@pytest.fixture
def no_process(monkeypatch) -> list[list[str]]:
    """Forbid starting any process (the SuperLink, flwr): a case must stop before Flower."""
    started: list[list[str]] = []

    def refuse(args, *a, **k):
        started.append(list(args))
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    return started


@pytest.mark.parametrize("args, needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_exits_2_with_one_line_before_flower(files: Path, no_process, capsys,
                                                      args: list[str], needle: str) -> None:
    args = [a.replace("{d}", str(files)) for a in args]
    if "--app" not in args and "--preset" not in args:
        args = ["--preset", "tiny", *args]
    code = launch(args)
    out, err = capsys.readouterr()
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert not no_process
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.replace("{d}", str(files)) in lines[0], lines[0]
    assert not (files.parent / "escaped").exists() and not Path("/tmp/hfz-escaped").exists()


def test_the_matrix_has_40_distinct_cases() -> None:
    assert len(BAD) >= 40 and len({c[0] for c in BAD}) == len(BAD)


def test_every_preset_fits_in_4_gib_with_three_processes() -> None:
    """No false refusals: the estimate of each preset (its dataset's shape and classes), for the
    ServerApp and two ClientApps at once, stays far below a small machine's memory."""
    from hfz_app.config import CONF_DIR
    from hfz_app.data.sources import source_info
    from hfz_app.resources import check_fits

    for preset in sorted(p.stem for p in CONF_DIR.glob("*.yaml")):
        cfg = load_config(preset)
        source = source_info(cfg.data.dataset)
        est = check_fits(cfg, source.shape, source.num_classes, processes=3, limit_bytes=4 * 2**30)
        assert est.parameters > 10_000 and est.activations > 10_000, (preset, est)


# --- the output folder: what stays allowed ------------------------------------------------------


def test_output_dir_may_be_absolute_or_a_symlink_the_user_chose(tmp_path: Path) -> None:
    """Confinement is of the run folder inside ``run.output_dir``; the output folder itself may
    be anywhere, through a symlink too."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cfg = load_config("tiny", {"run.output_dir": str(tmp_path / "link")})
    assert check_output_dir(cfg.run.output_dir) == tmp_path / "link"
    assert run_directory(cfg) == tmp_path / "link" / "tiny"
    nested = load_config("tiny", {"run.output_dir": str(tmp_path / "new" / "deeper")})
    assert check_output_dir(nested.run.output_dir).is_dir()  # created, as the run would


def test_node_files_may_hold_a_few_classes(tmp_path: Path) -> None:
    """The class checks are for a whole dataset; one client's own files (node config
    ``data-dir``) may hold a single class, or classes with gaps."""
    from hfz_app.data.sources import DataSourceError, load_folder

    npz(tmp_path / "client.npz", y_train=np.full(40, 3), y_test=np.full(12, 7))
    assert load_folder(str(tmp_path / "client.npz"), whole_dataset=False).num_classes == 8
    with pytest.raises(DataSourceError, match="expected at least 2 classes"):
        load_folder(str(tmp_path / "client.npz"))


# --- run-time failures: one line, non-zero, nothing computed lost -------------------------------


class PoisonAll:
    """The ClientApp, with NaN in every train reply from round ``start`` on (as ``train.lr``
    overflowing would give)."""

    def __init__(self, start: int = 1) -> None:
        self.start = start

    def __call__(self, msg, context):
        reply = client_app(msg, context)
        if (msg.metadata.message_type == MessageType.TRAIN
                and int(msg.content["config"]["server-round"]) >= self.start):
            arrays = reply.content["arrays"]
            key = next(iter(arrays.keys()))
            bad = arrays[key].numpy().copy()
            bad.flat[0] = np.nan
            arrays[key] = Array(bad)
            reply.content["arrays"] = arrays
        return reply


def run_tiny(out: Path, client, **overrides) -> None:
    run_config = full_run_config({"run.output_dir": str(out), "train.torch_threads": 1,
                                  **overrides}, preset="tiny")
    run_inprocess(server_app, client, run_config, simulation_node_configs(4))


def test_rounds_without_a_valid_reply_stop_the_run(tmp_path: Path) -> None:
    with pytest.raises(NoProgress) as err:
        run_tiny(tmp_path, PoisonAll(start=2), **{"run.rounds": 6,
                                                   "server.max_failed_rounds": 2})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("server.max_failed_rounds: 2 rounds in a row (2-3) without a "
                              "train reply that could be averaged (6 dropped"), message
    run_dir = tmp_path / "tiny"
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3"]  # nothing lost
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "round_0001.pt", "round_0002.pt", "round_0003.pt"]


def test_a_single_failed_round_below_the_limit_completes(tmp_path: Path) -> None:
    class OneRound(PoisonAll):
        def __call__(self, msg, context):
            if msg.metadata.message_type == MessageType.TRAIN and \
                    int(msg.content["config"]["server-round"]) != 1:
                return client_app(msg, context)
            return super().__call__(msg, context)

    run_tiny(tmp_path, OneRound(start=1), **{"run.rounds": 2, "server.max_failed_rounds": 2})
    rows = (tmp_path / "tiny" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4  # header + rounds 0-2


def _eval_reply(node: int, metrics: dict) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=request)


def test_aggregate_evaluate_takes_the_flower_template_keys(caplog) -> None:
    from hfz_app.federation.inprocess import _set_task_identity
    from hfz_app.federation.roles import Roles
    from hfz_app.federation.strategy import HyperFedZeroStrategy

    _set_task_identity()
    roles = Roles(participants=(11, 12), heldout=(21,), partition_of={11: 0, 12: 1, 21: 2})
    strategy = HyperFedZeroStrategy(["w"], roles, num_rounds=1)
    summary = strategy.aggregate_evaluate(1, [
        _eval_reply(11, {"eval_acc": 0.9, "eval_loss": 0.3, "num-examples": 100}),
        _eval_reply(12, {"accuracy": 0.7, "loss": 0.5, "num-examples": 300}),
        _eval_reply(21, {"eval_acc": 0.6, "eval_loss": 0.8, "num-examples": 50}),
        _eval_reply(12, {"acc_top5": 0.99, "num-examples": 10}),  # unknown keys: dropped
    ])
    assert summary["pacc_weighted"] == pytest.approx(0.75)
    assert summary["zacc_weighted"] == pytest.approx(0.6)
    dropped = [r.getMessage() for r in caplog.records if "dropped evaluation reply" in r.getMessage()]
    assert len(dropped) == 1 and "expected the keys 'accuracy' (or 'eval_acc'" in dropped[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_shot_model_follows_the_models_dtype(dtype: torch.dtype) -> None:
    from hfz_app import hyperfedzero, zero_shot_model

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    model = hyperfedzero(Net(), (1, 8, 8), 10, granularity="client").to(dtype)
    x = torch.rand(30, 1, 8, 8)  # float32 inputs, as a user's loader gives
    net = zero_shot_model(model, Net().to(dtype), x)
    assert net.fc.weight.dtype == dtype
    expected = model(x.to(dtype), embedding=model.pooled_embedding(x.to(dtype))).logits
    torch.testing.assert_close(net(x.to(dtype)), expected)


# --- SIGINT to a real launcher run: nothing left behind, the run resumes -------------------------


def _alive(marker: str) -> list[int]:
    return run_processes(marker)


def _commands(pids: list[int]) -> list[str]:
    """What each process runs, for the failure message (one may exit meanwhile)."""
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode())
        except OSError:
            out.append(f"{pid} (gone)")
    return out


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_stop_also_ends_what_a_raylet_started_without_the_run_marker() -> None:
    """A process that carries the run's marker and runs ``.../raylet/raylet`` is a raylet: the
    stop also ends processes whose environment names it (``RAY_RAYLET_PID``) but has lost the
    marker, as Ray's agents once did; a process with neither is left alone."""
    marker = f"HFZ_TEST_STOP={uuid.uuid4().hex}"
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    base = {k: v for k, v in os.environ.items() if k != "RAY_RAYLET_PID"}
    raylet = subprocess.Popen([*sleep, "/x/raylet/raylet"],
                              env={**base, marker.split("=")[0]: marker.split("=")[1]})
    agent = subprocess.Popen(sleep, env={**base, "RAY_RAYLET_PID": str(raylet.pid)})
    bystander = subprocess.Popen(sleep, env=base)
    try:
        deadline = time.monotonic() + 10
        while raylet.pid not in run_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)  # /proc/<pid>/environ is the child's once it has exec'd
        stop_run([], marker, timeout_s=5)
        assert raylet.wait(timeout=10) is not None and agent.wait(timeout=10) is not None
        assert bystander.poll() is None
    finally:
        for proc in (raylet, agent, bystander):
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_sigint_stops_every_process_and_the_run_resumes(tmp_path: Path) -> None:
    marker = f"HFZ_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           marker.split("=")[0]: marker.split("=")[1]}
    overrides = {"run.output_dir": str(tmp_path), "run.rounds": 200, "train.torch_threads": 1}
    args = [a for k, v in overrides.items()
            for a in ("-c", f"{k}={json.dumps(v) if isinstance(v, str) else v}")]
    proc = subprocess.Popen([sys.executable, "-m", "hfz_app.launch", "--preset", "tiny", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ckpts = tmp_path / "tiny" / "checkpoints"
    deadline = time.monotonic() + 150
    while not (ckpts / "round_0001.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint of round 1 in 150 s"
        time.sleep(0.2)
    # the launcher, the SuperLink, flower-superexec (a session of its own), the simulation, Ray
    assert len(_alive(marker)) > 5
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, (proc.returncode, out[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert lines == [err.strip().splitlines()[-1]], err[-3000:]
    assert lines[0].startswith("error: interrupted (SIGINT); stopped every process of the run; "
                               f"checkpoints so far kept in {tmp_path / 'tiny'}"), lines
    # A process can still be exiting when the launcher returns (seen under a full suite's load,
    # never in isolation): give stragglers 10 s to go, then nothing may be left.
    deadline = time.monotonic() + 10.0
    while _alive(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = _alive(marker)
    assert survivors == [], f"processes of the interrupted run survived: {_commands(survivors)}"
    done = max(int(p.stem.removeprefix("round_")) for p in ckpts.glob("round_*.pt"))
    # resume in-process from the last checkpoint with a logged row, up to one more round
    run_config = full_run_config({**overrides, "run.rounds": done + 1, "run.resume": True},
                                 preset="tiny")
    run_inprocess(server_app, client_app, run_config, simulation_node_configs(4))
    rows = (tmp_path / "tiny" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows][-1] == done + 1
    assert not (tmp_path / "tiny-2").exists()
    assert (ckpts / f"round_{done + 1:04d}.pt").exists()
