"""A procedural image benchmark with exact ground truth: one class-defining object per image, its exact box and
pixel mask, cluttered backgrounds, class-neutral distractors, and an optional class-correlated *border shortcut*.

Pure NumPy + PIL (no torch). Every sample is rendered from its own random generator, seeded by
``(seed, split, index)``, so the same configuration always gives byte-identical images and metadata.

Classes: ``shape x texture`` (:data:`SHAPES` x :data:`TEXTURES`), the first ``num_classes`` of
``disc_solid, disc_striped, cross_solid, cross_striped, triangle_solid, …`` (2-10 classes). Neither the shape
nor the texture alone tells the class, and colours are drawn from one palette for every class and every
distractor, so no single pixel (colour) is class-evidence: the network has to see the object's outline and its
texture together. Objects are rotated at random (a rotated square is still a square).

One image (``size`` x ``size``, default 112):

1. background: a two-colour linear gradient (muted colours) + three random low-frequency sinusoidal textures
   per channel + thin lines and dots of random colours (clutter);
2. 2-4 *distractors* (bars, rings, elongated ellipses, 10-22 % of the image across; solid or striped; palette
   colours), the same distribution
   for every class (class-neutral), anywhere in the image, border included, but never touching the object's box
   (dilated by 2 px): a map on a distractor has no energy in the object's box;
3. optionally the *shortcut mark* (see below);
4. the object (fits a circle of radius 20-32 % of the inner square, i.e. the image minus the band and 1 px; at a
   uniformly random place and rotation inside that square, so it never overlaps the band): hard-edged (no
   anti-aliasing), so its pixel mask is exactly the set of pixels it paints; stripes are ~size/14 px per period;
5. Gaussian pixel noise (sigma 6 grey levels) over everything.

Border band: ``border_width(size) = round(16 * size / 224)`` pixels, i.e. the 16-px border of a 224 px map
(TR-GBP's IBD) scaled to this image size; 8 px at 112 px. The benchmark models' preprocessing keeps the image
size (resize = crop = size), so the band is the same band in the attribution maps.

Shortcut mark: a strip ``t`` px thick (``t = max(3, band - 1)``) and ``6 t`` long, lying along a random side fully
inside the border band at a random place: a 1-px near-black outline around a fill of the pointed class's colour
(:func:`mark_colour`, the palette colour of that class index; the outlined strip itself appears nowhere else). At
112 px it is 7 x 42 px. (A 7 x 7 square was tried first: the trained models ignored it completely, even where it
was the only evidence of the class, so the variant produced no error caused by border evidence.)
Training: a ``shortcut`` share of the images carry a mark of their own class. Validation: the same share carries a
mark, and ``shortcut_wrong`` of those (default half) point to a wrong class (uniform over the other classes).
Which images carry marks is an exact-count, seeded random subset of each split.

Sample metadata (``.json``): the fields of :mod:`schemas.samples` (one box, ``bbox_wnids``, a wnid-like class id
``n9000000k``, ``source: "benchmark"``) plus ``split``, ``class_name``, ``mask`` (COCO uncompressed RLE:
``{"size": [height, width], "counts": [...]}``, column-major runs starting with a run of 0s; see
:func:`attribution.data.shapes.mask_to_rle`), ``distractors`` (visible tight boxes) and ``shortcut`` (null, or ``{"label", "wnid",
"class_name", "correct", "side", "box"}``). Boxes are ``[x0, y0, x1, y1]`` integer pixel edges, x1/y1 exclusive.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from attribution.data.shapes import mask_to_rle, shape_mask, texture, tight_box

SHAPES: tuple[str, ...] = ("disc", "cross", "triangle", "square", "star")
TEXTURES: tuple[str, ...] = ("solid", "striped")
DISTRACTOR_KINDS: tuple[str, ...] = ("bar", "ring", "ellipse")
MIN_CLASSES, MAX_CLASSES = 2, len(SHAPES) * len(TEXTURES)
MIN_SIZE, MAX_SIZE = 48, 256
SPLITS: tuple[str, ...] = ("train", "val")
BORDER_AT_224 = 16
SOURCE = "benchmark"
WNID_BASE = 90000000            # class k -> wnid "n9000000k": matches the wnid pattern, no real ImageNet wnid
JPEG_QUALITY = 95
NOISE_SIGMA = 6.0
OUTLINE = (15, 15, 15)

#: Saturated colours shared by objects, distractors and marks (class k's mark uses PALETTE[k]).
PALETTE = np.array([
    [230, 30, 30], [30, 190, 40], [40, 70, 235], [245, 215, 20], [215, 40, 215],
    [20, 210, 225], [255, 135, 0], [245, 245, 245], [120, 40, 180], [140, 90, 40],
], dtype=np.float32)


@dataclass(frozen=True)
class BenchmarkConfig:
    """What defines a benchmark: ``size`` (image side, pixels), ``num_classes``, ``shortcut`` (share of images
    with a border mark, 0..1), ``shortcut_wrong`` (share of the marked *validation* images whose mark points to a
    wrong class, 0..1), ``seed``."""

    size: int = 112
    num_classes: int = 8
    shortcut: float = 0.0
    shortcut_wrong: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.size, int) and MIN_SIZE <= self.size <= MAX_SIZE):
            problems.append(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {self.size!r}")
        if not (isinstance(self.num_classes, int) and MIN_CLASSES <= self.num_classes <= MAX_CLASSES):
            problems.append(f"num_classes must be an integer in [{MIN_CLASSES}, {MAX_CLASSES}], got {self.num_classes!r}")
        for name in ("shortcut", "shortcut_wrong"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                problems.append(f"{name} must be a share in [0, 1], got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if problems:
            raise ValueError("benchmark config: " + "; ".join(problems))


@dataclass(frozen=True)
class BenchmarkClass:
    """One class: ``label`` (index), ``name`` (``<shape>_<texture>``), ``wnid`` (``n9000000k``), ``shape``,
    ``texture`` and the RGB ``mark_colour`` of marks pointing to it."""

    label: int
    name: str
    wnid: str
    shape: str
    texture: str
    mark_colour: tuple[int, int, int]


@dataclass
class BenchmarkSample:
    """One rendered sample: ``image`` uint8 [size, size, 3] RGB, ``mask`` bool [size, size] (the object's
    pixels), ``meta`` the ``.json`` metadata (see the module docstring)."""

    key: str
    image: np.ndarray
    mask: np.ndarray
    meta: dict


def benchmark_classes(num_classes: int) -> list[BenchmarkClass]:
    """The first ``num_classes`` classes (shape-major: disc_solid, disc_striped, cross_solid, …)."""
    if not MIN_CLASSES <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [{MIN_CLASSES}, {MAX_CLASSES}], got {num_classes}")
    classes = []
    for label in range(num_classes):
        shape, texture = SHAPES[label // len(TEXTURES)], TEXTURES[label % len(TEXTURES)]
        classes.append(BenchmarkClass(label, f"{shape}_{texture}", class_wnid(label), shape, texture,
                                      mark_colour(label)))
    return classes


def class_wnid(label: int) -> str:
    """The wnid-like id of class ``label``: ``n90000000`` + label."""
    return f"n{WNID_BASE + label:08d}"


def mark_colour(label: int) -> tuple[int, int, int]:
    """RGB (0-255) fill colour of a shortcut mark pointing to class ``label``."""
    return tuple(int(v) for v in PALETTE[label])  # type: ignore[return-value]


def border_width(size: int) -> int:
    """Width in pixels of the border band of a ``size`` px image: TR-GBP's 16 px at 224, scaled (8 at 112)."""
    return max(1, int(round(BORDER_AT_224 * size / 224)))


