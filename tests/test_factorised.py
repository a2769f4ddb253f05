"""The factorised forward equals the materialised one to float32 rounding (docs/DESIGN.md)."""

import dataclasses

import pytest
import torch
from torch import nn

from hfz_app.config import ModelSection
from hfz_app.hyper import HyperFedZeroModel, build_model

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _pair(m: HyperFedZeroModel, x: torch.Tensor, embedding=None, grads: bool = False):
    """Outputs (and gradients) of the same model through both paths, same dropout draws."""
    res = []
    for factorised in (True, False):
        m.apply_mode = "factorised" if factorised else "materialised"
        m.zero_grad()
        torch.manual_seed(123)
        out = m(x, embedding=embedding).logits
        if grads:
            out.square().sum().backward()
            res.append(
                (
                    out.detach(),
                    {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None},
                )
            )
        else:
            res.append((out.detach(), {}))
    m.apply_mode = "auto"
    return res


def _perturb_heads(m: HyperFedZeroModel) -> None:
    """Residual models start with zero output layers; give the generated term some weight."""
    torch.manual_seed(7)
    with torch.no_grad():
        for layer in m.hyper.output_layers():
            layer.weight.add_(0.02 * torch.randn_like(layer.weight))
            layer.bias.add_(0.02 * torch.randn_like(layer.bias))


CASES = [
    ("mlp", MNIST, "all"),
    ("lenet", MNIST, "all"),
    ("lenet_s", CIFAR, "all"),
    ("resnet20", CIFAR, "all"),
    ("resnet20", CIFAR, "head"),
]


@pytest.mark.parametrize(("target", "shape", "generate"), CASES)
@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("residual", [False, True])
def test_factorised_equals_materialised(target, shape, generate, granularity, residual) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        ModelSection(),
        target=target,
        generate=generate,
        granularity=granularity,
        residual=residual,
        hidden="32",
    )
    m = build_model(cfg, shape, 10).train()
    if residual:
        _perturb_heads(m)
    x = torch.randn(4, *shape)
    (a, _), (b, _) = _pair(m, x)
    assert _rel(a, b) <= TOL


@pytest.mark.parametrize(("target", "shape"), [("mlp", MNIST), ("lenet", MNIST)])
def test_factorised_gradients_equal(target, shape) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelSection(), target=target, residual=False, hidden="32,16")
    m = build_model(cfg, shape, 10).train()
    (a, ga), (b, gb) = _pair(m, torch.randn(5, *shape), grads=True)
    assert _rel(a, b) <= TOL
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert _rel(ga[name], gb[name]) <= 1e-4, name


@pytest.mark.parametrize(("target", "shape"), [("lenet", MNIST), ("resnet20", CIFAR)])
def test_auto_mixes_paths_and_matches(target, shape) -> None:
    """``factorised: true`` (auto) factorises Linear layers and materialises big convs: exact."""
    torch.manual_seed(0)
    m = build_model(dataclasses.replace(ModelSection(), target=target, residual=False), shape, 10)
    m.train()
    x = torch.randn(4, *shape)
    chosen = {}
    for proxy in m._proxies:
        orig = proxy._factorise_cheaper
        proxy._factorise_cheaper = lambda x, g, p=proxy, o=orig: (
            chosen.setdefault(p.spec.kind, set()).add(o(x, g)) or o(x, g)
        )
    assert m.apply_mode == "auto"
    torch.manual_seed(123)
    auto = m(x).logits.detach()
    assert chosen["linear"] == {True} and False in chosen["conv2d"]
    (_, _), (b, _) = _pair(m, x)
    assert _rel(auto, b) <= TOL


def test_explicit_embeddings_both_paths() -> None:
    torch.manual_seed(0)
    m = build_model(dataclasses.replace(ModelSection(), target="lenet", residual=False), MNIST, 10)
    x = torch.randn(3, *MNIST)
    for e in (torch.softmax(torch.randn(16), -1), torch.softmax(torch.randn(3, 16), -1)):
        (a, _), (b, _) = _pair(m, x, embedding=e)
        assert _rel(a, b) <= TOL


def test_product_sum_contraction_matches() -> None:
    """The torch.compile-friendly contraction (product + sum) is the same function."""
    torch.manual_seed(0)
    m = build_model(dataclasses.replace(ModelSection(), residual=False), MNIST, 10).eval()
    x = torch.randn(6, *MNIST)
    want = m(x).logits
    for proxy in m._proxies:
        proxy.mulsum = True
    assert _rel(m(x).logits, want) <= TOL


class _Odd(nn.Module):
    """Layers the zoo does not exercise: strided/dilated/padded conv with bias, 3-D Linear input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, (3, 2), stride=2, padding=(1, 2), dilation=(1, 2))
        self.mix = nn.Linear(6, 4)
        self.out = nn.Linear(4 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # [B, 5, ., .]
        h = nn.functional.adaptive_avg_pool2d(h, (1, 6)).flatten(1, 2)  # [B, 5, 6]
        return self.out(torch.relu(self.mix(h)).flatten(1))  # Linear on [B, 5, 6]


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("generate", ["all", "conv.bias,mix.weight,out"])
def test_unusual_layers(granularity: str, generate: str) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        ModelSection(), generate=generate, granularity=granularity, residual=False
    )
    m = HyperFedZeroModel(_Odd(), CIFAR, 10, cfg).train()
    (a, ga), (b, gb) = _pair(m, torch.randn(4, *CIFAR), grads=True)
    assert _rel(a, b) <= TOL
    for name in ga:
        assert _rel(ga[name], gb[name]) <= 1e-4, name
