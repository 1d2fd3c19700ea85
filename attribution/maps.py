"""Small operations on attribution maps shared by several methods."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (align_corners=False, as Captum and OpenCV) of [..., h, w] maps to [..., *size]."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)
