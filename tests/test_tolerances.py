"""The suite's tolerance rule (tests/README.md, tests/tolerances.py) holds what it promises: the robust criterion
for maps through piecewise-linear rules accepts another batch composition and thread count, and fails on the
real bugs it is meant to catch; the rounding bound of a network pass stays far below a real bug's error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.maps import upsample
from attribution.methods import attribute, attribute_with_extras
from tests.tolerances import (assert_maps_agree, gamma, network_atol, pass_length, sum_atol, torch_threads,
                              unit_roundoff)

METHODS = ("gbp", "tr_gbp", "a_fmi")


@pytest.fixture(scope="module")
def two_photos(lite0, photos):
    x = photos[:2]
    with torch.no_grad():
        top = lite0.module(x).topk(5, dim=1).indices
    return x, top


def _atol(spec, maps: np.ndarray) -> np.ndarray:
    """What the pipeline test allows: float16 storage + a forward and a backward pass of rounding, per map."""
    scale = np.abs(maps).max(axis=(-2, -1))
    return scale * (unit_roundoff(torch.float16) + network_atol(spec.module, 1.0, passes=2))


def test_rounding_bounds_follow_dtype_and_size():
    assert unit_roundoff(torch.float32) == 2.0 ** -24 and unit_roundoff(torch.float64) == 2.0 ** -53
    assert gamma(1000) == pytest.approx(1000 * 2.0 ** -24, rel=1e-4)
    assert sum_atol(1000, 3.0) == pytest.approx(2 * 1000 * 2.0 ** -24 * 3.0, rel=1e-4)
    with pytest.raises(ValueError):
        gamma(2 ** 24)
    # a float32 sum of 10^4 terms in two orders stays inside the bound, and the bound is 2·n·u of Σ|x|
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    forward, backward = x.sum(), x.flip(0).cumsum(0)[-1]
    assert abs(float(forward - backward)) <= sum_atol(x.numel(), float(x.abs().sum()))
    assert sum_atol(x.numel(), float(x.abs().sum())) < 2e-3 * float(x.abs().sum())


def test_pass_length_counts_reduction_lengths(resnet18):
    conv1 = 3 * 7 * 7
    assert pass_length(torch.nn.Conv2d(3, 8, 7)) == conv1
    assert pass_length(torch.nn.Conv2d(8, 8, 3, groups=8)) == 9       # depthwise: one input channel per output
    assert pass_length(torch.nn.Linear(512, 10)) == 512
    assert pass_length(resnet18.module) > 512 * 9  # at least layer4's convs


@pytest.mark.parametrize("method", METHODS)
def test_criterion_accepts_another_batch_and_thread_count(lite0, two_photos, method):
    x, top = two_photos
    with torch_threads(2):
        batch = attribute(method, lite0, x, top).numpy()[0]
    with torch_threads(1):
        alone = attribute(method, lite0, x[:1], top[:1]).numpy()[0]
    assert_maps_agree(alone, batch, _atol(lite0, batch), what=method)


@pytest.mark.parametrize("method", METHODS)
def test_criterion_catches_a_wrong_target_and_a_shift(lite0, two_photos, method):
    x, top = two_photos
    maps = attribute(method, lite0, x[:1], top[:1]).numpy()[0]           # [5, H, W]: the top-5 classes
    atol = _atol(lite0, maps)
    with pytest.raises(AssertionError):
        assert_maps_agree(maps[[1, 0, 3, 2, 4]], maps, atol)             # maps of the wrong classes
    with pytest.raises(AssertionError):
        assert_maps_agree(np.roll(maps, 1, axis=-1), maps, atol)         # off by one pixel


def test_criterion_catches_any_dropped_bias_term_of_tr_gbp(lite0, two_photos):
    """Leaving out one term of eq. 9 — any of Lite0's 50 bias reconstructions R_l, or the input term R_0 — fails."""
    x, top = two_photos
    result = attribute_with_extras("tr_gbp", lite0, x[:1], top[:1], return_layers=True)
    maps = result.maps[0].numpy()
    atol = _atol(lite0, maps)
    layers = result.extras["layers"]
    assert len(layers) > 40
    for name, layer in layers.items():
        dropped = maps - upsample(layer[0], maps.shape[-2:]).numpy()
        with pytest.raises(AssertionError):
            assert_maps_agree(dropped, maps, atol, what=name)


def test_criterion_catches_a_wrong_reference_of_a_fmi(lite0, two_photos):
    x, top = two_photos
    black = attribute("a_fmi", lite0, x[:1], top[:1]).numpy()[0]
    white = attribute("a_fmi", lite0, x[:1], top[:1], reference="white").numpy()[0]
    with pytest.raises(AssertionError):
        assert_maps_agree(white, black, _atol(lite0, black))


def test_network_bound_is_far_below_a_wrong_reference(lite0, two_photos):
    """The score difference y_c − ȳ_c to the black reference vs to the white one: the bug moves it by far more
    than the rounding bound that test_a_fmi allows."""
    x, top = two_photos
    deltas = {r: attribute_with_extras("a_fmi", lite0, x, top[:, 0], reference=r,
                                       return_fmi=True).extras["score_delta"]
              for r in ("black", "white")}
    with torch.no_grad():
        scale = float(lite0.module(x).abs().max())
    atol = 2 * network_atol(lite0.module, scale)
    assert float((deltas["black"] - deltas["white"]).abs().max()) > 10 * atol
