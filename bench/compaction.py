"""Compaction at realistic map sizes: what merging one shard's staged parts costs (issue 14 item 3).

    python -m bench.compaction [--images 500] [--methods 4] [--targets 5] [--size 224] [--dtype float16]
                               [--batch 32] [--work runs/compaction] [--out bench/results/compaction.json]

jobs.attribute stages one Parquet part per actor batch and map layout; at commit a Ray task
(workers.sink.compact_parts) merges a complete shard's parts into few files. bench/scale.py runs at 64 px, where a
500-image shard is one part and nothing is merged; the real run is 224-px float16 maps, ~100 KB each, so a
500-image shard with 16 methods x top-5 is ~4 GB in ~16 parts. This stages one such shard through the job's own
write step (workers.staging.write_parts, from actor-output batches of ``--batch`` images x ``--methods`` x
``--targets`` maps of random values — attribution maps compress about as badly) and runs compact_parts on it in a
fresh process (parts of workers.sink.KEEP_BYTES and more stay as written), measuring: parts and bytes in, files
and row groups out, seconds and MB/s, the process's peak RSS above its RSS before the merge (VmHWM, reset after
the imports), and Arrow's peak allocation. Every row is checked afterwards (count, keys sorted, row groups of at
most ROW_GROUP_SIZE rows). Prints a table and writes JSON.
tests/test_compaction.py runs it at 16 px.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attribution.methods import REGISTRY
from bench.tables import text_table, write_report
from schemas.attributions import ERROR_SCHEMA, attribution_schema
from workers.batches import ipc_blob, output_schema
import workers.sink as sink
from workers.sink import OutputStore
from workers.staging import write_parts

DEFAULT_OUT = Path("bench/results/compaction.json")
SHARD = "val-000000.tar"
METHOD_NAMES = list(REGISTRY)  # the maps' method column: the first --methods of the registry


def batch_table(keys: list[str], methods: int, targets: int, size: int, dtype: str,
                rng: np.random.Generator) -> pa.Table:
    """One actor-output row (workers.batches.output_schema) for ``keys``: ``methods`` x ``targets`` maps per key of
    random values, [size, size] ``dtype``, in the order the actor emits them (key, method, target)."""
    n = len(keys) * methods * targets
    schema = attribution_schema(size, dtype, size)
    np_dtype = np.dtype(dtype)
    if np_dtype.kind == "f":
        maps = rng.standard_normal((n, size, size), dtype=np.float32).astype(np_dtype)
    else:
        info = np.iinfo(np_dtype)
        maps = rng.integers(info.min, info.max, size=(n, size, size), dtype=np_dtype)
    key = np.repeat(keys, methods * targets)
    method = np.tile(np.repeat(METHOD_NAMES[:methods], targets), len(keys))
    target = np.tile(np.arange(targets, dtype=np.int32), len(keys) * methods)
    columns = {
        "key": key.tolist(), "shard": [SHARD] * n, "model": ["resnet50"] * n, "weights": ["IMAGENET1K_V1"] * n,
        "method": method.tolist(), "options": ["{}"] * n, "target": target, "target_kind": ["top5"] * n,
        "target_rank": target.astype(np.int8), "label": np.zeros(n, np.int32), "wnid": ["n01440764"] * n,
        "top5": [[0, 1, 2, 3, 4]] * n, "top5_prob": [[0.5, 0.2, 0.1, 0.1, 0.1]] * n,
        "width": np.full(n, 500, np.int32), "height": np.full(n, 375, np.int32),
        "bboxes": [[[10.0, 20.0, 300.0, 200.0]]] * n, "bboxes_input": [[[5.0, 9.0, 150.0, 100.0]]] * n,
        "map": pa.FixedShapeTensorArray.from_numpy_ndarray(maps).cast(schema.field("map").type),
        "map_scale": np.ones(n, np.float32), "fmi": [None] * n, "layers": [None] * n,
        "seconds": np.full(n, 0.01, np.float32),
    }
    rows = pa.Table.from_pydict(columns, schema=schema)
    return pa.Table.from_pydict({"shard": [SHARD], "shard_total": [0], "samples": [len(keys)], "keys": [keys],
                                 "attributions": [ipc_blob(rows)], "errors": [ipc_blob([], ERROR_SCHEMA)]},
                                schema=output_schema("attributions"))


def stage_shard(work: Path, images: int, methods: int, targets: int, size: int, dtype: str, batch: int) -> dict:
    """Stage one shard of ``images`` samples in parts of ``batch`` samples under ``work`` with write_parts; returns
    {files (staged, relative), parts, bytes, rows, seconds}."""
    shutil.rmtree(work, ignore_errors=True)
    store = OutputStore(str(work))
    store.ensure()
    rng = np.random.default_rng(0)
    keys = [f"ILSVRC2012_val_{i:08d}" for i in range(images)]
    files: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, images, batch):
        table = batch_table(keys[start:start + batch], methods, targets, size, dtype, rng)
        table = table.set_column(1, "shard_total", pa.array([images], pa.int64()))
        for summary in write_parts(table, str(work), ("parquet",)).to_pylist():
            files += json.loads(summary["files"])
    seconds = time.perf_counter() - t0
    sizes = [store.fs.get_file_info(store.path(f)).size for f in files]
    return {"files": files, "parts": len(files), "bytes": int(sum(sizes)), "rows": images * methods * targets,
            "seconds": round(seconds, 3)}


def _peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM; since the last :func:`_reset_peak_rss`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the peak since the start


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: "5" to /proc/self/clear_refs), so imports do not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _compact_in_child(uri: str, files: list[str], queue) -> None:
    """compact_parts in this (fresh) process; puts {files, seconds, rss_before, peak_rss, arrow_peak} on ``queue``."""
    import psutil

    from workers.sink import compact_parts

    _reset_peak_rss()
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    out = compact_parts(uri, SHARD, files)
    seconds = time.perf_counter() - t0
    queue.put({"files": out, "seconds": seconds, "rss_before": before, "peak_rss": _peak_rss(),
               "arrow_peak": pa.default_memory_pool().max_memory()})


def compact(work: Path, files: list[str]) -> dict:
    """Run compact_parts on the staged ``files`` in a spawned process (its own peak RSS); returns its figures."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_compact_in_child, args=(str(work), files, queue))
    child.start()
    result = queue.get(timeout=3600)
    child.join()
    return result


