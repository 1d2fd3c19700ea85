"""Our saliency / GBP / Grad-CAM equal the reference libraries (Captum 0.9, pytorch-grad-cam) to
max|ours − ref| ≤ 1e-5 · max|ref|, on a ResNet-18 and a VGG-11-BN (random weights, randomised BatchNorm
statistics) and the real EfficientNet-Lite0 on real photos; batch of 4, a different target class per image.

Every reference runs on a deep copy of the model (Captum and pytorch-grad-cam attach hooks; pytorch-grad-cam also
calls ``.eval()`` and accumulates parameter gradients; Captum's GuidedBackprop needs distinct, non-inplace ReLU
modules). Our methods always get the caller's original model.
"""
from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import LayerAttribution, LayerGradCam
from captum.attr import Saliency as CaptumSaliency
from pytorch_grad_cam import GradCAM as PGCGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from attribution.methods import attribute, attribute_with_extras

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients",
                                        "ignore:Setting backward hooks on ReLU activations")
RTOL = 1e-5
MODELS = ("resnet18", "vgg11_bn", "lite0")
OBSERVED: dict[str, float] = {}  # "method/model/comparison" -> max|ours − ref| / max|ref| (printed at the end)


# --------------------------------------------------------------------------------------------------- helpers


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, label: str) -> float:
    """max|ours − ref| ≤ RTOL · max|ref| over the whole batch, and per image against that image's own scale."""
    ours = ours.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    assert ours.shape == ref.shape, f"{label}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{label}: non-finite values in our map"
    scale = float(ref.abs().max())
    assert scale > 0, f"{label}: the reference map is all zero, the comparison would say nothing"
    diff = float((ours - ref).abs().max())
    ratio = diff / scale
    OBSERVED[label] = max(ratio, OBSERVED.get(label, 0.0))
    assert diff <= RTOL * scale, f"{label}: max abs diff {diff:.3e} > {RTOL} * max|ref| = {RTOL * scale:.3e}"
    for i in range(ref.shape[0]):  # an image whose map is much weaker must not hide behind the batch maximum
        s_i = float(ref[i].abs().max())
        d_i = float((ours[i] - ref[i]).abs().max())
        assert d_i <= RTOL * s_i + 1e-12 * scale, f"{label}[image {i}]: max abs diff {d_i:.3e} > {RTOL} * {s_i:.3e}"
    return ratio


def _copy_module(model: nn.Module, original: nn.Module, copied: nn.Module) -> nn.Module:
    """The module of ``copied`` that sits where ``original`` sits in ``model``."""
    name = next(n for n, m in model.named_modules() if m is original)
    return copied.get_submodule(name)


