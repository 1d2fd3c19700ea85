"""TR-GBP: equals GBP without biases, the transposed-conv bias rule against an explicit ones-input twin network,
class-mean removal, and class sensitivity on the real EfficientNet-Lite0."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attribution import models
from attribution.methods import attribute, attribute_with_extras


class _GuidedReLU(torch.autograd.Function):
    """Independent guided-backprop ReLU for the twin networks (not the project's hook machinery)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp(min=0) * (x > 0)


class SmallCNN(nn.Module):
    """conv(3->6, 3x3) -> BN -> ReLU -> conv(6->8, 3x3, stride 2) -> BN -> ReLU -> avgpool -> fc(8->5)."""

    def __init__(self, bias: bool = True, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(6) if batchnorm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5, bias=bias)

    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)))
        return self.fc(self.pool(h).flatten(1))


def small_cnn(bias: bool = True, batchnorm: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN(bias, batchnorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with eval-mode BatchNorm folded in (computed here, independently)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = (conv.bias - bn.running_mean) * scale + bn.bias
    return weight.detach(), bias.detach()


def twin_bias_gradient(model: SmallCNN, x: torch.Tensor, target: torch.Tensor, layer: str) -> torch.Tensor:
    """GBP gradient w.r.t. an explicit extra input channel of ones that carries ``layer``'s folded bias.

    The twin's conv for ``layer`` has C_in + 1 input channels: the folded weights for the real ones, and taps
    b_i / (kh·kw) on the ones channel, no bias; the ones channel has the layer's input resolution and the same
    zero padding, so border taps see zeros (and the gradient there is weaker).
    """
    w1, b1 = folded(model.conv1, model.bn1)
    w2, b2 = folded(model.conv2, model.bn2)
    ones1 = torch.ones(x.shape[0], 1, *x.shape[-2:], requires_grad=True)

    def conv_with_ones(h, w, b, ones, stride):
        k = w.shape[-1]
        ones_taps = (b / (k * k)).view(-1, 1, 1, 1).expand(-1, 1, k, k)
        out = nn.functional.conv2d(torch.cat([h, ones], 1), torch.cat([w, ones_taps], 1), stride=stride, padding=1)
        # Zero padding makes the ones channel deliver less than b at the border; a constant (no gradient) restores
        # the original forward pass exactly, so the twin computes the same function as the model.
        shortfall = b.view(1, -1, 1, 1) - nn.functional.conv2d(ones.detach(), ones_taps, stride=stride, padding=1)
        return out + shortfall

    if layer == "conv1":
        h = _GuidedReLU.apply(conv_with_ones(x, w1, b1, ones1, 1))
    else:
        h = _GuidedReLU.apply(nn.functional.conv2d(x, w1, b1, padding=1))
    ones2 = torch.ones(x.shape[0], 1, *h.shape[-2:], requires_grad=True)
    if layer == "conv2":
        h = _GuidedReLU.apply(conv_with_ones(h, w2, b2, ones2, 2))
    else:
        h = _GuidedReLU.apply(nn.functional.conv2d(h, w2, b2, stride=2, padding=1))
    logits = model.fc(h.mean(dim=(2, 3)))
    ones = ones1 if layer == "conv1" else ones2
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), ones)
    return grad[:, 0]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 17, 17, generator=torch.Generator().manual_seed(3))


def test_without_biases_and_removal_equals_gbp(images):
    spec = models.wrap(small_cnn(bias=False, batchnorm=False))
    targets = torch.tensor([0, 1, 2, 4])
    tr = attribute("tr_gbp", spec, images, targets, remove_shared=False)
    gbp = attribute("gbp", spec, images, targets)
    assert gbp.abs().max() > 0
    torch.testing.assert_close(tr, gbp, rtol=0, atol=1e-7)


def test_biases_off_equals_gbp_on_resnet(resnet18):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([3, 700])
    tr = attribute("tr_gbp", resnet18, x, targets, biases=False, remove_shared=False)
    torch.testing.assert_close(tr, attribute("gbp", resnet18, x, targets), rtol=0, atol=1e-7)


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_bias_map_equals_ones_input_twin(images, layer):
    """R_l by the transposed-conv rule == GBP gradient w.r.t. an explicit ones channel, borders included."""
    model = small_cnn()
    spec = models.wrap(model)
    targets = torch.tensor([0, 3, 1, 4])
    result = attribute_with_extras("tr_gbp", spec, images, targets, remove_shared=False, return_layers=True)
    name = {"conv1": "conv1+bn1", "conv2": "conv2+bn2"}[layer]
    ours = result.extras["layers"][name]
    twin = twin_bias_gradient(model, images, targets, layer)
    assert ours.shape == twin.shape == (4, 17, 17)
    assert twin.abs().max() > 1e-6  # not trivially zero
    torch.testing.assert_close(ours, twin, rtol=1e-5, atol=1e-6 * float(twin.abs().max()))
    # Borders take part in fewer patches: with a stride-1 3x3 conv the corner sees 4 of 9 taps.
    if layer == "conv1":
        assert not torch.allclose(ours[:, 0, 0], ours[:, 8, 8])


