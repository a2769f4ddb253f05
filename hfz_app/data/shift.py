"""Intra-domain feature shift, fixed per client: each client sees its own "camera".

A client's parameters (rotation, brightness, contrast, blur, noise level) are drawn once from the
configured ranges with a generator seeded by ``(seed, partition_id)``, and applied once to the
client's whole tensor with batched torch ops, so training loops slice ready-made tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hfz_app.config import ShiftSection

_SHIFT_STREAM = 0x5117  # separates the shift generator from the seed's other uses


def _client_seed(seed: int, partition_id: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, _SHIFT_STREAM, partition_id])


def draw_shift(cfg: ShiftSection, seed: int, partition_id: int) -> dict[str, float]:
    """This client's shift parameters, or {} when the shift is disabled."""
    if not cfg.enabled:
        return {}
    rng = np.random.default_rng(_client_seed(seed, partition_id))
    return {
        "rotation_deg": float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)),
        "brightness": float(rng.uniform(-cfg.brightness, cfg.brightness)),
        "contrast": float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)),
        "blur_sigma": float(rng.uniform(0, cfg.blur_sigma)),
        "noise_std": float(rng.uniform(0, cfg.noise_std)),
    }


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate every image counter-clockwise by ``degrees`` about its centre (bilinear, zero fill).

    One angle for all: the batch is folded into channels, so a single sampling grid serves all.
    """
    if degrees == 0 or x.numel() == 0:
        return x
    n, c, h, w = x.shape
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # affine_grid works in [-1, 1] coordinates: rescale so non-square images rotate rigidly.
    theta = torch.tensor([[[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]]], dtype=x.dtype)
    grid = F.affine_grid(theta, [1, n * c, h, w], align_corners=False)
    out = F.grid_sample(x.reshape(1, n * c, h, w), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.reshape(n, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (kernel radius 3 sigma, edge-replicating padding)."""
    radius = math.ceil(3 * sigma)
    if sigma <= 0 or radius == 0 or x.numel() == 0:
        return x
    n, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    flat = F.pad(x.reshape(n * c, 1, h, w), (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1))
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def apply_shift(x: torch.Tensor, params: dict[str, float], seed: int,
                partition_id: int) -> torch.Tensor:
    """Apply a client's shift to all its images (float in [0, 1]); returns a new tensor.

    Order: rotation, blur, contrast (about each image's mean), brightness, noise, clamp. The noise
    comes from a generator seeded by (seed, partition_id), so it is the same on every call.
    """
    if not params:
        return x
    x = rotate(x, params["rotation_deg"])
    x = gaussian_blur(x, params["blur_sigma"])
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * params["contrast"] + mean + params["brightness"]
    if params["noise_std"] > 0:
        noise_seed = int(_client_seed(seed, partition_id).generate_state(1)[0])
        generator = torch.Generator().manual_seed(noise_seed)
        x = x + params["noise_std"] * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x.clamp_(0.0, 1.0)