def check(work: Path, files: list[str], rows: int) -> dict:
    """Every row there once, keys sorted within each file, row groups of at most workers.sink.ROW_GROUP_SIZE rows."""
    store = OutputStore(str(work))
    total, row_groups, largest, sorted_ok = 0, 0, 0, True
    for rel in files:
        f = pq.ParquetFile(store.path(rel))
        row_groups += f.num_row_groups
        largest = max(largest, *(f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)))
        keys = f.read(columns=["key"]).column("key").to_pylist()
        total += len(keys)
        sorted_ok &= keys == sorted(keys)
    return {"rows": total, "rows_expected": rows, "row_groups": row_groups, "largest_row_group": largest,
            "sorted": sorted_ok, "ok": total == rows and sorted_ok and largest <= sink.ROW_GROUP_SIZE}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.compaction", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500, help="samples in the shard")
    p.add_argument("--methods", type=int, default=4, help=f"methods per sample (at most {len(METHOD_NAMES)})")
    p.add_argument("--targets", type=int, default=5, help="maps per method and sample (top-5: 5)")
    p.add_argument("--size", type=int, default=224, help="map side, px")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32", "int8", "uint8"))
    p.add_argument("--batch", type=int, default=32, help="samples per actor batch = per staged part")
    p.add_argument("--work", type=Path, default=Path("runs/compaction"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    if not 1 <= a.methods <= len(METHOD_NAMES):
        p.error(f"--methods must be 1..{len(METHOD_NAMES)}")
    staged = stage_shard(a.work, a.images, a.methods, a.targets, a.size, a.dtype, a.batch)
    merged = compact(a.work, staged["files"])
    verdict = check(a.work, merged["files"], staged["rows"])
    mb = staged["bytes"] / 2 ** 20
    report = {
        "config": {k: getattr(a, k) for k in ("images", "methods", "targets", "size", "dtype", "batch")},
        "machine": {"python": platform.python_version(), "pyarrow": pa.__version__,
                    "compact_bytes": sink.COMPACT_BYTES, "row_group_size": sink.ROW_GROUP_SIZE},
        "staged": {k: v for k, v in staged.items() if k != "files"},
        "compacted": {"files": len(merged["files"]), "seconds": round(merged["seconds"], 3),
                      "mb_per_second": round(mb / merged["seconds"], 1) if merged["seconds"] >= 0.01 else None,
                      "peak_rss_above_start_bytes": merged["peak_rss"] - merged["rss_before"],
                      "arrow_peak_bytes": merged["arrow_peak"], **verdict},
    }
    c = report["compacted"]
    print(text_table(["", "value"], [
        ["shard", f"{a.images} images x {a.methods} methods x {a.targets} targets, {a.size} px {a.dtype}"],
        ["staged parts / MiB / bytes per map", f"{staged['parts']} / {mb:.0f} / {staged['bytes'] / staged['rows']:.0f}"],
        ["compacted files / row groups", f"{c['files']} / {c['row_groups']}"],
        ["compaction seconds / MiB/s", f"{c['seconds']:.2f} / {c['mb_per_second'] or '- (nothing merged)'}"],
        ["peak RSS above start / Arrow peak (MiB)",
         f"{c['peak_rss_above_start_bytes'] / 2 ** 20:.0f} / {c['arrow_peak_bytes'] / 2 ** 20:.0f}"],
        ["rows / sorted / checks", f"{c['rows']} of {c['rows_expected']} / {c['sorted']} / {'ok' if c['ok'] else 'FAILED'}"],
    ]))
    write_report(a.out, report)
    return 0 if c["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
