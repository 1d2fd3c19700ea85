"""attribution.metrics.similarity and .discrimination against scipy.stats and skimage.metrics."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from skimage.metrics import structural_similarity

from attribution.errors import AttributionError
from attribution.metrics.discrimination import class_discrimination
from attribution.metrics.similarity import minmax, pearson, rank, spearman, ssim

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tied(shape: tuple[int, ...], seed: int, levels: int = 6) -> torch.Tensor:
    """Random float32 values with many ties (a few integer levels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).float()


@pytest.mark.parametrize("device", DEVICES)
def test_rank_is_scipy_rankdata_average(device):
    x = torch.cat([tied((5, 300), 0), torch.randn(3, 300, generator=torch.Generator().manual_seed(1))])
    ours = rank(x.to(device))
    assert ours.dtype == torch.float64 and ours.device.type == device
    ref = stats.rankdata(x.numpy(), method="average", axis=1)
    np.testing.assert_array_equal(ours.cpu().numpy(), ref)


def test_rank_hand_example_and_nan():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0], [0.0, float("nan"), 5.0, 5.0, -1.0]])
    r = rank(x)
    assert r[0].tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert r[1, [0, 2, 3, 4]].tolist() == [2.0, 3.5, 3.5, 1.0] and torch.isnan(r[1, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_spearman_equals_scipy_with_ties(device):
    a = torch.cat([tied((6, 500), 2), torch.randn(2, 500, generator=torch.Generator().manual_seed(3))])
    b = torch.cat([tied((6, 500), 4, levels=3), torch.randn(2, 500, generator=torch.Generator().manual_seed(5))])
    b[0] = a[0] * 2 + 1  # perfectly monotone: rho = 1
    b[1] = -a[1]  # reversed: rho = -1
    ours = spearman(a.to(device), b.to(device)).cpu().numpy()
    ref = np.array([stats.spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy())])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert ours[0] == pytest.approx(1.0) and ours[1] == pytest.approx(-1.0)
    assert np.abs(ours[2:]).max() < 0.3  # independent random rows: not trivially +-1


def test_spearman_constant_row_is_nan_like_scipy():
    a = torch.stack([torch.ones(50), torch.arange(50.0)])
    b = torch.stack([torch.arange(50.0), torch.ones(50)])
    ours = spearman(a, b)
    with np.errstate(all="ignore"), pytest.warns(stats.ConstantInputWarning):
        ref = stats.spearmanr(a[0].numpy(), b[0].numpy()).statistic
    assert np.isnan(ref) and torch.isnan(ours).all()


def test_pearson_equals_numpy():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(4, 100, generator=g), torch.randn(4, 100, generator=g)
    b = b + a * torch.tensor([0.0, 0.5, 2.0, -3.0])[:, None]
    ref = [np.corrcoef(x, y)[0, 1] for x, y in zip(a.double().numpy(), b.double().numpy())]
    np.testing.assert_allclose(pearson(a, b).numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_ssim_equals_skimage_default(device):
    g = torch.Generator().manual_seed(11)
    a = torch.rand(4, 40, 52, generator=g)
    b = torch.stack([a[0], 1 - a[1], a[2] + 0.3 * torch.rand(40, 52, generator=g), torch.rand(40, 52, generator=g)])
    a[3] = a[3].mul(5).round() / 5  # ties / plateaus
    ours = ssim(minmax(a).to(device), minmax(b).to(device), data_range=1).cpu().numpy()
    ref = [structural_similarity(x, y, data_range=1.0)
           for x, y in zip(minmax(a).double().numpy(), minmax(b).double().numpy())]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)
    assert ours[0] == pytest.approx(1.0) and ours[1] < 0 and 0.05 < ours[2] < 0.99


def test_ssim_default_range_is_the_pairs_range():
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(3, 30, 30, generator=g) * 4, torch.randn(3, 30, 30, generator=g)
    ours = ssim(a, b).numpy()
    ref = [structural_similarity(x, y, data_range=float(max(x.max(), y.max()) - min(x.min(), y.min())))
           for x, y in zip(a.double().numpy(), b.double().numpy())]
    np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_minmax():
    x = torch.tensor([[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]])
    assert minmax(x).tolist() == [[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]


def test_bad_shapes_fail_in_one_line():
    with pytest.raises(AttributionError, match="shapes differ"):
        spearman(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(AttributionError, match="smaller than the 7x7 window"):
        ssim(torch.zeros(1, 5, 5), torch.zeros(1, 5, 5), data_range=1)
    with pytest.raises(AttributionError, match=r"\[N, T, H, W\]"):
        class_discrimination(torch.zeros(2, 5, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_class_discrimination_is_mean_pairwise_scipy_spearman(device):
    g = torch.Generator().manual_seed(13)
    base = torch.randn(3, 1, 16, 16, generator=g)
    maps = base + torch.tensor([0.2, 1.0, 5.0]).view(3, 1, 1, 1) * torch.randn(3, 5, 16, 16, generator=g)
    maps[0, 2] = maps[0, 2].round()  # ties
    ours = class_discrimination(maps.to(device)).cpu().numpy()
    ref = [np.mean([stats.spearmanr(m[i].ravel(), m[j].ravel()).statistic
                    for i, j in itertools.combinations(range(5), 2)]) for m in maps.numpy()]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert ours[0] > ours[1] > ours[2]  # more shared structure -> higher mean correlation
