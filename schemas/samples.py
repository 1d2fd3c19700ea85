"""The input sample format (WebDataset shards written by ``jobs.make_shards``) and the decoded-sample table.

One sample per image; its members are adjacent in the tar and named ``<key>.jpg``, ``<key>.cls``, ``<key>.json``:

- ``.jpg``: the original JPEG bytes, untouched (non-JPEG sources are encoded as JPEG, quality 95);
- ``.cls``: the class index as ASCII text (``"281"``), ``"-1"`` when unknown;
- ``.json``: the metadata below (:data:`SAMPLE_JSON_FIELDS`), UTF-8, checked by :func:`validate_sample_json`.

Keys contain no dots (a WebDataset key is everything before the first "."), no slashes and no whitespace.
Boxes are ``[x0, y0, x1, y1]`` in original pixel coordinates with ``0 <= x0 < x1 <= width`` and
``0 <= y0 < y1 <= height`` (x1/y1 are the right/bottom edges, as in ``attribution.images.decode_sample``).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, Sequence

import pyarrow as pa

#: name -> (JSON type, description) of every field of a sample's ``.json`` member, in the order they are written.
SAMPLE_JSON_FIELDS: dict[str, tuple[str, str]] = {
    "key": ("str", "sample key, equal to the tar member names' stem; no '.', '/' or whitespace"),
    "wnid": ("str | null", "WordNet id of the image's class (e.g. n02123045), null when unknown or not ImageNet"),
    "label": ("int", "class index in -1..999 (ImageNet: position of wnid in the sorted 1000 wnids); -1 = unknown"),
    "width": ("int", "original image width in pixels (> 0)"),
    "height": ("int", "original image height in pixels (> 0)"),
    "bboxes": ("list[[float, float, float, float]]",
               "boxes [x0, y0, x1, y1] in original pixels, 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height"),
    "bbox_wnids": ("list[str | null]", "WordNet id of each box's object (same length as bboxes), null if none"),
    "source": ("str", "where the image comes from: imagenet, synthetic, skimage.data.chelsea, ..."),
}

#: Optional fields (written by ``jobs.make_benchmark``, :mod:`attribution.data.benchmark`); other jobs ignore them.
#: Checked by :func:`validate_sample_json` when present; any other extra key is allowed and not checked.
OPTIONAL_SAMPLE_JSON_FIELDS: dict[str, tuple[str, str]] = {
    "split": ("str", "benchmark split: train or val"),
    "class_name": ("str", "human-readable class name (benchmark: <shape>_<texture>)"),
    "mask": ("{size: [int, int], counts: list[int]} | null",
             "the object's pixel mask, COCO uncompressed RLE: size = [height, width], counts = lengths of the "
             "alternating runs of 0s and 1s in column-major order, starting with 0s"),
    "distractors": ("list[[float, float, float, float]]", "boxes of class-neutral distractor objects"),
    "shortcut": ("{label, wnid, class_name, correct, side, box} | null",
                 "border-shortcut mark: the class it points to, whether that is the sample's label, the side "
                 "(top/bottom/left/right) and its box; null when the image has no mark"),
}

#: Shape classes of the synthetic set (label = index here; wnid null).
SYNTHETIC_CLASSES: tuple[str, ...] = ("disc", "square", "triangle")

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
WNID_PATTERN = re.compile(r"^n\d{8}$")
MIN_LABEL, MAX_LABEL = -1, 999

_TYPES = {"key": str, "width": int, "height": int, "label": int, "source": str, "bboxes": list, "bbox_wnids": list}


def validate_sample_json(meta: Any, key: str, *, wnids: Sequence[str] | None = None) -> list[str]:
    """Problems with one sample's metadata, one human-readable line each; ``[]`` means valid.

    ``key`` is the sample key taken from the tar member names. With ``wnids`` (the class list, e.g. the shipped
    ImageNet list) a known ``wnid`` must also sit at index ``label``.
    """
    if not isinstance(meta, Mapping):
        return [f"{key}: metadata is a {type(meta).__name__}, not a JSON object"]
    problems: list[str] = []
    say = problems.append
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        say(f"{key!r}: key must be non-empty and use only letters, digits, '_' and '-' (no dots)")
    for name in SAMPLE_JSON_FIELDS:
        if name not in meta:
            say(f"{key}: missing field {name!r}")
    for name, kind in _TYPES.items():
        value = meta.get(name)
        if name in meta and (not isinstance(value, kind) or isinstance(value, bool)):
            say(f"{key}: field {name!r} must be {kind.__name__}, got {type(value).__name__} {value!r:.40}")
    if isinstance(meta.get("key"), str) and meta["key"] != key:
        say(f"{key}: json key {meta['key']!r} differs from the member names' key {key!r}")
    wnid = meta.get("wnid")
    if wnid is not None and not (isinstance(wnid, str) and WNID_PATTERN.match(wnid)):
        say(f"{key}: wnid must be null or like 'n01440764', got {wnid!r}")
    label = meta.get("label")
    if _is_int(label) and not MIN_LABEL <= label <= MAX_LABEL:
        say(f"{key}: label {label} outside [{MIN_LABEL}, {MAX_LABEL}]")
    width, height = meta.get("width"), meta.get("height")
    for name, value in (("width", width), ("height", height)):
        if _is_int(value) and value <= 0:
            say(f"{key}: {name} must be positive, got {value}")
    if wnids is not None and isinstance(wnid, str) and _is_int(label):
        index = list(wnids).index(wnid) if wnid in wnids else None
        if index is None:
            say(f"{key}: wnid {wnid} is not in the class list")
        elif index != label:
            say(f"{key}: label {label} does not match wnid {wnid} (class {index})")
    boxes = meta.get("bboxes")
    if isinstance(boxes, list):
        size_ok = _is_int(width) and _is_int(height) and width > 0 and height > 0
        for i, box in enumerate(boxes):
            problem = _box_problem(box, width if size_ok else None, height if size_ok else None)
            if problem:
                say(f"{key}: bbox {i} {box!r:.60} {problem}")
        box_wnids = meta.get("bbox_wnids")
        if isinstance(box_wnids, list):
            if len(box_wnids) != len(boxes):
                say(f"{key}: {len(box_wnids)} bbox_wnids for {len(boxes)} bboxes")
            for i, w in enumerate(box_wnids):
                if w is not None and not (isinstance(w, str) and WNID_PATTERN.match(w)):
                    say(f"{key}: bbox_wnids[{i}] must be null or like 'n01440764', got {w!r}")
    source = meta.get("source")
    if isinstance(source, str) and not source.strip():
        say(f"{key}: source is empty")
    problems.extend(_optional_problems(meta, key))
    return problems


def _optional_problems(meta: Mapping[str, Any], key: str) -> list[str]:
    """Problems with the optional fields of :data:`OPTIONAL_SAMPLE_JSON_FIELDS` that are present."""
    problems: list[str] = []
    width, height = meta.get("width"), meta.get("height")
    size_ok = _is_int(width) and _is_int(height)
    for name in ("split", "class_name"):
        if name in meta and not isinstance(meta[name], str):
            problems.append(f"{key}: field {name!r} must be str, got {type(meta[name]).__name__}")
    mask = meta.get("mask")
    if mask is not None:
        counts = mask.get("counts") if isinstance(mask, Mapping) else None
        if not isinstance(counts, list) or not all(_is_int(c) and c >= 0 for c in counts):
            problems.append(f"{key}: mask must be {{size: [h, w], counts: [non-negative ints]}}")
        elif size_ok and (mask.get("size") != [height, width] or sum(counts) != height * width):
            problems.append(f"{key}: mask size {mask.get('size')} / {sum(counts)} pixels do not match the "
                            f"{width}x{height} image")
    for i, box in enumerate(meta.get("distractors") or []):
        problem = _box_problem(box, width if size_ok else None, height if size_ok else None)
        if problem:
            problems.append(f"{key}: distractor box {i} {box!r:.60} {problem}")
    shortcut = meta.get("shortcut")
    if shortcut is not None:
        if not isinstance(shortcut, Mapping) or not _is_int(shortcut.get("label")) \
                or not MIN_LABEL < shortcut["label"] <= MAX_LABEL:
            problems.append(f"{key}: shortcut must be null or an object with a class index 'label'")
        else:
            problem = _box_problem(shortcut.get("box"), width if size_ok else None, height if size_ok else None)
            if problem:
                problems.append(f"{key}: shortcut box {shortcut.get('box')!r:.60} {problem}")
    return problems


def encode_sample_json(meta: Mapping[str, Any]) -> bytes:
    """The ``.json`` member's bytes: fields in :data:`SAMPLE_JSON_FIELDS` order, compact, UTF-8, deterministic."""
    ordered = {name: meta[name] for name in SAMPLE_JSON_FIELDS if name in meta}
    ordered.update({k: v for k, v in meta.items() if k not in ordered})
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Decoded-sample table: one row per sample, for jobs that index or join on the inputs.

