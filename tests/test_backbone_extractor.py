"""model.extractor=backbone: the embedding read from the target's own head input (no trunk)."""

from __future__ import annotations

import pytest
import torch

from hfz_app.config import ConfigError, load_config
from hfz_app.hyper import HyperFedZeroModel
from hfz_app.models import build_target

SHAPES = {"mlp": (1, 28, 28), "lenet": (1, 28, 28)}


def model(target: str, **extra) -> HyperFedZeroModel:
    overrides = {"model.target": target, "model.extractor": "backbone", **extra}
    cfg = load_config("hyperfedzero_recipe", overrides).model
    torch.manual_seed(0)
    return HyperFedZeroModel(build_target(target, SHAPES[target], 10), SHAPES[target], 10, cfg)


@pytest.mark.parametrize("target", sorted(SHAPES))
def test_the_embedding_reads_the_heads_input_and_trains_the_backbone(target):
    hfz = model(target)
    assert not hasattr(hfz.noisy_embed.extractor.trunk, "weight")  # no trunk of its own
    head = hfz._proxies[-1]
    features = {}
    hook = head.register_forward_pre_hook(lambda _m, args: features.setdefault("h", args[0]))
    x, y = torch.rand(8, *SHAPES[target]), torch.randint(0, 10, (8,))
    hfz.eval()  # no noise: e is a function of the features alone
    out = hfz(x)
    hook.remove()
    expected = torch.softmax(hfz.noisy_embed.extractor.clean(features["h"]), dim=-1)
    torch.testing.assert_close(out.embedding, expected)

    hfz.train()
    loss, _ = hfz.loss(hfz(x), y)
    loss.backward()
    first = next(p for n, p in hfz.target.named_parameters() if not n.startswith(head_name(hfz)))
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert hfz.noisy_embed.extractor.clean.weight.grad.abs().sum() > 0


def head_name(hfz: HyperFedZeroModel) -> str:
    return next(n for n, m in hfz.target.named_modules() if m is hfz._proxies[-1])


def test_the_exported_model_is_what_the_pooled_embedding_generates():
    hfz = model("lenet").eval()
    x = torch.rand(32, *SHAPES["lenet"])
    e = hfz.pooled_embedding(x)
    torch.testing.assert_close(e, hfz.embed(x).mean(0))
    plain = build_target("lenet", SHAPES["lenet"], 10)
    plain.load_state_dict(hfz.generate(e))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), hfz(x, embedding=e).logits)


def test_uniform_control_and_a_generated_backbone_are_handled():
    control = model("mlp", **{"model.embedding": "uniform"})
    assert torch.allclose(control(torch.rand(4, 1, 28, 28)).embedding, torch.full((4, 10), 0.1))
    with pytest.raises(ConfigError, match="^model.extractor: 'backbone' reads the generated head"):
        load_config("hyperfedzero_recipe", {"model.extractor": "backbone",
                                            "model.generate": "all"})
