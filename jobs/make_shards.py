"""Images + boxes -> deterministic WebDataset tar shards (the input of every other job).

    python -m jobs.make_shards imagenet --images DIR (--boxes DIR | --boxes-csv FILE) --out DIR
                                        [--wnids FILE] [--shard-size 1000] [--limit N] [--prefix val]
    python -m jobs.make_shards sample [--out runs/sample_shards] [--synthetic 24] [--seed 0] [--shard-size 4]

Each sample is ``<key>.jpg`` (original JPEG bytes; other formats re-encoded as JPEG quality 95), ``<key>.cls``
(class index as text, -1 unknown) and ``<key>.json`` (see :mod:`schemas.samples`), adjacent in the tar.
Shards are ``<out>/<prefix>-000000.tar`` … with ``--shard-size`` samples each, sorted by key and byte-identical
for the same input (fixed mtime/uid/gid/mode, no user or group names). ``<out>/shards.json`` lists every set
written to ``<out>`` (prefix -> pattern, shard files, sample counts, sha256, skipped inputs).

ImageNet: ``ILSVRC2012_val_XXXXXXXX.JPEG`` files anywhere under ``--images`` (flat or in class folders), boxes
from per-image PASCAL-VOC XML files anywhere under ``--boxes`` (``<stem>.xml``) or from a
``ImageId,PredictionString`` CSV (``"wnid x0 y0 x1 y1 wnid …"``, Kaggle's LOC_val_solution.csv). The class index
is the wnid's position in ``--wnids`` (one wnid per line, or LOC_synset_mapping.txt lines
``n01440764 tench, Tinca tinca``; line i = class i), by default the sorted 1000 ImageNet wnids shipped in
``attribution/data/imagenet_wnids.txt`` (torchvision's order). The label is the class of the first object.
Box coordinates are kept as given (right/bottom edges may equal the image size); a box that overshoots the image
by at most one pixel is clipped, a worse one skips the image. Skipped images (no annotation, unreadable XML or
image, unknown wnid, bad box) get one warning line each and are counted in the summary and in shards.json.
Missing directories or no images: one ``error:`` line, exit code 2.

Sample: real photos shipped with scikit-image and matplotlib, labelled and boxed by hand in
``attribution/data/sample_photos.json`` (prefix ``photos``), and seeded synthetic shapes on cluttered
backgrounds with exact boxes (prefix ``synthetic``, label = index in ``schemas.samples.SYNTHETIC_CLASSES``).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from schemas.samples import (KEY_PATTERN, SYNTHETIC_CLASSES, WNID_PATTERN, encode_sample_json,
                             validate_sample_json)

DEFAULT_SHARD_SIZE = 1000
DEFAULT_SAMPLE_OUT = "runs/sample_shards"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
MANIFEST = "shards.json"
JPEG_QUALITY = 95
BOX_TOLERANCE = 1.0        # pixels a box may overshoot the image before the image is skipped (it is then clipped)
TAR_MTIME = 946684800      # 2000-01-01T00:00:00Z for every member: same input -> byte-identical shards
MAX_WARNINGS = 50          # warning lines printed per set; the rest are only counted (all are in shards.json)
_SHARD_INDEX_DIGITS = 6


class ShardError(Exception):
    """Bad command-line input (missing directory, no images, bad wnid list): one line, exit code 2."""


@dataclass
class Sample:
    """One sample to write: ``image()`` returns the ``.jpg`` member's bytes (read lazily, at write time)."""

    key: str
    meta: dict
    image: Callable[[], bytes]


@dataclass
class Skipped:
    """An input that did not become a sample: its path (relative to --images), reason and reason kind."""

    file: str
    reason: str
    kind: str = ""


@dataclass
class ShardSet:
    """What :func:`write_shards` wrote for one prefix."""

    prefix: str
    pattern: str
    shards: list[dict] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    source: str = ""

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def manifest_entry(self, shard_size: int) -> dict:
        return {"pattern": self.pattern, "source": self.source, "shard_size": shard_size,
                "num_shards": len(self.shards), "num_samples": self.num_samples, "shards": self.shards,
                "num_skipped": len(self.skipped),
                "skipped": [{"file": s.file, "kind": s.kind, "reason": s.reason} for s in self.skipped]}


# ---------------------------------------------------------------------------------------------------------------
# Class lists

