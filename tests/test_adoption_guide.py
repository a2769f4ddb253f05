"""docs/ADOPTING.md runs: its Python blocks, in order, turn Flower's PyTorch template
(examples/existing-project/before/) into a HyperFedZero app that trains, evaluates a held-out node
zero-shot and exports a plain model, in-process; plus the public API it introduces."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import MessageType
from torch import nn

import hfz_app
from hfz_app import (
    LabelPriorBatchSampler,
    client_embedding,
    hyperfedzero,
    recipe_options,
    zero_shot_model,
)
from hfz_app.config import ConfigError, read_yaml
from hfz_app.federation.roles import ZEROSHOT_MESSAGE_TYPE

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "ADOPTING.md"
TEMPLATE = ROOT / "examples" / "existing-project" / "before" / "existing_project"
PACKAGE = "existing_project"
FILE_TAG = re.compile(rf"\A# ({PACKAGE}/\w+\.py)\n")
FILES = ("task.py", "client_app.py", "server_app.py")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), re.DOTALL | re.MULTILINE)


def write_project(root: Path, blocks: list[str]) -> list[str]:
    """The template copied to ``root``, with the guide's file blocks applied: ``task.py`` blocks
    are appended to the template's (a later definition replaces the template's), the apps are
    the guide's alone. Returns the script blocks (no file tag), in order."""
    package = root / PACKAGE
    shutil.copytree(TEMPLATE, package)
    for name in FILES[1:]:
        (package / name).write_text("")
    scripts = []
    for block in blocks:
        tag = FILE_TAG.match(block)
        if tag is None:
            scripts.append(block)
            continue
        with (root / tag.group(1)).open("a") as f:
            f.write("\n\n" + block)
    return scripts


