"""Deterministic WebDataset tar shards: samples in, ``<prefix>-NNNNNN.tar`` files and ``shards.json`` out."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from schemas.samples import KEY_PATTERN, encode_sample_json, validate_sample_json

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


