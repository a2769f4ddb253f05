"""BatchNorm statistics: one policy for every method (model.bn_stats), AdaBN on held-out clients
(eval.heldout_adapt), and the run.device setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_app import app as client_app
from hfz_app.checkpoint import load_checkpoint
from hfz_app.config import ConfigError, load_config
from hfz_app.federation.inprocess import (
    RecordingClientApp,
    full_run_config,
    run_inprocess,
    simulation_node_configs,
)
from hfz_app.federation.job import job_for
from hfz_app.methods import resolve_device
from server_app import app as server_app

RESNET = {"data.dataset": "synthetic_rgb", "model.target": "resnet20", "run.rounds": 1,
          "data.train_subsample": 300, "data.test_subsample": 100, "train.torch_threads": 1}


def run(tmp_path: Path, **overrides):
    client = RecordingClientApp(client_app)
    config = full_run_config({"run.output_dir": str(tmp_path), **RESNET, **overrides},
                             preset="tiny")
    run_inprocess(server_app, client, config, simulation_node_configs(4))
    return client.replies, load_checkpoint(tmp_path / "tiny" / "checkpoints" / "round_0001.pt")


@pytest.mark.parametrize("method", ["fedavg", "hyperfedzero"])
def test_shared_statistics_are_the_sample_weighted_average(tmp_path, method) -> None:
    replies, ckpt = run(tmp_path, **{"run.method": method})
    trained = [r for r in replies if "arrays" in r.content.array_records]
    assert len(trained) == 3
    keys = [k for k in ckpt.shared if k.endswith(("running_mean", "running_var"))]
    assert keys and not any(k.endswith("num_batches_tracked") for k in ckpt.shared)
    weights = torch.tensor([float(r.content["metrics"]["num-examples"]) for r in trained],
                           dtype=torch.float64)
    for key in keys:
        stacked = torch.stack([torch.from_numpy(r.content["arrays"][key].numpy()).double()
                               for r in trained])
        expected = (weights[:, None] * stacked).sum(0) / weights.sum()
        torch.testing.assert_close(ckpt.shared[key].double(), expected, rtol=1e-5, atol=1e-6)
    mean = ckpt.shared[next(k for k in keys if k.endswith("running_mean"))]
    var = ckpt.shared[next(k for k in keys if k.endswith("running_var"))]
    assert mean.abs().max() > 1e-3 and (var - 1).abs().max() > 1e-3  # not the initial 0 / 1


def test_local_statistics_never_leave_the_participants(tmp_path, capsys) -> None:
    replies, ckpt = run(tmp_path, **{"run.method": "fedavg", "model.bn_stats": "local"})
    sent = {k for r in replies for rec in r.content.array_records.values() for k in rec}
    assert sent and not {k for k in sent if "running_" in k or "num_batches" in k}
    assert not {k for k in ckpt.shared if "running_" in k}
    assert "model.bn_stats=local): gACC uses the initial statistics" in capsys.readouterr().out


def heldout_metrics(overrides: dict, arrays=None) -> dict:
    job = job_for(load_config("tiny", {"train.torch_threads": 1, **overrides}))
    model = job.runtime.frozen(arrays if arrays is not None else job.runtime.initial_arrays(),
                               "arrays")
    data = job.federation.client(job.cfg.data.num_participants)
    return job.runtime.evaluate_heldout(model, data.test_x, data.test_y), model


def test_adabn_changes_nothing_without_batchnorm() -> None:
    plain, _ = heldout_metrics({"eval.heldout_adapt": "none"})
    adapted, _ = heldout_metrics({"eval.heldout_adapt": "adabn"})
    assert plain == adapted


def test_adabn_re_estimates_the_statistics_from_the_clients_inputs() -> None:
    base = {k: v for k, v in RESNET.items() if k != "run.rounds"} | {"run.method": "fedavg"}
    _, plain = heldout_metrics(base | {"eval.heldout_adapt": "none"})
    job = job_for(load_config("tiny", {"train.torch_threads": 1, **base,
                                       "eval.heldout_adapt": "adabn"}))
    _, adapted = heldout_metrics(base | {"eval.heldout_adapt": "adabn"})
    x = job.federation.client(job.cfg.data.num_participants).test_x
    bn = adapted.bn1
    assert torch.equal(plain.bn1.running_mean, torch.zeros_like(bn.running_mean))  # initial
    with torch.no_grad():  # the first BatchNorm sees conv1(x): its batch mean over all of x
        expected = adapted.conv1(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not bn.training  # restored after the pass
    assert all(not p.requires_grad for p in adapted.parameters())


def test_device_auto_is_the_cpu_here_and_a_missing_gpu_is_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^run.device: 'cuda' asked for, but this machine"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="run.device: expected auto, cpu, cuda, cuda:N or mps"):
        load_config("tiny", {"run.device": "tpu"})
