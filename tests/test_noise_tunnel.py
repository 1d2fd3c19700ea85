"""SmoothGrad / VarGrad: determinism per seed, noise = 0 limits, any base method, batching, no trace left."""
from __future__ import annotations

import pytest
import torch
from test_hook_hygiene import assert_untouched, snapshot, tiny_spec

from attribution.errors import AttributionError
from attribution.methods.gradients import GuidedBackprop, Saliency
from attribution.methods.integrated import IntegratedGradients
from attribution.methods.noise_tunnel import SmoothGrad, VarGrad
from tests.tolerances import assert_maps_agree, network_atol, sum_atol

SIZE = 64


@pytest.fixture(scope="module")
def spec():
    return tiny_spec()


def data(b: int = 2):
    images = torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    return images, torch.tensor([1, 7, 3][:b])


@pytest.mark.parametrize("cls", [SmoothGrad, VarGrad])
def test_same_seed_bit_identical_other_seed_differs(spec, cls):
    images, targets = data()
    a = cls(spec).attribute(images, targets, samples=6, seed=3).maps
    b = cls(spec).attribute(images, targets, samples=6, seed=3).maps
    c = cls(spec).attribute(images, targets, samples=6, seed=4).maps
    assert a.dtype == torch.float32 and a.shape == (2, SIZE, SIZE)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), "same seed must give bit-identical maps"
    assert not torch.equal(a, c)


def test_resnet18_deterministic_and_batched(resnet18):
    images, targets = data()
    sg = SmoothGrad(resnet18)
    a = sg.attribute(images, targets, samples=4, seed=1, internal_batch_size=None).maps
    b = sg.attribute(images, targets, samples=4, seed=1, internal_batch_size=None).maps
    c = sg.attribute(images, targets, samples=4, seed=1, internal_batch_size=3).maps
    assert torch.equal(a, b)
    # other chunks = other batch compositions: rounding of a forward + backward pass per sample (averaged over
    # the samples), and saliency's ReLU masks / channel max may flip at inputs within rounding of 0
    atol = network_atol(resnet18.module, 1.0, passes=2) * a.abs().amax(dim=(-2, -1))
    assert_maps_agree(c, a, atol, what="chunked smoothgrad")


@pytest.mark.parametrize("base", ["saliency", Saliency, GuidedBackprop])
def test_zero_noise_smoothgrad_is_base_and_vargrad_is_zero(spec, base):
    images, targets = data()
    base_cls = Saliency if base == "saliency" else base
    ref = base_cls(spec).attribute(images, targets).maps
    smooth = SmoothGrad(spec).attribute(images, targets, base=base, samples=5, noise=0.0).maps
    var = VarGrad(spec).attribute(images, targets, base=base, samples=5, noise=0.0).maps
    # 5 equal samples run as one batch of 5·B and averaged vs the base alone: rounding of a forward + backward
    # pass in another batch composition, plus the mean of 5 terms (tests/README.md, rule 2)
    scale = float(ref.abs().max())
    torch.testing.assert_close(smooth, ref, rtol=0,
                               atol=network_atol(spec.module, scale, passes=2) + sum_atol(5, scale))
    assert float(var.abs().max()) <= 1e-10 * float(ref.abs().max()) ** 2 + 1e-30
    assert float(ref.abs().max()) > 0


def test_smoothgrad_is_the_mean_of_base_maps_on_the_same_noise(spec):
    """Re-draw the documented noise by hand: mean / population variance of the base maps."""
    images, targets = data()
    samples, noise, seed = 3, 0.2, 9
    span = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).view(1, 2, 1, 1, 1)
    eps = torch.randn((samples, *images.shape), generator=torch.Generator().manual_seed(seed))
    noisy = images + eps * noise * span
    maps = torch.stack([GuidedBackprop(spec).attribute(noisy[s], targets).maps for s in range(samples)])
    smooth = SmoothGrad(spec).attribute(images, targets, base=GuidedBackprop, samples=samples, noise=noise,
                                        seed=seed).maps
    var = VarGrad(spec).attribute(images, targets, base=GuidedBackprop, samples=samples, noise=noise,
                                  seed=seed).maps
    scale = float(maps.abs().max())
    torch.testing.assert_close(smooth, maps.mean(0), rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(var, maps.var(0, correction=0), rtol=1e-4, atol=1e-6 * scale ** 2)


def test_targets_per_image_base_options_and_no_trace(spec):
    images, _ = data()
    targets = torch.tensor([[1, 2, 3], [9, 0, 1]])
    before = snapshot(spec, images)
    maps = SmoothGrad(spec).attribute(images, targets, base=IntegratedGradients, samples=2,
                                      base_options={"steps": 3}).maps
    assert maps.shape == (2, 3, SIZE, SIZE) and torch.isfinite(maps).all()
    with pytest.raises(AttributionError, match="out of range"):
        VarGrad(spec).attribute(images, torch.tensor([1, 10]), samples=2)
    assert_untouched(spec, images, before)


def test_rejects_bad_options(spec):
    images, targets = data()
    with pytest.raises(AttributionError, match="samples"):
        SmoothGrad(spec).attribute(images, targets, samples=0)
    with pytest.raises(AttributionError, match="noise"):
        SmoothGrad(spec).attribute(images, targets, noise=-1.0)
    with pytest.raises(AttributionError, match="noise tunnel"):
        SmoothGrad(spec).attribute(images, targets, base=VarGrad)
    with pytest.raises(AttributionError, match="no option"):
        SmoothGrad(spec).attribute(images, targets, stdevs=0.1)
