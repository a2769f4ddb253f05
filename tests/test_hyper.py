"""HyperFedZero wrapper, extractor/NoisyEmbed, penalty, hypernetwork init, federation seam."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hfz_app.config import ModelSection, TrainSection
from hfz_app.hyper import (
    FlatChunkedHypernetwork,
    HyperFedZeroModel,
    RowChunkedHypernetwork,
    balance_penalty,
    build_model,
    embed_usage,
    embedding_spread,
    hfz_loss,
    mean_entropy,
    sharpness_penalty,
)
from hfz_app.models import TARGETS, build_target

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


def cfg(**kw) -> ModelSection:
    return dataclasses.replace(ModelSection(), **kw)


def model(target: str = "mlp", shape=MNIST, seed: int = 0, **kw) -> HyperFedZeroModel:
    torch.manual_seed(seed)
    return build_model(cfg(target=target, **kw), shape, 10)


SWITCHES = [
    {},
    {"chunk_layout": "flat", "chunk_size": 512},
    {"granularity": "batch"},
    {"factorised": False},
    {"residual": False},
    {"conditioning": "input"},
    {"embedding": "uniform"},
    {"noisy_embed": False, "generate": "head"},
]


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("shape", [MNIST, CIFAR])
@pytest.mark.parametrize(
    "switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default"
)
def test_output_shapes(name: str, shape, switches: dict) -> None:
    m = model(name, shape, **switches)
    out = m(torch.randn(2, *shape))
    assert out.logits.shape == (2, 10)
    assert out.embedding.shape == (2, 16)
    assert torch.allclose(out.embedding.sum(-1), torch.ones(2))
    loss, parts = m.loss(out, torch.tensor([1, 2]))
    loss.backward()
    assert set(parts) == {"ce", "balance", "sharpness"} and torch.isfinite(loss)


# -- gradients ------------------------------------------------------------------------------------


def _grads_nonzero(m: HyperFedZeroModel) -> dict[str, bool]:
    parts = {
        "extractor trunk": m.noisy_embed.extractor.trunk,
        "clean head": m.noisy_embed.extractor.clean,
        "noise head": m.noisy_embed.extractor.noise,
        "hyper first layer": m.hyper.embed_in,
        "hyper chunk layer": m.hyper.chunk_in,
        "hyper output layers": nn.ModuleList(m.hyper.output_layers()),
    }
    got = {
        k: all(p.grad is not None and p.grad.abs().sum() > 0 for p in v.parameters())
        for k, v in parts.items()
    }
    got["chunk embeddings"] = bool(m.hyper.chunk_embeddings.grad.abs().sum() > 0)
    return got


def _step(m: HyperFedZeroModel, x, y) -> None:
    m.zero_grad()
    loss, _ = m.loss(m(x), y)
    loss.backward()


@pytest.mark.parametrize(
    "kw",
    [
        {"residual": False},
        {"residual": False, "chunk_layout": "flat"},
        {"residual": False, "factorised": False},
    ],
)
def test_gradients_reach_every_part(kw) -> None:
    m = model(hidden="32,32", **kw)
    x, y = torch.randn(8, *MNIST), torch.randint(0, 10, (8,))
    _step(m, x, y)
    assert all(_grads_nonzero(m).values()), _grads_nonzero(m)


def test_gradients_with_residual_after_one_step() -> None:
    """Zero-initialised output layers block gradients to h's inner layers only until they move."""
    m = model(target="lenet")
    x, y = torch.randn(8, *MNIST), torch.randint(0, 10, (8,))
    _step(m, x, y)
    assert all(
        p.grad.abs().sum() > 0 for layer in m.hyper.output_layers() for p in layer.parameters()
    )
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    _step(m, x, y)
    assert all(_grads_nonzero(m).values()), _grads_nonzero(m)


# -- penalty and diagnostics ---------------------------------------------------------------------


