"""Extremal perturbations: equal to TorchRay 1.0.0.2 (when installed: ``pip install torchray==1.0.0.2 --no-deps``)
at a reduced number of iterations, batched over images and areas; the mask finds the region that drives a known
score and respects the area constraint; the caller's model is untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attribution import models
from attribution.errors import AttributionError
from attribution.methods.extremal import (
    ExtremalPerturbation,
    SmoothMask,
    blur_pyramid,
    perturb,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_equals_torchray_batched():
    """Two images × two areas in one optimisation == TorchRay run per image, after 40 of its 800 iterations.
    Tolerance 1e-5 (observed: bit-equal; rows of the batch do not interact)."""
    ep = pytest.importorskip("torchray.attribution.extremal_perturbation")
    net = _net()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[1], [2]])
    ours = ExtremalPerturbation(models.wrap(net)).attribute(x, targets, areas=[0.1, 0.2], iterations=40,
                                                             return_masks=True)
    assert ours.maps.shape == (2, 1, 48, 48) and ours.maps.dtype == torch.float32
    assert torch.allclose(ours.maps, ours.extras["masks"].sum(dim=2))
    for b in range(2):
        ref, _ = ep.extremal_perturbation(copy.deepcopy(net), x[b:b + 1], int(targets[b, 0]), areas=[0.1, 0.2],
                                          max_iter=40)
        assert torch.allclose(ours.extras["masks"][b, 0], ref[:, 0], atol=1e-5)


def test_building_blocks_equal_torchray():
    ep = pytest.importorskip("torchray.attribution.extremal_perturbation")
    x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    pyramid = blur_pyramid(x, 8)
    reference = ep.Perturbation(x, num_levels=8)
    assert torch.allclose(pyramid[0], reference.pyramid, atol=1e-6)
    m = torch.rand(3, 1, 40, 40, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(perturb(pyramid, torch.zeros(3, dtype=torch.long), m), reference.apply(m), atol=1e-6)
    ours, theirs = SmoothMask((40, 40), 7, 21.0), ep.MaskGenerator((40, 40), 7, 21)
    p = torch.rand(2, 1, *ours.shape_in, generator=torch.Generator().manual_seed(4))
    for a, b in zip(ours(p), theirs.generate(p)):
        assert torch.allclose(a, b, atol=1e-6)


class _RegionEnergy(nn.Module):
    """Logit 0 = 5 × mean of x² over rows 8..23, cols 24..39 (horizontally centred, so the flip jitter keeps
    it in place): blurring the region lowers the score, blurring elsewhere does nothing."""

    def forward(self, x):
        e = (x[:, :, 8:24, 24:40] ** 2).mean(dim=(1, 2, 3))
        return torch.stack([5 * e, -e], dim=1)


def test_mask_finds_the_region_and_respects_the_area():
    spec = models.wrap(_RegionEnergy().eval())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = ExtremalPerturbation(spec).attribute(x, [0, 0], iterations=300, step=4, sigma=8.0, return_masks=True)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[8:24, 24:40] = True
    far = torch.ones(64, 64, dtype=torch.bool)
    far[:40, 8:56] = False  # farther than the mask's smoothing from the region
    for m in result.maps:
        assert m[inside].mean() > 0.95
        assert m[far].max() < 0.1
    # the regulariser pulls the full mask (with its margin) towards the target area 0.1 (0.13 after 300 steps)
    assert (result.extras["area"] - 0.1).abs().max() < 0.05


def test_model_untouched_and_options(resnet18):
    state = {k: v.clone() for k, v in resnet18.module.state_dict().items()}
    flags = [p.requires_grad for p in resnet18.module.parameters()]
    out = ExtremalPerturbation(resnet18).attribute(torch.randn(1, 3, 32, 32), [3], iterations=2, variant="delete")
    assert out.maps.shape == (1, 32, 32) and (out.maps >= 0).all() and (out.maps <= 1).all()
    assert all(torch.equal(v, resnet18.module.state_dict()[k]) for k, v in state.items())
    assert flags == [p.requires_grad for p in resnet18.module.parameters()]
    for m in resnet18.module.modules():
        assert not m._forward_hooks and not m._backward_hooks
    with pytest.raises(AttributionError):
        ExtremalPerturbation(resnet18).attribute(torch.randn(1, 3, 32, 32), [3], variant="dual")
    with pytest.raises(AttributionError):
        ExtremalPerturbation(resnet18).attribute(torch.randn(1, 3, 32, 32), [3], areas=[1.5])


def test_chunked_rows_equal_one_batch():
    """internal_batch_size chunks the (image, target, area) rows; each chunk runs every iteration: same masks."""
    net = _net()
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[1], [2], [0]])
    method = ExtremalPerturbation(models.wrap(net))
    whole = method.attribute(x, targets, areas=[0.1, 0.2], iterations=20, internal_batch_size=None).maps
    chunked = method.attribute(x, targets, areas=[0.1, 0.2], iterations=20, internal_batch_size=2).maps
    assert torch.allclose(chunked, whole, atol=1e-4)
