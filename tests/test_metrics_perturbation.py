"""attribution.metrics.perturbation: MoRF/LeRF and insertion curves against hand computation on a linear model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attribution.errors import AttributionError
from attribution.metrics.perturbation import (
    black_baseline,
    curve_auc,
    insertion,
    insertion_fractions,
    insertion_scores,
    morf_lerf,
    perturbation_curves,
    pixel_order,
    removal_fractions,
    target_probability,
)
from attribution.preprocessing import Preprocessing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class LinearSum(nn.Module):
    """logit_k(x) = b_k + sum_{c,h,w} W[k, c] x[c, h, w]: a 1x1 convolution summed over space."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kc,nchw->nk", self.weight, x) + self.bias


def setup(seed: int = 0, n: int = 3, c: int = 3, h: int = 5, w: int = 4, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    model = LinearSum(torch.randn(k, c, generator=g, dtype=torch.float64) * 0.3,
                      torch.randn(k, generator=g, dtype=torch.float64)).eval()
    images = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    base = torch.randn(c, generator=g, dtype=torch.float64)
    targets = torch.arange(n) % k
    return model, images, base, targets


def contributions(model: LinearSum, images: torch.Tensor, base: torch.Tensor) -> np.ndarray:
    """Per class and pixel: W[k] . (x_p - base) -> numpy [N, K, H*W]."""
    diff = (images - base.view(1, -1, 1, 1)).flatten(2).numpy()  # [N, C, P]
    return np.einsum("kc,ncp->nkp", model.weight.detach().numpy(), diff)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hand_curves(model, images, base, targets, order: np.ndarray, counts: list[int], mode: str):
    """Logits of every class after perturbing the first k pixels of ``order``, by hand: the model is linear, so
    logit = logit(start) +- sum of the chosen pixels' contributions."""
    contrib = contributions(model, images, base)  # [N, K, P]
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    n = images.shape[0]
    at_base = b + w @ base.numpy() * images.shape[2] * images.shape[3]  # [K], the all-baseline image
    full = at_base[None] + contrib.sum(axis=2)  # [N, K], the image itself
    logits = np.empty((n, len(counts), w.shape[0]))
    for i in range(n):
        for s, k in enumerate(counts):
            chosen = contrib[i][:, order[i, :k]].sum(axis=1)
            logits[i, s] = full[i] - chosen if mode == "remove" else at_base + chosen
    t = targets.numpy()
    rows = np.arange(n)
    return {"logit": logits[rows, :, t], "prob": softmax(logits)[rows, :, t],
            "top1": (logits.argmax(axis=2) == t[:, None]).astype(float)}


@pytest.mark.parametrize("mode", ["insert", "remove"])
def test_perfect_map_on_a_linear_model_gives_the_hand_computed_curves(mode):
    model, images, base, targets = setup()
    contrib = contributions(model, images, base)
    perfect = torch.from_numpy(contrib[np.arange(3), targets.numpy()]).view(3, 5, 4)  # the target's own share
    order = pixel_order(perfect, most_relevant_first=True)
    fractions = [0.0, 0.05, 0.25, 0.5, 0.9, 1.0]  # P = 20 -> k = 0, 1, 5, 10, 18, 20
    ours = perturbation_curves(model, images, order, targets, fractions, mode=mode, baseline=base, chunk_size=4)
    ref = hand_curves(model, images, base, targets, np.argsort(-contrib[np.arange(3), targets.numpy()], axis=1,
                                                                kind="stable"), [0, 1, 5, 10, 18, 20], mode)
    for key in ("logit", "prob", "top1"):
        np.testing.assert_allclose(ours[key].numpy(), ref[key], rtol=1e-6, atol=1e-6, err_msg=key)
    # a perfect map is optimal for a linear model: inserting (removing) its top-k pixels gives the highest (lowest)
    # target logit of any k pixels; check against random rankings
    g = torch.Generator().manual_seed(10)
    for _ in range(5):
        rand = torch.stack([torch.randperm(20, generator=g) for _ in range(3)])
        other = perturbation_curves(model, images, rand, targets, fractions, mode=mode, baseline=base)["logit"]
        if mode == "insert":
            assert bool((ours["logit"] >= other - 1e-9).all())
        else:
            assert bool((ours["logit"] <= other + 1e-9).all())


def test_fraction_rounding_half_up():
    model, images, base, targets = setup(1, n=2, h=2, w=5)  # P = 10
    order = pixel_order(torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(3)).double())
    ours = perturbation_curves(model, images, order, targets, [0.25, 0.34, 0.35], mode="remove", baseline=base)
    ref = hand_curves(model, images, base, targets, order.numpy(), [3, 3, 4], "remove")  # 2.5 -> 3, 3.4 -> 3, 3.5 -> 4
    np.testing.assert_allclose(ours["logit"].numpy(), ref["logit"], atol=1e-6)


