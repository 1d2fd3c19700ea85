"""Compute precision (attribution.precision, Method.check_precision, --precision): autocast really applied, maps
float32 and close to fp32 where the method allows the precision, refusals in one line, settings restored."""
from __future__ import annotations

import pytest
import torch

from attribution.errors import AttributionError
from attribution.methods import REGISTRY, attribute, get_method
from attribution.methods.precisions import MIN_SPEARMAN, POLICY_TARGETS, allowed_precisions
from attribution.precision import PRECISIONS, compute_precision, current_precision


def test_context_sets_and_restores_flags_and_autocast():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with compute_precision("tf32", "cpu"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert current_precision() == "tf32"
        with compute_precision("bf16", "cpu"):
            assert torch.is_autocast_enabled("cpu") and current_precision() == "bf16"
            assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu") and current_precision() == "tf32"
    with pytest.raises(RuntimeError):
        with compute_precision("fp32", "cpu"):
            assert not torch.backends.cudnn.allow_tf32  # fp32 means no TF32, also for cuDNN
            raise RuntimeError("inside")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert current_precision() == "fp32"
    with pytest.raises(AttributionError, match="unknown precision 'fp8'"):
        with compute_precision("fp8", "cpu"):
            pass


def test_every_method_allows_fp32_and_refuses_in_one_line(lite0, photos):
    x, t = photos[:1], torch.tensor([281])
    for name in REGISTRY:
        allowed = get_method(name).precisions()
        assert allowed[0] == "fp32" and set(allowed) <= set(PRECISIONS)
        for precision in set(PRECISIONS) - set(allowed):
            with pytest.raises(AttributionError, match=f"^{name}: precision '{precision}' is refused: .*; use fp32"):
                attribute(name, lite0, x, t, precision=precision)
    with pytest.raises(AttributionError, match="unknown precision 'half'"):
        attribute("gbp", lite0, x, t, precision="half")


def test_tf32_is_fp32_on_the_cpu(lite0, photos):
    x, t = photos[:2], torch.tensor([281, 967])
    torch.testing.assert_close(attribute("gradcam", lite0, x, t, precision="tf32"), attribute("gradcam", lite0, x, t),
                               rtol=0, atol=0)


@pytest.fixture(scope="module")
def measured_photos(lite0):
    """The 7 sample photos and their box masks, as bench.precision measures the policy on them."""
    from bench.precision import photos
    return photos(lite0)


@pytest.mark.parametrize("name", [n for n in REGISTRY if "bf16" in allowed_precisions(n)
                                  and n in ("gradcam", "a_fmi", "tr_gbp")])
def test_bf16_reproduces_the_policy_measurement(lite0, measured_photos, name):
    """A method that allows bf16 meets the policy's bound on the policy's own protocol (bench.precision: the 7
    photos, the policy's targets); the maps are float32 and not bit-equal to fp32, so autocast really ran."""
    from bench.precision import deviation

    images, masks = measured_photos
    with torch.no_grad():
        top = lite0.module(images).topk(5, dim=1).indices
    targets = top if POLICY_TARGETS["bf16"] == "top5" else top[:, 0]
    fp32 = attribute(name, lite0, images, targets).flatten(0, -3)
    bf16 = attribute(name, lite0, images, targets, precision="bf16").flatten(0, -3)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape and not torch.equal(bf16, fp32)
    row = deviation(fp32, bf16, masks)
    assert row["finite"] and row["spearman_mean"] >= MIN_SPEARMAN, row


def test_nested_methods_inherit_the_precision(lite0, photos, monkeypatch):
    """SmoothGrad's base method runs in the precision SmoothGrad was given (a context, not an option)."""
    seen = []
    gradcam = REGISTRY["gradcam"]
    real = gradcam._attribute

    def spy(self, images, targets, **options):
        seen.append((current_precision(), torch.is_autocast_enabled("cpu")))
        return real(self, images, targets, **options)

    monkeypatch.setattr(gradcam, "_attribute", spy)
    monkeypatch.setitem(__import__("attribution.methods.precisions", fromlist=["MEASURED"]).MEASURED,
                        "smoothgrad", {"bf16": 1.0})
    attribute("smoothgrad", lite0, photos[:1], torch.tensor([281]), base="gradcam", samples=2, precision="bf16")
    assert seen == [("bf16", True)]
