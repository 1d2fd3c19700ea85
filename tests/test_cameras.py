"""CAMERAS: analytic relations to Grad-CAM and activation×gradient, a multi-scale known answer, determinism,
batching over targets, the authors' default scales."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attribution import models
from attribution.maps import upsample
from attribution.methods.cam import GradCAM
from attribution.methods.cameras import CAMERAS, default_resolutions


class _Tiny(nn.Module):
    """conv -> ReLU (``act``) -> global average pool -> linear."""

    def __init__(self, stride: int = 2, positive_head: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=stride, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            if positive_head:
                self.fc.weight.abs_()

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def _images(b=2, size=16):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_one_scale_is_relu_of_upsampled_gradcam_sum():
    net = _Tiny().eval()
    spec = models.wrap(net, target_layer="act")
    x, t = _images(), torch.tensor([0, 2])
    ours = CAMERAS(spec).attribute(x, t, resolutions=[16]).maps
    a = torch.relu(net.conv(x))  # [B, 4, 8, 8]; the gradient at A is fc.weight[c] / (h·w), constant in space
    weights = net.fc.weight[t] / (a.shape[2] * a.shape[3])
    pre = (weights[:, :, None, None] * a).sum(1)
    assert torch.allclose(ours, torch.relu(upsample(pre, (16, 16))).detach(), atol=1e-6)


def test_one_scale_equals_gradcam_when_the_cam_is_non_negative():
    spec = models.wrap(_Tiny(positive_head=True).eval(), target_layer="act")
    x, t = _images(), torch.tensor([1, 2])
    ours = CAMERAS(spec).attribute(x, t, resolutions=[16]).maps
    assert torch.allclose(ours, GradCAM(spec).attribute(x, t).maps, atol=1e-6)


def test_full_resolution_layer_is_relu_of_gradient_times_activation():
    net = _Tiny(stride=1).eval()
    spec = models.wrap(net, target_layer="conv")  # before the ReLU: the gradient varies in space
    x, t = _images(), torch.tensor([0, 1])
    ours = CAMERAS(spec).attribute(x, t, resolutions=[16]).maps
    a = net.conv(x)
    out = net.fc(torch.relu(a).mean(dim=(2, 3)))
    (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), a)
    assert torch.allclose(ours, torch.relu((g * a).sum(1)).detach(), atol=1e-6)


def test_multi_scale_known_answer():
    net = _Tiny().eval()
    spec = models.wrap(net, target_layer="act")
    x, t = _images(), torch.tensor([2, 0])
    resolutions = [16, 24, 40]
    ours = CAMERAS(spec).attribute(x, t, resolutions=resolutions, consistent_only=False).maps
    mean_a, mean_g = 0.0, 0.0
    for r in resolutions:
        xs = x if r == 16 else F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False)
        a = torch.relu(net.conv(xs))
        mean_a = mean_a + upsample(a, (16, 16)) / len(resolutions)
        mean_g = mean_g + net.fc.weight[t] / (a.shape[2] * a.shape[3]) / len(resolutions)
    expected = torch.relu((mean_g[:, :, None, None] * mean_a).sum(1)).detach()
    assert torch.allclose(ours, expected, atol=1e-6)


def test_deterministic_batched_and_model_untouched(resnet18):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1, 5], [7, 7]])
    state = {k: v.clone() for k, v in resnet18.module.state_dict().items()}
    method = CAMERAS(resnet18)
    first = method.attribute(x, targets, resolutions=[64, 96], return_scales=True)
    second = method.attribute(x, targets, resolutions=[64, 96], return_scales=True)
    assert first.maps.shape == (2, 2, 64, 64) and first.maps.dtype == torch.float32
    assert torch.equal(first.maps, second.maps)
    assert (first.maps >= 0).all()
    assert first.extras["scales_used"].shape == (2, 2, 2) and first.extras["scales_used"][..., 0].all()
    single = method.attribute(x, targets[:, 1], resolutions=[64, 96]).maps
    assert torch.allclose(single, first.maps[:, 1], atol=1e-6)
    assert all(torch.equal(v, resnet18.module.state_dict()[k]) for k, v in state.items())
    for m in resnet18.module.modules():
        assert not m._forward_hooks and not m._backward_hooks


def test_consistent_only_drops_scales_with_another_top_class():
    """A model whose top class flips with the input size: only the consistent scale is averaged."""
    class SizeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.act = nn.ReLU()

        def forward(self, x):
            a = self.act(self.conv(x)).mean(dim=(2, 3))
            big = float(x.shape[-1] > 16)
            return torch.stack([a[:, 0] + 10 * (1 - big), a[:, 1] + 10 * big], dim=1)

    spec = models.wrap(SizeDependent().eval(), target_layer="act")
    x = _images(1)
    res = CAMERAS(spec).attribute(x, [0], resolutions=[16, 32], return_scales=True)
    assert res.extras["scales_used"].tolist() == [[True, False]]
    only_first = CAMERAS(spec).attribute(x, [0], resolutions=[16]).maps
    assert torch.allclose(res.maps, only_first)
    # the target itself being the top class at a scale also admits that scale
    res = CAMERAS(spec).attribute(x, [1], resolutions=[16, 32], return_scales=True)
    assert res.extras["scales_used"].tolist() == [[True, True]]


def test_default_resolutions_are_the_papers():
    assert default_resolutions(224) == [224, 324, 424, 524, 624, 724, 824, 924]