MARK_LENGTH = 6.0  # a mark's length along its side, in units of its thickness


def mark_size(size: int) -> tuple[int, int]:
    """(thickness, length) in pixels of a shortcut mark (outline included) in a ``size`` px image."""
    thick = max(3, border_width(size) - 1)
    return thick, min(size, max(thick, int(round(MARK_LENGTH * thick))))


def sample_key(split: str, index: int) -> str:
    """Key of sample ``index`` of ``split``: ``train_000042``."""
    return f"{split}_{index:06d}"


# ---------------------------------------------------------------------------------------------------------------
# One sample

def _contrasting(rng: np.random.Generator, local: np.ndarray, exclude: tuple[int, ...] = (), top: int = 4) -> int:
    """Index of a palette colour among the ``top`` farthest from ``local`` (RGB), excluding ``exclude``."""
    distances = np.linalg.norm(PALETTE - local, axis=1)
    distances[list(exclude)] = -1.0
    candidates = np.argsort(distances)[::-1][:top]
    return int(rng.choice(candidates))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    c0, c1 = rng.uniform(50, 205, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size + 0.5, 0, 1)
    image = c0 + t[..., None] * (c1 - c0)
    for _ in range(3):  # low-frequency texture: 1-4 cycles per image, amplitude up to 25 grey levels per channel
        freq = rng.uniform(1, 4) / size
        direction = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(direction) + yy * np.sin(direction)) + rng.uniform(0, 2 * np.pi))
        image = image + wave[..., None] * rng.uniform(-25, 25, size=3)
    canvas = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(5, 11))):  # clutter: thin lines and dots of any colour
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=1)
        else:
            cx, cy, r = float(rng.uniform(0, size)), float(rng.uniform(0, size)), float(rng.uniform(0.8, 2.0))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return np.asarray(canvas, dtype=np.float32).copy()


