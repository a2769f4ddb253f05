"""One script for a machine with a GPU (no internet needed): does the CUDA path work, and what does
it buy?

1. the device tests (``tests/test_devices.py``, ``tests/test_batchnorm.py``) with
   ``HFZ_TEST_DEVICE=cuda``: every method's training, replies, evaluation, AdaBN, export and the
   public API on the GPU, and no host sync per training step;
2. training-step times of MLP, LeNet-5 and ResNet-20, plain target (FedAvg's step) and
   HyperFedZero's recipe, on the CPU and on the GPU, interleaved in the same run (medians), each
   step being what a client's local round runs (the method's loss and parameter groups);
3. a short ResNet-20 ``flwr run`` on the synthetic CIFAR-100 stand-in (``data.synthetic=true``)
   with fractional GPUs per ClientApp, its accuracies and wall time.

It writes ``docs/benchmarks/gpu.md``. ``--device cpu`` is a dry run of the same code on a machine
without a GPU (written to ``outputs/gpu_check_cpu.md``; it checks the script, not a GPU).

    python -m benchmarks.gpu_check                 # on the GPU machine (~5 min)
    python -m benchmarks.gpu_check --quick         # fewer steps and rounds
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.harness import ROOT, machine, run_training, written_by
from hfz_app.config import load_config
from hfz_app.methods import runtime_for
from hfz_app.training import make_optimizer

TARGETS = {"mlp": (1, 28, 28), "lenet": (1, 28, 28), "resnet20": (3, 32, 32)}
DEVICE_TESTS = ("tests/test_devices.py", "tests/test_batchnorm.py")
RECIPE = "hyperfedzero_recipe"


@dataclass
class StepTimer:
    """One (target, method, device) training step, timed in ms per step."""

    label: str
    step: Callable[[], None]
    device: torch.device
    ms: list[float] = field(default_factory=list)

    def time(self, steps: int) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        self.ms.append((time.perf_counter() - start) / steps * 1e3)


def training_step(target: str, method: str, device: torch.device, batch: int,
                  amp: bool = False) -> Callable[[], None]:
    """One step of ``method`` (with the recipe's settings) on ``target``: loss, backward, step."""
    shape = TARGETS[target]
    cfg = load_config(RECIPE, {"model.target": target, "run.method": method, "train.amp": amp})
    runtime = runtime_for(cfg, shape, 10, device)
    model = runtime.build().train()
    optimizer = make_optimizer(runtime.method.param_groups(model), cfg.train)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    from hfz_app.training import autocast

    def step() -> None:
        with autocast(device, amp):
            loss, _ = runtime.method.loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_times(devices: list[torch.device], targets: list[str], batch: int, steps: int,
               repeats: int) -> list[StepTimer]:
    """Every (target, method, device) timer, built, warmed up, then timed interleaved."""
    timers = []
    for target in targets:
        for device in devices:
            variants = [("fedavg", False), ("hyperfedzero", False)]
            if device.type == "cuda":
                variants += [("fedavg", True), ("hyperfedzero", True)]
            for method, amp in variants:
                label = f"{target} {method}{' amp' if amp else ''}"
                timer = StepTimer(label, training_step(target, method, device, batch, amp), device)
                for _ in range(3):  # warm-up: allocator, cuDNN autotuning, lazy init
                    timer.step()
                timers.append(timer)
    for r in range(repeats):
        for timer in timers:
            timer.time(steps)
        print(f"  step times: repeat {r + 1}/{repeats}", flush=True)
    return timers


def device_tests(device: str) -> tuple[int, str]:
    """Run the device tests on ``device``; (exit code, pytest's summary line)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *DEVICE_TESTS], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HFZ_TEST_DEVICE": device}, check=False)
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", proc.stdout, re.MULTILINE)
    if proc.returncode:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    return proc.returncode, found[-1] if found else "no summary (see output above)"


def federated_run(device: str, gpus: float, rounds: int, out: Path) -> tuple[str, str]:
    """A ResNet-20 ``flwr run`` on the synthetic CIFAR-100 stand-in; (result row, launch args)."""
    overrides = {"data.synthetic": True, "run.rounds": rounds, "run.device": device,
                 "run.name": "gpu_check", "run.output_dir": str(out)}
    launch_args = ["--gpus-per-client", str(gpus)] if gpus else []
    run = run_training("cifar100_resnet", overrides, "flwr", launch_args=launch_args,
                       log_path=out / "gpu_check.log", timeout_s=900, echo=True)
    if run.rc or not run.rows:
        return f"| failed (exit {run.rc}; log {out / 'gpu_check.log'}) | | | | |", \
            " ".join(launch_args)
    last = run.rows[-1]
    cells = [f"{100 * float(last[k]):.2f}" for k in ("zacc_weighted", "gacc", "pacc_weighted")]
    return f"| {rounds} | {' | '.join(cells)} | {run.wall_s:.0f} |", " ".join(launch_args)


def render(args, argv: list[str], tests: tuple[int, str], timers: list[StepTimer],
           fed: tuple[str, str] | None) -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines = ["# CUDA check", "", *written_by("gpu_check", argv), f"Machine: {machine()}",
             f"GPU: {gpu}", "",
             "## 1. Device tests", "",
             (f"`HFZ_TEST_DEVICE={args.device} python -m pytest {' '.join(DEVICE_TESTS)}`: "
              f"{tests[1]} (exit {tests[0]})."), "",
             "## 2. Training-step time (ms, median over repeats)", "",
             (f"Batch {args.batch}, {args.steps} steps per repeat, {args.repeats} repeats, "
              f"interleaved. HyperFedZero: the recipe (`{RECIPE}`); `amp`: `train.amp=true` "
              "(bfloat16 autocast). Ratios are to the plain target on the same device, and CPU "
              "over GPU for the same step."), "",
             "| step | device | ms | / plain | CPU / this |", "|---|---|---:|---:|---:|"]
    med = {(t.label, t.device.type): statistics.median(t.ms) for t in timers}
    for timer in timers:
        dev = timer.device.type
        target = timer.label.split()[0]
        amp = " amp" if timer.label.endswith("amp") else ""
        plain = med[(f"{target} fedavg{amp}", dev)]
        cpu = med.get((timer.label.removesuffix(" amp"), "cpu"))
        speedup = f"{cpu / med[(timer.label, dev)]:.1f}x" if cpu and dev != "cpu" else ""
        lines.append(f"| {timer.label} | {dev} | {med[(timer.label, dev)]:.2f} | "
                     f"{med[(timer.label, dev)] / plain:.2f}x | {speedup} |")
    if fed is not None:
        lines += ["", "## 3. `flwr run`: ResNet-20 on the synthetic CIFAR-100 stand-in", "",
                  (f"`cifar100_resnet`, `data.synthetic=true`, `run.device={args.device}`, "
                   f"launcher `{fed[1] or '(no GPU flag)'}`. Accuracies on generated data measure "
                   "only that the run works."), "",
                  "| rounds | zACC | gACC | pACC | wall s |", "|---:|---:|---:|---:|---:|", fed[0]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, repeats and rounds")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--gpus-per-client", type=float, default=0.25)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-flwr", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: torch {torch.__version__} sees no CUDA device here "
              "(--device cpu is a dry run of this script)", file=sys.stderr)
        return 2
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        print(f"error: --targets: unknown {unknown}; expected some of {list(TARGETS)}",
              file=sys.stderr)
        return 2
    args.steps = args.steps or (5 if args.quick else 20)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.rounds = args.rounds or (2 if args.quick else 5)
    gpu = args.device.startswith("cuda")
    out = args.out or (ROOT / ("docs/benchmarks/gpu.md" if gpu else "outputs/gpu_check_cpu.md"))

    tests = (0, "skipped (--skip-tests)") if args.skip_tests else device_tests(args.device)
    print(f"device tests: {tests[1]}", flush=True)
    devices = [torch.device("cpu")] + ([torch.device(args.device)] if gpu else [])
    timers = step_times(devices, targets, args.batch, args.steps, args.repeats)
    fed = None
    if not args.skip_flwr:
        fed = federated_run(args.device, args.gpus_per_client if gpu else 0.0, args.rounds,
                            ROOT / "outputs" / "gpu_check")
    text = render(args, argv, tests, timers, fed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written: {out}")
    return 1 if tests[0] else 0


if __name__ == "__main__":
    sys.exit(main())
