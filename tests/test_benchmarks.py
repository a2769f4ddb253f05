"""The benchmark suite's infrastructure (benchmarks.sweep, benchmarks.report, benchmarks.harness),
without training anything but one tiny in-process run of the harness: the launch command each
cell runs, resume, skipped cells, the report's aggregation, the shared helpers. A stand-in
launcher writes metrics.csv as hfz_app.launch would."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from benchmarks import harness, report, sweep
from hfz_app.config import CONF_DIR, load_config, parse_overrides
from hfz_app.methods import METHODS


def launch_overrides(cmd: list[str]) -> tuple[str, dict]:
    preset = cmd[cmd.index("--preset") + 1]
    pairs = [cmd[i + 1] for i, part in enumerate(cmd) if part == "-c"]
    return preset, parse_overrides(pairs)


def test_command_runs_the_cell_through_launch_with_its_overrides(tmp_path):
    jobs = sweep.plan(["mnist"], [0, 1], rounds=5, extra={"data.train_subsample": 3000})
    assert len(jobs) == 2 * len(sweep.SWEEPS["mnist"].cells)
    assert {c.method for c in sweep.SWEEPS["mnist"].cells} == set(METHODS)  # every method
    assert {"fedavg", "hyperfedzero", "scaffold", "fedamp", "pefll"} <= {
        c.method for c in sweep.SWEEPS["fashion"].cells}
    by_cell = {(j.cell.id, j.seed): j for j in jobs}
    cmd = sweep.command(by_cell["control", 1], tmp_path, torch_threads=1)
    assert cmd[:3] == [sys.executable, "-m", "hfz_app.launch"]
    preset, overrides = launch_overrides(cmd)
    assert preset == "mnist_mlp"
    assert overrides == {
        "run.method": "hyperfedzero", "run.seed": 1, "run.rounds": 5,
        "server.server_momentum": 0.5, "model.embedding": "uniform",
        "data.train_subsample": 3000, "run.name": "mnist--control--s1--r5",
        "run.output_dir": str(tmp_path), "train.torch_threads": 1,
    }
    # FedAvg-family baselines: momentum 0.5, plain embedding key untouched
    _, fedavg = launch_overrides(sweep.command(by_cell["fedavg", 0], tmp_path))
    assert fedavg["run.method"] == "fedavg" and fedavg["server.server_momentum"] == 0.5
    assert "model.embedding" not in fedavg
    # every run has its own folder name and identity; where it writes is not part of it
    assert len({j.name for j in jobs}) == len({j.key for j in jobs}) == len(jobs)
    same = sweep.plan(["mnist"], [0, 1], rounds=5, extra={"data.train_subsample": 3000})
    assert [j.key for j in same] == [j.key for j in jobs]
    other = sweep.plan(["mnist"], [0, 1], rounds=6, extra={"data.train_subsample": 3000})
    assert not {j.key for j in other} & {j.key for j in jobs}
    # filters
    kept = sweep.plan(["mnist"], [0], only_methods=["fedavg", "hyperfedzero"])
    assert [j.cell.id for j in kept] == ["fedavg", "hyperfedzero", "control", "fedavg-em"]
    assert [j.cell.id for j in sweep.plan(["heldout_alpha"], [0], only_cells=["a0.1-*"])] == \
        ["a0.1-fedavg", "a0.1-hyperfedzero", "a0.1-control"]
    variants = sweep.plan(["fashion"], [0], variants={"": {}, "lr01": {"train.lr": 0.01}})
    n = 2 * len(sweep.SWEEPS["fashion"].cells)
    assert len(variants) == n and len({j.name for j in variants}) == n
    assert variants[-1].overrides()["train.lr"] == 0.01


def test_every_sweep_cell_is_a_valid_config():
    for name in sweep.SWEEPS:
        for job in sweep.plan([name], [0]):
            cfg = load_config(job.cell.preset, job.overrides())
            assert cfg.run.method == job.cell.method
    ablation_presets = {c.preset for c in sweep.SWEEPS["ablations"].cells}
    assert {p.stem for p in CONF_DIR.glob("ablation_*.yaml")} < ablation_presets
    assert "control_uniform_embedding" in ablation_presets
    alphas = {load_config(j.cell.preset, j.overrides()).data.alpha_dir_heldout
              for j in sweep.plan(["heldout_alpha"], [0])}
    assert alphas == set(sweep.HELDOUT_ALPHAS)
    scale = load_config("mnist_mlp", sweep.plan(["scale"], [0])[0].overrides())
    assert (scale.data.num_participants, scale.data.num_heldout) == (100, 15)


FAKE_LAUNCH = textwrap.dedent('''
    """Stand-in for hfz_app.launch: metrics.csv from the -c keys, or a failure."""
    import sys
    import tomllib
    from pathlib import Path
    args = sys.argv[1:]
    pairs = [args[i + 1].partition("=") for i, a in enumerate(args) if a == "-c"]
    o = {k: tomllib.loads(f"v = {v}")["v"] for k, _, v in pairs}
    calls = Path(o["run.output_dir"]) / "calls.txt"
    calls.parent.mkdir(parents=True, exist_ok=True)
    with calls.open("a") as f:
        f.write(o["run.name"] + "\\n")
    if o.get("data.dataset") == "folder":
        print("error: folder: /nonexistent-hfz does not exist (data.data_dir)", file=sys.stderr)
        sys.exit(2)
    if o.get("train.lr") == 0.123:
        print("error: boom", file=sys.stderr)
        sys.exit(1)
    run = Path(o["run.output_dir"]) / o["run.name"]
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    z = 0.9 + o["run.seed"] / 100
    (run / "metrics.csv").write_text(
        "round,elapsed_s,round_time_s,gacc,zacc_weighted,zacc_std,pacc_weighted,"
        "bytes_sent_per_client\\n"
        "0,0.1,0.1,0.1,,,,\\n"
        f"1,2.5,2.4,0.8,{z},0.02,0.85,1000000\\n")
    print("run 123 completed in 7 s")
''')


@pytest.fixture
def fake_launch(tmp_path, monkeypatch):
    script = tmp_path / "fake_launch.py"
    script.write_text(FAKE_LAUNCH)
    monkeypatch.setattr(harness, "LAUNCH", [sys.executable, str(script)])
    monkeypatch.setattr(sweep, "git_commit", lambda: "abc1234")
    return tmp_path / "runs"


def test_sweep_records_as_it_goes_and_resume_skips_done_cells(tmp_path, fake_launch):
    results = tmp_path / "results.jsonl"
    jobs = sweep.plan(["digits"], [0, 1], rounds=1, only_methods=["fedavg"])
    assert len(jobs) == 2
    records = list(sweep.run_sweep(jobs, results, fake_launch))
    assert [r["status"] for r in records] == ["ok", "ok"]
    first = records[0]
    assert first["zacc_weighted"] == 0.9 and first["zacc_std"] == 0.02
    assert first["gacc"] == 0.8 and first["round"] == 1 and first["flwr_s"] == 7
    assert first["bytes_sent_per_client"] == 1e6 and first["wall_s"] > 0
    assert not (fake_launch / jobs[0].name / "checkpoints").exists()  # dropped after the run
    assert first["command"].startswith("python ") and "-c run.seed=0" in first["command"]
    assert [r["key"] for r in sweep.read_results(results)] == [j.key for j in jobs]

    # a torn last line (killed sweep) and a failed record for seed 1: resume reruns seed 1 only
    failed = dict(records[1], status="failed", message="killed")
    with results.open("a") as f:
        f.write(json.dumps(failed) + "\n" + '{"key": "torn')
    assert sweep.done_keys(sweep.read_results(results)) == {jobs[0].key}
    calls = fake_launch / "calls.txt"
    calls.unlink()
    again = list(sweep.run_sweep(jobs, results, fake_launch, resume=True))
    assert [(r["seed"], r["status"]) for r in again] == [(1, "ok")]
    assert calls.read_text().split() == [jobs[1].name]
    assert list(sweep.run_sweep(jobs, results, fake_launch, resume=True)) == []

    # the CLI refuses to append to a results file without --resume or --rerun
    cli = ["--sweep", "digits", "--seeds", "0", "--rounds", "1", "--results", str(results),
           "--runs-dir", str(fake_launch), "--only-methods", "fedavg"]
    assert sweep.main(cli) == 2
    assert sweep.main([*cli, "--rerun", "--resume"]) == 2
    # --rerun runs a held cell again (a changed preset); the report keeps its last record
    calls.unlink()
    assert sweep.main([*cli, "--rerun"]) == 0
    assert calls.read_text().split() == [jobs[0].name]
    held = [r for r in report.load([results]) if r["key"] == jobs[0].key]
    last = sweep.read_results(results)[-1]
    assert last["key"] == jobs[0].key and last["status"] == "ok"
    assert len(held) == 1 and {k: v for k, v in held[0].items() if k != "source"} == last


def test_unavailable_data_is_skipped_and_other_failures_fail(tmp_path, fake_launch):
    results = tmp_path / "results.jsonl"
    jobs = sweep.plan(["digits"], [0, 1], rounds=1, only_methods=["fedavg"],
                      extra={"data.dataset": "folder", "data.data_dir": "/nonexistent-hfz"})
    broken = sweep.plan(["digits"], [0], rounds=1, only_methods=["fedavg"],
                        extra={"train.lr": 0.123})
    records = list(sweep.run_sweep(jobs + broken, results, fake_launch))
    assert [r["status"] for r in records] == ["skipped", "skipped", "failed"]
    assert records[0]["message"] == "folder: /nonexistent-hfz does not exist (data.data_dir)"
    assert records[1]["message"] == records[0]["message"]
    # once the data is known missing, its other cells are not launched again
    assert (fake_launch / "calls.txt").read_text().split() == [jobs[0].name, broken[0].name]
    assert records[2]["message"] == "boom" and records[2]["rc"] == 1
    # resume: skipped cells count as done unless retried, failed ones run again
    kept = sweep.read_results(results)
    assert sweep.done_keys(kept) == {jobs[0].key, jobs[1].key}
    assert sweep.done_keys(kept, retry_skipped=True) == set()


def record(cell, seed, status="ok", **metrics):
    job = sweep.Job("mnist", next(c for c in sweep.SWEEPS["mnist"].cells if c.id == cell), seed, 20)
    return {"key": job.key, "sweep": "mnist", "cell": cell, "label": job.cell.label,
            "method": job.cell.method, "seed": seed, "rounds": 20, "variant": "", "extra": {},
            "status": status, "machine": "test box", "commit": "abc", **metrics}


def test_report_aggregates_over_seeds_and_lists_skipped_cells(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [
        record("hyperfedzero", 0, zacc_weighted=0.97, zacc_std=0.01, gacc=0.96,
               pacc_weighted=0.95, bytes_sent_per_client=1.06e6, wall_s=50),
        record("hyperfedzero", 1, zacc_weighted=0.98, zacc_std=0.03, gacc=0.96,
               pacc_weighted=0.97, bytes_sent_per_client=1.06e6, wall_s=70),
        record("fedavg", 0, zacc_weighted=0.96, gacc=0.95, pacc_weighted=0.94, wall_s=20),
        record("fedavg", 1, status="failed", message="killed"),
        record("fedavg", 1, zacc_weighted=0.94, gacc=0.93, pacc_weighted=0.92, wall_s=30),
        record("ditto", 0, status="skipped", message="ditto: no data here"),
        record("pfedme", 0, status="failed", message="boom"),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tabs = report.tables(report.load([path]))
    assert len(tabs) == 1
    table = tabs[0]
    # the sweep's own order, not the file's; the later fedavg seed-1 record replaced the failure
    assert [row.cell for row in table.rows] == ["fedavg", "ditto", "pfedme", "hyperfedzero"]
    hfz, fedavg = table.rows[3], table.rows[0]
    assert hfz.stat("zacc_weighted") == pytest.approx((97.5, 0.5))
    assert hfz.stat("zacc_std") == pytest.approx((2.0, 1.0))
    assert fedavg.stat("zacc_weighted") == pytest.approx((95.0, 1.0))
    assert [r["seed"] for r in fedavg.ok] == [0, 1]
    text = "\n".join(report.table_markdown(table))
    assert "python -m benchmarks.sweep --sweep mnist --seeds 0,1 --rounds 20 " in text
    assert "--only-cells fedavg,ditto,pfedme,hyperfedzero" in text
    assert "| hyperfedzero | `hyperfedzero` | 97.50 +- 0.50 | 2.00 | 96.00 +- 0.00 | " \
           "96.00 +- 1.00 | 2 (0,1) | 1.06 | 60 |" in text
    assert "| fedavg | `fedavg` | 95.00 +- 1.00 | - |" in text
    assert "Skipped (data unavailable here):\n\n- ditto (seeds 0): ditto: no data here" in text
    assert "Failed:\n\n- pfedme (seeds 0): boom" in text
    assert "killed" not in text
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(path), "--out", str(out), "--no-plots"]) == 0
    assert "Machine: test box." in out.read_text()


def test_a_table_filled_by_another_script_shows_that_scripts_command(tmp_path):
    """benchmarks.heldout_alpha fills the heldout_alpha table from checkpoints: the report
    must print its command, not a sweep command that would retrain."""
    path = tmp_path / "h.jsonl"
    rows = [record("hyperfedzero", s, zacc_weighted=0.97, wall_s=1) | {
        "sweep": "heldout_alpha", "cell": "a0.1-hyperfedzero", "x": 0.1,
        "key": f"heldout_alpha/a0.1-hyperfedzero/s{s}",
        "table_command": "python -m benchmarks.heldout_alpha"} for s in (0, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (table,) = report.tables(report.load([path]))
    assert table.command() == "python -m benchmarks.heldout_alpha"
    assert "python -m benchmarks.heldout_alpha" in "\n".join(report.table_markdown(table))


def test_variants_and_accuracy():
    assert harness.parse_variants([]) == {"": {}}
    assert harness.parse_variants([], default="default") == {"default": {}}
    assert harness.parse_variants(["a=", "b=train.lr=0.01,run.seed=3"]) == \
        {"a": {}, "b": {"train.lr": 0.01, "run.seed": 3}}
    with pytest.raises(SystemExit, match="expected NAME=k=v"):
        harness.parse_variants(["nameonly"])
    import torch

    assert harness.accuracy(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([1, 1])) == 0.5
    assert harness.command_line("sweep", ["--sweep", "a b"], quote=True) == \
        "python -m benchmarks.sweep --sweep 'a b'"


def test_run_training_in_this_process_and_in_a_fresh_one(tmp_path):
    """The harness's in-process mode, here and in a fresh process (as flower_overhead runs it):
    the same metrics; a second run of the same name gets its own folder (``name-2``)."""
    overrides = {"run.output_dir": str(tmp_path), "run.name": "t", "run.rounds": 1,
                 "train.torch_threads": 1}
    here = harness.run_training("tiny", overrides)
    fresh = harness.run_training("tiny", overrides, fresh_process=True)
    assert here.output_dir == tmp_path / "t" and fresh.output_dir == tmp_path / "t-2"
    assert fresh.rc == 0 and set(fresh.child) == {"import_s", "run_s"}
    timing = ("elapsed_s", "round_time_s")
    assert len(here.rows) == 2 and [{k: v for k, v in r.items() if k not in timing}
                                    for r in here.rows] == \
        [{k: v for k, v in r.items() if k not in timing} for r in fresh.rows]
    assert harness.run_folder(tmp_path, "t") == tmp_path / "t-2"


def test_gpu_check_refuses_a_missing_gpu_in_one_line_and_times_every_step(capsys):
    """benchmarks.gpu_check's parts on the CPU: a GPU asked for where torch sees none is one line
    and exit 2; the step timers cover the plain target and the recipe and time real steps."""
    import torch

    from benchmarks import gpu_check

    if not torch.cuda.is_available():
        assert gpu_check.main(["--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --device cuda: torch")
    assert gpu_check.main(["--device", "cpu", "--targets", "mlp,vgg"]) == 2
    timers = gpu_check.step_times([torch.device("cpu")], ["mlp"], batch=8, steps=1, repeats=2)
    assert [t.label for t in timers] == ["mlp fedavg", "mlp hyperfedzero"]
    assert all(len(t.ms) == 2 and min(t.ms) > 0 for t in timers)


def test_scale_report_from_fixture_runs(tmp_path, capsys):
    """benchmarks.scale without training: per-round wall times from elapsed_s, RSS peaks by
    round, the growth check (rounds 3-5 against the last 5), the time breakdown from
    timings.csv, the ratio and the met/missed lines; a smoke run says so; bad flags exit 2."""
    import argparse

    from benchmarks import scale

    rounds = 20

    def fixture(method: str, round_s: float, leak_mb: float) -> scale.Result:
        rows = [{"round": str(r), "elapsed_s": str(r * round_s), "bytes_sent": "1e6",
                 "bytes_received": "1e6", "bytes_sent_eval": "5e6", "zacc_weighted": "0.9"}
                for r in range(rounds + 1)]
        timings = [{"round": str(r), "train_s": str(round_s / 2), "evaluate_s": str(round_s / 4),
                    "aggregate_train_s": "0.1", "record_s": "0.2", "gacc_s": "0.05",
                    "client_data_s": "0.2", "client_train_s": str(round_s / 2),
                    "client_eval_s": "0.2"} for r in range(rounds + 1)]
        marks = {r: r * 10.0 + 0.5 for r in range(rounds + 1)}
        samples = [scale.Sample(t, int((500 + leak_mb * (t // 10)) * 2**20),
                                {1: 600 * 2**20, 2: int((610 + leak_mb * (t // 10)) * 2**20)})
                   for t in range(rounds * 10 + 1)]
        return scale.Result(method, 0, 100.0, rows, timings, marks, samples)

    fedavg, hfz = fixture("fedavg", 2.0, 0.0), fixture("hyperfedzero", 2.4, 10.0)
    assert fedavg.wall_per_round()[3] == pytest.approx(2.0) and fedavg.workers() == 2
    peaks = scale.round_peaks(hfz.samples, hfz.marks)
    assert peaks[1][0] == pytest.approx(510) and set(peaks[1][1]) == {1, 2}
    growth = scale.memory_growth(peaks, rounds)
    assert growth["server"] == pytest.approx(150) and growth["client"] == pytest.approx(150)
    assert scale.memory_growth(peaks, 9) is None
    assert scale.after_last_round(hfz.samples, hfz.marks) is None  # no sample after round 20
    late = [*hfz.samples, scale.Sample(rounds * 10 + 5.0, 900 * 2**20, {1: 601 * 2**20})]
    assert scale.after_last_round(late, hfz.marks) == pytest.approx((900, 601))
    parts = scale.breakdown(fedavg)[3]
    assert parts["local training"] == pytest.approx(0.5) and parts["gACC"] == pytest.approx(0.05)
    assert sum(parts.values()) == pytest.approx(2.0)
    args = argparse.Namespace(preset="mnist_mlp", seed=0, participants=1000, heldout=100,
                              rounds=rounds, fraction=0.1, eval_every=1, eval_participants=100,
                              eval_heldout=50, min_partition_size=5, cpus_per_client=1,
                              repeats=1)
    text = scale.report(args, ["--rounds", str(rounds)], [fedavg, hfz], ((1, 1, 1), (2, 2, 2)))
    assert "SMOKE" not in text and "Written by `benchmarks/scale.py`" in text
    assert "HyperFedZero / FedAvg = **1.20x** (target <= 1.3x): **met**" in text
    assert "memory, fedavg: largest growth +0.0 MB" in text and ": met" in text
    assert "memory, hyperfedzero: largest growth +150.0 MB (target <= 32 MB): missed" in text
    assert "| fedavg | 2.00 | 1.00x | 2.0 | 5.0 |" in text
    assert text.count(" | 90.00 |\n") == 2  # the final zACC in percent, as every table
    assert "| after the last round (curves.png, summary, shut-down) | - | - | - | - |" in text
    small = argparse.Namespace(**{**vars(args), "participants": 100, "rounds": 3})
    assert "(SMOKE RUN)" in scale.report(small, [], [fedavg, hfz], ((1, 1, 1), (1, 1, 1)))
    assert scale.main(["--rounds", "0", "--out", str(tmp_path / "x.md")]) == 2
    assert capsys.readouterr().err.strip() == "error: --rounds: expected an integer >= 1, got 0"
    table = scale.processes()
    assert os.getpid() in table and table[os.getpid()][2] > 0
    assert os.getpid() in scale.descendants(table, table[os.getpid()][0])


def test_step_time_recipe_section_times_the_clients_step_and_quotes_into_cost_table(
        tmp_path, monkeypatch):
    """step_time's recipe rows run the method's own step against FedAvg's, print a goal line per
    row and where the time goes; cost_table quotes those rows, not the breakdown."""
    from benchmarks import cost_table, step_time

    out = tmp_path / "step_time.md"
    monkeypatch.setattr(sys, "argv", ["step_time", "--targets", "none", "--recipe-targets",
                                      "mlp", "--repeats", "1", "--steps", "1", "--no-compile",
                                      "--out", str(out)])
    step_time.main()
    text = out.read_text()
    assert "### mlp (`mnist_mlp`)" in text
    rows = ("recipe", "recipe, e uniform (no extractor run)", "recipe, backbone extractor",
            "recipe, CNN extractor", "recipe, pooled MLP extractor")
    for row in ("fedavg", *rows):
        assert f"| {row} |" in text
    assert "| recipe, MLP extractor |" not in text  # the MLP preset's own trunk: the recipe row
    assert text.count("- goal <= 1.25x") == len(rows)
    for part in ("extractor", "hypernetwork", "target forward", "backward", "optimiser step"):
        assert f"| {part} |" in text
    ops = {line.split("|")[1].strip(): int(line.split("|")[6]) for line in text.splitlines()
           if line.startswith(("| fedavg |", "| recipe |"))}
    assert 0 < ops["fedavg"] < ops["recipe"]  # forward, backward and optimiser ops counted
    assert "| part | fedavg | recipe | fedavg ops | recipe ops |" in text
    assert f"dispatches {ops['recipe']} aten operators against FedAvg's {ops['fedavg']}" in text
    quoted = cost_table.step_time_quote(out)
    assert [row.split("|")[1].strip() for row in quoted] == ["fedavg", *rows]


def test_the_sweeps_spelt_out_recipe_is_the_presets_recipe():
    """sweep.RECIPE_HFZ (the recipe's keys for presets whose own default differs) is what the
    presets that extend conf/hyperfedzero_recipe.yaml run: on them it changes nothing."""
    assert (load_config("mnist_mlp", sweep.RECIPE_HFZ).flat()
            == load_config("mnist_mlp").flat())
    assert (load_config("fashion_mnist_lenet_s", sweep.RECIPE_HFZ).flat()
            == load_config("fashion_mnist_lenet_s").flat())


def test_cost_table_times_fedavg_and_hyperfedzero_side_by_side(capsys):
    """The local-round goal's ratio: both methods' rounds on the same client, alternating in one
    process, as medians of each."""
    import json

    from benchmarks import cost_table

    cost_table.interleaved_child({"preset": "tiny", "overrides": {}, "repeats": 2,
                                  "partition": 0})
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("CHILD "))
    medians = json.loads(line.removeprefix("CHILD "))
    assert set(medians) == {"fedavg", "hyperfedzero"} and all(v > 0 for v in medians.values())
