"""RISE: mask statistics, seeded determinism, the exact formula, and a model whose score is a known linear
function of an image region."""
from __future__ import annotations

import torch
from torch import nn

from attribution import models
from attribution.methods.a_fmi import reference_images
from attribution.methods.rise import RISE, rise_masks
from tests.tolerances import sum_atol


class RegionScore(nn.Module):
    """Logit 0 = 5 · mean of the (un-normalised-by-us) input over rows/cols 0..7; logit 1 = the same over the
    bottom-right 8×8 block with weight 1; logit 2 = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        a = x[:, :, :8, :8].mean(dim=(1, 2, 3))
        b = x[:, :, -8:, -8:].mean(dim=(1, 2, 3))
        return torch.stack([5 * a, b, torch.zeros_like(a)], dim=1) * self.scale


def _spec():
    return models.wrap(RegionScore().eval())


def _white(spec, b=2, size=28):
    return spec.preprocessing.normalise(torch.ones(b, 3, size, size))


def test_mask_statistics():
    m = rise_masks(1000, (28, 28), cells=7, p=0.5, seed=3)
    assert m.shape == (1000, 28, 28) and m.dtype == torch.float32
    assert m.min() >= 0 and m.max() <= 1
    assert abs(float(m.mean()) - 0.5) < 0.02
    assert abs(float(rise_masks(1000, (28, 28), p=0.2, seed=3).mean()) - 0.2) < 0.02
    assert torch.equal(m, rise_masks(1000, (28, 28), cells=7, p=0.5, seed=3))
    assert not torch.equal(m, rise_masks(1000, (28, 28), cells=7, p=0.5, seed=4))


def test_exact_formula_with_black_reference():
    spec = _spec()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 1], [1, 2]])
    n, p = 50, 0.5
    ours = RISE(spec).attribute(x, targets, masks=n, p=p, seed=1, batch_size=16, probabilities=False).maps
    masks = rise_masks(n, (28, 28), p=p, seed=1)
    ref = reference_images(spec, "black", x)
    expected = torch.zeros(2, 2, 28, 28)
    for m in masks:
        scores = spec.module(m * x + (1 - m) * ref).detach()
        expected += scores.gather(1, targets)[:, :, None, None] * m
    expected /= n * p
    assert ours.shape == (2, 2, 28, 28) and ours.dtype == torch.float32
    assert torch.allclose(ours, expected, atol=1e-5)


def test_seeded_and_batch_layout():
    spec = _spec()
    x = _white(spec)
    a = RISE(spec).attribute(x, [0, 1], masks=40, seed=7, batch_size=10).maps
    b = RISE(spec).attribute(x, [0, 1], masks=40, seed=7, batch_size=10).maps
    c = RISE(spec).attribute(x, [0, 1], masks=40, seed=8, batch_size=10).maps
    d = RISE(spec).attribute(x, [0, 1], masks=40, seed=7, batch_size=64).maps
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # same masks, other chunking: equal up to summation order — the 40 non-negative mask terms of each pixel
    # and the model's means over 3·8·8 inputs (tests/README.md, rule 2)
    assert torch.allclose(a, d, rtol=0, atol=sum_atol(40 + 3 * 8 * 8, float(a.abs().max())))


def test_region_that_drives_the_score_ranks_highest():
    spec = _spec()
    x = _white(spec, b=1)
    maps = RISE(spec).attribute(x, torch.tensor([[0, 1]]), masks=500, seed=0, probabilities=False).maps[0]
    for t, (rows, cols) in enumerate(((slice(0, 8), slice(0, 8)), (slice(-8, None), slice(-8, None)))):
        inside = torch.zeros(28, 28, dtype=torch.bool)
        inside[rows, cols] = True
        m = maps[t]
        assert inside.view(-1)[m.argmax()]
        assert m[inside].mean() > m[~inside].mean() + 0.1 * m[~inside].abs().mean()


def test_model_untouched(resnet18):
    state = {k: v.clone() for k, v in resnet18.module.state_dict().items()}
    out = RISE(resnet18).attribute(torch.randn(1, 3, 32, 32), [3], masks=8, batch_size=8)
    assert out.maps.shape == (1, 32, 32)
    assert all(torch.equal(v, resnet18.module.state_dict()[k]) for k, v in state.items())
    assert not resnet18.module.training
