"""A few batches of a run, step by step, on the hardware one of the run's actors gets: the measurements that
jobs.plan turns into a forecast of the whole run (time, storage, CPUs the read/decode/write steps need).

The steps are the job's own — workers.shards.read_shard, workers.decode.decode_batch, the run's actor class, and
its write step (workers.staging) into a temporary directory — called in sequence in one process, so each one's time is
its own (in the job they overlap: decode and write run in CPU tasks beside the actors).
"""
from __future__ import annotations

import functools
import io
import math
import os
import resource
import tempfile
import time
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from workers.batches import ipc_tables
from workers.decode import decode_batch
from workers.device import device_name
from workers.shards import RAW_SCHEMA, read_shard
from workers.sink import parquet_options
from workers.staging import write_parts


def trial_batches(worker_cls: type, worker_config: Any, uris: list[str], preprocessing: Any, batch_size: int,
                  batches: int = 2, write: Callable[..., pa.Table] | None = None, results: str = "attributions",
                  group: str = "method") -> dict[str, Any]:
    """Run the first ``batches`` x ``batch_size`` samples of the shards ``uris`` (read in order, only as many as
    needed) through the job's steps, timing each: ``worker_cls(config=worker_config)`` on each batch, then
    ``write(actor output, uri=<temporary directory>)`` (the job's write step; None: workers.staging.write_parts
    with Parquet only). ``results``: the actor output's blob column of result rows; ``group``: the result column
    whose values the rows and bytes are counted by (``method`` for maps, ``metric`` for metric rows).

    The first batch pays the warm-up (CUDA context, cuDNN autotuning, first allocations); later batches are the
    steady state. Returns a JSON-able dict:

    - ``device`` (e.g. ``"cuda:0"``), ``device_name`` (the GPU's name, or the CPU's), ``threads`` (torch's CPU
      threads), ``shard_samples`` (samples in the first shard), ``images`` (samples tried), ``batch_size``;
    - ``read_seconds`` and ``read_samples`` (the shards read whole: tar members to rows), ``decode_seconds`` (the
      tried samples: JPEG to pixels), ``load_seconds`` (the actor's constructor: model load);
    - ``batches``: per batch ``images``, ``seconds`` (the actor's call, device synchronised), ``write_seconds``,
      ``rows``, ``error_rows``, and ``steps``: {step: seconds} as the worker timed its own steps in the call (its
      ``last_seconds``: per method for maps, per metric family for metrics);
    - ``staged_bytes``: the bytes the write step staged for all tried images (every format asked for);
    - ``group_bytes``: {group value: Parquet bytes of all its tried rows, written alone with the job's options};
      ``group_rows``: {group value: rows tried};
    - ``chunk_sizes``: {method: images per call} for methods that ran out of memory at the full batch (see
      AttributionWorker); ``errors``: the first error rows' ``key: reason`` (at most 5);
    - ``peak_device_bytes`` (torch's peak allocation on a CUDA device; None on the CPU) and ``peak_rss_bytes``
      (this process's peak resident set)."""
    write = write or functools.partial(write_parts, formats=("parquet",))
    wanted = max(1, batch_size * batches)
    started = time.perf_counter()
    rows: list[dict] = []
    shard_samples = None
    for uri in uris:
        rows += read_shard(uri)
        shard_samples = len(rows) if shard_samples is None else shard_samples
        if len(rows) >= wanted:
            break
    read_seconds = time.perf_counter() - started
    raw = pa.Table.from_pylist(rows[:wanted], schema=RAW_SCHEMA)
    started = time.perf_counter()
    decoded = decode_batch(raw, preprocessing)
    decode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    worker = worker_cls(config=worker_config)
    load_seconds = time.perf_counter() - started
    device = worker.spec.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measured: list[dict[str, Any]] = []
    grouped: dict[str, list[pa.Table]] = {}
    reasons: list[str] = []
    with tempfile.TemporaryDirectory(prefix="xai-plan-") as staging:
        for b in range(math.ceil(decoded.num_rows / batch_size)):
            part = decoded.slice(b * batch_size, batch_size)
            _synchronize(device)
            started = time.perf_counter()
            out = worker(part)
            _synchronize(device)
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            write(out, uri=staging)
            write_seconds = time.perf_counter() - started
            result_tables = _blob_tables(out.column(results))
            for table in result_tables:
                for value in dict.fromkeys(table.column(group).to_pylist()):
                    grouped.setdefault(value, []).append(table.filter(pc.equal(table.column(group), value)))
            error_tables = _blob_tables(out.column("errors"))
            for table in error_tables:
                reasons += [f"{k}: {r}" for k, r in zip(table.column("key").to_pylist(),
                                                         table.column("reason").to_pylist())]
            measured.append({"images": part.num_rows, "seconds": seconds, "write_seconds": write_seconds,
                             "rows": sum(t.num_rows for t in result_tables),
                             "error_rows": sum(t.num_rows for t in error_tables),
                             "steps": dict(getattr(worker, "last_seconds", {}))})
        staged_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(staging) for f in files)
    return {
        "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
        "shard_samples": shard_samples, "images": decoded.num_rows, "batch_size": batch_size,
        "read_seconds": read_seconds, "read_samples": len(rows), "decode_seconds": decode_seconds,
        "load_seconds": load_seconds, "batches": measured, "staged_bytes": staged_bytes,
        "group_bytes": {g: _parquet_bytes(pa.concat_tables(t)) for g, t in grouped.items()},
        "group_rows": {g: sum(t.num_rows for t in tables) for g, tables in grouped.items()},
        "chunk_sizes": dict(getattr(worker, "chunk_sizes", {})), "errors": reasons[:5],
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _blob_tables(column: pa.ChunkedArray) -> list[pa.Table]:
    """The non-empty tables of an actor output's blob column (Arrow IPC streams, workers.batches.ipc_tables)."""
    return [t for blob in column.to_pylist() for t in ipc_tables(blob or b"") if t.num_rows]


def _parquet_bytes(table: pa.Table) -> int:
    """Bytes of ``table`` written as one Parquet file with the options every staged part gets."""
    sink = io.BytesIO()
    pq.write_table(table, sink, **parquet_options(table.schema))
    return sink.tell()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["trial_batches"]
