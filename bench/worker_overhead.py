"""The attribution actor's overhead over the bare method calls it makes, in one process (no Ray).

    python -m bench.worker_overhead [--model resnet18] [--methods saliency,gbp,gradcam,tr_gbp,a_fmi]
                                    [--images 16] [--targets top5] [--device cpu] [--repeats 3]
                                    [--out bench/results/worker_overhead.json]

Both sides get the same decoded batch (random-noise JPEGs through workers.decode). The bare side is
``attribute(method, …)`` for every method, the top-k decided by the first method's own forward pass
(attribution.methods.targets.TopKTargets, as in the actor), maps left on the device; the worker side is
``AttributionWorker.__call__`` on the same batch: the same calls plus moving the maps to the host, scaling,
float16 conversion and building the Arrow rows. Interleaved rounds after one warm-up, median wall and CPU
seconds (CPU seconds of this process are what to read on a shared machine with --threads 1; on a GPU, wall);
the overhead is worker / bare − 1. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from attribution.methods import attribute
from attribution.methods.targets import TopKTargets
from workers.attribution_worker import AttributionWorker, WorkerConfig
from workers.decode import decode_batch
from workers.shards import RAW_SCHEMA


def decoded_batch(worker: AttributionWorker, n: int, seed: int = 0) -> pa.Table:
    """n random-noise JPEGs (320×256) decoded with the worker's preprocessing."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        meta = {"key": f"s{i:04d}", "label": i % 10, "wnid": "n0", "width": 320, "height": 256,
                "bboxes": [[10, 10, 200, 180]]}
        rows.append({"key": meta["key"], "shard": "bench", "shard_total": n, "jpg": buffer.getvalue(),
                     "cls": str(i % 10).encode(), "json": json.dumps(meta).encode(), "stage": None, "error": None})
    return decode_batch(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), worker.spec.preprocessing)


def bare(worker: AttributionWorker, table: pa.Table) -> None:
    """What the worker cannot avoid: every method's maps, left on the device, the top-k decided by the first
    method's own forward pass (TopKTargets; a plain forward first where that method has none)."""
    spec = worker.spec
    pixels = torch.from_numpy(np.ascontiguousarray(table.column("pixels").combine_chunks().to_numpy()))
    images = spec.preprocessing.normalise(pixels.to(spec.device).float() / 255.0)
    targets = TopKTargets(5 if worker.config.targets == "top5" else 1)
    for method in worker.config.methods:
        attribute(method, spec, images, targets, **worker.config.options_for(method))
        targets = targets.classes if isinstance(targets, TopKTargets) else targets
    if spec.device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints the table, writes the JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.worker_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--methods", default="saliency,gbp,gradcam,tr_gbp,a_fmi")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--targets", default="top5", choices=("top1", "top5"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/worker_overhead.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    config = WorkerConfig(model=a.model, methods=a.methods.split(","), targets=a.targets, device=a.device,
                          threads=a.threads)
    worker = AttributionWorker(config)
    table = decoded_batch(worker, a.images)
    wall: dict[str, list[float]] = {"bare": [], "worker": []}
    cpu: dict[str, list[float]] = {"bare": [], "worker": []}
    bare(worker, table)
    worker(table)  # warm-up
    for _ in range(a.repeats):
        for side, fn in (("bare", lambda: bare(worker, table)), ("worker", lambda: worker(table))):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[side].append(time.perf_counter() - start)
            cpu[side].append(time.process_time() - start_cpu)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    best = {k: min(v) for k, v in wall.items()}
    overhead, overhead_cpu = med["worker"] / med["bare"] - 1, med_cpu["worker"] / med_cpu["bare"] - 1
    overhead_best = best["worker"] / best["bare"] - 1
    print(f"{a.model}, {a.images} images, {a.targets}, methods {a.methods}, {a.device}, {a.threads} thread(s)")
    print(f"{'side':<8} {'median wall s':>13} {'median cpu s':>12} {'min wall s':>10} {'s/img':>8}")
    for side in ("bare", "worker"):
        print(f"{side:<8} {med[side]:13.3f} {med_cpu[side]:12.3f} {best[side]:10.3f} {med[side] / a.images:8.4f}")
    # CPU seconds of this process and the best run resist other processes on a shared machine (1 thread)
    print(f"worker overhead over the bare calls: {100 * overhead:+.1f} % median wall, {100 * overhead_cpu:+.1f} % "
          f"median cpu, {100 * overhead_best:+.1f} % best wall")
    result = {"model": a.model, "methods": config.methods, "images": a.images, "targets": a.targets,
              "device": a.device, "threads": a.threads, "repeats": a.repeats, "wall_seconds": wall,
              "cpu_seconds": cpu, "median_wall": med, "median_cpu": med_cpu, "overhead_wall": overhead,
              "overhead_cpu": overhead_cpu, "min_wall": best, "overhead_best_wall": overhead_best, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
