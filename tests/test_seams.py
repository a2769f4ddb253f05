"""The seams: no import cycle, one array check, zero-shot evaluation without an optimiser."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client_app import app as client_app
from hfz_app.arrays import ArrayMismatch, check_arrays
from hfz_app.config import load_config
from hfz_app.federation.inprocess import InProcessGrid, full_run_config
from hfz_app.federation.job import job_for
from hfz_app.federation.roles import ZEROSHOT_MESSAGE_TYPE

PACKAGE = Path(__file__).resolve().parent.parent / "hfz_app"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in the file, lazy imports too)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    graph[name].add(target if target in modules else base)
        graph[name] &= set(modules)
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules, or [] (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40 and graph["hfz_app.federation.client"]  # the parser sees the package
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_config_and_data_import_no_methods_launcher_or_flower_node_code() -> None:
    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert not {m for m in reach("hfz_app.config") if m.startswith(("hfz_app.methods",
                                                                       "hfz_app.models"))}
    data = reach("hfz_app.data.federation") | reach("hfz_app.data.describe")
    assert not {m for m in data if m.startswith(("hfz_app.launch", "hfz_app.federation"))}


REFERENCE = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


@pytest.mark.parametrize("received, message", [
    ({"w": torch.zeros(2, 3), "b": torch.zeros(3), "bn.running_mean": torch.zeros(3)},
     "'bn.running_mean' is not a shared key of this model (1 foreign, 0 missing of 2"),
    ({"w": torch.zeros(2, 3)}, "'b' is missing (0 foreign, 1 missing of 2"),
    ({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, "'w' has shape [3, 2], expected [2, 3]"),
    ({"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(3)},
     "'w' has dtype float64, expected float32"),
    ({"w": torch.zeros(2, 3), "b": torch.tensor([0.0, float("nan"), 0.0])},
     "'b' holds non-finite values"),
])
def test_check_arrays_names_the_first_problem_in_one_line(received, message) -> None:
    with pytest.raises(ArrayMismatch) as err:
        check_arrays(received, REFERENCE, "arrays of round 3")
    assert str(err.value).startswith(f"arrays of round 3: {message}")
    assert "\n" not in str(err.value)
    as_record = ArrayRecord({k: Array(v.numpy()) for k, v in received.items()})
    with pytest.raises(ArrayMismatch, match="arrays of round 3"):  # Flower Arrays alike
        check_arrays(as_record, REFERENCE, "arrays of round 3")


def test_check_arrays_accepts_matching_arrays() -> None:
    check_arrays({"w": np.ones((2, 3), np.float32), "b": torch.ones(3)}, REFERENCE, "x")


def zeroshot_message(arrays: ArrayRecord) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=7, message_type=ZEROSHOT_MESSAGE_TYPE)


def heldout_context(run_config) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 3, "num-partitions": 4},
                   state=RecordDict(), run_config=run_config)


@pytest.mark.parametrize("method", ["hyperfedzero", "fedavg", "ditto", "fedjets"])
def test_a_zero_shot_evaluation_constructs_no_optimiser(monkeypatch, method: str) -> None:
    overrides = {"train.torch_threads": 1, "run.method": method}
    run_config = full_run_config(overrides, preset="tiny")
    arrays = job_for(load_config("tiny", overrides)).runtime.initial_arrays()
    InProcessGrid(client_app, {}, {})  # Message() needs a run identity

    def refuse(*args, **kwargs):
        raise AssertionError("an optimiser on the zero-shot path")

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse)
    reply = client_app(zeroshot_message(arrays), heldout_context(run_config))
    assert reply.content["metrics"]["num-examples"] > 0


def test_the_refusing_optimiser_would_be_noticed(monkeypatch) -> None:
    """The check above can fail: the labelled fine-tuning reference (not zero-shot) does build an
    optimiser on a held-out node, and the refusal surfaces."""
    overrides = {"train.torch_threads": 1, "run.method": "finetune"}
    run_config = full_run_config(overrides, preset="tiny")
    arrays = job_for(load_config("tiny", overrides)).runtime.initial_arrays()
    InProcessGrid(client_app, {}, {})

    def refuse(*args, **kwargs):
        raise AssertionError("an optimiser on the zero-shot path")

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse)
    with pytest.raises(AssertionError, match="an optimiser on the zero-shot path"):
        client_app(zeroshot_message(arrays), heldout_context(run_config))


def test_a_node_refuses_arrays_of_another_dtype_in_one_line() -> None:
    run_config = full_run_config({"train.torch_threads": 1}, preset="tiny")
    arrays = job_for(load_config("tiny", {"train.torch_threads": 1})).runtime.initial_arrays()
    key = next(iter(arrays.keys()))
    arrays[key] = Array(arrays[key].numpy().astype(np.float64))
    InProcessGrid(client_app, {}, {})
    with pytest.raises(ArrayMismatch) as err:
        client_app(zeroshot_message(arrays), heldout_context(run_config))
    assert str(err.value) == f"arrays of round 1: '{key}' has dtype float64, expected float32"