def imagenet_wnids(path: str | os.PathLike | None = None) -> list[str]:
    """The class list: ``path`` (see :func:`read_wnids`) or the shipped sorted 1000 ImageNet wnids."""
    if path is not None:
        return read_wnids(path)
    text = resources.files("attribution.data").joinpath("imagenet_wnids.txt").read_text(encoding="ascii")
    return _parse_wnids(text, "attribution/data/imagenet_wnids.txt")


def read_wnids(path: str | os.PathLike) -> list[str]:
    """Wnids from a file with one per line, optionally followed by names (LOC_synset_mapping.txt); line i = class i.
    Blank lines and ``#`` comments are ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardError(f"cannot read wnid list {path}: {exc.strerror if isinstance(exc, OSError) else exc}") \
            from None
    return _parse_wnids(text, str(path))


def _parse_wnids(text: str, where: str) -> list[str]:
    wnids: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = re.split(r"[\s,:]", line, maxsplit=1)[0]
        if not WNID_PATTERN.match(token):
            raise ShardError(f"wnid list {where} line {number}: {line[:40]!r} does not start with a wnid like n01440764")
        wnids.append(token)
    if not wnids:
        raise ShardError(f"wnid list {where} holds no wnids")
    duplicates = sorted({w for w in wnids if wnids.count(w) > 1}) if len(set(wnids)) != len(wnids) else []
    if duplicates:
        raise ShardError(f"wnid list {where} repeats {', '.join(duplicates[:3])}")
    if len(wnids) > 1000:
        raise ShardError(f"wnid list {where} has {len(wnids)} wnids; labels must stay in 0..999")
    return wnids


# ---------------------------------------------------------------------------------------------------------------
# ImageNet layout

class _BadInput(Exception):
    """One input image cannot become a sample: ``kind`` (counted in the summary) and ``detail``."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind} ({detail})" if detail else kind)
        self.kind = kind


def parse_voc_xml(path: Path) -> tuple[tuple[int, int] | None, list[tuple[str, list[float]]]]:
    """((width, height) or None, [(wnid, [x0, y0, x1, y1]), …]) from one PASCAL-VOC annotation file."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise _BadInput("unreadable XML", f"{path.name}: {exc}") from None
    if root.tag != "annotation":
        raise _BadInput("unreadable XML", f"{path.name}: root is <{root.tag}>, not <annotation>")
    size = None
    if root.find("size") is not None:
        try:
            size = (int(float(root.findtext("size/width"))), int(float(root.findtext("size/height"))))
        except (TypeError, ValueError):
            raise _BadInput("unreadable XML", f"{path.name}: <size> has no numeric width/height") from None
    objects = []
    for i, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        try:
            box = [_number(obj.findtext(f"bndbox/{tag}")) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise _BadInput("unreadable XML", f"{path.name}: object {i} has no numeric <bndbox>") from None
        objects.append((name, box))
    return size, objects


def read_boxes_csv(path: Path) -> dict[str, list[tuple[str, list[float]]] | str]:
    """ImageId -> [(wnid, box), …] from an ``ImageId,PredictionString`` CSV; a malformed row maps to its reason."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise ShardError(f"cannot read boxes CSV {path}: {exc.strerror}") from None
    table: dict[str, list[tuple[str, list[float]]] | str] = {}
    with handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row or (number == 1 and row[0].strip().lower() in ("imageid", "image_id", "id")):
                continue
            image_id = Path(row[0].strip()).stem
            tokens = row[1].split() if len(row) > 1 else []
            try:
                if not tokens or len(tokens) % 5:
                    raise ValueError(f"{len(tokens)} tokens, expected groups of 'wnid x0 y0 x1 y1'")
                objects = [(tokens[i], [_number(t) for t in tokens[i + 1:i + 5]]) for i in range(0, len(tokens), 5)]
            except ValueError as exc:
                table[image_id] = f"row {number}: {str(exc).splitlines()[0][:60]}"
                continue
            previous = table.get(image_id)
            table[image_id] = (previous if isinstance(previous, list) else []) + objects
    return table


