"""`python -m hfz_app.export`: one plain personalised model from a checkpoint and unlabelled data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hfz_app import export
from hfz_app.checkpoint import load_checkpoint, save_checkpoint
from hfz_app.data import build_federation
from hfz_app.methods import runtime_for
from hfz_app.models import build_target
from hfz_app.zeroshot.checkpoint_config import checkpoint_config

N = 3  # the tiny preset's participants; partition N is its held-out client


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export")
    code = export.main(["--run", "tiny", "--output-dir", str(trained), "--partition", str(N),
                        "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "export.json").read_text())


def generated_reference(trained: Path) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The held-out client's inputs, the generated model's logits ``model(x, embedding=e)``."""
    ckpt = load_checkpoint(trained / "tiny" / "checkpoints" / "round_0001.pt")
    cfg = checkpoint_config(ckpt.config)
    federation = build_federation(cfg.data, cfg.run.seed)
    x = federation.client(N).test_x
    model = runtime_for(cfg, federation.input_shape, federation.num_classes).frozen(
        ckpt.shared, "checkpoint")
    e = model.pooled_embedding(x)
    with torch.inference_mode():
        return x, model(x, embedding=e).logits, model


def test_export_writes_the_plain_model_and_the_report(trained, exported) -> None:
    out, report = exported
    assert (out / "model.pt").exists() and (out / "model.torchscript.pt").exists()
    assert report["method"] == "hyperfedzero" and report["heldout"] is True
    assert len(report["embedding"]) == 4 and abs(sum(report["embedding"]) - 1) < 1e-5
    assert report["max_abs_logit_diff_vs_generated"] < 1e-5
    # per-sample HyperFedZero on the held-out client is the training app's zACC for it
    training = json.loads((trained / "tiny" / "metrics.json").read_text())
    (client,) = training["clients"]["1"]["heldout"]
    assert report["accuracy_hyperfedzero"] == client["accuracy"]
    assert report["num_samples"] == client["num-examples"]
    assert 0 <= report["accuracy_exported"] <= 1
    assert report["accuracy_generated_pooled"] == report["accuracy_exported"]


def test_state_dict_loads_into_the_bare_target(trained, exported) -> None:
    out, report = exported
    plain = build_target(report["target"], tuple(report["input_shape"]), report["num_classes"])
    plain.load_state_dict(torch.load(out / "model.pt", weights_only=True))  # strict
    x, generated, _ = generated_reference(trained)
    with torch.inference_mode():
        assert torch.allclose(plain.eval()(x), generated, atol=1e-5)


def test_torchscript_runs_with_torch_alone_and_matches_the_generated_model(
        trained, exported, tmp_path: Path) -> None:
    out, _ = exported
    x, generated, _ = generated_reference(trained)
    torch.save(x.clone(), tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(out / 'model.torchscript.pt')!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "with torch.inference_mode():\n"
        f"    torch.save(m(x), {str(tmp_path / 'logits.pt')!r})\n"
        "assert not any(k.startswith('hfz_app') for k in sys.modules), 'hfz_app imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logits = torch.load(tmp_path / "logits.pt")
    assert (logits - generated).abs().max() < 1e-5
    assert torch.equal(logits.argmax(1), generated.argmax(1))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_unlabelled_data_file_gives_a_report_without_accuracy(trained, tmp_path: Path) -> None:
    x, generated, _ = generated_reference(trained)
    np.savez(tmp_path / "client.npz", x=x.numpy())  # float inputs [n, C, H, W], no labels
    ckpt = trained / "tiny" / "checkpoints" / "round_0001.pt"
    code = export.main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "client.npz"),
                        "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report["labels"] is False and "accuracy_exported" not in report
    assert report["num_classes"] == 10 and report["max_abs_logit_diff_vs_generated"] < 1e-5
    scripted = torch.jit.load(str(tmp_path / "out" / "model.torchscript.pt"))
    assert (scripted(x) - generated).abs().max() < 1e-5


def test_uint8_images_with_labels(trained, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x=images, y=rng.integers(0, 10, size=20))
    code = export.main(["--run", "tiny", "--output-dir", str(trained), "--data",
                        str(tmp_path / "c.npz"), "--num-classes", "10", "--out",
                        str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report["input_shape"] == [1, 28, 28]
    assert {"accuracy_exported", "accuracy_hyperfedzero"} <= set(report)


def test_fedavg_checkpoint_is_exported_as_it_is(trained, tmp_path: Path) -> None:
    ckpt = load_checkpoint(trained / "tiny" / "checkpoints" / "round_0001.pt")
    cfg = checkpoint_config(ckpt.config, {"run.method": "fedavg"})
    plain = build_target(cfg.model.target, (1, 28, 28), 10)
    from flwr.app import ArrayRecord

    save_checkpoint(tmp_path / "fedavg.pt", ArrayRecord(plain.state_dict()), cfg.to_dict(), 1)
    code = export.main(["--checkpoint", str(tmp_path / "fedavg.pt"), "--partition", str(N),
                        "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report["method"] == "fedavg" and "embedding" not in report


@pytest.mark.parametrize("case", ["missing", "method", "override", "shape"])
def test_one_line_errors(trained, tmp_path: Path, capsys, case: str) -> None:
    ckpt = trained / "tiny" / "checkpoints" / "round_0001.pt"
    if case == "method":
        payload = load_checkpoint(ckpt)
        payload.config["run"]["method"] = "finetune"  # needs labels on the new client
        from flwr.app import ArrayRecord

        save_checkpoint(tmp_path / "finetune.pt", ArrayRecord(payload.shared), payload.config, 1)
        ckpt = tmp_path / "finetune.pt"
    if case == "shape":
        np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 8, 8), dtype=np.uint8))
    argv = {
        "missing": ["--checkpoint", str(tmp_path / "none.pt"), "--partition", "0"],
        "method": ["--checkpoint", str(ckpt), "--partition", "0"],
        "override": ["--checkpoint", str(ckpt), "--partition", "0", "-c", "model.hidden='8'"],
        "shape": ["--checkpoint", str(ckpt), "--data", str(tmp_path / "c.npz"),
                  "--num-classes", "10"],
    }[case] + ["--out", str(tmp_path / "out")]
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert {"missing": "no file at", "method": "'finetune' is not zero-shot",
            "override": "model.hidden", "shape": "for inputs of shape [3, 8, 8]"}[case] in err
