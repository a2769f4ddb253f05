"""Distribution extractor ``f`` with noise head ``noisy``, and NoisyEmbed (docs/DESIGN.md, "Modules").

The extractor is deliberately cheap: it runs on every input next to the target, and the
prototype measured that the plain MLP + extractor + penalty alone already costs ~1.5x the plain
step. It has no BatchNorm, so it carries no client-local statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cnn_trunk(channels: int, hidden: int) -> tuple[nn.Module, int]:
    """2x2 average pooling, two stride-2 3x3 convs (hidden/8, hidden/4 channels), a 4x4 pooled
    map, Linear(hidden). The embedding describes the input's distribution, not its fine detail;
    pooling first cut the trunk's CPU cost from 2.1 to 0.9 ms (fwd+bwd, 64 x 1x28x28)."""
    c1, c2 = max(hidden // 8, 4), max(hidden // 4, 8)
    trunk = nn.Sequential(
        nn.AvgPool2d(2),
        nn.Conv2d(channels, c1, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(c2 * 16, hidden),
        nn.ReLU(),
    )
    return trunk, hidden


def _mlp_trunk(input_shape: tuple[int, int, int], hidden: int, pool: int = 1
               ) -> tuple[nn.Module, int]:
    """[pool x pool average pooling ->] Flatten -> Linear(in, hidden) -> ReLU (the prototype's
    784-64 extractor; pooled by 2, 196-64: a quarter of its weights to send)."""
    c, h, w = input_shape
    if pool > 1 and min(h, w) < pool:
        raise ValueError(f"model.extractor: 'pooled_mlp' pools {pool}x{pool}, so it needs "
                         f"inputs of at least that size, got {h}x{w}")
    layers = [nn.AvgPool2d(pool)] if pool > 1 else []
    in_features = c * (h // pool) * (w // pool)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU()), hidden


class DistributionExtractor(nn.Module):
    """Trunk on the raw input with a clean head ``f(x)`` and an optional noise head ``noisy(x)``.

    ``kind``: ``cnn`` (2-layer CNN), ``mlp`` (one hidden layer on the flattened input),
    ``pooled_mlp`` (the same after 2x2 average pooling),
    ``auto``: the CNN for images with H, W >= 16, the MLP for flat or small inputs, or
    ``backbone``: no trunk, the heads read features the target already computed (``input_shape``
    is then theirs, ``(1, 1, F)``).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        embed_dim: int,
        hidden: int = 64,
        noise_head: bool = True,
        kind: str = "auto",
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        if kind == "auto":
            kind = "cnn" if min(h, w) >= 16 else "mlp"
        if kind == "cnn":
            self.trunk, feat = _cnn_trunk(c, hidden)
        elif kind == "mlp":
            self.trunk, feat = _mlp_trunk(input_shape, hidden)
        elif kind == "pooled_mlp":
            self.trunk, feat = _mlp_trunk(input_shape, hidden, pool=2)
        elif kind == "backbone":
            self.trunk, feat = nn.Flatten(), math.prod(input_shape)
        else:
            raise ValueError("model.extractor: expected auto, cnn, mlp, pooled_mlp or backbone, "
                             f"got {kind!r}")
        self.kind = kind
        self.clean = nn.Linear(feat, embed_dim)
        self.noise = nn.Linear(feat, embed_dim) if noise_head else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Clean logits [B, d] and noise-scale logits [B, d] (``None`` without a noise head)."""
        z = self.trunk(x)
        return self.clean(z), (self.noise(z) if self.noise is not None else None)


class NoisyEmbed(nn.Module):
    """``e = softmax(f(x) + z * softplus(noisy(x)))``, ``z ~ N(0, I)``.

    Noise is drawn in training mode only, unless ``noise_at_eval``. ``noisy=False`` gives
    ``e = softmax(f(x))``. ``uniform=True`` is the no-conditioning control: ``e = 1/d`` for every
    input and the extractor is not run (its parameters remain, so state dicts keep their keys).
    """

    def __init__(
        self,
        extractor: DistributionExtractor,
        embed_dim: int,
        noisy: bool = True,
        noise_at_eval: bool = False,
        uniform: bool = False,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.embed_dim = embed_dim
        self.noisy = noisy
        self.noise_at_eval = noise_at_eval
        self.uniform = uniform

    def noise_active(self) -> bool:
        return self.noisy and not self.uniform and (self.training or self.noise_at_eval)

    def forward(self, x: Tensor) -> Tensor:
        if self.uniform:
            return x.new_full((x.shape[0], self.embed_dim), 1.0 / self.embed_dim)
        logits, noise_logits = self.extractor(x)
        if self.noise_active() and noise_logits is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(noise_logits)
        return torch.softmax(logits, dim=-1)
