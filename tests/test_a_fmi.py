"""A-FMI: the linear-head identities, the secant rule against Captum's DeepLIFT-rescale, and the references."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attribution import models
from attribution.errors import AttributionError
from attribution.methods import attribute, attribute_with_extras
from tests.tolerances import network_atol, sum_atol


def test_resnet_head_fmi_is_fc_weight_over_positions(resnet18):
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([5, 400, 999])
    result = attribute_with_extras("a_fmi", resnet18, x, targets, return_fmi=True)
    h, w = result.extras["feature_map"].shape[-2:]
    expected = resnet18.module.fc.weight[targets].detach() / (h * w)
    torch.testing.assert_close(result.extras["fmi"], expected, rtol=1e-5, atol=1e-8)


def test_resnet_map_sums_to_score_difference(resnet18):
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([1, 2, 3])
    result = attribute_with_extras("a_fmi", resnet18, x, targets, return_fmi=True)
    black = resnet18.preprocessing.normalise(torch.zeros(1, 3, 96, 96))
    with torch.no_grad():
        scores = resnet18.module(x).gather(1, targets[:, None])[:, 0]
        ref_scores = resnet18.module(black)[0, targets]
    delta = scores - ref_scores
    # Both sides are forward passes in other batch compositions (the method runs images and reference in one
    # batch): each score is within the rounding bound of one pass, so their difference within twice that.
    atol = 2 * network_atol(resnet18.module, float(torch.maximum(scores.abs(), ref_scores.abs()).max()))
    torch.testing.assert_close(result.extras["score_delta"], delta, rtol=0, atol=atol)
    # The map sums to the score difference: + one sum over K·H·W terms of |map| ≤ |fc row|·|A − Ā|.
    feature_map = result.extras["feature_map"]
    map_atol = atol + sum_atol(feature_map[0].numel(), float(feature_map.abs().sum(dim=(1, 2)).max()))
    torch.testing.assert_close(feature_map.sum(dim=(1, 2)), delta, rtol=0, atol=map_atol)
    assert float(delta.abs().min()) > 5 * map_atol  # the worst-case bound stays well below what is compared


class DeepHeadCNN(nn.Module):
    """conv features -> avgpool -> Linear-ReLU-Linear-ReLU-Linear (a VGG-like head where the secant rule matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(6, 16), nn.ReLU(),
                                  nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 7))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def deep_head() -> models.ModelSpec:
    torch.manual_seed(0)
    model = DeepHeadCNN().eval()
    return models.wrap(model, features=model.features, head=model.head)


def test_secant_fmi_equals_captum_deeplift_on_the_head(deep_head):
    """FMI = DeepLIFT-rescale multipliers at A (reference features as baseline), averaged per feature map."""
    from captum.attr import DeepLift

    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 1, 2, 3, 4, 6])
    result = attribute_with_extras("a_fmi", deep_head, x, targets, return_fmi=True)
    black = deep_head.preprocessing.normalise(torch.zeros(1, 3, 12, 12))
    with torch.no_grad():
        feats, ref = deep_head.features(x), deep_head.features(black)
    multipliers = DeepLift(deep_head.head).attribute(
        feats, baselines=ref.expand_as(feats), target=targets,
        custom_attribution_func=lambda mult, inp, base: mult)
    expected = multipliers.mean(dim=(2, 3))
    assert expected.abs().max() > 0
    torch.testing.assert_close(result.extras["fmi"], expected, rtol=1e-5, atol=1e-7)
    # The plain gradient differs: the secant rule is doing something here.
    feats_leaf = feats.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(deep_head.head(feats_leaf).gather(1, targets[:, None]).sum(), feats_leaf)
    assert not torch.allclose(grad.mean(dim=(2, 3)), expected, atol=1e-6)
    # Summation to delta (the rescale rule's completeness) holds through the nonlinear head.
    torch.testing.assert_close(result.extras["feature_map"].sum(dim=(1, 2)), result.extras["score_delta"],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reference", ["black", "white", "random"])
def test_vgg_fmi_equals_captum_deeplift_for_each_reference(vgg11_bn, reference):
    """VGG's head (avgpool + Linear/ReLU/Dropout x3): FMI = DeepLIFT-rescale multipliers averaged per map.

    Completeness of the map does not hold here: the multipliers differ between positions (flatten, not
    global pooling), and A-FMI averages them per feature map, as the paper defines.
    """
    import copy

    from captum.attr import DeepLift

    from attribution.methods.a_fmi import reference_images

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([3, 4])
    result = attribute_with_extras("a_fmi", vgg11_bn, x, targets, reference=reference, return_fmi=True)
    assert result.maps.shape == (2, 224, 224) and torch.isfinite(result.maps).all()
    with torch.no_grad():
        feats = vgg11_bn.features(x)
        ref = vgg11_bn.features(reference_images(vgg11_bn, reference, x))
    head = copy.deepcopy(vgg11_bn.head)
    for m in head.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    multipliers = DeepLift(head).attribute(feats, baselines=ref.expand_as(feats), target=targets,
                                           custom_attribution_func=lambda mult, inp, base: mult)
    expected = multipliers.mean(dim=(2, 3))
    assert result.extras["fmi"].shape == (2, 512)
    torch.testing.assert_close(result.extras["fmi"], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_references_differ_and_random_is_seeded(deep_head):
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([1, 2])
    maps = {r: attribute("a_fmi", deep_head, x, targets, reference=r) for r in ("black", "white")}
    assert not torch.allclose(maps["black"], maps["white"])
    a = attribute("a_fmi", deep_head, x, targets, reference="random", seed=7)
    b = attribute("a_fmi", deep_head, x, targets, reference="random", seed=7)
    c = attribute("a_fmi", deep_head, x, targets, reference="random", seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tensor_reference_equals_named_one(deep_head):
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    white = deep_head.preprocessing.normalise(torch.ones(3, 12, 12))
    targets = torch.tensor([0, 5])
    torch.testing.assert_close(attribute("a_fmi", deep_head, x, targets, reference=white),
                               attribute("a_fmi", deep_head, x, targets, reference="white"))
    per_image = white.expand(2, 3, 12, 12)
    torch.testing.assert_close(attribute("a_fmi", deep_head, x, targets, reference=per_image),
                               attribute("a_fmi", deep_head, x, targets, reference="white"))


def test_needs_a_head(deep_head):
    spec = models.wrap(deep_head.module)
    with pytest.raises(AttributionError, match="features/head split"):
        attribute("a_fmi", spec, torch.randn(1, 3, 12, 12), torch.tensor([0]))


def test_real_lite0_map_points_at_the_cat(lite0, photos):
    """On chelsea the cat fills the centre: the centre quarter of the crop holds clearly more than its area share
    (25 %) of the positive A-FMI mass for the top cat class."""
    maps = attribute("a_fmi", lite0, photos[:1], torch.tensor([281]))[0]
    positive = maps.clamp(min=0)
    centre = positive[56:168, 56:168].sum() / positive.sum()
    assert centre > 0.3
