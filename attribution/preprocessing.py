"""Image -> model input: resize, centre crop, scale, normalise. Importing this module does not import torch, so
CPU decode workers stay light; the tensor operations import it when called."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Image -> normalised tensor: resize the shorter side to ``resize_size`` (bilinear, as torchvision's
    ``Resize`` on a PIL image), centre-crop ``input_size`` (torchvision's rounding), scale to [0, 1], subtract
    ``mean`` and divide by ``std`` (per RGB channel)."""

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing the shorter side to ``resize_size`` (torchvision's computation)."""
        if width <= height:
            return self.resize_size, int(self.resize_size * height / width)
        return int(self.resize_size * width / height), self.resize_size

    def crop_offsets(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop of a ``width`` x ``height`` image (torchvision's rounding)."""
        return int(round((width - self.input_size) / 2.0)), int(round((height - self.input_size) / 2.0))

    def pixels_uint8(self, image: Image.Image) -> np.ndarray:
        """PIL image (any mode) -> uint8 [3, input_size, input_size] RGB, without torch."""
        image = image.convert("RGB")
        width, height = self.resized_size(*image.size)
        image = image.resize((width, height), Image.BILINEAR)
        left, top = self.crop_offsets(width, height)
        image = image.crop((left, top, left + self.input_size, top + self.input_size))
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))

    def pixels(self, image: Image.Image) -> "Tensor":
        """PIL image (any mode) -> float32 [3, input_size, input_size] RGB in [0, 1]."""
        import torch
        return torch.from_numpy(self.pixels_uint8(image)).float() / 255.0

    def normalise(self, pixels: "Tensor") -> "Tensor":
        """[..., 3, H, W] in [0, 1] -> normalised, same shape."""
        import torch
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        return (pixels - mean) / std

    def denormalise(self, images: "Tensor") -> "Tensor":
        """Inverse of :meth:`normalise`: normalised [..., 3, H, W] -> pixels in [0, 1] (not clamped)."""
        import torch
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(3, 1, 1)
        return images * std + mean

    def __call__(self, image: Image.Image) -> "Tensor":
        """PIL image -> normalised float32 [3, input_size, input_size]."""
        return self.normalise(self.pixels(image))
