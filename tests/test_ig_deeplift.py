"""Integrated Gradients and DeepLIFT-rescale against Captum 0.9, plus completeness (Σ map = f(x) − f(x̄)).

References run on deep copies (Captum attaches hooks; its DeepLift needs distinct non-inplace ReLU modules, so
ResNet-18 is compared on ``distinct_relu_copy`` from test_reference_equality). Images are 64×64 to keep the
file fast (torchvision ResNets/VGGs pool adaptively). Tolerance: max|ours − ref| ≤ 1e-5 · max|ref| per batch and
per image (``assert_matches``).

Captum 0.9's DeepLift max-pool rule cannot serve as the reference for max-pooling: (1) when a ReLU feeds the
max-pool (every max-pool of ResNet/VGG) the rule has no effect at all — Captum's map equals the one it gives
with the rule removed, so it is not summation-to-delta (Captum's own convergence delta ~2% of f(x) − f(x̄) on
these networks); (2) its zero-Δ fallback uses ``grad_input[0]``, the first row's gradient broadcast to the
batch (captum#1276); (3) ``max_unpool2d`` overwrites instead of summing overlapping windows (ResNet's 3×3/2
stem pool). So: the rescale rule through the whole ResNet-18/VGG-11-BN is compared with unpatched Captum on
copies whose max-pools are average pools; the max-pool rule is compared with Captum's own rule with (2) and (3)
fixed (:func:`captum_maxpool2d_fixed`) on a net where it applies, and with a hand computation after a ReLU;
completeness is checked on the real ResNet-18/VGG-11-BN.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from captum.attr import DeepLift as CaptumDeepLift
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr._core import deep_lift as captum_deep_lift
from test_hook_hygiene import assert_untouched, snapshot, tiny_spec
from test_reference_equality import OBSERVED, assert_matches, distinct_relu_copy
from torch import nn

from attribution import models
from attribution.errors import AttributionError
from attribution.methods.deeplift import DeepLift
from attribution.methods.integrated import IntegratedGradients

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SIZE = 64
TIMES: dict[str, float] = {}


def black(spec: models.ModelSpec, like: torch.Tensor) -> torch.Tensor:
    return spec.preprocessing.normalise(torch.zeros(1, *like.shape[1:])).expand_as(like).clone()


def batch(seed: int = 7, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return images, torch.tensor([3, 250, 999, 17][:b])


class SmallCNN(nn.Module):
    """Distinct non-inplace ReLUs, two non-overlapping max-pools, BatchNorm, an average pool, 10 classes."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, pool: type[nn.Module] = nn.MaxPool2d) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(), pool(2),
            nn.Conv2d(8, 16, 3, padding=1), act(), pool(2),
            nn.Conv2d(16, 16, 3, padding=1), act(), nn.AdaptiveAvgPool2d(2), nn.Flatten(1),
            nn.Linear(64, 32), act(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def small_spec(**kwargs) -> models.ModelSpec:
    torch.manual_seed(0)
    net = SmallCNN(**kwargs)
    with torch.no_grad():
        bn = net.net[1]
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return models.wrap(net.eval(), name="small")


def captum_maxpool2d_fixed(module, inputs, outputs, grad_input, grad_output, eps=1e-10):
    """Captum's ``deep_lift.maxpool`` for 2-D pooling with its two bugs fixed (see the module docstring)."""
    with torch.no_grad():
        input, input_ref = inputs.chunk(2)
        output, output_ref = outputs.chunk(2)
        delta_in = torch.cat(2 * [input - input_ref])
        delta_out_xmax = torch.max(output, output_ref)
        delta_out = torch.cat([delta_out_xmax - output_ref, output - delta_out_xmax])
        _, indices = F.max_pool2d(module.input, module.kernel_size, module.stride, module.padding,
                                  module.dilation, module.ceil_mode, True)
        values = grad_output * delta_out
        n, c, h, w = module.input.shape
        unpooled = values.new_zeros(n, c, h * w).scatter_add_(2, indices.flatten(2), values.flatten(2))
        delta, ref_delta = unpooled.view(n, c, h, w).chunk(2)
    return torch.where(abs(delta_in) < eps, grad_input, torch.cat(2 * [delta + ref_delta]) / delta_in)


@pytest.fixture
def fixed_captum(monkeypatch):
    monkeypatch.setitem(captum_deep_lift.SUPPORTED_NON_LINEAR, nn.MaxPool2d, captum_maxpool2d_fixed)


def timed(label: str, fn):
    t0 = time.perf_counter()
    out = fn()
    TIMES[label] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------ IG


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_ig_equals_captum(request, name, method):
    spec = request.getfixturevalue(name)
    images, targets = batch()
    ours = timed(f"ig/{name}/{method}", lambda: IntegratedGradients(spec).attribute(
        images, targets, steps=8, method=method, internal_batch_size=10).maps)
    assert ours.dtype == torch.float32 and ours.shape == (3, SIZE, SIZE)
    ref = CaptumIG(copy.deepcopy(spec.module)).attribute(images.clone(), baselines=black(spec, images),
                                                         target=targets, n_steps=8, method=method).sum(dim=1)
    assert_matches(ours, ref, f"ig/{name}/captum {method}")


def test_ig_targets_per_image_and_random_baseline(resnet18):
    """Targets [B, T] equal separate calls; a "random" baseline equals Captum with the same pixels."""
    images, _ = batch(b=2)
    targets = torch.tensor([[1, 281], [504, 967]])
    seed = 5
    ours = IntegratedGradients(resnet18).attribute(images, targets, steps=4, baseline="random", seed=seed,
                                                   internal_batch_size=3).maps
    assert ours.shape == (2, 2, SIZE, SIZE)
    pixels = torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))
    base = resnet18.preprocessing.normalise(pixels).expand_as(images).clone()
    ig = CaptumIG(copy.deepcopy(resnet18.module))
    for t in range(2):
        ref = ig.attribute(images.clone(), baselines=base, target=targets[:, t], n_steps=4).sum(dim=1)
        assert_matches(ours[:, t], ref, "ig/resnet18/captum, targets [B,2], random baseline")