def imagenet_samples(images: Path, *, boxes_dir: Path | None = None, boxes_csv: Path | None = None,
                     wnids: Sequence[str], limit: int | None = None,
                     log: Callable[[str], None] = print) -> tuple[list[Sample], list[Skipped]]:
    """Samples (sorted by key) and skipped inputs for an ImageNet-layout folder."""
    if not images.is_dir():
        raise ShardError(f"--images {images} is not a directory")
    if boxes_dir is not None and not boxes_dir.is_dir():
        raise ShardError(f"--boxes {boxes_dir} is not a directory")
    if boxes_csv is not None and not boxes_csv.is_file():
        raise ShardError(f"--boxes-csv {boxes_csv} is not a file")
    files = sorted((p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: (_key_for(p), str(p)))
    if not files:
        raise ShardError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {images}")
    xml_files: dict[str, Path] = {}
    if boxes_dir is not None:
        for p in sorted(boxes_dir.rglob("*.xml")) + sorted(boxes_dir.rglob("*.XML")):
            xml_files.setdefault(p.stem, p)
    csv_boxes = read_boxes_csv(boxes_csv) if boxes_csv is not None else {}
    index = {w: i for i, w in enumerate(wnids)}
    log(f"imagenet: {len(files)} images under {images}, "
        f"{len(xml_files) if boxes_dir is not None else len(csv_boxes)} annotations, {len(wnids)} classes")

    samples: list[Sample] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for n, path in enumerate(files, 1):
        if limit is not None and len(samples) >= limit:
            break
        rel = str(path.relative_to(images))
        key = _key_for(path)
        try:
            if key in seen:
                raise _BadInput("duplicate key", f"{key}: another image has the same name")
            if boxes_dir is not None:
                xml = xml_files.get(path.stem)
                if xml is None:
                    raise _BadInput("no annotation", f"no {path.stem}.xml under {boxes_dir}")
                xml_size, objects = parse_voc_xml(xml)
            else:
                entry = csv_boxes.get(path.stem)
                if entry is None:
                    raise _BadInput("no annotation", f"no row {path.stem} in {boxes_csv.name}")
                if isinstance(entry, str):
                    raise _BadInput("malformed CSV row", entry)
                xml_size, objects = None, entry
            width, height, is_jpeg = _image_info(path)
            if xml_size is not None and xml_size != (width, height):
                raise _BadInput("size mismatch", f"annotation says {xml_size[0]}x{xml_size[1]}, "
                                                  f"the image is {width}x{height}")
            if not objects:
                raise _BadInput("no objects", "the annotation lists no object")
            for wnid, _ in objects:
                if wnid not in index:
                    raise _BadInput("unknown wnid", f"{wnid!r} is not in the class list")
            boxes = [_checked_box(box, width, height) for _, box in objects]
            meta = {"key": key, "wnid": objects[0][0], "label": index[objects[0][0]], "width": width,
                    "height": height, "bboxes": boxes, "bbox_wnids": [w for w, _ in objects], "source": "imagenet"}
            problems = validate_sample_json(meta, key)
            if problems:
                raise _BadInput("invalid metadata", problems[0])
        except _BadInput as exc:
            skipped.append(Skipped(rel, str(exc), exc.kind))
            continue
        seen.add(key)
        samples.append(Sample(key, meta, _file_reader(path, is_jpeg)))
        if n % 5000 == 0:
            log(f"  scanned {n}/{len(files)} images: {len(samples)} samples, {len(skipped)} skipped")
    return samples, skipped


def _key_for(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", path.stem)


def _number(text: str | None) -> float | int:
    if text is None:
        raise ValueError("missing coordinate")
    value = float(text.strip())
    if not math.isfinite(value):
        raise ValueError(f"non-finite coordinate {text!r}")
    return int(value) if value.is_integer() else value


def _image_info(path: Path) -> tuple[int, int, bool]:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            return image.size[0], image.size[1], image.format == "JPEG"
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise _BadInput("unreadable image", f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}") from None


def _checked_box(box: list[float], width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise _BadInput("bad bbox", f"{box} needs x1 > x0 and y1 > y0")
    if x0 < -BOX_TOLERANCE or y0 < -BOX_TOLERANCE or x1 > width + BOX_TOLERANCE or y1 > height + BOX_TOLERANCE:
        raise _BadInput("bad bbox", f"{box} lies outside the {width}x{height} image")
    return [max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)]


def _file_reader(path: Path, is_jpeg: bool) -> Callable[[], bytes]:
    if is_jpeg:
        return path.read_bytes
    return lambda: _encode_jpeg_file(path)


def _encode_jpeg_file(path: Path) -> bytes:
    from PIL import Image
    with Image.open(path) as image:
        return encode_jpeg(image)


def encode_jpeg(image) -> bytes:
    """PIL image or uint8 array -> JPEG bytes (quality 95; grayscale stays grayscale, anything else RGB)."""
    from PIL import Image
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Writing shards

def write_shards(samples: Iterable[Sample], out: Path, prefix: str, shard_size: int, *,
                 log: Callable[[str], None] = print) -> ShardSet:
    """Write ``samples`` sorted by key into ``<out>/<prefix>-NNNNNN.tar`` (``shard_size`` per shard).

    Each shard is written to a temporary name and renamed when complete; shards of an earlier run with the same
    prefix beyond the new count are removed. Samples whose metadata fails validation raise ValueError (a bug).
    """
    if not KEY_PATTERN.match(prefix):
        raise ShardError(f"--prefix {prefix!r}: use only letters, digits, '_' and '-'")
    if shard_size < 1:
        raise ShardError(f"--shard-size must be at least 1, got {shard_size}")
    ordered = sorted(samples, key=lambda s: s.key)
    keys = [s.key for s in ordered]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate sample keys in set {prefix}")
    out.mkdir(parents=True, exist_ok=True)
    groups = [ordered[i:i + shard_size] for i in range(0, len(ordered), shard_size)]
    shard_set = ShardSet(prefix, shard_pattern(out, prefix, len(groups)))
    done = 0
    for number, group in enumerate(groups):
        name = f"{prefix}-{number:0{_SHARD_INDEX_DIGITS}d}.tar"
        t0 = time.perf_counter()
        digest = _write_tar(out / name, group)
        done += len(group)
        shard_set.shards.append({"file": name, "samples": len(group), "first_key": group[0].key,
                                 "last_key": group[-1].key, "sha256": digest})
        log(f"  [{prefix}] {number + 1}/{len(groups)} {name}: {len(group)} samples "
            f"({done}/{len(ordered)}, {time.perf_counter() - t0:.2f} s)")
    _remove_stale(out, prefix, len(groups))
    return shard_set


def shard_pattern(out: Path, prefix: str, count: int) -> str:
    """Brace pattern of ``count`` shards: ``/abs/out/val-{000000..000049}.tar`` (a plain path for one shard)."""
    base = out.resolve()
    if count <= 1:
        return str(base / f"{prefix}-{0:0{_SHARD_INDEX_DIGITS}d}.tar")
    return str(base / f"{prefix}-{{{0:0{_SHARD_INDEX_DIGITS}d}..{count - 1:0{_SHARD_INDEX_DIGITS}d}}}.tar")


def _write_tar(path: Path, samples: Sequence[Sample]) -> str:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for sample in samples:
                problems = validate_sample_json(sample.meta, sample.key)
                if problems:
                    raise ValueError(f"sample {sample.key} has invalid metadata: {'; '.join(problems)}")
                members = (("jpg", sample.image()), ("cls", str(int(sample.meta["label"])).encode("ascii")),
                           ("json", encode_sample_json(sample.meta)))
                for suffix, data in members:
                    tar.addfile(_tar_info(f"{sample.key}.{suffix}", len(data)), io.BytesIO(data))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _remove_stale(out: Path, prefix: str, count: int) -> None:
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{{_SHARD_INDEX_DIGITS}}})\.tar$")
    for path in out.iterdir():
        match = pattern.match(path.name)
        if match and int(match.group(1)) >= count:
            path.unlink()


