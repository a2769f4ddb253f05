"""Feature shift: drawn per client from the configured ranges, fixed per client, vectorised."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hfz_app.config import DataSection, ShiftSection
from hfz_app.data import apply_shift, build_federation, draw_shift
from hfz_app.data.federation import _build_cached
from hfz_app.data.shift import gaussian_blur, rotate

ON = ShiftSection(enabled=True, rotation_deg=30, brightness=0.2, contrast=0.3, blur_sigma=1.0,
                  noise_std=0.1)
SHIFTED = DataSection(dataset="synthetic", num_participants=4, num_heldout=2,
                      min_partition_size=10, shift=ON)


def test_parameters_come_from_the_configured_ranges():
    assert draw_shift(ShiftSection(enabled=False), 0, 0) == {}
    for pid in range(50):
        p = draw_shift(ON, 7, pid)
        assert abs(p["rotation_deg"]) <= 30 and abs(p["brightness"]) <= 0.2
        assert 0.7 <= p["contrast"] <= 1.3 and 0 <= p["blur_sigma"] <= 1
        assert 0 <= p["noise_std"] <= 0.1
    assert draw_shift(ON, 7, 3) == draw_shift(ON, 7, 3)
    assert draw_shift(ON, 7, 3) != draw_shift(ON, 7, 4) != draw_shift(ON, 8, 4)


def test_shift_is_fixed_per_client_and_differs_between_clients():
    federation = build_federation(SHIFTED, 0)
    first = federation.client(1).train_x.clone()
    _build_cached.cache_clear()  # a fresh process would rebuild everything
    again = build_federation(SHIFTED, 0)
    assert again is not federation
    assert torch.equal(again.client(1).train_x, first)  # noise included
    assert again.client(1).shift == federation.shift_params(1)
    params = [again.client(p).shift for p in range(again.num_clients)]
    assert len({tuple(p.values()) for p in params}) == again.num_clients
    assert again.client(4).heldout and again.client(4).shift  # held-out clients are shifted too


def test_shift_changes_pixels_and_stays_in_range():
    unshifted = build_federation(dataclasses.replace(SHIFTED, shift=ShiftSection()), 0)
    shifted = build_federation(SHIFTED, 0)
    assert unshifted.client(0).shift == {}
    a, b = unshifted.client(0).train_x, shifted.client(0).train_x
    assert a.shape == b.shape and not torch.equal(a, b)
    assert b.min() >= 0 and b.max() <= 1


def test_no_parameters_is_the_identity():
    x = torch.rand(4, 1, 8, 8)
    assert apply_shift(x, {}, 0, 0) is x
    neutral = {"rotation_deg": 0.0, "brightness": 0.0, "contrast": 1.0, "blur_sigma": 0.0,
               "noise_std": 0.0}
    assert torch.allclose(apply_shift(x, neutral, 0, 0), x)


def test_rotation_is_counter_clockwise_and_rigid():
    x = torch.rand(3, 2, 6, 6)
    assert torch.allclose(rotate(x, 90), torch.rot90(x, 1, (2, 3)), atol=1e-6)
    bar = torch.zeros(1, 1, 9, 5)
    bar[0, 0, 4, 2:] = 1  # from the centre to the right edge
    assert torch.equal(rotate(bar, 90)[0, 0, 2:5, 2].round(), torch.ones(3))  # now points up


def test_blur_smooths_but_keeps_constant_images():
    flat = torch.full((2, 3, 10, 10), 0.4)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat)
    dot = torch.zeros(1, 1, 15, 15)
    dot[0, 0, 7, 7] = 1
    blurred = gaussian_blur(dot, 1.0)
    assert blurred.max() < 0.2 and torch.isclose(blurred.sum(), torch.tensor(1.0))
    assert torch.allclose(blurred[0, 0], blurred[0, 0].T)


@pytest.mark.parametrize("key, value", [("brightness", 0.1), ("contrast", 1.2)])
def test_brightness_and_contrast(key, value):
    x = torch.rand(5, 1, 6, 6) * 0.5 + 0.25
    params = {"rotation_deg": 0.0, "brightness": 0.0, "contrast": 1.0, "blur_sigma": 0.0,
              "noise_std": 0.0, key: value}
    out = apply_shift(x, params, 0, 0)
    if key == "brightness":
        assert torch.allclose(out, x + 0.1)
    else:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        assert torch.allclose(out - mean, 1.2 * (x - mean), atol=1e-6)


def test_noise_is_seeded_per_client():
    x = torch.full((3, 1, 8, 8), 0.5)
    params = {"rotation_deg": 0.0, "brightness": 0.0, "contrast": 1.0, "blur_sigma": 0.0,
              "noise_std": 0.05}
    a, b = apply_shift(x, params, 0, 1), apply_shift(x, params, 0, 1)
    c = apply_shift(x, params, 0, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.03 < (a - x).std() < 0.07