def test_linear_bias_map_is_the_target_bias(images):
    model = small_cnn()
    spec = models.wrap(model)
    targets = torch.tensor([0, 3, 1, 4])
    layers = attribute_with_extras("tr_gbp", spec, images, targets, remove_shared=False,
                                   return_layers=True).extras["layers"]
    # For the last layer the guided gradient at its output is the one-hot seed: R = b_target, a [B, 1, 1] map.
    torch.testing.assert_close(layers["fc"][:, 0, 0], model.fc.bias[targets].detach())


def test_top5_maps_sum_to_zero_after_removal(images):
    spec = models.wrap(small_cnn())
    top5 = spec.module(images).topk(5, dim=1).indices
    maps = attribute("tr_gbp", spec, images, top5)
    assert maps.shape == (4, 5, 17, 17)
    assert maps.sum(dim=1).abs().max() < 1e-5 * maps.abs().max()


def test_removal_subtracts_top5_mean_also_for_other_targets(resnet18):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    top5 = resnet18.module(x).topk(5, dim=1).indices
    outside = torch.tensor([c for c in range(1000) if c not in top5[0] and c not in top5[1]][:2])
    raw = attribute("tr_gbp", resnet18, x, torch.cat([top5, outside[:, None]], 1), remove_shared=False)
    expected = raw[:, 5] - raw[:, :5].mean(dim=1)
    ours = attribute("tr_gbp", resnet18, x, outside)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_relu_option_shows_positive_part(images):
    spec = models.wrap(small_cnn())
    targets = torch.tensor([0, 3, 1, 4])
    signed = attribute("tr_gbp", spec, images, targets)
    shown = attribute("tr_gbp", spec, images, targets, relu=True)
    assert bool((signed < 0).any())
    torch.testing.assert_close(shown, signed.clamp(min=0))


def test_vgg_fc_layers_take_part(vgg11_bn):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    result = attribute_with_extras("tr_gbp", vgg11_bn, x, torch.tensor([1, 2]), return_layers=True)
    names = list(result.extras["layers"])
    assert {"classifier.0", "classifier.3", "classifier.6"} <= set(names)
    assert sum(n.startswith("features.") for n in names) == 8  # 8 conv+BN units
    assert torch.isfinite(result.maps).all() and result.maps.abs().max() > 0


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_class_sensitivity_on_lite0(lite0, photos):
    """Chelsea: a cat class and a non-cat class of the top 5 are less alike under TR-GBP than under GBP."""
    chelsea = photos[:1]
    top5 = lite0.module(chelsea).topk(5, dim=1).indices[0].tolist()
    cats = set(range(281, 294))
    cat, other = top5[0], next(c for c in top5 if c not in cats)
    assert cat in cats
    targets = torch.tensor([[cat, other]])
    gbp = attribute("gbp", lite0, chelsea, targets)[0]
    tr = attribute("tr_gbp", lite0, chelsea, targets)[0]
    rho_gbp, rho_tr = _rank_correlation(gbp[0], gbp[1]), _rank_correlation(tr[0], tr[1])
    print(f"chelsea classes {cat} vs {other}: rank corr GBP {rho_gbp:.3f}, TR-GBP {rho_tr:.3f}")
    assert rho_tr < rho_gbp
    assert rho_gbp > 0.5


