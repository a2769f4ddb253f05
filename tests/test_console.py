"""What a run prints: Flower's INFO detail only with --verbose; our lines, warnings and errors
always; one progress line per round with the time elapsed and left."""

from __future__ import annotations

import io
import sys

from hfz_app import console
from hfz_app.config import load_config
from hfz_app.federation.server import clock, progress_line

# Lines as `flwr log --stream` gives them (Flower's coloured level prefix), and ours.
FLOWER_INFO = [
    "\x1b[92mINFO \x1b[0m:      Starting HyperFedZeroStrategy strategy:\n",
    "\x1b[92mINFO \x1b[0m:      \t└──> Aggregated MetricRecord: {'train_loss': 1.49}\n",
    "INFO :      [ROUND 1/20]\n",  # uncoloured, as in a log file
    "Using SuperLink: hfz (127.0.0.1:45491)\n",
    "Successfully installed hyperfedzero to /tmp/x/apps/hyperfedzero.0.1.0.d72b1589.\n",
]
ALWAYS = [
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed\n",
    "\x1b[91mERROR \x1b[0m:     Simulation raised an exception\n",
    "Traceback (most recent call last):\n",
    "[round   1/20] | loss 1.495 | gACC 80.00 | 3.4s | 0:04 elapsed, ~1:16 left\n",
    "run tiny (hyperfedzero, synthetic/mlp), round 2:\n",
]


def test_flower_info_is_dropped_unless_verbose_and_the_rest_is_kept() -> None:
    lines = FLOWER_INFO + ALWAYS
    assert list(console.filtered(lines)) == ALWAYS
    assert list(console.filtered(lines, verbose=True)) == lines


def test_stream_copies_a_commands_output_through_the_filter() -> None:
    script = "import sys; sys.stdout.write(" + repr("".join(FLOWER_INFO + ALWAYS)) + ")"
    out = io.StringIO()
    code = console.stream([sys.executable, "-c", script], env={}, out=out)
    assert code == 0 and out.getvalue() == "".join(ALWAYS)


def test_progress_line_says_time_elapsed_and_left() -> None:
    cfg = load_config("tiny", {"run.rounds": 20})
    row = {"round": 4, "train_loss": 0.5, "gacc": 0.9, "round_time_s": 4.2, "elapsed_s": 30.0}
    line = progress_line(row, cfg)
    assert line.startswith("[round   4/20] | loss 0.500 | gACC 90.00 | 4.2s")
    assert line.endswith("| 0:30 elapsed, ~2:00 left")  # 16 rounds left at 7.5 s each
    assert "left" not in progress_line({"round": 0, "gacc": 0.1, "round_time_s": 0.0,
                                        "elapsed_s": 0.0}, cfg)
    assert (clock(59.6), clock(3725)) == ("1:00", "1:02:05")


def test_curves_show_accuracy_usage_and_the_collapse_diagnostics(tmp_path, monkeypatch) -> None:
    """curves.png: accuracies, embedding usage, and per-sample entropy with the distance
    between held-out clients' mean embeddings (the collapse diagnostics)."""
    import matplotlib.figure

    from hfz_app.outputs import RunOutputs

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: drawn.append(fig))
    outputs = RunOutputs(load_config("tiny"), tmp_path / "run")
    for r in (1, 2):
        outputs.log_round({"round": r, "gacc": 0.5, "zacc_weighted": 0.5, "pacc_weighted": 0.5,
                           "embed_usage_participants": 3.0, "embed_usage_heldout": 2.5,
                           "embed_entropy_participants": 1.0, "embed_entropy_heldout": 1.1,
                           "embed_distance_heldout": 0.2 * r})
    outputs.plot()
    (fig,) = drawn
    labels = [[line.get_label() for line in ax.lines] for ax in fig.axes]
    assert labels[1] == ["participants", "held-out"]
    assert labels[2] == ["mean H(e), participants", "mean H(e), held-out",
                         "distance between held-out clients' mean e"]


def test_metrics_json_keeps_every_round_without_holding_them(tmp_path) -> None:
    """metrics.json is rewritten each round from the previous file (no round's replies kept in
    memory): every round's row and replies are in it, a round without replies adds none, and a
    restored run keeps only the rounds up to its checkpoint and goes on from there."""
    import json

    from hfz_app.outputs import RunOutputs

    cfg = load_config("tiny")
    outputs = RunOutputs(cfg, tmp_path / "run")
    replies = {r: {"participants": [{"partition-id": r, "accuracy": 0.1 * r}], "heldout": []}
               for r in (1, 2, 4)}
    for r in range(5):
        outputs.log_round({"round": r, "gacc": 0.5}, replies.get(r))
    assert not any(isinstance(v, (dict, list, str)) and "participants" in str(v)
                   for k, v in vars(outputs).items() if k != "rows")
    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["round"] for row in payload["rounds"]] == [0, 1, 2, 3, 4]
    assert payload["clients"] == {str(r): c for r, c in replies.items()}

    resumed = RunOutputs(cfg, tmp_path / "run")
    resumed.restore(2)
    resumed.log_round({"round": 3, "gacc": 0.6}, {"participants": [], "heldout": [{"x": 3}]})
    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["round"] for row in payload["rounds"]] == [0, 1, 2, 3]
    assert payload["clients"] == {"1": replies[1], "2": replies[2],
                                  "3": {"participants": [], "heldout": [{"x": 3}]}}
    resumed._write_metrics_json({4: {"a": 4}, 5: {"a": 5}}, keep_previous=True)  # several at once
    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(payload["clients"]) == ["1", "2", "3", "4", "5"]