BOXES = pa.list_(pa.list_(pa.float32()))

_FIELDS: list[tuple[str, pa.DataType, bool, str]] = [
    ("key", pa.string(), False, "sample key (tar member name before the first '.')"),
    ("shard", pa.string(), False, "input shard file name, e.g. val-000003.tar"),
    ("label", pa.int32(), False, "class index, -1 if unknown"),
    ("wnid", pa.string(), True, "WordNet id of the class; null if unknown"),
    ("width", pa.int32(), False, "original image width, pixels"),
    ("height", pa.int32(), False, "original image height, pixels"),
    ("bboxes", BOXES, False, "boxes [x0, y0, x1, y1] in original pixels"),
]

SAMPLE_SCHEMA = pa.schema([pa.field(name, dtype, nullable, metadata={"doc": doc})
                           for name, dtype, nullable, doc in _FIELDS])


def sample_row(meta: Mapping[str, Any], shard: str) -> dict[str, Any]:
    """A :data:`SAMPLE_SCHEMA` row from a sample's metadata and its shard's file name."""
    return {"key": meta["key"], "shard": shard, "label": int(meta["label"]), "wnid": meta.get("wnid"),
            "width": int(meta["width"]), "height": int(meta["height"]),
            "bboxes": [[float(v) for v in box] for box in meta.get("bboxes", [])]}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _box_problem(box: Any, width: int | None, height: int | None) -> str | None:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return "is not a list of 4 numbers"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return "has a non-numeric or non-finite coordinate"
    x0, y0, x1, y1 = box
    if x1 <= x0:
        return "has x1 <= x0"
    if y1 <= y0:
        return "has y1 <= y0"
    if width is not None and height is not None and (x0 < 0 or y0 < 0 or x1 > width or y1 > height):
        return f"lies outside the {width}x{height} image"
    return None
