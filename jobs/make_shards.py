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
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from attribution.data.imagenet import imagenet_samples, imagenet_wnids
from attribution.data.sample_sets import photo_samples, synthetic_samples
from attribution.data.shards import MANIFEST, ShardError, ShardSet, Skipped, write_manifest, write_shards
from schemas.samples import KEY_PATTERN, SYNTHETIC_CLASSES

DEFAULT_SHARD_SIZE = 1000
DEFAULT_SAMPLE_OUT = "runs/sample_shards"
MAX_WARNINGS = 50          # warning lines printed per set; the rest are only counted (all are in shards.json)


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
