"""From a stored sample (encoded image bytes + metadata) to model input pixels and boxes in map coordinates."""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from attribution.preprocessing import Preprocessing


class SampleError(ValueError):
    """A sample that cannot be used; the message is the reason stored in the errors table."""


@dataclass
class DecodedSample:
    """``pixels``: uint8 [3, S, S] RGB after resize + centre crop (S = input size); ``bboxes`` in original pixels;
    ``bboxes_input``: the same boxes in the S x S map's pixel coordinates, clipped to it (boxes that leave the
    crop entirely are dropped)."""

    pixels: np.ndarray
    label: int
    wnid: str | None
    width: int
    height: int
    bboxes: list[list[float]]
    bboxes_input: list[list[float]]


def decode_sample(image_bytes: bytes | None, cls_bytes: bytes | None, json_bytes: bytes | None,
                  preprocessing: Preprocessing) -> DecodedSample:
    """Decode one sample; raise SampleError with a one-line reason if it cannot be used.

    Any format PIL reads is accepted (grayscale, CMYK and PNG bytes in a ``.jpg`` member are converted to RGB);
    a corrupt or truncated image, a missing ``.cls``/``.json``, or a box outside the image is an error.
    """
    if not image_bytes:
        raise SampleError("missing image member (.jpg)")
    if cls_bytes is None:
        raise SampleError("missing .cls member")
    if json_bytes is None:
        raise SampleError("missing .json member")
    try:
        label = int(cls_bytes.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError(f"unreadable .cls: {cls_bytes[:20]!r}") from None
    try:
        meta = json.loads(json_bytes)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SampleError(f"unreadable .json: {exc}") from None
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            rgb = image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        reason = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>", "the image bytes", str(exc))  # no memory address
        raise SampleError(f"undecodable image: {type(exc).__name__}: {reason}") from None
    width, height = rgb.size
    bboxes = [[float(v) for v in box] for box in meta.get("bboxes", [])]
    for box in bboxes:
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise SampleError(f"malformed bbox {box}")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise SampleError(f"bbox {box} outside the {width}x{height} image")
    pixels = preprocessing.pixels_uint8(rgb)
    return DecodedSample(pixels, label, meta.get("wnid"), width, height, bboxes,
                         boxes_in_input(bboxes, width, height, preprocessing))


def crop_geometry(width: int, height: int, preprocessing: Preprocessing) -> tuple[float, float, int, int]:
    """(scale_x, scale_y, left, top) of resize-shorter-side + centre-crop, as torchvision computes them."""
    new_w, new_h = preprocessing.resized_size(width, height)
    left, top = preprocessing.crop_offsets(new_w, new_h)
    return new_w / width, new_h / height, left, top


def boxes_in_input(bboxes: list[list[float]], width: int, height: int,
                   preprocessing: Preprocessing) -> list[list[float]]:
    """Boxes [x0, y0, x1, y1] in original pixels -> in the input crop's pixels, clipped; empty ones dropped."""
    sx, sy, left, top = crop_geometry(width, height, preprocessing)
    size = preprocessing.input_size
    out = []
    for x0, y0, x1, y1 in bboxes:
        box = [min(max(x0 * sx - left, 0.0), size), min(max(y0 * sy - top, 0.0), size),
               min(max(x1 * sx - left, 0.0), size), min(max(y1 * sy - top, 0.0), size)]
        if box[2] > box[0] and box[3] > box[1]:
            out.append(box)
    return out