def _purge_package() -> None:
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def guide_run(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The guide, executed: project files written, then its scripts run in one namespace (in a
    scratch working directory, where the ServerApp saves final_model.pt)."""
    root = tmp_path_factory.mktemp("adopting")
    blocks = python_blocks()
    scripts = write_project(root, blocks[1:])  # the first block is the summary (checked below)
    threads = torch.get_num_threads()  # the template's task.py sets 1 thread
    cwd = Path.cwd()
    saved = {m: sys.modules.pop(m) for m in list(sys.modules)
             if m == PACKAGE or m.startswith(f"{PACKAGE}.")}  # test_example_project's package
    sys.path.insert(0, str(root))
    namespace: dict[str, Any] = {"__name__": "adopting_guide"}
    out = io.StringIO()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out):
            for i, script in enumerate(scripts):
                exec(compile(script, f"{GUIDE.name}:script{i}", "exec"), namespace)  # noqa: S102
        yield {"ns": namespace, "stdout": out.getvalue(), "root": root, "scripts": scripts}
    finally:
        os.chdir(cwd)
        sys.path.remove(str(root))
        _purge_package()
        sys.modules.update(saved)
        torch.set_num_threads(threads)


def test_guide_has_the_template_files_and_scripts() -> None:
    blocks = python_blocks()
    tags = [m.group(1) for b in blocks if (m := FILE_TAG.match(b))]
    assert {f"{PACKAGE}/{name}" for name in FILES} == set(tags)
    assert len(blocks) - len(tags) == 3  # the summary, the in-process run, the export


def test_summary_lines_are_lines_of_the_steps() -> None:
    """The opening block is what the steps add: each of its lines occurs in a later block."""
    summary, *steps = python_blocks()
    later = {line.strip() for block in steps for line in block.splitlines()}
    lines = [line.split("  # ")[0].strip() for line in summary.splitlines() if line.strip()]
    assert len(lines) >= 8
    missing = [line for line in lines if not any(line in other for other in later)]
    assert not missing, f"summary lines not in the guide's code: {missing}"


def test_guide_trains_and_evaluates_the_held_out_node_zero_shot(guide_run) -> None:
    found = re.search(r"^zACC (\S+)  pACC (\S+)$", guide_run["stdout"], re.MULTILINE)
    assert found, guide_run["stdout"][-2000:]
    zacc, pacc = map(float, found.groups())
    assert zacc > 0.7 and pacc > 0.7, (zacc, pacc)  # 10 classes: chance is 0.1
    grid = guide_run["ns"]["grid"]
    heldout = next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == 4)
    kinds = {n: {kind for node, kind in grid.sent if node == n} for n in grid.contexts}
    assert kinds[heldout] == {MessageType.QUERY, ZEROSHOT_MESSAGE_TYPE}  # never trains
    for node, sent in kinds.items():
        if node != heldout:
            assert sent == {MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE}, sent


def test_exported_model_is_a_plain_net_scoring_the_reported_zacc(guide_run) -> None:
    ns = guide_run["ns"]
    plain, net_class = ns["plain"], ns["Net"]
    assert type(plain) is net_class
    state = torch.load(guide_run["root"] / "client4_model.pt")
    fresh = net_class()
    fresh.load_state_dict(state)  # a plain Net: no hfz_app module inside
    fresh.eval()
    loader = ns["load_all"](4, 5)
    x = torch.cat([b["img"] for b in loader])
    y = torch.cat([b["label"] for b in loader])
    with torch.no_grad():
        exported = fresh(x)
        generated = ns["net"](x, embedding=client_embedding(ns["net"], x)).logits
    assert torch.allclose(exported, generated, atol=1e-5)
    zacc = float(re.search(r"^zACC (\S+)", guide_run["stdout"], re.MULTILINE).group(1))
    assert float((exported.argmax(1) == y).double().mean()) == pytest.approx(zacc, abs=1e-4)


# -- the API the guide introduces ---------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_recipe_options_are_the_recipe_file_sections() -> None:
    recipe = read_yaml(ROOT / "conf" / "hyperfedzero_recipe.yaml")
    for section in ("model", "train", "server"):
        assert recipe_options(section) == recipe[section]
    options = recipe_options()
    options["alpha"] = -1.0  # a copy: the next call is unaffected
    assert recipe_options()["alpha"] == recipe["model"]["alpha"]
    model = hyperfedzero(Net(), (1, 8, 8), 10, **recipe_options())
    assert model.cfg.granularity == "client" and model.embed_dim == 10
    assert set(recipe_options("train")) == {"hyper_output_lr_scale", "prior_alpha"}
    strategy = hfz_app.HyperFedZeroStrategy(model.shared_keys(), **recipe_options("server"))
    assert strategy.server_momentum == recipe["server"]["server_momentum"]
    with pytest.raises(ConfigError, match=r"^section: expected one of model, train, server, got 'data'$"):
        recipe_options("data")


def test_param_groups_take_the_output_layer_scale() -> None:
    model = hyperfedzero(Net(), (1, 8, 8), 10, **recipe_options())
    default = {g["name"]: g["lr"] for g in model.param_groups(0.1)}
    assert default == pytest.approx({"hyper_output": 0.001, "extractor": 0.1, "base": 0.1})
    scaled = {g["name"]: g["lr"] for g in model.param_groups(
        0.1, hyper_output_lr_scale=1.0, extractor_lr_scale=0.5)}
    assert scaled == pytest.approx({"hyper_output": 0.1, "extractor": 0.05, "base": 0.1})
    with pytest.raises(ValueError, match=r"^hyper_output_lr_scale: expected > 0, got 0$"):
        model.param_groups(0.1, hyper_output_lr_scale=0)


def test_label_prior_batches_vary_their_label_mix() -> None:
    labels = torch.arange(10).repeat(20)  # 200 samples, balanced
    sampler = LabelPriorBatchSampler(labels, batch_size=32, prior_alpha=1.0, seed=0)
    first, second = list(sampler), list(sampler)
    assert len(sampler) == len(first) == 7 and all(len(b) == 32 for b in first)
    assert first != second  # each epoch draws new batches
    mixes = [torch.bincount(labels[b], minlength=10).max().item() for b in first]
    assert max(mixes) > 8  # a balanced batch of 32 has at most 4 of a class; Dir(1) skews
    assert first == list(LabelPriorBatchSampler(labels, 32, 1.0, seed=0))  # seeded
    plain = list(LabelPriorBatchSampler(labels, 32, prior_alpha=0.0, seed=0))
    assert sorted(i for b in plain for i in b) == list(range(200))  # every sample once
    with pytest.raises(ValueError, match=r"^batch_size: expected >= 1, got 0$"):
        LabelPriorBatchSampler(labels, 0)
    with pytest.raises(ValueError, match=r"^prior_alpha: expected >= 0, got -1"):
        LabelPriorBatchSampler(labels, 8, prior_alpha=-1)


def test_client_embedding_pools_over_all_inputs_whatever_the_batches() -> None:
    torch.manual_seed(0)
    model = hyperfedzero(Net(), (1, 8, 8), 10, **recipe_options())
    x = torch.randn(50, 1, 8, 8)
    whole = client_embedding(model, x)
    assert not model.training
    with torch.no_grad():
        assert torch.allclose(whole, model.embed(x).mean(0), atol=1e-6)
    batched = client_embedding(model, (x[i:i + 16] for i in range(0, 50, 16)), batch_size=7)
    assert torch.allclose(whole, batched, atol=1e-6)
    with torch.no_grad():  # model(x) in eval mode pools over the batch it is given
        for layer in model.hyper.output_layers():  # zero at initialisation: nothing generated
            layer.weight.normal_()
        per_batch = model(x[:16]).logits
        pooled = model(x[:16], embedding=whole).logits
    assert not torch.allclose(per_batch, pooled)
    plain = zero_shot_model(model, Net(), (x[i:i + 16] for i in range(0, 50, 16)))
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x, embedding=whole).logits, atol=1e-5)
    with pytest.raises(TypeError, match=r"^inputs: expected tensors of inputs, got a dict"):
        client_embedding(model, [{"img": x}])
    with pytest.raises(ValueError, match=r"^inputs: expected at least one input, got none$"):
        client_embedding(model, [])


# -- the strategy: BatchNorm statistics are averaged, not stepped --------------------------------


def test_server_momentum_leaves_batchnorm_statistics_at_their_average() -> None:
    """FedAvgM's momentum on a shrinking running variance takes it below zero in round 2 (NaN
    logits in the guide's CNN); statistics take the replies' weighted mean instead."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from hfz_app.federation.inprocess import InProcessGrid, _set_task_identity

    keys = ["fc.weight", "bn.running_var"]
    _set_task_identity()
    grid = InProcessGrid(client_app=None, node_configs={1: {}, 2: {}}, run_config={})
    strategy = hfz_app.HyperFedZeroStrategy(keys, server_momentum=0.5)

    def record(value: float) -> ArrayRecord:
        return ArrayRecord({k: Array(np.full(3, value, dtype=np.float32)) for k in keys})

    def reply(node: int, value: float, n: int) -> Message:
        request = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": record(value), "metrics": MetricRecord({"num-examples": n})})
        return Message(content, reply_to=request)

    arrays = record(1.0)
    for _ in range(3):  # every node's variance estimate: 0.1
        list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(1, [reply(1, 0.1, 10), reply(2, 0.1, 30)])
    var = arrays["bn.running_var"].numpy()
    assert var.dtype == np.float32 and np.allclose(var, 0.1)
    assert arrays["fc.weight"].numpy()[0] < 0  # weights still take the momentum step
    weighted = strategy.averaged_statistics(record(0.0), [reply(1, 0.2, 10), reply(2, 0.6, 30)])
    assert np.allclose(weighted["bn.running_var"].numpy(), 0.5)
    assert np.allclose(weighted["fc.weight"].numpy(), 0.0)
