"""The recipe levers of issue 12: label-prior batches, pooled (client) embeddings, the label
anchor, the hypernetwork's log input, and the flat layout's residual scale."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hfz_app.config import ModelSection
from hfz_app.hyper import build_model
from hfz_app.hyper.hypernet import FlatChunkedHypernetwork
from hfz_app.training import batch_indices

MNIST = (1, 28, 28)


def test_plain_batches_are_one_permutation() -> None:
    y = torch.randint(0, 10, (200,))
    batches = batch_indices(y, 64, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [64, 64, 64, 8]
    assert sorted(torch.cat(batches).tolist()) == list(range(200))


def test_prior_batches_vary_their_label_mix_within_the_clients_classes() -> None:
    y = torch.tensor([1] * 300 + [4] * 300 + [7] * 300)
    plain = batch_indices(y, 64, torch.Generator().manual_seed(0))
    skewed = batch_indices(y, 64, torch.Generator().manual_seed(0), prior_alpha=1.0)
    assert len(skewed) == len(plain) and all(len(b) == 64 for b in skewed)
    assert set(y[torch.cat(skewed)].tolist()) <= {1, 4, 7}

    def share_of_ones(batches):
        return torch.tensor([float((y[b] == 1).float().mean()) for b in batches[:-1]])

    assert share_of_ones(skewed).std() > 2 * share_of_ones(plain).std()
    again = batch_indices(y, 64, torch.Generator().manual_seed(0), prior_alpha=1.0)
    assert all(torch.equal(a, b) for a, b in zip(skewed, again))  # seeded


def test_log_input_is_the_centred_log_and_both_paths_agree() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelSection(), hidden="16", hyper_input="log")
    model = build_model(cfg, MNIST, 10).eval()  # eval: no NoisyEmbed draw between the two paths
    with torch.no_grad():
        for layer in model.hyper.output_layers():
            layer.weight.add_(0.02 * torch.randn_like(layer.weight))
    e = torch.softmax(torch.randn(3, cfg.embed_dim), -1)
    expected = e.log() - e.log().mean(-1, keepdim=True)
    torch.testing.assert_close(model.hyper.embed_input(e), expected)
    x = torch.randn(3, *MNIST)
    model.apply_mode = "factorised"
    a = model(x).logits
    model.apply_mode = "materialised"
    torch.testing.assert_close(a, model(x).logits, rtol=1e-4, atol=1e-5)


def test_flat_residual_head_generates_unscaled_values() -> None:
    spec_model = build_model(dataclasses.replace(ModelSection(), generate="classifier.bias"),
                             MNIST, 10)
    specs = spec_model.hyper.specs
    residual = FlatChunkedHypernetwork(specs, 10, (8,), chunk_size=10, residual=True)
    scratch = FlatChunkedHypernetwork(specs, 10, (8,), chunk_size=10, residual=False)
    assert torch.equal(residual.scale, torch.ones(10))
    assert float(scratch.scale[0]) == pytest.approx(specs[0].bias_var ** 0.5)


def test_label_anchor_adds_a_cross_entropy_on_e_and_needs_one_dim_per_class() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelSection(), hidden="16", embed_dim=10, anchor="labels")
    model = build_model(cfg, MNIST, 10)
    x, y = torch.rand(8, *MNIST), torch.randint(0, 10, (8,))
    out = model(x)
    total, parts = model.loss(out, y)
    expected = torch.nn.functional.nll_loss(out.embedding.log(), y)
    torch.testing.assert_close(parts["anchor"], expected.detach(), rtol=1e-4, atol=1e-6)
    plain, _ = build_model(dataclasses.replace(cfg, anchor="none"), MNIST, 10).loss(out, y)
    torch.testing.assert_close(total - plain, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="model.embed_dim: anchor 'labels' needs one dimension"):
        build_model(dataclasses.replace(cfg, embed_dim=16), MNIST, 10)


def test_client_granularity_uses_the_embedding_pooled_over_all_inputs() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelSection(), hidden="16", granularity="client")
    model = build_model(cfg, MNIST, 10).eval()
    with torch.no_grad():
        for layer in model.hyper.output_layers():
            layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    x = torch.rand(40, *MNIST)
    pooled = model.embed(x).mean(0)
    predict = model.client_predictor(x)
    with torch.no_grad():
        torch.testing.assert_close(predict(x[:7]), model(x[:7], embedding=pooled).logits)
        # a batch's own pooled embedding differs: the predictor really uses the client's
        assert not torch.allclose(predict(x[:7]), model(x[:7]).logits)
