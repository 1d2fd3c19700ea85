"""XRAI equals the `saliency` package's ``XRAI`` (0.2.1, algorithm "full") given the same base attribution and the
same image: the reference segments the image itself (we also check our Felzenszwalb masks equal its masks, so the
segments are the same), and gets our base map repeated over 3 channels (its max-over-channels reduction then
returns our map). Heatmaps agree to max|ours − ref| ≤ 1e-6·max|ref| per pair (observed ~5e-8, the float32 rounding
of our output); the region ranks are identical. Real photos at 64×64 to keep time down; batch of 4, mixed targets.
"""
from __future__ import annotations

import numpy as np
import pytest
import saliency.core.xrai as reference_module
import torch
from saliency.core import XRAI as ReferenceXRAI

from attribution.errors import AttributionError
from attribution.methods.gradients import Saliency
from attribution.methods.xrai import XRAI, segment_masks
from attribution.models import Preprocessing
from tests.tolerances import torch_threads

RTOL = 1e-6
SIZE = 64
NAMES = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    from PIL import Image
    from skimage import data
    prep = Preprocessing(input_size=SIZE, resize_size=SIZE)
    return torch.stack([prep(Image.fromarray(np.asarray(getattr(data, n)()))) for n in NAMES])


def pixels_hwc(spec, images) -> np.ndarray:
    return spec.preprocessing.denormalise(images.double()).permute(0, 2, 3, 1).numpy()


def reference(pixels: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference heatmap and flattened segment ranks for one image [H, W, C] and one base map [H, W]."""
    params = reference_module.XRAIParameters(return_xrai_segments=True)
    out = ReferenceXRAI().GetMaskWithDetails(pixels, None, base_attribution=np.repeat(base[..., None], 3, -1),
                                             extra_parameters=params)
    return out.attribution_mask, out.segments


def assert_matches(ours: torch.Tensor, ranks: torch.Tensor, pixels: np.ndarray, base: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    for i in range(ours.shape[0]):
        for j in range(ours.shape[1]):
            ref, ref_ranks = reference(pixels[i], base[i, j].double().numpy())
            err = np.abs(ours[i, j].double().numpy() - ref).max() / np.abs(ref).max()
            assert err <= RTOL, f"pair ({i}, {j}): relative difference {err}"
            assert np.array_equal(ranks[i, j].numpy(), ref_ranks)


def test_segments_equal_reference(resnet18, images):
    pixels = pixels_hwc(resnet18, images)
    for i in (0, 2):
        ours, ref = segment_masks(pixels[i]), reference_module._get_segments_felzenszwalb(pixels[i])
        assert len(ours) == len(ref) and all(np.array_equal(a, b) for a, b in zip(ours, ref))


def test_default_ig_base_equals_reference(resnet18, images):
    from attribution.methods.integrated import IntegratedGradients

    targets = torch.tensor([[1, 5], [7, 7], [100, 3], [999, 0]])
    result = XRAI(resnet18).attribute(images, targets, base_options={"steps": 4}, return_ranks=True)
    assert result.maps.shape == (4, 2, SIZE, SIZE)
    base = IntegratedGradients(resnet18).attribute(images, targets, steps=4).maps
    assert_matches(result.maps, result.extras["ranks"], pixels_hwc(resnet18, images), base)


def test_saliency_base_equals_reference(resnet18, images):
    targets = torch.tensor([[1, 5], [7, 7], [100, 3], [999, 0]])
    result = XRAI(resnet18).attribute(images, targets, base="saliency", return_ranks=True)
    base = Saliency(resnet18).attribute(images, targets).maps
    assert_matches(result.maps, result.extras["ranks"], pixels_hwc(resnet18, images), base)


def test_named_base_with_options_and_given_attributions(vgg11_bn, images):
    targets = torch.tensor([3, 250, 0, 998])
    # a signed base method by name, T squeezed
    named = XRAI(vgg11_bn).attribute(images, targets, base="gbp", return_ranks=True)
    assert named.maps.shape == (4, SIZE, SIZE)
    from attribution.methods.gradients import GuidedBackprop
    gbp = GuidedBackprop(vgg11_bn).attribute(images, targets[:, None]).maps
    assert_matches(named.maps[:, None], named.extras["ranks"][:, None], pixels_hwc(vgg11_bn, images), gbp)
    # precomputed signed maps, [B, H, W] shared by both targets of an image
    given = torch.randn(4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    two = torch.stack([targets, targets.flip(0)], dim=1)
    out = XRAI(vgg11_bn).attribute(images, two, attributions=given, return_ranks=True)
    assert torch.equal(out.maps[:, 0], out.maps[:, 1])
    assert_matches(out.maps[:, :1], out.extras["ranks"][:, :1], pixels_hwc(vgg11_bn, images), given[:, None])
    assert torch.equal(XRAI(vgg11_bn).attribute(images, two, attributions=given).maps, out.maps)  # deterministic


def test_images_on_threads_give_the_one_thread_maps(resnet18, images):
    """The batch's images run on torch's thread count; each image's result is the one-thread result, bit for bit."""
    given = torch.randn(4, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[3, 5], [250, 1], [0, 2], [998, 7]])
    out = {}
    for threads in (1, 3):
        with torch_threads(threads):
            out[threads] = XRAI(resnet18).attribute(images, targets, attributions=given, return_ranks=True)
    assert torch.equal(out[1].maps, out[3].maps) and torch.equal(out[1].extras["ranks"], out[3].extras["ranks"])


def test_bad_options(resnet18, images):
    with pytest.raises(AttributionError, match="attributions must be"):
        XRAI(resnet18).attribute(images, torch.tensor([1, 2, 3, 4]), attributions=torch.zeros(4, 8, 8))
    with pytest.raises(AttributionError, match="no option 'steps'"):
        XRAI(resnet18).attribute(images, torch.tensor([1, 2, 3, 4]), base="gbp", base_options={"steps": 3})
    with pytest.raises(AttributionError, match="xrai itself"):
        XRAI(resnet18).attribute(images, torch.tensor([1, 2, 3, 4]), base="xrai")


def test_constant_image_gives_finite_maps(resnet18):
    """The reference divides by zero when min-max scaling a constant image; we segment it as constant."""
    from attribution.methods.a_fmi import reference_images
    black = reference_images(resnet18, "black", torch.zeros(1, 3, 40, 40)).expand(2, -1, -1, -1).contiguous()
    maps = XRAI(resnet18).attribute(black, torch.tensor([1, 2])).maps
    assert maps.shape == (2, 40, 40) and torch.isfinite(maps).all()
