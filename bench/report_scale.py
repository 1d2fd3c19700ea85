"""How jobs.report scales: time and peak memory of one report over a synthetic evaluate run and its attribution run
at a chosen size, to size the machine that aggregates the big run (ImageNet val: 50,000 images × 16 methods ×
top-5 is 4 million maps and ~12 million metric rows).

    python -m bench.report_scale [--images 2000] [--methods 16] [--out bench/results/report_scale.json]

The runs are written the way the jobs write them (one committed shard per ``--shard-size`` images; Parquet through
workers.sink.parquet_options): per image and method, EBPG and IBD for each of the 5 target maps, MoRF, LeRF and the
two insertion curves (``--curve-steps`` points) and class discrimination for the top-1 map; attribution rows with
8-px maps (the report reads no map but the grid's few). The report runs in a child process (its peak resident set is
the process's VmHWM) with the screenshot off. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.tables import text_table, write_report

CURVES = ("morf", "lerf", "insertion_accuracy", "insertion_softmax")


def write_runs(root: Path, images: int, methods: int, shard_size: int, curve_steps: int, seed: int = 0) -> dict:
    """An attribution run and an evaluate run of ``images`` synthetic images × ``methods`` methods (top-5) under
    ``root``; returns their row counts and bytes."""
    from schemas.attributions import attribution_schema
    from workers.sink import parquet_options

    rng = np.random.default_rng(seed)
    names = [f"method{m:02d}" for m in range(methods)]
    attribution_dir, evaluate_dir = root / "maps", root / "metrics"
    counts = {"attribution_rows": 0, "metric_rows": 0}
    schema = attribution_schema(8, "float16", 224)
    for first in range(0, images, shard_size):
        n = min(shard_size, images - first)
        shard = f"val-{first // shard_size:06d}.tar"
        keys = np.array([f"ILSVRC2012_val_{first + i + 1:08d}" for i in range(n)], dtype=object)
        labels = rng.integers(0, 1000, n).astype(np.int32)
        top5 = np.stack([np.where(rng.random(n) < 0.75, labels, rng.integers(0, 1000, n))]
                        + [rng.integers(0, 1000, n) for _ in range(4)], axis=1).astype(np.int32)
        attribution = _attribution_rows(schema, shard, keys, labels, top5, names, rng)
        metrics = _metric_rows(shard, keys, labels, top5, names, curve_steps, rng)
        for folder, kind, table in ((attribution_dir, "attributions", attribution), (evaluate_dir, "metrics", metrics)):
            rel = f"{kind}/{shard}/part-00000.parquet"
            (folder / kind / shard).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, folder / rel, **parquet_options(table.schema))
            (folder / "_commits").mkdir(exist_ok=True)
            (folder / "_commits" / f"{shard}.json").write_text(json.dumps(
                {"shard": shard, "files": [rel], "samples": n, "rows": table.num_rows, "error_rows": 0}))
        counts["attribution_rows"] += attribution.num_rows
        counts["metric_rows"] += metrics.num_rows
    started = "2026-12-03T00:00:00+0000"
    (attribution_dir / "manifest.json").write_text(json.dumps(
        {"job": "attribute", "status": "complete", "started": started, "config": {"model": "resnet50"}}))
    (evaluate_dir / "manifest.json").write_text(json.dumps(
        {"job": "evaluate", "status": "complete", "started": started,
         "config": {"attributions": str(attribution_dir), "shards": []}}))
    counts["bytes"] = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    return {**counts, "evaluate_run": str(evaluate_dir), "attribution_run": str(attribution_dir)}


def _attribution_rows(schema: pa.Schema, shard: str, keys: np.ndarray, labels: np.ndarray, top5: np.ndarray,
                      names: list[str], rng: np.random.Generator) -> pa.Table:
    n, m = len(keys), len(names)
    rows = n * m * 5
    image = np.repeat(np.arange(n), m * 5)
    rank = np.tile(np.arange(5), n * m).astype(np.int8)
    method = np.tile(np.repeat(np.array(names, dtype=object), 5), n)
    box = pa.array([[[10.0, 20.0, 150.0, 200.0]]] * rows, schema.field("bboxes").type)
    map_type = schema.field("map").type  # a fixed-shape tensor extension type over fixed_size_list<float16>[S*S]
    size = map_type.storage_type.list_size
    data = {
        "key": pa.array(keys[image]), "shard": pa.array([shard] * rows), "model": pa.array(["resnet50"] * rows),
        "weights": pa.array(["IMAGENET1K_V1"] * rows), "method": pa.array(method), "options": pa.array(["{}"] * rows),
        "target": pa.array(top5[image, rank]), "target_kind": pa.array(["top5"] * rows), "target_rank": pa.array(rank),
        "label": pa.array(labels[image]), "wnid": pa.array(["n01440764"] * rows),
        "top5": pa.FixedSizeListArray.from_arrays(pa.array(top5[image].reshape(-1)), 5),
        "top5_prob": pa.FixedSizeListArray.from_arrays(pa.array(np.full(rows * 5, 0.2, np.float32)), 5),
        "width": pa.array(np.full(rows, 500, np.int32)), "height": pa.array(np.full(rows, 375, np.int32)),
        "bboxes": box, "bboxes_input": box,
        "map": pa.ExtensionArray.from_storage(map_type, pa.FixedSizeListArray.from_arrays(
            pa.array(rng.random(rows * size).astype(np.float16)), size)),
        "map_scale": pa.array(np.ones(rows, np.float32)), "fmi": pa.nulls(rows, schema.field("fmi").type),
        "layers": pa.nulls(rows, schema.field("layers").type),
        "seconds": pa.array(rng.random(rows).astype(np.float32) * 0.01),
    }
    return pa.Table.from_arrays([data[f.name].cast(f.type) for f in schema], schema=schema)


def _metric_rows(shard: str, keys: np.ndarray, labels: np.ndarray, top5: np.ndarray, names: list[str],
                 curve_steps: int, rng: np.random.Generator) -> pa.Table:
    from schemas.metrics import METRIC_SCHEMA

    parts = []
    n = len(keys)
    steps = np.linspace(0, 1, curve_steps, dtype=np.float32)
    for metric, ranks in (("ebpg", range(5)), ("ibd", range(5)), *((c, [0]) for c in CURVES),
                          ("class_discrimination", [0])):
        for rank in ranks:
            rows = n * len(names)
            image = np.repeat(np.arange(n), len(names))
            curve = metric in CURVES
            data = {
                "key": pa.array(keys[image]), "shard": pa.array([shard] * rows), "model": pa.array(["resnet50"] * rows),
                "weights": pa.array(["IMAGENET1K_V1"] * rows),
                "method": pa.array(np.tile(np.array(names, dtype=object), n)), "options": pa.array(["{}"] * rows),
                "target": pa.array(top5[image, rank]), "target_kind": pa.array(["top5"] * rows),
                "target_rank": pa.array(np.full(rows, rank, np.int8)), "label": pa.array(labels[image]),
                "top1": pa.array(top5[image, 0]), "correct": pa.array(top5[image, 0] == labels[image]),
                "n_boxes": pa.array(np.ones(rows, np.int16)),
                "box_share": pa.array(rng.random(rows).astype(np.float32) * 0.6),
                "metric": pa.array([metric] * rows), "value": pa.array(rng.random(rows)),
                "steps": (pa.FixedSizeListArray.from_arrays(pa.array(np.tile(steps, rows)), curve_steps)
                          .cast(pa.list_(pa.float32())) if curve else pa.nulls(rows, pa.list_(pa.float32()))),
                "curve": (pa.FixedSizeListArray.from_arrays(pa.array(rng.random(rows * curve_steps)
                                                                     .astype(np.float32)), curve_steps)
                          .cast(pa.list_(pa.float32())) if curve else pa.nulls(rows, pa.list_(pa.float32()))),
            }
            parts.append(pa.Table.from_arrays([data[f.name].cast(f.type) for f in METRIC_SCHEMA],
                                              schema=METRIC_SCHEMA))
    return pa.concat_tables(parts).sort_by([("key", "ascending")])


_CHILD = """
import json, resource, sys, time
from jobs import report
runs, out = sys.argv[1], sys.argv[2]
t = time.perf_counter()
report.build(report.ReportConfig(runs=[runs], out=out, quiet=True, grid_images=2))
seconds = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss_bytes": hwm * 1024}))
"""


def measure(evaluate_run: str, out: str) -> dict:
    """jobs.report.build over ``evaluate_run`` in a child process: {"seconds", "peak_rss_bytes"}."""
    done = subprocess.run([sys.executable, "-c", _CHILD, evaluate_run, out], capture_output=True, text=True,
                          check=False, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"report failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--methods", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--curve-steps", type=int, default=21)
    p.add_argument("--out", default="bench/results/report_scale.json")
    a = p.parse_args(argv)
    results = []
    for images in a.images:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            runs = write_runs(Path(tmp), images, a.methods, a.shard_size, a.curve_steps)
            write_s = time.perf_counter() - t
            measured = measure(runs["evaluate_run"], str(Path(tmp) / "report"))
        results.append({"images": images, "methods": a.methods, "attribution_rows": runs["attribution_rows"],
                        "metric_rows": runs["metric_rows"], "parquet_bytes": runs["bytes"], "write_s": write_s,
                        **measured})
    per_image = None
    if len(results) >= 2:  # the marginal cost of one more image, for the extrapolation to 50,000
        lo, hi = results[0], results[-1]
        span = hi["images"] - lo["images"]
        per_image = {"seconds": (hi["seconds"] - lo["seconds"]) / span,
                     "rss_bytes": (hi["peak_rss_bytes"] - lo["peak_rss_bytes"]) / span}
    headers = ["images", "methods", "metric rows", "attribution rows", "Parquet MiB", "report s", "peak RSS MiB"]
    rows = [[r["images"], r["methods"], r["metric_rows"], r["attribution_rows"], f"{r['parquet_bytes'] / 2**20:.0f}",
             f"{r['seconds']:.1f}", f"{r['peak_rss_bytes'] / 2**20:.0f}"] for r in results]
    extrapolated = None
    if per_image:
        top = results[-1]
        extrapolated = {"images": 50_000,
                        "seconds": top["seconds"] + per_image["seconds"] * (50_000 - top["images"]),
                        "peak_rss_bytes": top["peak_rss_bytes"] + per_image["rss_bytes"] * (50_000 - top["images"])}
        rows.append(["50000 (linear)", a.methods, "", "", "", f"{extrapolated['seconds']:.0f}",
                     f"{extrapolated['peak_rss_bytes'] / 2**20:.0f}"])
    print(text_table(headers, rows))
    write_report(Path(a.out), {"results": results, "per_image": per_image, "extrapolated": extrapolated,
                               "settings": vars(a)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