def test_chunk_size_does_not_change_results():
    model, images, base, targets = setup(2, n=5)
    order = pixel_order(torch.randn(5, 5, 4, generator=torch.Generator().manual_seed(4)))
    fractions = removal_fractions(7)
    runs = [perturbation_curves(model, images, order, targets, fractions, mode=m, baseline=base, chunk_size=cs)
            for m in ("remove", "insert") for cs in (1, 3, 40, 1000)]
    for i in (1, 2, 3):
        for key in ("logit", "prob", "top1"):
            torch.testing.assert_close(runs[i][key], runs[0][key], rtol=0, atol=1e-12)
            torch.testing.assert_close(runs[4 + i][key], runs[4][key], rtol=0, atol=1e-12)
    assert not torch.allclose(runs[0]["logit"], runs[4]["logit"])  # the two modes really differ


@pytest.mark.parametrize("device", DEVICES)
def test_morf_at_fraction_one_is_the_model_on_the_baseline_image(resnet18, device):
    module = resnet18.module.to(device)
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(5)).to(device)
    maps = torch.randn(2, 48, 48, generator=torch.Generator().manual_seed(6)).to(device)
    base = black_baseline(resnet18.preprocessing).to(device)
    targets = torch.tensor([3, 700], device=device)
    try:
        curves = perturbation_curves(module, images, pixel_order(maps), targets, [0.0, 0.5, 1.0], mode="remove",
                                     baseline=base, chunk_size=4)
        ins = perturbation_curves(module, images, pixel_order(maps), targets, [0.0, 1.0], mode="insert",
                                  baseline=base, chunk_size=4)
        with torch.no_grad():
            black = base.view(1, 3, 1, 1).expand(2, 3, 48, 48)
            on_black = module(black).softmax(dim=1).gather(1, targets[:, None])[:, 0]
            on_image = module(images).softmax(dim=1).gather(1, targets[:, None])[:, 0]
    finally:
        module.to("cpu")
    assert curves["prob"].device.type == device
    torch.testing.assert_close(curves["prob"][:, 2], on_black, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(curves["prob"][:, 0], on_image, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ins["prob"][:, 0], on_black, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ins["prob"][:, 1], on_image, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(on_black, on_image)


def test_black_baseline_is_black_in_pixel_space():
    pre = Preprocessing()
    base = black_baseline(pre)
    torch.testing.assert_close(base, torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    torch.testing.assert_close(pre.denormalise(base.view(3, 1, 1)).flatten(), torch.zeros(3), atol=1e-7, rtol=0)


def test_pixel_order_ties_and_abs():
    maps = torch.tensor([[[1.0, 3.0], [3.0, 0.0]], [[-5.0, 2.0], [-2.0, 0.0]]])
    assert pixel_order(maps).tolist() == [[1, 2, 0, 3], [1, 3, 2, 0]]
    assert pixel_order(maps, most_relevant_first=False).tolist() == [[3, 0, 1, 2], [0, 2, 3, 1]]
    assert pixel_order(maps, most_relevant_first=False, by_abs=True).tolist() == [[3, 0, 1, 2], [3, 1, 2, 0]]
    assert pixel_order(maps, by_abs=True).tolist() == [[1, 2, 0, 3], [0, 1, 2, 3]]
    flat = torch.zeros(1, 3, 3)  # all tied: row-major order both ways
    assert pixel_order(flat).tolist() == pixel_order(flat, most_relevant_first=False).tolist() == [list(range(9))]


def test_morf_lerf_matches_two_separate_calls_and_abs_per_image():
    model, images, base, targets = setup(3, n=4)
    maps = torch.randn(4, 5, 4, generator=torch.Generator().manual_seed(8)).double()
    by_abs = torch.tensor([True, False, True, False])
    fractions = removal_fractions(4)
    both = morf_lerf(model, images, maps, targets, fractions, baseline=base, lerf_by_abs=by_abs, chunk_size=5)
    morf = perturbation_curves(model, images, pixel_order(maps), targets, fractions, mode="remove", baseline=base)
    lerf_abs = pixel_order(maps, most_relevant_first=False, by_abs=True)
    lerf_signed = pixel_order(maps, most_relevant_first=False)
    order = torch.where(by_abs[:, None], lerf_abs, lerf_signed)
    lerf = perturbation_curves(model, images, order, targets, fractions, mode="remove", baseline=base)
    for key in ("logit", "prob", "top1"):
        torch.testing.assert_close(both["morf"][key], morf[key], rtol=0, atol=1e-12)
        torch.testing.assert_close(both["lerf"][key], lerf[key], rtol=0, atol=1e-12)
    assert not torch.equal(lerf_abs[0], lerf_signed[0])


def test_curve_auc():
    curves = torch.tensor([[0.7, 0.7, 0.7], [0.0, 0.5, 1.0], [1.0, 0.0, 1.0]])
    torch.testing.assert_close(curve_auc(curves, [0.0, 0.5, 1.0]), torch.tensor([0.7, 0.5, 0.5], dtype=torch.float64))
    # uneven x: trapezoids (0.1+0.3)/2*0.2 + (0.3+0.9)/2*0.6 = 0.04 + 0.36 = 0.40, over the range 0.8 -> 0.5
    torch.testing.assert_close(curve_auc(torch.tensor([[0.1, 0.3, 0.9]]), [0.2, 0.4, 1.0]),
                               torch.tensor([0.5], dtype=torch.float64))
    assert curve_auc(torch.tensor([[0.3]]), [0.5]).item() == pytest.approx(0.3)
    with pytest.raises(AttributionError, match="strictly increasing"):
        curve_auc(curves, [0.0, 1.0, 0.5])


def test_insertion_scores_by_hand():
    curves = {"prob": torch.tensor([[0.1, 0.4, 0.8], [0.05, 0.2, 0.25]]),
              "top1": torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])}
    out = insertion_scores(curves, torch.tensor([0.8, 0.5]), [1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(out["softmax_ratio"].numpy(), [[0.125, 0.5, 1.0], [0.1, 0.4, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(out["accuracy_auc"].numpy(), [0.75, 0.25])
    np.testing.assert_allclose(out["softmax_ratio_auc"].numpy(), [(0.3125 + 0.75) / 2, (0.25 + 0.45) / 2], rtol=1e-6)


def test_insertion_end_to_end_on_the_linear_model():
    model, images, base, targets = setup(4, n=3, h=4, w=5)
    maps = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(9)).double()
    out = insertion(model, images, maps, targets, baseline=base, steps=20, chunk_size=7)
    fractions = insertion_fractions(20)
    assert fractions[0] == 0.05 and fractions[-1] == 1.0 and len(fractions) == 20
    ref = hand_curves(model, images, base, targets, np.argsort(-maps.flatten(1).numpy(), axis=1, kind="stable"),
                      list(range(1, 21)), "insert")  # P = 20: one pixel per 5 %
    p_c = target_probability(model, images, targets).numpy()
    np.testing.assert_allclose(out["softmax_ratio"].numpy(), ref["prob"] / p_c[:, None], rtol=1e-6)
    np.testing.assert_allclose(out["accuracy"].numpy(), ref["top1"])
    np.testing.assert_allclose(out["softmax_ratio"][:, -1].numpy(), 1.0, rtol=1e-6)  # PI = 100 %: the image
    np.testing.assert_allclose(out["accuracy_auc"].numpy(), np.trapezoid(ref["top1"], fractions, axis=1) / 0.95)


def test_model_is_left_alone():
    model, images, base, targets = setup(5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perturbation_curves(model, images, pixel_order(images[:, 0]), targets, [0.5], mode="remove", baseline=base)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_input_fails_in_one_line():
    model, images, base, targets = setup(6, n=2)
    order = pixel_order(images[:, 0])
    with pytest.raises(AttributionError, match="not a permutation"):
        perturbation_curves(model, images, torch.zeros_like(order), targets, [0.5], baseline=base)
    with pytest.raises(AttributionError, match=r"in \[0, 1\]"):
        perturbation_curves(model, images, order, targets, [1.5], baseline=base)
    with pytest.raises(AttributionError, match="does not fit images"):
        perturbation_curves(model, images, order, targets, [0.5], baseline=torch.zeros(4))
    with pytest.raises(AttributionError, match="mode must be"):
        perturbation_curves(model, images, order, targets, [0.5], mode="delete", baseline=base)
    with pytest.raises(AttributionError, match="outside the model's 4 classes"):
        perturbation_curves(model, images, order, torch.tensor([0, 9]), [0.5], baseline=base)
    with pytest.raises(AttributionError, match="map 1 holds NaN"):
        pixel_order(torch.tensor([[[0.0]], [[float("nan")]]]))