def test_ig_completeness_smooth_network():
    """Σ map = f(x) − f(x̄): Gauss–Legendre on a smooth (Softplus, avg-pool) network converges fast."""
    spec = small_spec(act=nn.Softplus, pool=nn.AvgPool2d)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 4, 9])
    result = IntegratedGradients(spec).attribute(images, targets, steps=16, return_delta=True)
    with torch.no_grad():
        gap = spec.module(images).gather(1, targets[:, None])[:, 0] - spec.module(black(spec, images))[0, targets]
    assert float(gap.abs().min()) > 1e-3
    torch.testing.assert_close(result.maps.sum(dim=(1, 2)), gap, rtol=1e-4, atol=1e-5)
    assert float(result.extras["delta"].abs().max()) <= 1e-4 * float(gap.abs().max()) + 1e-5


def test_ig_chunking_does_not_change_the_result(resnet18):
    images, targets = batch(b=2)
    ig = IntegratedGradients(resnet18)
    a = ig.attribute(images, targets, steps=4, internal_batch_size=None).maps
    b = ig.attribute(images, targets, steps=4, internal_batch_size=3).maps
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))


def test_ig_rejects_bad_options(resnet18):
    images, targets = batch(b=1)
    with pytest.raises(AttributionError, match="unknown method"):
        IntegratedGradients(resnet18).attribute(images, targets, method="simpson")
    with pytest.raises(AttributionError, match="steps"):
        IntegratedGradients(resnet18).attribute(images, targets, steps=0)
    with pytest.raises(AttributionError, match="internal_batch_size"):
        IntegratedGradients(resnet18).attribute(images, targets, internal_batch_size=0)
    with pytest.raises(AttributionError, match="no option"):
        IntegratedGradients(resnet18).attribute(images, targets, n_steps=3)


# ------------------------------------------------------------------------------------------------ DeepLIFT