def test_caller_model_unchanged_by_bias_units(images):
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    out = model(images)
    attribute("tr_gbp", models.wrap(model), images, torch.tensor([0, 1, 2, 3]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(images), out)
    assert model.relu2.inplace


# ---------------------------------------------------------------------------------------------- the readings
def twin_parameter_gradients(model: SmallCNN, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """GBP gradients w.r.t. explicit ones-inputs that carry only the modules' own ``.bias`` parameters.

    Nothing is folded: each conv has an extra ones channel at its input resolution with taps b_i / (kh·kw) (and
    the constant shortfall at the zero-padded border, as in :func:`twin_bias_gradient`); each BatchNorm is
    y = γ(h − μ)/√(σ² + ε) + β ⊙ 1, the ones map 1 [B, 1, H, W] at its own resolution (the −γμ/σ shift is a
    constant of the layer, no ones-input); the fc is W h + b · 1 with a scalar ones-input per image. One forward,
    one backward: returns unit name -> gradient (conv/BN [B, H, W], fc [B, 1, 1]) and the twin's logits.
    """
    def conv_with_ones(h, conv, ones):
        k, stride = conv.weight.shape[-1], conv.stride
        taps = (conv.bias.detach() / (k * k)).view(-1, 1, 1, 1).expand(-1, 1, k, k)
        out = nn.functional.conv2d(torch.cat([h, ones], 1), torch.cat([conv.weight.detach(), taps], 1),
                                   stride=stride, padding=1)
        shortfall = conv.bias.detach().view(1, -1, 1, 1) - nn.functional.conv2d(ones.detach(), taps, stride=stride,
                                                                                padding=1)
        return out + shortfall

    def batchnorm_with_ones(h, bn, ones):
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(1, -1, 1, 1)
        return scale * (h - bn.running_mean.view(1, -1, 1, 1)) + bn.bias.detach().view(1, -1, 1, 1) * ones

    b = x.shape[0]
    ones = {"conv1": torch.ones(b, 1, *x.shape[-2:], requires_grad=True),
            "bn1": torch.ones(b, 1, *x.shape[-2:], requires_grad=True),
            "conv2": torch.ones(b, 1, *x.shape[-2:], requires_grad=True),
            "bn2": torch.ones(b, 1, 9, 9, requires_grad=True),
            "fc": torch.ones(b, 1, requires_grad=True)}
    h = _GuidedReLU.apply(batchnorm_with_ones(conv_with_ones(x, model.conv1, ones["conv1"]), model.bn1, ones["bn1"]))
    h = _GuidedReLU.apply(batchnorm_with_ones(conv_with_ones(h, model.conv2, ones["conv2"]), model.bn2, ones["bn2"]))
    logits = h.mean(dim=(2, 3)) @ model.fc.weight.detach().T + model.fc.bias.detach() * ones["fc"]
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), list(ones.values()))
    out = {name: g[:, 0] if g.dim() == 4 else g.view(-1, 1, 1) for name, g in zip(ones, grads)}
    out["logits"] = logits.detach()
    return out


def test_parameter_bias_terms_equal_the_own_bias_ones_input_twin(images):
    """bias_terms="parameter": R_l of every conv/BN/fc bias parameter == the gradient w.r.t. its ones-input in
    an explicit twin (conv biases at the conv's geometry, BatchNorm β as a 1x1 unit, nothing folded)."""
    model = small_cnn()
    targets = torch.tensor([0, 3, 1, 4])
    twin = twin_parameter_gradients(model, images, targets)
    torch.testing.assert_close(twin.pop("logits"), model(images).detach(), rtol=1e-5, atol=1e-5)
    layers = attribute_with_extras("tr_gbp", models.wrap(model), images, targets, bias_terms="parameter",
                                   remove_shared=False, return_layers=True).extras["layers"]
    assert set(layers) == set(twin) | {"input"}
    for name, expected in twin.items():
        assert expected.abs().max() > 1e-6, name
        # float32 sums of at most C·k·k = 54 products per position: rtol ~ 54·eps ≈ 6e-6
        torch.testing.assert_close(layers[name], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()),
                                   msg=name)
    # β of bn2 is a 1x1 unit: its map is Σ_c g_c β_c at bn2's own 9x9 resolution
    assert layers["bn2"].shape == (4, 9, 9)


def test_parameter_equals_effective_without_batchnorm(images):
    spec = models.wrap(small_cnn(batchnorm=False))
    targets = torch.tensor([[0, 2], [3, 1], [1, 4], [4, 0]])
    eff = attribute_with_extras("tr_gbp", spec, images, targets, return_layers=True)
    par = attribute_with_extras("tr_gbp", spec, images, targets, bias_terms="parameter", return_layers=True)
    assert set(eff.extras["layers"]) == set(par.extras["layers"]) == {"conv1", "conv2", "fc", "input"}
    torch.testing.assert_close(par.maps, eff.maps, rtol=0, atol=0)


def test_parameter_differs_from_effective_with_batchnorm(images):
    spec = models.wrap(small_cnn())
    targets = torch.tensor([0, 3, 1, 4])
    eff = attribute("tr_gbp", spec, images, targets)
    par = attribute("tr_gbp", spec, images, targets, bias_terms="parameter")
    assert (par - eff).abs().max() > 1e-3 * eff.abs().max()


def test_bias_terms_none_is_biases_false(images):
    spec = models.wrap(small_cnn())
    targets = torch.tensor([0, 3, 1, 4])
    torch.testing.assert_close(attribute("tr_gbp", spec, images, targets, bias_terms="none"),
                               attribute("tr_gbp", spec, images, targets, biases=False), rtol=0, atol=0)