def _basic_block_forward(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu_a(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu_b(out + identity)


def _bottleneck_forward(self: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu_a(self.bn1(self.conv1(x)))
    out = self.relu_b(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu_c(out + identity)


class ClampedReLU(nn.Module):
    """ReLU6 written as min(nn.ReLU(x), 6), so Captum's GuidedBackprop (which hooks nn.ReLU modules only) sees it.

    Captum sets the ReLU's input gradient to relu(g · 1[x ≤ 6] · 1[x > 0]) = relu(g) · 1[0 < x ≤ 6], i.e. our
    rule relu(g) · 1[0 < x < 6] except at x == 6 exactly (torch.clamp passes the gradient at its bound), which
    a BatchNorm output does not hit in practice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x).clamp(max=6.0)


def distinct_relu_copy(model: nn.Module) -> nn.Module:
    """Deep copy in which every ReLU call site has its own non-inplace nn.ReLU (ReLU6 -> ClampedReLU).

    torchvision's BasicBlock/Bottleneck call one in-place ``self.relu`` two/three times; the copied blocks get
    ``relu_a``/``relu_b``(/``relu_c``) and a forward that uses them (and adds the skip out of place).
    """
    copied = copy.deepcopy(model)
    for parent in list(copied.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, child_name, nn.ReLU(inplace=False))
            elif type(child) is nn.ReLU6:
                setattr(parent, child_name, ClampedReLU())
        if isinstance(parent, (BasicBlock, Bottleneck)):
            parent.relu_a, parent.relu_b = nn.ReLU(), nn.ReLU()
            if isinstance(parent, Bottleneck):
                parent.relu_c = nn.ReLU()
                parent.forward = types.MethodType(_bottleneck_forward, parent)
            else:
                parent.forward = types.MethodType(_basic_block_forward, parent)
            del parent.relu  # a forgotten call site would now fail loudly instead of sharing a module
    return copied.eval()


class _GuidedReLU6Fn(torch.autograd.Function):
    """Hand-written guided ReLU6: forward min(max(x, 0), 6); backward relu(g) where 0 < x < 6."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.minimum(torch.relu(x), torch.full_like(x, 6.0))

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return torch.where((x > 0) & (x < 6), torch.relu(g), torch.zeros_like(g))


class _GuidedReLU6(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedReLU6Fn.apply(x)


def hand_guided_lite0(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Guided backprop on Lite0 without Captum: each ReLU6 (all distinct modules) -> its own guided Function."""
    copied = copy.deepcopy(model)
    for parent in list(copied.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(parent, child_name, _GuidedReLU6())
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in copied.modules())
    x = x.clone().requires_grad_(True)
    logits = copied.eval()(x)
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    return grad.sum(dim=1)


class RawGradCAM(PGCGradCAM):
    """pytorch-grad-cam's GradCAM that also keeps its cam before ``scale_cam_image`` (``self.raw``): its own
    forward, targets, hooks, ``get_cam_weights`` and ``get_cam_image``, then the relu it applies, at the target
    layer's resolution. ``__call__`` still returns the library's public (scaled, resized) output."""

    raw: np.ndarray

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        activations = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
        grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
        cam = self.get_cam_image(input_tensor, self.target_layers[0], targets, activations[0], grads[0],
                                 eigen_smooth)
        self.raw = np.maximum(cam, 0)
        return super().compute_cam_per_layer(input_tensor, targets, eigen_smooth)


def pgc_scaling(maps: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """What pytorch-grad-cam's public output does to a raw cam, applied to our maps: per image
    ``scale_cam_image`` (min-max over the layer-resolution cam, resize) then ``aggregate_multi_layers``
    (relu, min-max again). Min-max commutes with bilinear resizing, so the first one is applied after it."""
    out = []
    for m, c in zip(maps.to(torch.float64), cams.to(torch.float64)):
        lo = c.min()
        img = (m - lo) / (1e-7 + (c - lo).max())
        img = img.clamp(min=0)
        img = img - img.min()
        out.append(img / (1e-7 + img.max()))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------- fixtures


class Case(types.SimpleNamespace):
    name: str
    spec: object
    images: torch.Tensor
    targets: torch.Tensor
    ref_model: nn.Module
    layer_name: str


@pytest.fixture(scope="module", params=MODELS)
def case(request) -> Case:
    name = request.param
    spec = request.getfixturevalue(name)
    if name == "lite0":
        images = request.getfixturevalue("photos")
        with torch.no_grad():
            ranked = spec.module(images).argsort(dim=1, descending=True)
        # image i explains its class of rank i: the top prediction, a runner-up, a less likely class …
        targets = torch.stack([ranked[i, [0, 1, 5, 50][i]] for i in range(4)])
    else:
        images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(7))
        targets = torch.tensor([3, 250, 517, 999])
    assert len(set(targets.tolist())) == 4, "targets must differ per image"
    layer_name = next(n for n, m in spec.module.named_modules() if m is spec.target_layer)
    return Case(name=name, spec=spec, images=images, targets=targets,
                ref_model=copy.deepcopy(spec.module).eval(), layer_name=layer_name)


@pytest.fixture(scope="module")
def gradcam_ours(case):
    """Our Grad-CAM for the case, computed once for both reference libraries."""
    return attribute_with_extras("gradcam", case.spec, case.images, case.targets)


@pytest.fixture(scope="module")
def gbp_copy(case) -> nn.Module:
    copied = distinct_relu_copy(case.spec.module)
    with torch.no_grad():  # the rewritten copy computes the same function
        torch.testing.assert_close(copied(case.images), case.spec.module(case.images), rtol=0, atol=0)
    return copied


# --------------------------------------------------------------------------------------------------- tests


def test_saliency_equals_captum(case):
    ours = attribute("saliency", case.spec, case.images, case.targets)
    assert ours.dtype == torch.float32 and ours.shape == (4, 224, 224)
    ref = CaptumSaliency(case.ref_model).attribute(case.images.clone(), target=case.targets, abs=True).amax(dim=1)
    assert_matches(ours, ref, f"saliency/{case.name}/captum")


def test_gbp_equals_captum(case, gbp_copy):
    ours = attribute("gbp", case.spec, case.images, case.targets)
    assert ours.dtype == torch.float32 and ours.shape == (4, 224, 224)
    ref = CaptumGuidedBackprop(gbp_copy).attribute(case.images.clone(), target=case.targets).sum(dim=1)
    assert_matches(ours, ref, f"gbp/{case.name}/captum")


def test_gbp_lite0_equals_hand_written_relu6_rule(lite0, photos):
    """Independent of Captum: relu(grad)·1[0 < x < 6] at each ReLU6 call, via a torch.autograd.Function."""
    targets = torch.tensor([1, 281, 504, 967])
    ours = attribute("gbp", lite0, photos, targets)
    ref = hand_guided_lite0(lite0.module, photos, targets)
    assert_matches(ours, ref, "gbp/lite0/hand-written ReLU6 rule")


def test_gradcam_equals_captum(case, gradcam_ours):
    result = gradcam_ours
    assert result.maps.dtype == torch.float32 and result.maps.shape == (4, 224, 224)
    layer = case.ref_model.get_submodule(case.layer_name)
    cam = LayerGradCam(case.ref_model, layer).attribute(case.images.clone(), target=case.targets,
                                                        relu_attributions=True)
    ref = LayerAttribution.interpolate(cam, (224, 224), "bilinear").squeeze(1)
    assert_matches(result.maps, ref, f"gradcam/{case.name}/captum (224x224)")
    assert_matches(result.extras["cam"], cam.squeeze(1), f"gradcam/{case.name}/captum (layer res)")


def test_gradcam_equals_pytorch_grad_cam(case, gradcam_ours):
    result = gradcam_ours
    pgc_targets = [ClassifierOutputTarget(int(t)) for t in case.targets]
    model = copy.deepcopy(case.ref_model)
    layer = model.get_submodule(case.layer_name)
    with RawGradCAM(model=model, target_layers=[layer]) as grad_cam:
        public = torch.from_numpy(grad_cam(input_tensor=case.images.clone(), targets=pgc_targets))
        raw = torch.from_numpy(grad_cam.raw)
    # 1) the raw (relu'd, unscaled) cam at the target layer's resolution
    assert_matches(result.extras["cam"], raw, f"gradcam/{case.name}/pytorch-grad-cam raw (layer res)")
    # 2) the raw cam resized by torch bilinear (align_corners=False) to the input size
    resized = F.interpolate(raw[:, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    assert_matches(result.maps, resized, f"gradcam/{case.name}/pytorch-grad-cam raw (224x224)")
    # 3) its public output (min-max scaled, resized with cv2) against our map put through the same scaling
    assert_matches(pgc_scaling(result.maps, result.extras["cam"]), public,
                   f"gradcam/{case.name}/pytorch-grad-cam scaled output (224x224, cv2)")


def test_targets_per_image_equal_separate_reference_calls(resnet18):
    """Targets [B, T]: one forward, T backward passes; column t equals the reference run for targets[:, t]."""
    spec, model = resnet18, "resnet18"
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    targets = torch.tensor([[1, 281], [504, 967], [7, 8], [999, 0]])
    ref_model = copy.deepcopy(spec.module)
    gbp_model = distinct_relu_copy(spec.module)
    layer = ref_model.get_submodule(next(n for n, m in spec.module.named_modules() if m is spec.target_layer))
    sal = attribute("saliency", spec, images, targets)
    gbp = attribute("gbp", spec, images, targets)
    cam = attribute("gradcam", spec, images, targets)
    assert sal.shape == gbp.shape == cam.shape == (4, 2, 224, 224)
    for t in range(2):
        x = images.clone()
        assert_matches(sal[:, t], CaptumSaliency(ref_model).attribute(x, target=targets[:, t], abs=True)
                       .amax(dim=1), f"saliency/{model}/captum, targets [B,2]")
        assert_matches(gbp[:, t], CaptumGuidedBackprop(gbp_model).attribute(x, target=targets[:, t]).sum(dim=1),
                       f"gbp/{model}/captum, targets [B,2]")
        ref_cam = LayerGradCam(ref_model, layer).attribute(x, target=targets[:, t], relu_attributions=True)
        assert_matches(cam[:, t], LayerAttribution.interpolate(ref_cam, (224, 224), "bilinear").squeeze(1),
                       f"gradcam/{model}/captum, targets [B,2]")


def test_zz_report_observed_ratios(capsys):
    """Not a check: prints max|ours − ref| / max|ref| of every comparison above (run with -s to see it)."""
    with capsys.disabled():
        print("\nmax|ours - ref| / max|ref| per comparison:")
        for label, ratio in sorted(OBSERVED.items()):
            print(f"  {ratio:9.2e}  {label}")
