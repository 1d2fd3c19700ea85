"""The ImageNet validation layout -> samples: wnid lists, PASCAL-VOC XML and CSV boxes."""
from __future__ import annotations

import csv
import math
import os
import re
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from attribution.data.shards import BOX_TOLERANCE, IMAGE_SUFFIXES, Sample, ShardError, Skipped, encode_jpeg
from schemas.samples import WNID_PATTERN, validate_sample_json

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


