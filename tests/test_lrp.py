"""LRP-ε against zennit 0.5 (``Gradient`` attributor, Epsilon on Convolution/Linear + ``layer_map_base``,
``VGGCanonizer`` / ``ResNetCanonizer``), conservation, and hook hygiene.

Tolerances: in float64 ours equals zennit to ≤ 1e-5 · max|ref| (observed ~3e-8) on ResNet-18 and VGG-11-BN
(random weights, randomised BatchNorm). In float32 both implementations drift from the float64 map by up to ~1%
of max|map| at 224 px (zennit itself ~0.1–0.8%): ε = 1e-6 divides by near-zero pre-activations of a random
network, so rounding differences of ~1e-7 are amplified; the float32 test only checks ≤ 1e-2 at 64 px.

zennit's BatchNorm merge leaves each merged BatchNorm as an identity: zennit 0.5 keeps its eps (x / sqrt(1 + eps),
~5e-6 per BatchNorm, up to ~1e-2 relative in the maps), zennit 1.0 sets eps = 0, which torch 2.11's batch_norm
rejects. The reference therefore runs on bench.reference_adapters.zennit_ready_copy (eps folded into running_var,
eps = 1e-30) under zennit_positive_bn_eps (a merged eps of 0 becomes 1e-30): the same function, merged exactly, with
either zennit on any torch.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
from test_hook_hygiene import assert_untouched, snapshot, tiny_spec
from test_reference_equality import assert_matches
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite, layer_map_base
from zennit.rules import Epsilon
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Convolution, Linear

from attribution import models
from attribution.errors import AttributionError
from attribution.methods.lrp import LRPEpsilon
from bench.reference_adapters import zennit_positive_bn_eps, zennit_ready_copy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SIZE = 64
CANONIZERS = {"resnet18": ResNetCanonizer, "vgg11_bn": VGGCanonizer}
OBSERVED: dict[str, float] = {}


def zennit_lrp(model: nn.Module, name: str, images: torch.Tensor, targets: torch.Tensor,
               epsilon: float = 1e-6) -> torch.Tensor:
    """zennit's LRP-ε relevance at the input, seeded with one-hot × logit, summed over channels."""
    ref = zennit_ready_copy(model)
    composite = LayerMapComposite(
        layer_map=layer_map_base(epsilon) + [(Convolution, Epsilon(epsilon)), (Linear, Epsilon(epsilon))],
        canonizers=[CANONIZERS[name]()])

    def seed(out: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(out).scatter(1, targets[:, None], out.gather(1, targets[:, None]))

    with zennit_positive_bn_eps(), Gradient(ref, composite) as attributor:
        _, relevance = attributor(images.clone(), seed)
    return relevance.sum(dim=1)


def ratio(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def batch(b: int = 3, dtype=torch.float32):
    images = torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7), dtype=dtype)
    return images, torch.tensor([3, 250, 999][:b])


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_lrp_equals_zennit_float64(request, name):
    spec = copy.deepcopy(request.getfixturevalue(name))
    spec.module.double()
    images, targets = batch(dtype=torch.float64)
    ours = LRPEpsilon(spec).attribute(images, targets).maps
    assert ours.dtype == torch.float32 and ours.shape == (3, SIZE, SIZE)
    ref = zennit_lrp(spec.module, name, images, targets)
    OBSERVED[f"lrp/{name}/zennit float64"] = assert_matches(ours, ref, f"lrp/{name}/zennit float64")


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_lrp_float32_close_to_zennit(request, name):
    spec = request.getfixturevalue(name)
    images, targets = batch()
    t0 = time.perf_counter()
    ours = LRPEpsilon(spec).attribute(images, targets).maps
    OBSERVED[f"lrp/{name} seconds (3 images, 64 px, float32)"] = time.perf_counter() - t0
    ref64 = zennit_lrp(copy.deepcopy(spec.module).double(), name, images.double(), targets)
    OBSERVED[f"lrp/{name}/ours f32 vs zennit f64"] = r = ratio(ours, ref64)
    OBSERVED[f"lrp/{name}/zennit f32 vs zennit f64"] = ratio(zennit_lrp(spec.module, name, images, targets), ref64)
    assert r <= 1e-2


