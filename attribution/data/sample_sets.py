"""The offline sample sets: hand-labelled real photos and seeded synthetic shapes with exact boxes."""
from __future__ import annotations

import io
import json
from importlib import resources

import numpy as np

from attribution.data.imagenet import imagenet_wnids
from attribution.data.shards import Sample, encode_jpeg
from schemas.samples import SYNTHETIC_CLASSES, validate_sample_json

# ---------------------------------------------------------------------------------------------------------------
# Sample mode: hand-labelled real photos + synthetic shapes

def sample_photos_spec() -> list[dict]:
    """The entries of ``attribution/data/sample_photos.json``."""
    text = resources.files("attribution.data").joinpath("sample_photos.json").read_text(encoding="utf-8")
    return json.loads(text)["photos"]


def photo_samples() -> list[Sample]:
    """The hand-labelled real photos (scikit-image, matplotlib) as samples; labels checked against the wnid list."""
    from PIL import Image
    wnids = imagenet_wnids()
    samples = []
    for entry in sample_photos_spec():
        data = _photo_bytes(entry)
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        meta = {"key": entry["name"], "wnid": entry["wnid"], "label": entry["label"], "width": width,
                "height": height, "bboxes": entry["bboxes"], "bbox_wnids": entry["bbox_wnids"],
                "source": entry["source"]}
        problems = validate_sample_json(meta, entry["name"], wnids=wnids)
        if problems:
            raise ValueError(f"attribution/data/sample_photos.json: {'; '.join(problems)}")
        samples.append(Sample(entry["name"], meta, lambda data=data: data))
    return samples


def _photo_bytes(entry: dict) -> bytes:
    source = entry["source"]
    if source.startswith("matplotlib.cbook.get_sample_data:"):
        from matplotlib import cbook
        with cbook.get_sample_data(source.split(":", 1)[1]) as handle:
            data = handle.read()
        return data if data[:3] == b"\xff\xd8\xff" else encode_jpeg(_open(data))
    if source.startswith("skimage.data."):
        from skimage import data as skdata
        array = getattr(skdata, source.removeprefix("skimage.data."))()
        if isinstance(array, tuple):
            array = array[entry.get("item", 0)]
        array = np.asarray(array)
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        return encode_jpeg(array)
    raise ValueError(f"sample photo {entry['name']}: unknown source {source!r}")


def _open(data: bytes):
    from PIL import Image
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def synthetic_image(rng: np.random.Generator, label: int, size: int = 224) -> tuple[np.ndarray, list[int]]:
    """One uint8 [size, size, 3] image with a filled shape of class ``label`` (SYNTHETIC_CLASSES) on a noisy,
    cluttered background, and the shape's exact box [x0, y0, x1, y1] (tight around its pixels, x1/y1 exclusive)."""
    from PIL import Image, ImageDraw
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # background: a random two-colour gradient, then clutter (thin lines, small dots)
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size + 0.5
    background = c0 + np.clip(t, 0, 1)[..., None] * (c1 - c0)
    canvas = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 14))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
        else:
            cx, cy, r = float(rng.uniform(0, size)), float(rng.uniform(0, size)), float(rng.uniform(1, 4))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    image = np.asarray(canvas, dtype=np.float32)
    # the shape: fully inside the image, a saturated colour far from the local background
    extent = float(rng.uniform(0.18, 0.5) * size)
    x0 = float(rng.uniform(2, size - extent - 2))
    y0 = float(rng.uniform(2, size - extent - 2))
    name = SYNTHETIC_CLASSES[label]
    if name == "disc":
        r = extent / 2
        mask = (xx - x0 - r) ** 2 + (yy - y0 - r) ** 2 <= r * r
    elif name == "square":
        mask = (xx >= x0) & (xx < x0 + extent) & (yy >= y0) & (yy < y0 + extent)
    else:  # triangle: apex at the top centre, base at the bottom
        apex_x = x0 + extent / 2
        rel = (yy - y0) / extent  # 0 at the apex, 1 at the base
        mask = (rel >= 0) & (rel <= 1) & (np.abs(xx - apex_x) <= rel * extent / 2)
    palette = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 235], [250, 220, 20], [220, 40, 220], [20, 220, 230],
                        [255, 140, 0], [250, 250, 250]], dtype=np.float32)
    local = image[mask].mean(axis=0)
    distances = np.linalg.norm(palette - local, axis=1)
    candidates = np.flatnonzero(distances >= np.sort(distances)[-3])  # one of the 3 most contrasting colours
    colour = palette[int(rng.choice(candidates))]
    image[mask] = colour
    image += rng.normal(0, 8, image.shape)
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    return np.clip(image, 0, 255).round().astype(np.uint8), box


def synthetic_samples(count: int = 24, seed: int = 0, size: int = 224) -> list[Sample]:
    """``count`` synthetic samples, classes in turn (balanced), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        label = i % len(SYNTHETIC_CLASSES)
        image, box = synthetic_image(rng, label, size)
        data = encode_jpeg(image)
        key = f"synthetic_{i:06d}"
        meta = {"key": key, "wnid": None, "label": label, "width": size, "height": size, "bboxes": [box],
                "bbox_wnids": [None], "source": "synthetic"}
        samples.append(Sample(key, meta, lambda data=data: data))
    return samples