def write_manifest(out: Path, sets: Sequence[tuple[ShardSet, int]]) -> Path:
    """Write/merge ``<out>/shards.json``: the given sets replace entries with the same prefix, others are kept."""
    path = out / MANIFEST
    manifest = {"format": "webdataset", "members": ["jpg", "cls", "json"], "sets": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(old.get("sets"), dict):
                manifest["sets"].update(old["sets"])
        except (ValueError, AttributeError):
            pass
    for shard_set, shard_size in sets:
        manifest["sets"][shard_set.prefix] = shard_set.manifest_entry(shard_size)
    manifest["sets"] = dict(sorted(manifest["sets"].items()))
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


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
        apex_x, base = x0 + extent / 2, y0 + extent
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


# ---------------------------------------------------------------------------------------------------------------
# Command line

def _report_skipped(prefix: str, skipped: Sequence[Skipped], warn: Callable[[str], None]) -> None:
    for item in skipped[:MAX_WARNINGS]:
        warn(f"warning: skipped {item.file}: {item.reason}")
    if len(skipped) > MAX_WARNINGS:
        warn(f"warning: … {len(skipped) - MAX_WARNINGS} more skipped images (all listed in {MANIFEST}, set {prefix})")


def _summary(shard_set: ShardSet, log: Callable[[str], None]) -> None:
    log(f"{shard_set.prefix}: {shard_set.num_samples} samples in {len(shard_set.shards)} shards, "
        f"{len(shard_set.skipped)} skipped")
    if shard_set.skipped:
        reasons: dict[str, int] = {}
        for item in shard_set.skipped:
            reasons[item.kind or "other"] = reasons.get(item.kind or "other", 0) + 1
        log("  skipped: " + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])))
    log(f"  {shard_set.pattern}")


