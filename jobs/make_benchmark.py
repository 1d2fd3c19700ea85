"""The procedural benchmark with exact ground truth -> WebDataset shards in the ImageNet sample format.

    python -m jobs.make_benchmark --out DIR [--size 112] [--classes 8] [--train 3000] [--val 1000]
                                  [--shortcut 0.0] [--shortcut-wrong 0.5] [--seed 0] [--samples-per-shard 500]

Writes ``DIR/train-NNNNNN.tar`` and ``DIR/val-NNNNNN.tar`` (``<key>.jpg``, ``<key>.cls``, ``<key>.json``, exactly
as ``jobs.make_shards``; keys ``train_000042``), ``DIR/shards.json`` (the shard manifest), ``DIR/classes.json``
(configuration, border band, classes, mark colours, formats) and ``DIR/README.md``. The images, their boxes,
pixel masks, distractors and border-shortcut marks are described in :mod:`attribution.data.benchmark`; the same
arguments always give byte-identical shards. ``python -m jobs.attribute`` reads them unchanged (with
``--model bench_resnet --weights <checkpoint>`` from ``jobs.train_benchmark_model``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from attribution.data import benchmark
from attribution.data.shards import Sample, ShardError, write_manifest, write_shards

DEFAULT_SAMPLES_PER_SHARD = 500


def benchmark_split(config: benchmark.BenchmarkConfig, split: str, count: int) -> tuple[list[Sample], dict]:
    """The ``count`` samples of ``split`` as shard samples (JPEG bytes rendered now) and the split's summary
    (counts of marked / wrongly marked images)."""
    samples, marked, wrong = [], 0, 0
    for item in benchmark.generate(config, split, count):
        data = benchmark.encode_image(item.image)
        samples.append(Sample(item.key, item.meta, lambda data=data: data))
        shortcut = item.meta["shortcut"]
        marked += shortcut is not None
        wrong += shortcut is not None and not shortcut["correct"]
    return samples, {"samples": count, "marked": marked, "marked_wrong": wrong}


def make_benchmark(out: Path, config: benchmark.BenchmarkConfig, counts: dict[str, int], samples_per_shard: int,
                   log: Callable[[str], None] = print) -> dict:
    """Write the shards of every split in ``counts`` (split -> number of images; 0 skips it), ``shards.json``,
    ``classes.json`` and ``README.md`` into ``out``. Returns the ``classes.json`` content."""
    if samples_per_shard < 1:
        raise ShardError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    out.mkdir(parents=True, exist_ok=True)
    description = benchmark.describe(config)
    description["splits"] = {}
    sets = []
    for split, count in counts.items():
        if count < 0:
            raise ShardError(f"--{split} must be >= 0, got {count}")
        if count == 0:
            continue
        t0 = time.perf_counter()
        samples, summary = benchmark_split(config, split, count)
        log(f"{split}: rendered {count} images in {time.perf_counter() - t0:.1f} s")
        shard_set = write_shards(samples, out, split, samples_per_shard, log=log)
        shard_set.source = (f"benchmark (seed {config.seed}, {config.num_classes} classes, {config.size} px, "
                            f"shortcut {config.shortcut})")
        sets.append((shard_set, samples_per_shard))
        description["splits"][split] = {**summary, "pattern": Path(shard_set.pattern).name,
                                       "shards": len(shard_set.shards)}
    write_manifest(out, sets)
    _write_text(out / "classes.json", json.dumps(description, indent=1) + "\n")
    _write_text(out / "README.md", _readme(description))
    return description


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _readme(d: dict) -> str:
    cfg = d["benchmark"]
    lines = [
        "# Procedural attribution benchmark",
        "",
        f"Written by `python -m jobs.make_benchmark --size {cfg['size']} --classes {cfg['num_classes']} "
        f"--shortcut {cfg['shortcut']} --shortcut-wrong {cfg['shortcut_wrong']} --seed {cfg['seed']}` "
        "(the same arguments give byte-identical shards). Generator: `attribution/data/benchmark.py`.",
        "",
        f"{d['image_size']}x{d['image_size']} RGB images, one class-defining object each (class = shape x texture; "
        "colours come from one palette shared by all classes and all distractors), on cluttered backgrounds with "
        "2-4 class-neutral distractors (bars, rings, ellipses) that never touch the object's box. Each `.json` "
        "holds the exact box (`bboxes`, pixel edges, x1/y1 exclusive), the pixel mask (`mask`, "
        f"{d['mask_format']}), the distractor boxes and `shortcut`.",
        "",
        f"Border band: {d['border_px']} px (TR-GBP's 16 px at 224, scaled); the object never enters it. "
        f"Shortcut mark: a {d['mark_px'][0]} x {d['mark_px'][1]} px strip along a side with a dark outline, filled "
        "with the colour of the class it points to, inside the band; `shortcut` = null or {label, wnid, class_name, correct, side, box}. "
        f"Share of marked images: {cfg['shortcut']}; in `val`, {cfg['shortcut_wrong']} of the marked images point "
        "to a wrong class.",
        "",
        "| label | wnid | class | shape | texture | mark colour (RGB) |",
        "|---|---|---|---|---|---|",
    ]
    for c in d["classes"]:
        lines.append(f"| {c['label']} | {c['wnid']} | {c['name']} | {c['shape']} | {c['texture']} | "
                     f"{tuple(c['mark_colour'])} |")
    lines += ["", "| split | images | marked | marked, wrong class | shards |", "|---|---|---|---|---|"]
    for split, s in d["splits"].items():
        lines.append(f"| {split} | {s['samples']} | {s['marked']} | {s['marked_wrong']} | `{s['pattern']}` |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.make_benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default 112; 64-128 intended)")
    p.add_argument("--classes", type=int, default=8, help=f"number of classes, {benchmark.MIN_CLASSES}-"
                                                          f"{benchmark.MAX_CLASSES} (default 8)")
    p.add_argument("--train", type=int, default=3000, help="training images (default 3000)")
    p.add_argument("--val", type=int, default=1000, help="validation images (default 1000)")
    p.add_argument("--shortcut", type=float, default=0.0,
                   help="share of images with a border-shortcut mark, 0..1 (default 0: none)")
    p.add_argument("--shortcut-wrong", type=float, default=0.5,
                   help="share of the marked validation images whose mark points to a wrong class (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                   help=f"samples per shard (default {DEFAULT_SAMPLES_PER_SHARD})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; bad arguments: one ``error:`` line, exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        config = benchmark.BenchmarkConfig(size=args.size, num_classes=args.classes, shortcut=args.shortcut,
                                           shortcut_wrong=args.shortcut_wrong, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        description = make_benchmark(Path(args.out), config, {"train": args.train, "val": args.val},
                                     args.samples_per_shard, log=lambda line: print(line, flush=True))
    except ShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, s in description["splits"].items():
        print(f"{split}: {s['samples']} samples ({s['marked']} marked, {s['marked_wrong']} pointing to a wrong "
              f"class) {Path(args.out).resolve() / s['pattern']}")
    print(f"wrote {Path(args.out).resolve()} (classes.json, README.md, shards.json) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
