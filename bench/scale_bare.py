"""bench.scale's in-process references: the bare loop (decode + model + method, no pipeline) and the pipeline's own
stage functions run serially in one process, no Ray."""
from __future__ import annotations

import inspect
import json
import shutil
import time
from collections import Counter
from pathlib import Path

from bench.pipeline import PeakMemory, bare_loop


def bare(uris: list[str], count: int, weights: str | None, model: str, method: str, targets: str,
         batch: int, thread_counts: list[int]) -> dict:
    """The same decode + model + method in this process, on the first ``count`` images of ``uris``, in batches of
    ``batch``, once per torch thread count in ``thread_counts`` (after a one-batch warm-up). Returns ``runs``: per
    thread count, wall ``seconds`` (decode and compute apart), images per second, CPU seconds and CPU ms per image,
    peak RSS in bytes; and ``rows``: the read_shard rows used (for :func:`stages`)."""
    import torch

    from attribution import models
    from attribution.data.shards import Sample
    from workers.shards import read_shard

    rows = []
    for uri in uris:
        rows += read_shard(uri)
        if len(rows) >= count:
            break
    rows = rows[:count]
    samples = [Sample(r["key"], json.loads(r["json"]), lambda data=r["jpg"]: data) for r in rows]
    spec = models.load(weights or model, device="cpu")
    threads_default = torch.get_num_threads()
    runs = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        bare_loop(spec, samples[:batch], [method], targets, batch)  # warm-up
        with PeakMemory() as memory:
            start, cpu_start = time.perf_counter(), time.process_time()
            compute = bare_loop(spec, samples, [method], targets, batch)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        runs.append({"threads": threads, "images": len(samples), "seconds": round(wall, 3),
                     "decode_seconds": round(wall - compute, 3), "compute_seconds": round(compute, 3),
                     "images_per_second": round(len(samples) / wall, 2),
                     "compute_images_per_second": round(len(samples) / compute, 2),
                     "cpu_seconds": round(cpu, 3), "cpu_ms_per_image": round(1000 * cpu / len(samples), 3),
                     "peak_rss_bytes": memory.peak})
    torch.set_num_threads(threads_default)
    return {"runs": runs, "rows": rows}


def stages(rows: list[dict], weights: str | None, model: str, method: str, targets: str, batch: int,
           scratch: Path) -> dict:
    """The pipeline's own stage functions on ``rows`` (read_shard output) in batches of ``batch``, in this process,
    1 torch thread, no Ray, writing under ``scratch/stages`` (removed afterwards): ``seconds`` and ``ms_per_image``
    per stage (decode_batch, attribution_worker, to_arrow, write_parts) and ``total_ms_per_image``. The attribution
    actor's time minus the bare compute is its per-row Python (row dicts, IPC blobs); write_parts' is Arrow concat
    + Parquet + staging files."""
    import pyarrow as pa
    import torch

    from attribution import models
    from workers.attribution_worker import AttributionWorker, WorkerConfig
    from workers.decode import decode_batch
    from workers.shards import RAW_SCHEMA
    from workers.staging import write_parts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    preprocessing = models.preprocessing_for(weights or model)
    worker = AttributionWorker(WorkerConfig(model=model, weights=weights, methods=[method], targets=targets,
                                            device="cpu", threads=1))
    offered = {"uri": str(scratch / "stages"), "formats": ("parquet",), "map_size": preprocessing.input_size,
               "map_dtype": "float16"}
    write_kwargs = {k: v for k, v in offered.items() if k in inspect.signature(write_parts).parameters}
    totals = Counter()
    raw_batches = [pa.Table.from_pylist(rows[i:i + batch], schema=RAW_SCHEMA) for i in range(0, len(rows), batch)]
    worker(decode_batch(raw_batches[0], preprocessing))  # warm-up
    out = scratch / "stages"
    for raw in raw_batches:
        t0 = time.perf_counter()
        decoded = decode_batch(raw, preprocessing)
        t1 = time.perf_counter()
        result = worker(decoded)
        t2 = time.perf_counter()
        table = (result if isinstance(result, pa.Table)  # the worker returns a table or a dict of columns
                 else pa.Table.from_pydict({k: list(v) for k, v in result.items()}))
        t3 = time.perf_counter()
        write_parts(table, **write_kwargs)
        t4 = time.perf_counter()
        totals.update({"decode_batch": t1 - t0, "attribution_worker": t2 - t1, "to_arrow": t3 - t2,
                       "write_parts": t4 - t3})
    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    n = len(rows)
    return {"images": n, "batch": batch,
            "seconds": {k: round(v, 3) for k, v in totals.items()},
            "ms_per_image": {k: round(1000 * v / n, 3) for k, v in totals.items()},
            "total_ms_per_image": round(1000 * sum(totals.values()) / n, 3)}