def run_imagenet(args: argparse.Namespace, log: Callable[[str], None], warn: Callable[[str], None]) -> int:
    wnids = imagenet_wnids(args.wnids)
    samples, skipped = imagenet_samples(Path(args.images), boxes_dir=_path(args.boxes),
                                        boxes_csv=_path(args.boxes_csv), wnids=wnids, limit=args.limit, log=log)
    _report_skipped(args.prefix, skipped, warn)
    if not samples:
        raise ShardError(f"none of the images under {args.images} could be used ({len(skipped)} skipped)")
    out = Path(args.out)
    shard_set = write_shards(samples, out, args.prefix, args.shard_size, log=log)
    shard_set.skipped, shard_set.source = skipped, "imagenet"
    manifest = write_manifest(out, [(shard_set, args.shard_size)])
    _summary(shard_set, log)
    log(f"wrote {manifest.resolve()}")
    return 0


def run_sample(args: argparse.Namespace, log: Callable[[str], None], warn: Callable[[str], None]) -> int:
    if args.synthetic < 0:
        raise ShardError(f"--synthetic must be >= 0, got {args.synthetic}")
    if args.size < 32:
        raise ShardError(f"--size must be at least 32, got {args.size}")
    out = Path(args.out)
    t0 = time.perf_counter()
    sets = []
    photos = write_shards(photo_samples(), out, "photos", args.shard_size, log=log)
    photos.source = "skimage.data + matplotlib sample data (attribution/data/sample_photos.json)"
    sets.append((photos, args.shard_size))
    if args.synthetic:
        synthetic = write_shards(synthetic_samples(args.synthetic, args.seed, args.size), out, "synthetic",
                                 args.shard_size, log=log)
        synthetic.source = f"synthetic (seed {args.seed}, classes {', '.join(SYNTHETIC_CLASSES)})"
        sets.append((synthetic, args.shard_size))
    manifest = write_manifest(out, sets)
    for shard_set, _ in sets:
        _summary(shard_set, log)
    log(f"wrote {manifest.resolve()} in {time.perf_counter() - t0:.1f} s")
    return 0


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.make_shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    imagenet = sub.add_parser("imagenet", help="ImageNet-layout images + VOC XML or CSV boxes -> shards")
    imagenet.add_argument("--images", required=True, help="folder of ILSVRC2012_val_XXXXXXXX.JPEG (searched recursively)")
    boxes = imagenet.add_mutually_exclusive_group(required=True)
    boxes.add_argument("--boxes", help="folder of per-image PASCAL-VOC XML files <stem>.xml (searched recursively)")
    boxes.add_argument("--boxes-csv", help="CSV ImageId,PredictionString ('wnid x0 y0 x1 y1 …')")
    imagenet.add_argument("--wnids", help="class list (one wnid per line or LOC_synset_mapping.txt; line i = class i); "
                                          "default: the sorted 1000 ImageNet wnids shipped with the package")
    imagenet.add_argument("--out", required=True, help="output folder")
    imagenet.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard (default 1000)")
    imagenet.add_argument("--limit", type=int, help="at most this many samples (the first valid images by key)")
    imagenet.add_argument("--prefix", default="val", help="shard file prefix (default val)")
    sample = sub.add_parser("sample", help="offline demo set: hand-labelled real photos + synthetic shapes")
    sample.add_argument("--out", default=DEFAULT_SAMPLE_OUT, help=f"output folder (default {DEFAULT_SAMPLE_OUT})")
    sample.add_argument("--synthetic", type=int, default=24, help="number of synthetic images (default 24)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the synthetic set (default 0)")
    sample.add_argument("--size", type=int, default=224, help="synthetic image size in pixels (default 224)")
    sample.add_argument("--shard-size", type=int, default=4, help="samples per shard (default 4)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    def warn(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.shard_size < 1:
            raise ShardError(f"--shard-size must be at least 1, got {args.shard_size}")
        if args.mode == "imagenet":
            if args.limit is not None and args.limit < 1:
                raise ShardError(f"--limit must be at least 1, got {args.limit}")
            if not KEY_PATTERN.match(args.prefix):
                raise ShardError(f"--prefix {args.prefix!r}: use only letters, digits, '_' and '-'")
        return (run_imagenet if args.mode == "imagenet" else run_sample)(args, log, warn)
    except ShardError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