def test_penalty_hand_computed() -> None:
    e = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    # u = [0.4, 0.1, 0.1, 0.4], mean 0.25, biased var = 4 * 0.15^2 / 4 = 0.0225 -> 0.0225/0.25
    assert balance_penalty(e).item() == pytest.approx(0.09, abs=1e-6)
    h = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))  # 0.940448...
    assert sharpness_penalty(e).item() == pytest.approx(h, abs=1e-6)
    logits, y = torch.zeros(2, 4), torch.tensor([0, 3])  # CE = ln 4
    total, parts = hfz_loss(logits, y, e, alpha=2.0, beta=0.5)
    assert total.item() == pytest.approx(math.log(4) + 2.0 * 0.09 + 0.5 * h, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert not parts["ce"].requires_grad


def test_penalty_extremes_and_diagnostics() -> None:
    d = 8
    uniform = torch.full((5, d), 1 / d)
    collapsed = F.one_hot(torch.zeros(5, dtype=torch.long), d).float()
    assert balance_penalty(uniform).item() == pytest.approx(0.0, abs=1e-7)
    assert balance_penalty(collapsed).item() == pytest.approx((d - 1) / d, rel=1e-5)
    assert embed_usage(uniform) == pytest.approx(d, rel=1e-5)
    assert embed_usage(collapsed) == pytest.approx(1.0, rel=1e-5)
    assert mean_entropy(uniform) == pytest.approx(math.log(d), rel=1e-5)
    assert mean_entropy(collapsed) == pytest.approx(0.0, abs=1e-6)
    spread = embedding_spread(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert spread["min_pairwise_dist"] == 0.0
    assert spread["mean_pairwise_dist"] == pytest.approx(2 * math.sqrt(2) / 3)


# -- NoisyEmbed ----------------------------------------------------------------------------------


def test_noise_only_in_training() -> None:
    m = model()
    x = torch.randn(4, *MNIST)
    m.train()
    assert not torch.allclose(m.embed(x), m.embed(x))
    m.eval()
    clean, _ = m.noisy_embed.extractor(x)
    assert torch.equal(m.embed(x), m.embed(x))
    assert torch.allclose(m.embed(x), torch.softmax(clean, -1))


def test_noise_at_eval_and_no_noise() -> None:
    x = torch.randn(4, *MNIST)
    m = model(noise_at_eval=True).eval()
    assert not torch.allclose(m.embed(x), m.embed(x))
    m = model(noisy_embed=False).train()
    assert m.noisy_embed.extractor.noise is None
    assert torch.equal(m.embed(x), m.embed(x))


def test_uniform_embedding_is_constant() -> None:
    m = model(embedding="uniform").train()
    out = m(torch.randn(5, *MNIST))
    assert torch.equal(out.embedding, torch.full((5, 16), 1 / 16))
    assert sum(p.numel() for p in m.noisy_embed.parameters()) > 0  # capacity kept


def test_extractor_kind() -> None:
    assert model("mlp").noisy_embed.extractor.kind == "mlp"
    assert model("lenet").noisy_embed.extractor.kind == "cnn"
    assert model("lenet", (1, 8, 8)).noisy_embed.extractor.kind == "mlp"
    assert model("mlp", extractor="cnn").noisy_embed.extractor.kind == "cnn"


def test_pooled_mlp_extractor_reads_the_input_pooled_by_two() -> None:
    """``pooled_mlp``: 2x2 average pooling, then the MLP trunk on 196 features (28x28), so its
    first layer is a quarter of ``mlp``'s; the embedding follows the pooled input only."""
    m = model("lenet", extractor="pooled_mlp").train()
    trunk = m.noisy_embed.extractor.trunk
    assert m.noisy_embed.extractor.kind == "pooled_mlp" and trunk[2].in_features == 14 * 14
    x = torch.rand(4, *MNIST)
    assert m(x).logits.shape == (4, 10)
    m.eval()
    same_pooled = x + torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(14, 14) * 0.1
    assert torch.allclose(m.embed(x), m.embed(same_pooled), atol=1e-6)
    with pytest.raises(ValueError, match="'pooled_mlp' pools 2x2"):
        model("mlp", (1, 1, 784), extractor="pooled_mlp")


# -- granularity and explicit embeddings ---------------------------------------------------------


def test_batch_granularity_uses_one_weight_set() -> None:
    m = model(granularity="batch", residual=False).eval()
    seen = []
    orig = m.hyper.factorised
    m.hyper.factorised = lambda e: seen.append(e.shape) or orig(e)
    x = torch.randn(6, *MNIST)
    logits = m(x).logits
    assert seen == [torch.Size([1, 16])]
    pooled = m.embed(x).mean(0)
    assert torch.allclose(logits, m(x, embedding=pooled).logits, atol=1e-6)
    # one weight set for the batch: sample 0's output depends on the other samples
    x2 = x.clone()
    x2[1:] = torch.randn(5, *MNIST)
    assert not torch.allclose(m(x2).logits[0], logits[0])


def test_sample_granularity_is_per_sample() -> None:
    m = model(residual=False).eval()
    x = torch.randn(6, *MNIST)
    logits = m(x).logits
    x2 = x.clone()
    x2[1:] = torch.randn(5, *MNIST)
    assert torch.allclose(m(x2).logits[0], logits[0], atol=1e-6)
    assert torch.allclose(m(x, embedding=m.embed(x)).logits, logits, atol=1e-6)


def test_explicit_embedding_shapes() -> None:
    m = model().eval()
    x = torch.randn(3, *MNIST)
    e = torch.softmax(torch.randn(16), -1)
    a = m(x, embedding=e)
    b = m(x, embedding=e[None].expand(3, -1).contiguous())
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    assert a.embedding.shape == (3, 16)
    for bad in (torch.rand(15), torch.rand(2, 16), torch.rand(1, 1, 16)):
        with pytest.raises(ValueError, match="embedding"):
            m(x, embedding=bad)


# -- init ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["mlp", "lenet", "resnet20", "zenkenet"])
def test_residual_at_init_equals_plain_target(target: str) -> None:
    shape = CIFAR if target in ("resnet20", "zenkenet") else MNIST
    torch.manual_seed(0)
    plain = build_target(target, shape, 10)
    m = HyperFedZeroModel(plain, shape, 10, cfg(target=target, residual=True))
    x = torch.randn(4, *shape)
    for mode in ("train", "eval"):
        plain.train(mode == "train")
        m.train(mode == "train")
        torch.manual_seed(1)
        want = plain(x)
        torch.manual_seed(1)
        got = m(x).logits
        if target != "zenkenet" or mode == "eval":  # dropout draws differ (extractor noise)
            assert torch.allclose(got, want, atol=1e-6), mode


@pytest.mark.parametrize(
    ("layout", "target"), [("row", "mlp"), ("row", "resnet20"), ("flat", "lenet")]
)
def test_hyperfan_init_matches_target_variance(layout: str, target: str) -> None:
    shape = CIFAR if target == "resnet20" else MNIST
    torch.manual_seed(0)
    plain = build_target(target, shape, 10)
    m = HyperFedZeroModel(
        plain, shape, 10, cfg(residual=False, chunk_layout=layout, chunk_size=300)
    )
    e = torch.softmax(torch.randn(1, 16), -1)
    with torch.no_grad():
        gens = m.hyper.materialise(e)
    own = dict(plain.named_parameters())
    for spec, gen in zip(m.hyper.specs, gens):
        got, want = gen.weight.var().item(), own[f"{spec.name}.weight"].var().item()
        assert 0.5 < got / want < 2.0, (spec.name, got, want)
        assert abs(gen.weight.mean().item()) < 0.5 * want**0.5  # centred


def test_chunk_layout_picks_the_hypernetwork_class() -> None:
    assert isinstance(model().hyper, RowChunkedHypernetwork)
    flat = model(chunk_layout="flat", chunk_size=512).hyper
    assert isinstance(flat, FlatChunkedHypernetwork) and not hasattr(flat, "factorised")
    with pytest.raises(ValueError, match=r"^model\.chunk_layout: expected row or flat, got 'x'$"):
        model(chunk_layout="x")


# -- generate selection --------------------------------------------------------------------------


def test_generate_selection() -> None:
    head = model("resnet20", CIFAR, generate="head")
    assert [s.name for s in head.hyper.specs] == ["linear"]
    all_ = model("resnet20", CIFAR, generate="all")
    assert len(all_.hyper.specs) == 20
    bn = [n for n, _ in all_.named_parameters() if ".bn" in n or n.startswith("target.bn")]
    assert bn  # BatchNorm affine parameters stay ordinary backbone parameters
    some = model("mlp", generate="classifier, features.1.weight", residual=False)
    specs = {s.name: (s.gen_weight, s.gen_bias) for s in some.hyper.specs}
    assert specs == {"features.1": (True, False), "classifier": (True, True)}
    assert "target.features.1.bias" in some.state_dict()
    assert "target.features.1.weight" not in some.state_dict()
    assert [s.name for s in model("mlp", generate="features").hyper.specs] == [
        "features.1",
        "features.3",
    ]
    with pytest.raises(ValueError, match="model.generate"):
        model("mlp", generate="nosuch")
    with pytest.raises(ValueError, match="model.generate"):
        model("resnet20", CIFAR, generate="bn1")


# -- federation seam and export ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["mlp", "resnet20"])
def test_shared_and_personal_keys_partition_state_dict(target: str) -> None:
    m = model(target, CIFAR if target == "resnet20" else MNIST)
    shared, personal = m.shared_keys(), m.personal_keys()
    assert set(shared) | set(personal) == set(m.state_dict())
    assert not set(shared) & set(personal)
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in personal)
    assert (len(personal) > 0) == (target == "resnet20")
    for prefix in ("noisy_embed.extractor.", "hyper.chunk_embeddings", "hyper.heads.", "target."):
        assert any(k.startswith(prefix) for k in shared), prefix


def test_param_groups_cover_parameters_once() -> None:
    m = model()
    train = TrainSection(hyper_output_lr_scale=0.1, extractor_lr_scale=0.5)
    groups = {g["name"]: g for g in m.param_groups(0.2, train)}
    assert groups["hyper_output"]["lr"] == pytest.approx(0.02)
    assert groups["extractor"]["lr"] == pytest.approx(0.1)
    assert groups["base"]["lr"] == pytest.approx(0.2)
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    torch.optim.Adam(m.param_groups(0.01, train))  # accepted by an optimiser as is


GENERATE_CASES = [
    ("mlp", MNIST, {}),
    ("mlp", MNIST, {"residual": False, "chunk_layout": "flat"}),
    ("mlp", MNIST, {"conditioning": "input"}),
    ("lenet", MNIST, {"residual": False}),
    ("resnet20", CIFAR, {"generate": "head"}),
    ("resnet20", CIFAR, {"residual": False}),
]


@pytest.mark.parametrize(("target", "shape", "kw"), GENERATE_CASES)
def test_generate_exports_plain_model(target: str, shape, kw: dict) -> None:
    m = model(target, shape, **kw)
    x = torch.randn(5, *shape)
    m.train()
    m(x)  # move BatchNorm statistics away from their init
    with torch.no_grad():  # make the generated term non-trivial under residual too
        for layer in m.hyper.output_layers() if m.hyper else []:
            layer.weight.add_(0.01 * torch.randn_like(layer.weight))
    m.eval()
    e = m.embed(x).mean(0)
    plain = build_target(target, shape, 10).eval()
    plain.load_state_dict(m.generate(e))  # strict: exactly the bare target's keys
    with torch.no_grad():
        want = m(x, embedding=e).logits
        got = plain(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_parameter_counts_near_target() -> None:
    counts = model(residual=False).parameter_counts()
    assert counts["target_plain"] == 199_210
    assert 0.5 < (counts["extractor"] + counts["hyper"]) / counts["target_plain"] < 1.0


@pytest.mark.parametrize("method_name", ["fedavg", "hyperfedzero"])
def test_training_is_bit_identical_to_single_tensor_sgd_and_reports_weighted_means(
        method_name) -> None:
    """make_optimizer's multi-tensor SGD gives the same weights, bit for bit, as torch's
    single-tensor loop (three parameter groups for the recipe), and train_epochs reports each
    part's sample-weighted mean over the epoch's batches."""
    import copy

    from hfz_app.config import load_config
    from hfz_app.methods import get_method
    from hfz_app.training import make_optimizer, train_epochs

    cfg = load_config("mnist_mlp", {"run.method": method_name})
    method = get_method(method_name)(cfg, (1, 28, 28), 10)
    torch.manual_seed(0)
    base = method.build_model()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(150, 1, 28, 28, generator=gen), torch.randint(0, 10, (150,), generator=gen)
    states, metrics, seen = [], [], []
    for foreach in (True, False):
        model = copy.deepcopy(base)
        groups = method.param_groups(model)
        if foreach:
            opt = make_optimizer(groups, cfg.train)
            assert opt.defaults["foreach"] is True
            assert len(opt.param_groups) == 1  # the recipe's three groups share one lr: merged
        else:
            opt = torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                  foreach=False)
        batches: list[tuple[int, dict[str, float]]] = []

        def loss(m, xb, yb, batches=batches):
            value, parts = method.loss(m, xb, yb)
            batches.append((len(yb), {"train_loss": float(value)}
                            | {k: float(v) for k, v in parts.items()}))
            return value, parts

        torch.manual_seed(1)
        metrics.append(train_epochs(model, loss, x, y, opt, epochs=2, batch_size=64,
                                    generator=torch.Generator().manual_seed(1),
                                    prior_alpha=cfg.train.prior_alpha))
        states.append(model.state_dict())
        seen.append(batches)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert metrics[0] == metrics[1]
    total = sum(n for n, _ in seen[0])
    for key, value in metrics[0].items():
        expected = sum(n * parts[key] for n, parts in seen[0]) / total
        assert value == pytest.approx(expected, rel=1e-6), key


def test_merge_groups_keeps_distinct_settings_apart() -> None:
    from hfz_app.training import merge_groups

    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    merged = merge_groups([{"name": "x", "params": [a], "lr": 0.1},
                           {"name": "y", "params": [b], "lr": 0.2},
                           {"name": "z", "params": [c], "lr": 0.1}])
    assert [(g["name"], g["lr"], [id(p) for p in g["params"]]) for g in merged] == [
        ("x+z", 0.1, [id(a), id(c)]), ("y", 0.2, [id(b)])]


def test_compiled_training_loss_matches_the_eager_one() -> None:
    """model.compile compiles forward, loss and metrics as one graph (and their backward): the
    same loss, parts and gradients as eager up to float rounding (noise off: compiled kernels
    draw their own random numbers)."""
    from hfz_app.config import load_config
    from hfz_app.methods import get_method

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    results = []
    for compiled in (False, True):
        cfg = load_config("mnist_mlp", {"model.compile": compiled, "model.noisy_embed": False})
        method = get_method("hyperfedzero")(cfg, (1, 28, 28), 10)
        torch.manual_seed(0)
        model = method.build_model().train()
        loss, parts = method.loss(model, x, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), {k: float(v) for k, v in parts.items()}, grads))
    (eager_loss, eager_parts, eager_grads), (loss, parts, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert parts == pytest.approx(eager_parts, rel=1e-4)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6)
