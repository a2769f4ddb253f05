"""The launcher's ClientApp resources: --cpus-per-client / --gpus-per-client, the federation
config they become, and the GPU visibility it gives Ray. No Flower process is started."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfz_app.launch import (
    ResourceError,
    check_client_device,
    client_resources,
    default_gpus_per_client,
    federation_config,
    ray_environment,
)

ROOT = Path(__file__).resolve().parent.parent


def parsed_by_flower(config: str):
    """The SimulationConfig `flwr run --federation-config` makes of the string
    (flwr/cli/run/run.py, _parse_federation_config_overrides)."""
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    raw = parse_config_args([config])
    return simulation_config_from_json({k.replace("-", "_"): v for k, v in raw.items()})


def test_cpu_only_federation_config_is_todays_string() -> None:
    assert federation_config(15, 1, 0.0) == "num-supernodes=15 client-resources-num-cpus=1"
    sim = parsed_by_flower(federation_config(15, 1, 0.0))
    assert sim.num_supernodes == 15 and sim.client_resources_num_cpus == 1
    assert not sim.HasField("client_resources_num_gpus")  # Flower's default, 0.0


@pytest.mark.parametrize(("cpus", "gpus"), [(1, 0.25), (2, 0.5), (4, 1.0), (1, 0.125), (3, 2.0)])
def test_federation_config_with_gpus(cpus: int, gpus: float) -> None:
    config = federation_config(13, cpus, gpus)
    assert config == (f"num-supernodes=13 client-resources-num-cpus={cpus} "
                      f"client-resources-num-gpus={gpus!r}")
    sim = parsed_by_flower(config)
    assert sim.client_resources_num_cpus == cpus
    assert math.isclose(sim.client_resources_num_gpus, gpus, rel_tol=1e-6)  # proto float32


@pytest.mark.parametrize(("gpus", "cpus", "cpus_per_client", "expected"), [
    (0, 16, 1, 0.0),    # no GPU: CPU only, as before
    (1, 1, 1, 1.0),     # one CPU slot: a whole GPU
    (1, 2, 1, 0.5),
    (1, 3, 1, 0.5),     # powers of two only
    (1, 16, 1, 0.25),   # capped at four ClientApps per GPU
    (1, 16, 8, 0.5),    # 2 CPU slots
    (8, 16, 1, 0.5),    # 2 CPU slots per GPU
    (8, 4, 1, 1.0),
])
def test_default_gpus_per_client(gpus: int, cpus: int, cpus_per_client: int,
                                 expected: float) -> None:
    assert default_gpus_per_client(gpus, cpus, cpus_per_client) == expected


def test_client_resources_defaults_and_accepted_values() -> None:
    assert client_resources(1, None, gpus=0, cpus=2) == (1, 0.0)  # today's run
    assert client_resources(2, None, gpus=1, cpus=4) == (2, 0.5)
    assert client_resources(2, None, gpus=1, cpus=16) == (2, 0.25)
    assert client_resources(1, 0.0, gpus=1, cpus=2) == (1, 0.0)
    assert client_resources(1, 0.25, gpus=1, cpus=2) == (1, 0.25)
    assert client_resources(1, 2, gpus=2, cpus=2) == (1, 2.0)


@pytest.mark.parametrize(("cpus_per_client", "gpus_per_client", "gpus", "flag", "says"), [
    (0, None, 0, "--cpus-per-client", "got 0"),
    (-1, None, 1, "--cpus-per-client", "got -1"),
    (1, -1.0, 1, "--gpus-per-client", "expected a value >= 0, got -1"),
    (1, float("nan"), 1, "--gpus-per-client", "got nan"),
    (1, 0.5, 0, "--gpus-per-client 0.5", "no GPU visible here"),
    (1, 1.5, 2, "--gpus-per-client 1.5", "whole number"),
    (1, 2.0, 1, "--gpus-per-client 2", "more than the 1 GPU(s)"),
])
def test_client_resources_refusals(cpus_per_client: int, gpus_per_client: float | None,
                                   gpus: int, flag: str, says: str) -> None:
    with pytest.raises(ResourceError) as err:
        client_resources(cpus_per_client, gpus_per_client, gpus=gpus, cpus=4)
    message = str(err.value)
    assert message.startswith(flag) and says in message and "\n" not in message


def test_run_device_against_the_clients_gpus() -> None:
    for device in ("auto", "cpu", "mps"):
        check_client_device(device, 0.0)
    check_client_device("cuda", 0.25)
    check_client_device("cuda:0", 1.0)
    check_client_device("cuda:1", 2.0)
    with pytest.raises(ResourceError, match="--gpus-per-client 0"):
        check_client_device("cuda", 0.0)
    with pytest.raises(ResourceError, match="as cuda:0"):
        check_client_device("cuda:1", 0.5)


def test_ray_environment() -> None:
    assert ray_environment(0.0) == {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                                    "CUDA_VISIBLE_DEVICES": ""}
    assert ray_environment(0.5) == {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


@pytest.mark.parametrize(("gpus_per_client", "ids", "visible"), [
    (0.0, [], ""),        # 0 GPUs: the launcher's "" stays, whatever Ray's default
    (0.5, ["1"], "1"),    # a GPU share: Ray narrows the actor to its GPU
    (2.0, ["0", "3"], "0,3"),
])
def test_what_a_ray_actor_sees(monkeypatch: pytest.MonkeyPatch, gpus_per_client: float,
                               ids: list[str], visible: str) -> None:
    """Ray's own actor start-up step (ray/_private/utils.py, set_visible_accelerator_ids) on
    the launcher's environment, for an actor that Ray assigned ``ids``."""
    import ray
    import ray._private.utils as ray_utils

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for key, value in ray_environment(gpus_per_client).items():
        monkeypatch.setenv(key, value)

    class Context:
        def get_accelerator_ids(self) -> dict[str, list[str]]:
            return {"GPU": ids}

    monkeypatch.setattr(ray, "get_runtime_context", Context)
    ray_utils.set_visible_accelerator_ids()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == visible


def test_bad_flags_are_one_line_and_exit_2_before_flower() -> None:
    cases = [(["--gpus-per-client", "-1"], "error: --gpus-per-client: expected a value >= 0"),
             (["--cpus-per-client", "0"], "error: --cpus-per-client: expected an integer >= 1")]
    if not torch.cuda.is_available():
        cases.append((["--gpus-per-client", "0.5"], "error: --gpus-per-client 0.5: no GPU"))
    procs = [subprocess.Popen([sys.executable, "-m", "hfz_app.launch", "--preset", "tiny", *argv],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, _ in cases]  # in parallel: each is mostly the launcher's imports
    for proc, (argv, start) in zip(procs, cases, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (argv, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), (argv, err)
        assert out == "", (argv, out)  # nothing else ran: no plan, no "flwr run:"