@pytest.mark.parametrize("bias_terms", ["effective", "parameter"])
def test_layer_norm_max_keeps_the_removal_summing_to_zero(images, bias_terms):
    spec = models.wrap(small_cnn())
    top5 = spec.module(images).topk(5, dim=1).indices
    result = attribute_with_extras("tr_gbp", spec, images, top5, bias_terms=bias_terms, layer_norm="max",
                                   return_layers=True)
    assert result.maps.shape == (4, 5, 17, 17)
    # the top-5 maps are a mean-removed set: they sum to 0 (float32, 5 terms)
    assert result.maps.sum(dim=1).abs().max() < 1e-5 * result.maps.abs().max()
    raw = attribute_with_extras("tr_gbp", spec, images, top5, bias_terms=bias_terms, layer_norm="max",
                                remove_shared=False, return_layers=True).extras["layers"]
    for name, term in raw.items():  # every term, R_0 included, has max |R_l| = 1 over the image's top-5 maps
        torch.testing.assert_close(term.abs().amax(dim=(1, 2, 3)), torch.ones(4), rtol=1e-6, atol=0, msg=name)
        removed = result.extras["layers"][name]
        torch.testing.assert_close(removed, term - term.mean(dim=1, keepdim=True), rtol=1e-5, atol=1e-6, msg=name)


def test_layer_norm_max_divisor_comes_from_the_top5_whatever_the_targets(images):
    """A target's map does not depend on which other targets are asked for: the divisor is the top-5's."""
    spec = models.wrap(small_cnn())
    top5 = spec.module(images).topk(5, dim=1).indices
    all5 = attribute("tr_gbp", spec, images, top5, layer_norm="max", remove_shared=False)
    one = attribute("tr_gbp", spec, images, top5[:, 2], layer_norm="max", remove_shared=False)
    torch.testing.assert_close(one, all5[:, 2], rtol=1e-6, atol=1e-7)
    # and the divisor changes the result: without it the terms keep their own scales
    plain = attribute("tr_gbp", spec, images, top5[:, 2], remove_shared=False)
    assert (plain - one).abs().max() > 1e-3 * plain.abs().max()


def test_input_term_gradient_x_input_on_a_bias_free_net(images):
    """input_term="gradient_x_input" without biases == Σ_c x ⊙ (independent guided gradient)."""
    model = small_cnn(bias=False, batchnorm=False)
    targets = torch.tensor([0, 3, 1, 4])
    x = images.clone().requires_grad_(True)
    h = _GuidedReLU.apply(nn.functional.conv2d(x, model.conv1.weight, padding=1))
    h = _GuidedReLU.apply(nn.functional.conv2d(h, model.conv2.weight, stride=2, padding=1))
    logits = model.fc(h.mean(dim=(2, 3)))
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    expected = (images * grad).sum(dim=1)
    ours = attribute("tr_gbp", models.wrap(model), images, targets, input_term="gradient_x_input",
                     remove_shared=False)
    assert expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # the independent guided gradient is the one behind the project's gbp map (summed over colours)
    gbp = attribute("gbp", models.wrap(model), images, targets)
    torch.testing.assert_close(gbp, grad.sum(dim=1), rtol=1e-5, atol=1e-6 * float(gbp.abs().max()))


@pytest.mark.parametrize("options", [{}, {"bias_terms": "parameter"}, {"layer_norm": "max"},
                                     {"input_term": "gradient_x_input", "layer_norm": "max"}])
def test_final_map_is_input_plus_upsampled_layers_for_every_reading(images, options):
    spec = models.wrap(small_cnn())
    targets = torch.tensor([0, 3, 1, 4])
    result = attribute_with_extras("tr_gbp", spec, images, targets, return_layers=True, **options)
    layers = result.extras["layers"]
    total = layers["input"].clone()
    for name, m in layers.items():
        if name != "input":
            total += nn.functional.interpolate(m[:, None], size=(17, 17), mode="bilinear",
                                               align_corners=False)[:, 0]
    torch.testing.assert_close(result.maps, total, rtol=1e-5, atol=1e-6 * float(total.abs().max()))


@pytest.mark.parametrize("options", [{"bias_terms": "folded"}, {"layer_norm": "l2"}, {"input_term": "x"},
                                     {"biases": False, "bias_terms": "parameter"}])
def test_unknown_readings_are_refused(images, options):
    from attribution.errors import AttributionError
    with pytest.raises(AttributionError, match="tr_gbp"):
        attribute("tr_gbp", models.wrap(small_cnn()), images, torch.tensor([0, 1, 2, 3]), **options)