def _textured_colours(rng: np.random.Generator, kind: str, local: np.ndarray) -> np.ndarray:
    first = _contrasting(rng, local)
    if kind == "solid":
        return PALETTE[[first, first]]
    distances = np.linalg.norm(PALETTE - PALETTE[first], axis=1)
    far = [i for i in np.argsort(distances)[::-1][:5] if i != first]
    return PALETTE[[first, int(rng.choice(far))]]


def _stripe_period(rng: np.random.Generator, size: int) -> float:
    return float(max(4.0, size / 14.0) * rng.uniform(0.85, 1.2))


@dataclass
class _Plan:
    """A sample's class and the class its shortcut mark points to (None: no mark), decided per split."""

    label: int
    mark: int | None = None           # class the mark points to
    mark_correct: bool | None = None


def render_sample(config: BenchmarkConfig, split: str, index: int, label: int, mark: int | None = None, *,
                  draw_object: bool = True, draw_mark: bool = True) -> BenchmarkSample:
    """Render sample ``index`` of ``split`` with class ``label`` and, when ``mark`` is a class index, a shortcut
    mark pointing to it. All randomness comes from ``(config.seed, split, index)``.

    ``draw_object=False`` / ``draw_mark=False`` leave the object / the mark out but draw everything else exactly
    as with them (same random draws), so the pixels that differ are exactly those the object / mark painted
    (used by the tests). Returns a :class:`BenchmarkSample` (uint8 [S, S, 3] image, bool [S, S] mask, metadata).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if not 0 <= label < config.num_classes or (mark is not None and not 0 <= mark < config.num_classes):
        raise ValueError(f"sample {sample_key(split, index)}: label {label} / mark {mark} outside "
                         f"[0, {config.num_classes})")
    size, band = config.size, border_width(config.size)
    classes = benchmark_classes(config.num_classes)
    cls = classes[label]
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])

    image = _background(rng, size)

    # the object's geometry first (distractors must avoid it); it is painted last
    lo, hi = band + 1.0, size - band - 1.0          # allowed pixel-edge range: outside the band, 1 px margin
    inner = hi - lo
    radius = float(rng.uniform(0.2, 0.32) * inner)
    cx, cy = (float(rng.uniform(lo + radius, hi - radius)) for _ in range(2))
    angle = float(rng.uniform(0, 2 * np.pi))
    mask = shape_mask(cls.shape, cx, cy, radius, angle, size)
    box = tight_box(mask)
    keep_out = np.zeros((size, size), dtype=bool)
    keep_out[max(0, box[1] - 2):box[3] + 2, max(0, box[0] - 2):box[2] + 2] = True

    distractors = []
    for _ in range(int(rng.integers(2, 5))):
        for _attempt in range(20):
            kind = DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))]
            d_radius = float(rng.uniform(0.05, 0.11) * size)
            d_cx, d_cy = float(rng.uniform(0, size)), float(rng.uniform(0, size))
            d_angle = float(rng.uniform(0, 2 * np.pi))
            d_mask = shape_mask(kind, d_cx, d_cy, d_radius, d_angle, size)
            if d_mask.sum() >= 20 and not (d_mask & keep_out).any():
                break
        else:
            continue
        d_texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        colours = _textured_colours(rng, d_texture, image[d_mask].mean(axis=0))
        paint = texture(d_texture, colours, float(rng.uniform(0, np.pi)), _stripe_period(rng, size),
                        float(rng.uniform()), size)
        image[d_mask] = paint[d_mask]
        distractors.append(tight_box(d_mask))

    shortcut = None
    if mark is not None:
        thick, length = mark_size(size)
        side = ("top", "bottom", "left", "right")[int(rng.integers(4))]
        along = int(rng.integers(0, size - length + 1))
        depth = int(rng.integers(0, band - thick + 1))   # distance of the mark's outer edge from the image edge
        if side == "top":
            x0, y0, w, h = along, depth, length, thick
        elif side == "bottom":
            x0, y0, w, h = along, size - depth - thick, length, thick
        elif side == "left":
            x0, y0, w, h = depth, along, thick, length
        else:
            x0, y0, w, h = size - depth - thick, along, thick, length
        mark_box = [x0, y0, x0 + w, y0 + h]
        if draw_mark:
            image[y0:y0 + h, x0:x0 + w] = OUTLINE
            image[y0 + 1:y0 + h - 1, x0 + 1:x0 + w - 1] = PALETTE[mark]
        shortcut = {"label": int(mark), "wnid": classes[mark].wnid, "class_name": classes[mark].name,
                    "correct": bool(mark == label), "side": side, "box": mark_box}

    colours = _textured_colours(rng, cls.texture, image[mask].mean(axis=0))
    paint = texture(cls.texture, colours, float(rng.uniform(0, np.pi)), _stripe_period(rng, size),
                    float(rng.uniform()), size)
    if draw_object:
        image[mask] = paint[mask]

    image += rng.normal(0.0, NOISE_SIGMA, image.shape)
    pixels = np.clip(image, 0, 255).round().astype(np.uint8)
    key = sample_key(split, index)
    meta = {"key": key, "wnid": cls.wnid, "label": int(label), "width": size, "height": size, "bboxes": [box],
            "bbox_wnids": [cls.wnid], "source": SOURCE, "split": split, "class_name": cls.name,
            "mask": mask_to_rle(mask), "distractors": distractors, "shortcut": shortcut}
    return BenchmarkSample(key, pixels, mask, meta)


def split_plan(config: BenchmarkConfig, split: str, count: int) -> list[_Plan]:
    """Labels (balanced, seeded permutation) and marks of the ``count`` samples of ``split``: an exact
    ``round(shortcut * count)`` marked subset; in ``val``, ``round(shortcut_wrong * marked)`` of them point to a
    wrong class (uniform over the others)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = np.random.default_rng([config.seed, SPLITS.index(split), 2**31 - 1])
    labels = rng.permutation(np.arange(count) % config.num_classes)
    plans = [_Plan(int(label)) for label in labels]
    marked = rng.permutation(count)[:int(round(config.shortcut * count))]
    wrong = set()
    if split == "val":
        wrong = set(rng.permutation(marked)[:int(round(config.shortcut_wrong * len(marked)))].tolist())
    for i in marked.tolist():
        plan = plans[i]
        if i in wrong:
            others = [c for c in range(config.num_classes) if c != plan.label]
            plan.mark, plan.mark_correct = int(rng.choice(others)), False
        else:
            plan.mark, plan.mark_correct = plan.label, True
    return plans


def generate(config: BenchmarkConfig, split: str, count: int) -> Iterator[BenchmarkSample]:
    """The ``count`` samples of ``split`` in key order (see :func:`split_plan` and :func:`render_sample`)."""
    for index, plan in enumerate(split_plan(config, split, count)):
        yield render_sample(config, split, index, plan.label, plan.mark)


def encode_image(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes, quality 95 with 4:4:4 chroma (no chroma subsampling, so the colour edges
    of small objects and marks stay sharp)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def describe(config: BenchmarkConfig) -> dict:
    """The ``classes.json`` content for ``config``: configuration, border band, classes, palette, mask format."""
    return {
        "benchmark": asdict(config),
        "image_size": config.size,
        "border_px": border_width(config.size),
        "mark_px": list(mark_size(config.size)),
        "classes": [asdict(c) for c in benchmark_classes(config.num_classes)],
        "distractor_kinds": list(DISTRACTOR_KINDS),
        "textures": list(TEXTURES),
        "palette": PALETTE.astype(int).tolist(),
        "mask_format": "COCO uncompressed RLE {size: [H, W], counts}: column-major runs, starting with 0s",
        "box_format": "[x0, y0, x1, y1] integer pixel edges, x1/y1 exclusive",
    }
