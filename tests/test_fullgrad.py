"""FullGrad: equality with pytorch-grad-cam (after its documented per-channel scaling) and with an independent
re-implementation of the paper's formula; batching over targets; the caller's model stays untouched."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution import models
from attribution.methods.fullgrad import FullGrad, rescale


def _minmax(m: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    flat = m.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return (flat / (flat.max(dim=1, keepdim=True).values + eps)).view_as(m)


def test_equals_pytorch_grad_cam_with_channel_scaling(resnet18):
    """pytorch-grad-cam's FullGrad min-max scales each channel map on its own (and each colour channel of the
    input term), uses eps 1e-7 and min-max scales the final sum. With scaling="channel", eps=1e-7 and that final
    scaling ours is the same map. ResNet convs have no bias, so every BN is exactly one of our folded units."""
    from pytorch_grad_cam import FullGrad as RefFullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([3, 7])
    ours = FullGrad(resnet18).attribute(x, targets, scaling="channel", eps=1e-7).maps
    ref_model = copy.deepcopy(resnet18.module)
    ref = RefFullGrad(ref_model, [])(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(c)) for c in targets])
    ref = torch.from_numpy(ref)
    assert ours.shape == ref.shape == (2, 64, 64)
    assert torch.allclose(_minmax(ours), ref, atol=2e-5), (_minmax(ours) - ref).abs().max()


class _Net(nn.Module):
    """conv(bias) -> ReLU -> strided conv(bias) -> ReLU -> GAP -> linear: two spatial bias units, no BN."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.c2(self.act(self.c1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def _paper_fullgrad(net: _Net, x: torch.Tensor, c: int) -> torch.Tensor:
    """Independent re-implementation of the authors' FullGrad.saliency (align_corners=False as ours)."""
    def post(t):  # the authors' _postProcess: abs, min over the whole image tensor, max, eps 1e-6
        t = t.abs()
        t = t - t.flatten(1).min(1).values.view(-1, 1, 1, 1)
        return t / (t.flatten(1).max(1).values.view(-1, 1, 1, 1) + 1e-6)
    x = x.clone().requires_grad_(True)
    z1 = F.conv2d(x, net.c1.weight, net.c1.bias, padding=1)
    z2 = F.conv2d(torch.relu(z1), net.c2.weight, net.c2.bias, stride=2, padding=1)
    out = net.fc(torch.relu(z2).mean(dim=(2, 3)))
    gx, g1, g2 = torch.autograd.grad(out[:, c].sum(), [x, z1, z2])
    cam = post(gx * x).sum(1)
    for g, b in ((g1, net.c1.bias), (g2, net.c2.bias)):
        t = post(g * b.view(1, -1, 1, 1))
        cam = cam + F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False).sum(1)
    return cam.detach()


def test_equals_paper_formula_and_batches_targets():
    net = _Net().eval()
    spec = models.wrap(net)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[0, 2], [1, 4], [3, 3]])
    result = FullGrad(spec).attribute(x, targets, return_layers=True)
    assert result.maps.shape == (3, 2, 16, 16) and result.maps.dtype == torch.float32
    for t in range(2):
        for b in range(3):
            expected = _paper_fullgrad(net, x[b:b + 1], int(targets[b, t]))[0]
            assert torch.allclose(result.maps[b, t], expected, atol=1e-5)
    assert torch.allclose(result.extras["layers"]["input"] + result.extras["layers"]["bias"], result.maps)
    # single-target call == the matching column
    single = FullGrad(spec).attribute(x, targets[:, 1]).maps
    assert torch.allclose(single, result.maps[:, 1], atol=1e-6)
    assert (result.maps >= 0).all()


def test_rescale_modes():
    t = torch.randn(2, 3, 4, 4)
    layer, channel = rescale(t, "layer", 0.0), rescale(t, "channel", 0.0)
    assert torch.allclose(layer.flatten(1).max(1).values, torch.ones(2))
    assert torch.allclose(channel.amax(dim=(2, 3)), torch.ones(2, 3))
    assert torch.allclose(channel.amin(dim=(2, 3)), torch.zeros(2, 3))


def test_model_untouched(resnet18):
    state = {k: v.clone() for k, v in resnet18.module.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    FullGrad(resnet18).attribute(x, [1])
    assert all(torch.equal(v, resnet18.module.state_dict()[k]) for k, v in state.items())
    for m in resnet18.module.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert not resnet18.module.training


def test_bad_scaling(resnet18):
    from attribution.errors import AttributionError
    with pytest.raises(AttributionError):
        FullGrad(resnet18).attribute(torch.randn(1, 3, 32, 32), [0], scaling="nope")
