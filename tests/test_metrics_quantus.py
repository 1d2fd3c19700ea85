"""Cross-checks against Quantus 0.6 where the definitions coincide (and, in comments, where and why they do not).

* EBPG vs ``quantus.AttributionLocalisation``: equal with ``abs=False, positive_attributions=True,
  weighted=False`` (Quantus' ratio adds 1e-9 to the denominator: relative difference ~1e-9/total energy).
  Where they differ: Quantus' default ``abs=True`` counts |map| (negative evidence becomes energy; ours clamps
  negatives to 0, so its default equals ours only on |map|); ``weighted=True`` multiplies by an "area ratio"
  computed as mask pixels / ``x_batch[2:].size`` (the whole batch minus two samples, not one image: a quirk of
  0.6), which has no counterpart in the papers; an all-zero map gives 0 in Quantus (0 / 1e-9) and NaN in ours
  (undefined share).
* MoRF / LeRF / insertion vs ``quantus.PixelFlipping``: equal when Quantus' fill is black in pixel space. Its
  ``perturb_baseline="black"`` is the per-image *minimum* of the input array (for a normalised image: the most
  negative channel value anywhere, applied to all three channels, which is not black), so the model is wrapped
  behind its normalisation and fed pixels in [0, 1] with the fill 0.0; ours runs on normalised images with
  ``black_baseline``. ``features_in_step`` = C·(pixels per step) because Quantus counts each channel value as a
  feature (the three copies of a pixel's map value are adjacent in its ranking, so whole pixels go per step);
  Quantus also asserts that ``features_in_step`` divides H·W, hence 24x24 images (576 = 3·192) and 12 steps;
  its curve starts after the first step (fractions 1/S … 1). LeRF = Quantus on -map. Maps with distinct values
  (Quantus' argsort is not stable, so ties could be ordered differently).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from attribution.metrics.localisation import box_mask, energy_pointing_game
from attribution.metrics.perturbation import (
    black_baseline,
    perturbation_curves,
    pixel_order,
)
from attribution.preprocessing import Preprocessing
from bench.metrics import PixelSpaceModel, quantus_curves

quantus = pytest.importorskip("quantus")


def masks_and_maps(n: int = 5, size: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    boxes = [[[2, 3, 20, 15]], [[0, 0, 5.5, 31.2]], [[10, 10, 30, 30], [0, 0, 4, 4]], [[1, 1, 39, 39]],
             [[20.3, 0, 40, 17.9]]][:n]
    masks = torch.stack([box_mask(b, size, size) for b in boxes])
    maps = torch.randn(n, size, size, generator=g, dtype=torch.float64)
    maps[0, 3:10, 5:15] += 10.0  # some maps concentrated in their box
    return masks, maps


def quantus_localisation(maps: torch.Tensor, masks: torch.Tensor, **options) -> np.ndarray:
    metric = quantus.AttributionLocalisation(disable_warnings=True, **options)
    n, h, w = maps.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metric(model=None, x_batch=np.zeros((n, 3, h, w)), y_batch=np.zeros(n, dtype=int),
                     a_batch=maps[:, None].numpy(), s_batch=masks[:, None].numpy().astype(np.float64))
    return np.asarray(out, dtype=np.float64)


def test_ebpg_equals_quantus_attribution_localisation_on_positive_attributions():
    masks, maps = masks_and_maps()
    ours = energy_pointing_game(maps, masks).numpy()
    ref = quantus_localisation(maps, masks, abs=False, positive_attributions=True, normalise=False, weighted=False)
    np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=0)
    assert ours[0] > 0.5 and ours.std() > 0.05  # not all alike
    # Quantus' default (abs=True, normalise by max) is EBPG of |map|: equal to ours on maps.abs()
    np.testing.assert_allclose(energy_pointing_game(maps.abs(), masks).numpy(), quantus_localisation(maps, masks),
                               rtol=1e-8)
    assert np.abs(ours - quantus_localisation(maps, masks)).max() > 0.01  # ... and different from ours on maps


class TinyNet(nn.Module):
    """A small random CNN on normalised inputs (conv-BN-ReLU, strided conv, pooling, linear head)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Linear(64, 10))
        with torch.no_grad():
            self.body[1].running_mean.uniform_(-0.2, 0.2)
            self.body[1].running_var.uniform_(0.5, 1.5)
            self.body[-1].weight.mul_(8)  # confident enough that the curves move

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def flipping_setup():
    pre = Preprocessing(input_size=24)
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(4, 3, 24, 24, generator=g)
    pixels[:, :, 6:18, 6:18] *= 0.3  # structure the model can react to
    maps = torch.randn(4, 24, 24, generator=g)  # distinct values
    net = TinyNet().eval()
    images = pre.normalise(pixels)
    with torch.no_grad():
        targets = net(images).argmax(dim=1)
    return pre, net, pixels, images, maps, targets


@pytest.mark.parametrize("mode", ["morf", "lerf", "insertion"])
def test_curves_equal_quantus_pixel_flipping(flipping_setup, mode):
    pre, net, pixels, images, maps, targets = flipping_setup
    steps = 12  # 48 pixels per step
    fractions = [i / steps for i in range(1, steps + 1)]
    order = pixel_order(maps, most_relevant_first=(mode != "lerf"))
    ours = perturbation_curves(net, images, order, targets, fractions, baseline=black_baseline(pre),
                               mode="insert" if mode == "insertion" else "remove", chunk_size=24)["prob"]
    ranking = -maps if mode == "lerf" else maps  # Quantus always flips the largest values first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = quantus_curves(PixelSpaceModel(net, pre.mean, pre.std).eval(), pixels.numpy(), ranking.numpy(),
                             targets.numpy(), steps, mode="insert" if mode == "insertion" else "remove")
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=0, atol=2e-6)
    assert np.ptp(ref, axis=1).min() > 1e-3  # the curves really move


def test_quantus_black_is_not_black(flipping_setup):
    """Why the cross-check fills with 0.0 on pixel inputs: Quantus' "black" on normalised images is the per-image
    minimum over all channels, which differs from the per-channel normalised black."""
    pre, net, _, images, maps, targets = flipping_setup
    steps = 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.PixelFlipping(features_in_step=3 * 24 * 24 // steps, abs=False, normalise=False,
                                       perturb_baseline="black", disable_warnings=True)
        q = np.asarray(metric(model=net, x_batch=images.numpy(), y_batch=targets.numpy(),
                              a_batch=maps[:, None].numpy(), softmax=True, channel_first=True))
    ours = perturbation_curves(net, images, pixel_order(maps), targets, [i / steps for i in range(1, steps + 1)],
                               baseline=black_baseline(pre))["prob"].double().numpy()
    assert np.abs(q - ours).max() > 1e-3
    per_image_min = images.flatten(1).min(dim=1).values
    assert not torch.allclose(per_image_min[:, None].expand(4, 3), black_baseline(pre).expand(4, 3))
