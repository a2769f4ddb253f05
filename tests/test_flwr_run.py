"""A real `flwr run` in local simulation (own SuperLink, Ray backend) on the tiny preset."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfz_app import console

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_flwr_run_tiny_completes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hfz_app.launch", "--preset", "tiny",
         "-c", f'run.output_dir="{tmp_path}"'],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "completed" in proc.stdout
    # what a person reads: one progress line per round, no Flower INFO detail (--verbose has it)
    lines = proc.stdout.splitlines()
    assert [ln.split("]")[0] for ln in lines if ln.startswith("[round")] == \
        ["[round   0/2", "[round   1/2", "[round   2/2"]
    assert not any(console.LEVEL.match(ln) and "INFO" in ln for ln in lines), proc.stdout
    assert len(lines) <= 30, proc.stdout
    with (tmp_path / "tiny" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert rows[-1]["zacc_weighted"] != ""


def test_staged_app_builds_the_same_fab_as_flower_from_the_project(tmp_path: Path) -> None:
    """The launcher submits a staged copy of the app (no walk over .venv); Flower must build the
    same FAB, byte for byte, from it as from the project directory itself."""
    from flwr.cli.build import build_fab_from_disk

    from hfz_app.launch import APPS, stage_app

    for name, app_dir in APPS.items():
        staged = tmp_path / name
        kept = stage_app(app_dir, staged)
        assert "pyproject.toml" in kept and not any(k.startswith(".venv/") for k in kept)
        assert build_fab_from_disk(staged) == build_fab_from_disk(app_dir), name


def test_bad_override_fails_fast_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hfz_app.launch", "--preset", "tiny", "-c", "train.lr=-1"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: train.lr: expected a value > 0, got -1.0"


def test_dataset_needing_internet_fails_fast_before_flower_starts() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hfz_app.launch", "--preset", "emnist_mlp"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: emnist_letters: needs internet")
    assert "data.dataset=folder" in lines[0]