def avgpool_copy(model: nn.Module) -> nn.Module:
    """Deep copy with every MaxPool2d replaced by an AvgPool2d of the same geometry (ReLUs untouched)."""
    copied = copy.deepcopy(model)
    for parent in list(copied.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    return copied.eval()


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_deeplift_rescale_equals_captum(request, name):
    """The rescale rule at every ReLU call site through the whole ResNet-18 / VGG-11-BN, against unpatched Captum.

    Max-pools are replaced by average pools in a copy (ours runs on that copy with its shared in-place ReLUs,
    Captum on ``distinct_relu_copy`` of it): Captum 0.9 silently drops its max-pool rule when a ReLU feeds the
    max-pool (see test_deeplift_maxpool_rule_*), which is every max-pool of these networks.
    """
    spec = request.getfixturevalue(name)
    model = avgpool_copy(spec.module)
    images, targets = batch()
    ours = timed(f"deeplift/{name} (avg-pool copy)",
                 lambda: DeepLift(models.wrap(model)).attribute(images, targets).maps)
    assert ours.dtype == torch.float32 and ours.shape == (3, SIZE, SIZE)
    ref = CaptumDeepLift(distinct_relu_copy(model)).attribute(images.clone(), baselines=black(spec, images),
                                                              target=targets).sum(dim=1)
    assert_matches(ours, ref, f"deeplift/{name} (max-pools -> avg-pools)/captum")


def test_deeplift_small_cnn_without_maxpool_equals_captum():
    spec = small_spec(pool=nn.AvgPool2d)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([1, 5, 9])
    ours = DeepLift(spec).attribute(images, targets).maps
    ref = CaptumDeepLift(copy.deepcopy(spec.module)).attribute(images.clone(), baselines=black(spec, images),
                                                               target=targets).sum(dim=1)
    assert_matches(ours, ref, "deeplift/small-cnn (no max-pool)/captum")


def test_deeplift_maxpool_rule_equals_fixed_captum_when_it_applies(fixed_captum):
    """conv -> max-pool (overlapping 3x3/2 windows) -> linear: Captum's rule applies here (no ReLU before the
    pool); with its two bugs fixed it equals ours."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, padding=1), nn.Conv2d(4, 4, 3), nn.MaxPool2d(2),
                        nn.Flatten(1), nn.Linear(4 * 4, 5)).eval()
    spec = models.wrap(net)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([1, 2, 4])
    result = DeepLift(spec).attribute(images, targets, return_delta=True)
    ref = CaptumDeepLift(copy.deepcopy(net)).attribute(images.clone(), baselines=black(spec, images),
                                                       target=targets).sum(dim=1)
    assert_matches(result.maps, ref, "deeplift/conv-maxpool net/captum (max-pool rule fixed)")
    assert float(result.extras["delta"].abs().max()) < 1e-5


def test_deeplift_maxpool_rule_after_relu_equals_hand_computation():
    """ReLU -> MaxPool2d(2) -> Linear in float64: our map equals DeepLIFT's max-pool rule computed by hand
    (the change Δy of each window goes to the input's argmax as max(y, ȳ) − ȳ and to the reference's argmax as
    y − max(y, ȳ); the rescale rule passes contributions through the ReLU). Captum 0.9 returns the same map with
    and without its max-pool rule here: the rule is lost after a ReLU."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(1), nn.Linear(4, 1)).double().eval()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = DeepLift(models.wrap(net)).attribute(x, torch.tensor([0, 0]), baseline=ref).maps
    w = net[3].weight.detach().view(1, 1, 2, 2).expand(2, 1, 2, 2)
    y, ix = F.max_pool2d(x.relu(), 2, return_indices=True)
    y_ref, ir = F.max_pool2d(ref.relu(), 2, return_indices=True)
    top = torch.maximum(y, y_ref)
    hand = torch.zeros(2, 16, dtype=torch.float64)
    hand.scatter_add_(1, ix.flatten(1), (w * (top - y_ref)).flatten(1))
    hand.scatter_add_(1, ir.flatten(1), (w * (y - top)).flatten(1))
    torch.testing.assert_close(ours.double(), hand.view(2, 4, 4), rtol=1e-6, atol=1e-7)
    assert float(hand.abs().max()) > 0


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_deeplift_completeness(request, name):
    """Summation-to-delta: Σ map = f(x) − f(x̄) per pair, also for targets [B, T] and a white baseline."""
    spec = request.getfixturevalue(name)
    images, _ = batch(seed=11, b=2)
    targets = torch.tensor([[1, 281], [504, 967]])
    for baseline in ("black", "white"):
        result = DeepLift(spec).attribute(images, targets, baseline=baseline, return_delta=True)
        ref_pixels = torch.zeros if baseline == "black" else torch.ones
        with torch.no_grad():
            f = spec.module(images).gather(1, targets)
            f_ref = spec.module(spec.preprocessing.normalise(ref_pixels(1, 3, SIZE, SIZE)))[0][targets]
        torch.testing.assert_close(result.maps.sum(dim=(2, 3)), f - f_ref, rtol=1e-4,
                                   atol=1e-5 * float((f - f_ref).abs().max()))
        assert float(result.extras["delta"].abs().max()) <= 1e-4 * float((f - f_ref).abs().max())


def test_deeplift_leaves_no_trace_on_exception():
    """A forward that raises inside the paired pass: every hook removed, the model untouched (incl. max-pool)."""
    spec = tiny_spec()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    before = snapshot(spec, images)
    spec.module.features[5].armed = True
    try:
        with pytest.raises(RuntimeError, match="tripwire"):
            DeepLift(spec).attribute(images, torch.tensor([1, 7]))
    finally:
        spec.module.features[5].armed = False
    with pytest.raises(AttributionError, match="out of range"):
        DeepLift(spec).attribute(images, torch.tensor([1, 10]))
    with pytest.raises(AttributionError, match="out of range"):
        IntegratedGradients(spec).attribute(images, torch.tensor([1, 10]), steps=2)
    DeepLift(spec).attribute(images, torch.tensor([1, 7]))
    assert_untouched(spec, images, before)


def test_zz_report_times(capsys):
    with capsys.disabled():
        print("\nseconds per call (3 images, 64x64):", {k: round(v, 2) for k, v in TIMES.items()})
        print("max|ours - ref| / max|ref|:")
        for label, r in sorted(OBSERVED.items()):
            print(f"  {r:9.2e}  {label}")
