"""Every method, end to end, on one device: ``HFZ_TEST_DEVICE`` (default ``cpu``).

On this CPU machine the tests run with ``run.device=cpu`` set explicitly; on a machine with a GPU,
``HFZ_TEST_DEVICE=cuda python -m pytest tests/test_devices.py`` (what ``benchmarks.gpu_check``
runs) puts models, batches, evaluation, held-out adaptation, export and the public API on CUDA and
checks that nothing falls back to, or silently syncs with, the host inside the training loop.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from client_app import app as client_app
from hfz_app import api
from hfz_app.config import load_config
from hfz_app.export import export
from hfz_app.federation.inprocess import full_run_config, run_inprocess, simulation_node_configs
from hfz_app.methods import METHODS, runtime_for
from hfz_app.models import build_target
from hfz_app.training import train_epochs
from server_app import app as server_app

DEVICE = torch.device(os.environ.get("HFZ_TEST_DEVICE", "cpu"))
SHAPE, CLASSES = (3, 16, 16), 10
# A conv target with BatchNorm, so AdaBN, shared statistics and devices meet in one model.
SMALL = {"data.dataset": "synthetic_rgb", "model.target": "resnet20", "run.rounds": 1,
         "data.train_subsample": 200, "data.test_subsample": 60, "train.torch_threads": 1,
         "eval.heldout_adapt": "adabn", "run.device": str(DEVICE)}


def data(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def on_device(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == DEVICE.type for t in tensors)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_method_trains_replies_and_evaluates_on_the_device(method: str) -> None:
    cfg = load_config("tiny", {"run.method": method, "model.target": "lenet",
                               "run.device": str(DEVICE), "eval.heldout_adapt": "adabn"})
    runtime = runtime_for(cfg, SHAPE, CLASSES)
    assert runtime.device.type == DEVICE.type
    model = runtime.build()
    assert on_device(model)
    x, y = data()
    metrics = runtime.method.local_train(model, x.to(DEVICE), y.to(DEVICE),
                                         torch.Generator().manual_seed(0), {"server-round": 1})
    assert all(isinstance(v, float) for v in metrics.values()) and "train_loss" in metrics
    reply = runtime.reply(model).to_torch_state_dict()  # what crosses the network: host arrays
    assert all(t.device.type == "cpu" for t in reply.values())

    participant = runtime.evaluate(model, x, y, zeroshot=False)
    received = runtime.receive(reply, "device test")  # as a held-out node (client_app) does
    assert on_device(received)
    received, xh, yh = runtime.method.prepare_heldout(received, x.to(DEVICE), y.to(DEVICE),
                                                      torch.Generator().manual_seed(1))
    heldout = runtime.evaluate_heldout(received, xh, yh)
    frozen = runtime.frozen(reply, "device test")
    assert on_device(frozen) and not any(p.requires_grad for p in frozen.parameters())
    for result in (participant, heldout):
        assert 0.0 <= result["accuracy"] <= 1.0 and torch.isfinite(torch.tensor(result["loss"]))


def test_a_federated_round_and_an_export_on_the_device_report_every_accuracy(
        tmp_path: Path) -> None:
    """ServerApp (gACC, aggregation) and ClientApps with ``run.device`` set, in process; then the
    held-out client's export from the checkpoint, on the same device."""
    config = full_run_config({"run.output_dir": str(tmp_path), **SMALL}, preset="tiny")
    run_inprocess(server_app, client_app, config, simulation_node_configs(4))
    with (tmp_path / "tiny" / "metrics.csv").open() as f:
        row = list(csv.DictReader(f))[-1]
    for key in ("zacc_weighted", "gacc", "pacc_weighted"):
        assert 0.0 <= float(row[key]) <= 1.0, (key, row[key])

    report = export(tmp_path / "tiny" / "checkpoints" / "round_0001.pt", tmp_path / "export",
                    partition=3, overrides={"run.device": str(DEVICE)})
    assert torch.device(report["device"]).type == DEVICE.type
    assert 0.0 <= report["accuracy_exported"] <= 1.0
    assert report["max_abs_logit_diff_vs_generated"] < 1e-3  # the plain module = the generator's


def test_the_public_api_keeps_a_module_on_its_device() -> None:
    """A user's module already on the device: the wrapper, its loss and the zero-shot weights
    stay there."""
    net = build_target("lenet", SHAPE, CLASSES).to(DEVICE)
    model = api.hyperfedzero(net, SHAPE, CLASSES)
    assert on_device(model)
    x, y = data()
    x, y = x.to(DEVICE), y.to(DEVICE)
    loss = api.HyperFedZeroLoss(model)(model(x), y)
    loss.backward()
    personal = api.zero_shot_model(model, build_target("lenet", SHAPE, CLASSES).to(DEVICE), x)
    assert on_device(personal) and personal(x).shape == (len(x), CLASSES)


def cross_entropy(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
    """A plain loss in train_epochs' form: (loss, named parts)."""
    return nn.functional.cross_entropy(m(xb), yb), {}


def step_sync_warnings(epochs: int) -> int:
    """Host syncs CUDA reports while ``train_epochs`` runs ``epochs`` epochs of 8 steps."""
    torch.manual_seed(0)
    net = build_target("lenet", SHAPE, CLASSES).to(DEVICE)
    x, y = data(256)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)

    x, y = x.to(DEVICE), y.to(DEVICE)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_epochs(net, cross_entropy, x, y, optimizer, epochs=epochs, batch_size=32,
                         generator=torch.Generator().manual_seed(0))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host syncs are a CUDA notion (HFZ_TEST_DEVICE)")
def test_the_training_loop_does_not_sync_with_the_host_per_step() -> None:
    """As many host syncs for 4 epochs as for 1: none per step (the final sums cost a few)."""
    assert step_sync_warnings(4) == step_sync_warnings(1)


def amp_weights(amp: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = build_target("lenet", SHAPE, CLASSES).to(DEVICE)
    x, y = data(64)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    train_epochs(net, cross_entropy, x.to(DEVICE), y.to(DEVICE), optimizer, epochs=1, batch_size=16,
                 generator=torch.Generator().manual_seed(0), amp=amp)
    return [p.detach().cpu() for p in net.parameters()]


def test_train_amp_changes_nothing_off_cuda_and_trains_on_cuda() -> None:
    """``train.amp`` is a no-op on the CPU (bit-identical weights); on CUDA it trains in
    bfloat16 autocast to weights close to, but not necessarily equal to, float32's."""
    plain, mixed = amp_weights(False), amp_weights(True)
    if DEVICE.type != "cuda":
        assert all(torch.equal(a, b) for a, b in zip(plain, mixed, strict=True))
    else:
        assert all(torch.isfinite(b).all() for b in mixed)
        drift = max(float((a - b).abs().max()) for a, b in zip(plain, mixed, strict=True))
        assert drift < 0.05, drift
