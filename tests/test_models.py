"""Target zoo: output shapes for every net and input size, sizes, registry errors."""

import pytest
import torch
from torch import nn

from hfz_app.models import TARGETS, build_target

SHAPES = [(1, 28, 28), (1, 8, 8), (3, 32, 32)]


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("shape", SHAPES)
def test_output_shape_and_backward(name: str, shape: tuple[int, int, int]) -> None:
    net = build_target(name, shape, 7)
    out = net(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_flat_input_mlp() -> None:
    net = build_target("mlp", (1, 1, 64), 10)
    assert net(torch.randn(3, 64)).shape == (3, 10)


@pytest.mark.parametrize(
    ("name", "shape", "count"),
    [
        ("mlp", (1, 28, 28), 199_210),  # 784-200-200-10, the FL literature's "2NN"
        ("lenet", (1, 28, 28), 61_706),  # LeNet-5 with MNIST's 28 -> 32 padding
        ("resnet20", (3, 32, 32), 269_722),  # He et al.: 0.27M
        ("resnet32", (3, 32, 32), 464_154),  # He et al.: 0.46M
    ],
)
def test_parameter_counts(name: str, shape: tuple[int, int, int], count: int) -> None:
    assert sum(p.numel() for p in build_target(name, shape, 10).parameters()) == count


def test_resnet_structure() -> None:
    net = build_target("resnet20", (3, 32, 32), 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(m.bias is None for m in convs)  # + 1 linear = 20 layers
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 19


def test_zenkenet_layout() -> None:
    net = build_target("zenkenet", (3, 32, 32), 10)
    convs = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 32, 64, 64]
    assert [m.out_features for m in net.modules() if isinstance(m, nn.Linear)] == [512, 10]
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 3


def test_unknown_target_is_one_line() -> None:
    with pytest.raises(ValueError) as err:
        build_target("vgg", (3, 32, 32), 10)
    msg = str(err.value)
    assert "\n" not in msg and "vgg" in msg
    assert all(name in msg for name in TARGETS)