@pytest.mark.parametrize("which", ["resnet18", "tinynet"])
def test_conservation_with_zero_biases(request, which):
    """ε → 0 and every (folded) bias zero: the relevance map sums to the target logit (float64)."""
    spec = copy.deepcopy(request.getfixturevalue("resnet18")) if which == "resnet18" else tiny_spec()
    spec.module.double()
    with torch.no_grad():
        for m in spec.module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.bias.zero_()
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
    images, _ = batch(b=2, dtype=torch.float64)
    targets = torch.tensor([[1, 5], [7, 0]])
    maps = LRPEpsilon(spec).attribute(images, targets, epsilon=1e-12).maps
    with torch.no_grad():
        logits = spec.module(images).gather(1, targets)
    torch.testing.assert_close(maps.double().sum(dim=(2, 3)), logits, rtol=1e-5, atol=1e-6)


def test_targets_per_image_equal_single_targets(resnet18):
    images, _ = batch(b=2)
    targets = torch.tensor([[1, 281], [504, 967]])
    both = LRPEpsilon(resnet18).attribute(images, targets).maps
    for t in range(2):
        single = LRPEpsilon(resnet18).attribute(images, targets[:, t]).maps
        torch.testing.assert_close(both[:, t], single, rtol=0, atol=0)


def test_no_trace_on_success_exception_and_bad_target():
    spec = tiny_spec()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    before = snapshot(spec, images)
    maps = LRPEpsilon(spec).attribute(images, torch.tensor([1, 7])).maps
    assert torch.isfinite(maps).all()
    spec.module.head[4].armed = True
    try:
        with pytest.raises(RuntimeError, match="tripwire"):
            LRPEpsilon(spec).attribute(images, torch.tensor([1, 7]))
    finally:
        spec.module.head[4].armed = False
    with pytest.raises(AttributionError, match="out of range"):
        LRPEpsilon(spec).attribute(images, torch.tensor([1, 10]))
    assert_untouched(spec, images, before)


def test_lone_batchnorm_is_refused_and_cleaned_up():
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(1), nn.Linear(4 * 6 * 6, 2))
    spec = models.wrap(net.eval())
    images = torch.randn(1, 3, 8, 8)
    with pytest.raises(AttributionError, match="does not follow"):
        LRPEpsilon(spec).attribute(images, torch.tensor([0]))
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in net.modules())


def test_zennit_merge_is_exact_with_a_positive_eps():
    """The reference's BatchNorm merge (zennit_ready_copy under zennit_positive_bn_eps): the merged BatchNorm keeps a
    positive eps (torch 2.11 rejects 0), the merged copy computes the original function exactly in float64, the patch
    is gone afterwards, and the caller's model is untouched."""
    from zennit.canonizers import MergeBatchNorm, SequentialMergeBatchNorm

    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).double().eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.01, 0.1)
        net[1].eps = 1e-2  # large, so that a merge losing or double-counting eps would show
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expected = net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    original = MergeBatchNorm.__dict__["merge_batch_norm"]
    ref = zennit_ready_copy(net)
    with zennit_positive_bn_eps():
        handles = SequentialMergeBatchNorm().apply(ref)
        try:
            assert 0 < ref[1].eps <= 1e-30 and torch.equal(ref[1].running_var, torch.ones(4, dtype=torch.float64))
            torch.testing.assert_close(ref(x), expected, rtol=1e-12, atol=1e-12)
        finally:
            for handle in handles:
                handle.remove()
    assert MergeBatchNorm.__dict__["merge_batch_norm"] is original
    torch.testing.assert_close(ref(x), expected, rtol=1e-12, atol=1e-12)
    assert net[1].eps == 1e-2 and net[2].inplace and not ref[2].inplace
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_zz_report(capsys):
    with capsys.disabled():
        print("\nLRP observations:")
        for k, v in sorted(OBSERVED.items()):
            print(f"  {v:9.2e}  {k}")
