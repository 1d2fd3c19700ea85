"""attribution.metrics.localisation: EBPG, IBD and the EBPG image filter, analytic values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.errors import AttributionError
from attribution.metrics.localisation import (
    border_frame,
    border_intensity,
    box_area_share,
    box_mask,
    ebpg_eligible,
    energy_pointing_game,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_box_mask_pixel_centres():
    m = box_mask([[1, 2, 4, 3]], 5, 6)  # integer box: columns 1..3, row 2
    expected = np.zeros((5, 6), bool)
    expected[2, 1:4] = True
    np.testing.assert_array_equal(m.numpy(), expected)
    # fractional: a centre j + 0.5 counts when x0 <= j + 0.5 < x1
    m = box_mask([[0.5, 0.4, 2.5, 1.6]], 4, 4)
    expected = np.zeros((4, 4), bool)
    expected[0:2, 0:2] = True  # columns 0, 1 (centres 0.5, 1.5; 2.5 excluded), rows 0, 1 (0.5, 1.5 < 1.6)
    np.testing.assert_array_equal(m.numpy(), expected)
    # union, clipping, no boxes
    m = box_mask([[-3, -3, 1, 1], [3, 3, 99, 99]], 4, 4)
    assert m.sum() == 2 and m[0, 0] and m[3, 3]
    assert not box_mask([], 3, 3).any() and box_mask([], 3, 3).shape == (3, 3)
    assert box_mask(np.array([[0, 0, 2, 2]]), 3, 3).sum() == 4 and box_mask(torch.tensor([[0, 0, 2, 2]]), 3, 3).sum() == 4


@pytest.mark.parametrize("device", DEVICES)
def test_ebpg_analytic_values(device):
    h = w = 224
    box = [[30, 40, 130, 100]]  # 100 x 60 pixels
    mask = box_mask(box, h, w).to(device)
    share = 100 * 60 / (224 * 224)
    inside = torch.zeros(h, w)
    inside[50:90, 40:120] = torch.rand(40, 80) + 0.1  # all energy inside the box
    inside[0:10, 0:10] = -3.0  # negative values outside are clamped away
    uniform = torch.full((h, w), 0.7)
    half = torch.zeros(h, w)
    half[mask.cpu()] = 1.0
    half[110:170, 0:100] = 1.0  # 6000 pixels outside the box with the same energy as the box
    maps = torch.stack([inside, uniform, half, torch.zeros(h, w)]).to(device)
    out = energy_pointing_game(maps, mask.expand(4, h, w))
    assert out.device.type == device and out.dtype == torch.float64
    assert out[0].item() == 1.0
    assert out[1].item() == pytest.approx(share, abs=1e-12)
    assert out[2].item() == pytest.approx(0.5, abs=1e-12)
    assert torch.isnan(out[3])
    # signed variant: the negative block outside now counts: (inside) / (inside - 300)
    signed = energy_pointing_game(maps[:1], mask, clamp=False).item()
    total_in = inside[50:90, 40:120].double().sum().item()
    assert signed == pytest.approx(total_in / (total_in - 300.0), rel=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_ibd_uniform_map_and_border_only(device):
    maps = torch.stack([torch.ones(224, 224), torch.zeros(224, 224), torch.rand(224, 224)]).to(device)
    maps[1, :16] = 2.0  # only the top 16 rows (all of it in the frame)
    maps[2, 16:208, 16:208] = 0.0  # only frame energy
    out = border_intensity(maps)
    assert out[0].item() == pytest.approx(1 - (192 / 224) ** 2, abs=1e-12)
    assert out[1].item() == 1.0 and out[2].item() == 1.0
    rect = border_intensity(torch.ones(1, 100, 60), border=10)
    assert rect.item() == pytest.approx(1 - (80 / 100) * (40 / 60), abs=1e-12)
    frame = border_frame(224, 224, 16)
    assert frame.sum() == 224 * 224 - 192 * 192 and frame[15, 100] and frame[208, 100] and not frame[207, 100]
    assert border_intensity(torch.ones(1, 8, 8), border=0).item() == 0.0


def test_ibd_sign_handling():
    m = torch.ones(1, 224, 224)
    m[0, 16:208, 16:208] = -1.0  # negative interior: clamped, the frame holds all positive energy
    assert border_intensity(m).item() == 1.0
    frame = 224 * 224 - 192 * 192
    assert border_intensity(m, clamp=False).item() == pytest.approx(frame / (frame - 192 * 192))


def test_box_area_share_and_ebpg_eligible():
    assert box_area_share([[0, 0, 50, 40]], 100, 80) == pytest.approx(0.25)
    assert box_area_share([[0, 0, 50, 40], [25, 0, 75, 40]], 100, 80) == pytest.approx(0.375)  # union, overlap once
    assert box_area_share([[-10, -10, 50, 40]], 100, 80) == pytest.approx(0.25)  # clipped
    # pixel count of box_mask agrees for integer boxes
    boxes = [[3, 5, 40, 33], [20, 10, 70, 60]]
    assert box_area_share(boxes, 80, 64) == pytest.approx(float(box_mask(boxes, 64, 80).float().mean()))
    assert ebpg_eligible([[10, 10, 60, 60]], 100, 100)  # 25 %
    assert not ebpg_eligible([[0, 0, 100, 50]], 100, 100)  # exactly 50 %: not < 50 %
    assert ebpg_eligible([[0, 0, 100, 50]], 100, 100, max_share=0.6)
    assert not ebpg_eligible([[0, 0, 10, 10], [20, 20, 30, 30]], 100, 100)  # two boxes
    assert not ebpg_eligible([], 100, 100)
    assert ebpg_eligible([[0, 0, 300, 100]], 500, 375)  # width first: 300x100 of 500x375 = 16 %
    # (width, height) order: the box is clipped to the image's width 375 in the second call
    assert box_area_share([[0, 0, 480, 100]], 500, 375) == pytest.approx(48000 / 187500)
    assert box_area_share([[0, 0, 480, 100]], 375, 500) == pytest.approx(37500 / 187500)


def test_bad_boxes_fail_in_one_line():
    with pytest.raises(AttributionError, match="x1 < x0"):
        box_mask([[5, 0, 1, 3]], 4, 4)
    with pytest.raises(AttributionError, match="wrap it in a list"):
        box_mask([1, 2, 3, 4], 4, 4)
    with pytest.raises(AttributionError, match="non-finite"):
        box_mask([[0, 0, float("nan"), 3]], 4, 4)
    with pytest.raises(AttributionError, match="do not match"):
        energy_pointing_game(torch.zeros(2, 4, 4), torch.zeros(2, 5, 5, dtype=torch.bool))
    with pytest.raises(AttributionError, match="border must be >= 0"):
        border_intensity(torch.zeros(1, 4, 4), border=-1)
