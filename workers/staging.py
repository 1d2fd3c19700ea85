"""The jobs' write steps (Ray Data map_batches steps after the actors): an actor batch's rows, which arrive as Arrow
IPC blobs (workers.batches.output_schema), staged as Parquet (and NPZ) parts per shard and map layout in the
output's ``_staging`` folder (workers.sink), with one summary row per shard for the driver's commits."""
from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa

from schemas.attributions import ERROR_SCHEMA, validate_attributions, validate_errors
from schemas.maps import MapLayout, map_field_layout
from schemas.metrics import METRIC_ERROR_SCHEMA, validate_metric_errors, validate_metrics
from workers.batches import ipc_tables
from workers.sink import SUMMARY_SCHEMA, OutputStore, write_staged_parquet


def write_parts(batch: pa.Table, uri: str, formats: tuple[str, ...]) -> pa.Table:
    """Ray Data step of jobs.attribute: stage a batch of AttributionWorker rows (workers.batches.output_schema: one
    per actor batch and shard, with IPC blobs ``attributions`` and ``errors``), grouped by shard: one Parquet
    (and/or NPZ) part per shard and map layout (schemas.maps). Returns one SUMMARY_SCHEMA row per shard in the
    batch."""
    def write(store: OutputStore, shard: str, part: str, groups: list[pa.Table]) -> list[str]:
        staged = []
        for g, rows in enumerate(groups):
            layout = map_field_layout(rows.schema.field("map"))
            validate_attributions(rows, layout.size, layout.dtype)
            name = part if len(groups) == 1 else f"{part}-{layout.size}{layout.dtype}"
            if "parquet" in formats:
                staged.append(write_staged_parquet(store, shard, f"attributions-{name}.parquet", rows))
            if "npz" in formats:
                staged.append(_write_npz(store, shard, f"npz-{name}.npz", rows, layout))
        return staged

    return _stage(batch, uri, "attributions", write, ERROR_SCHEMA, validate_errors)


def write_metric_parts(batch: pa.Table, uri: str) -> pa.Table:
    """Ray Data step of jobs.evaluate: stage a batch of EvaluateWorker / ShardMapMetrics rows
    (workers.batches.output_schema, with IPC blobs ``metrics`` and ``errors``), grouped by shard. Returns one
    SUMMARY_SCHEMA row per shard in the batch."""
    def write(store: OutputStore, shard: str, part: str, groups: list[pa.Table]) -> list[str]:
        for rows in groups:
            validate_metrics(rows)
        return [write_staged_parquet(store, shard, f"metrics-{part}.parquet", pa.concat_tables(groups))]

    return _stage(batch, uri, "metrics", write, METRIC_ERROR_SCHEMA, validate_metric_errors)


def _stage(batch: pa.Table, uri: str, kind: str,
           write: Callable[["OutputStore", str, str, list[pa.Table]], list[str]], error_schema: pa.Schema,
           validate_error_rows: Callable[[pa.Table], None]) -> pa.Table:
    """Concatenate each shard's result rows (blob column ``kind``; one table per schema) and error rows,
    validate, write to staging."""
    store = OutputStore(uri)
    shards = batch.column("shard").to_pylist()
    totals = dict(zip(shards, batch.column("shard_total").to_pylist()))
    samples = batch.column("samples").to_pylist()
    blobs = {column: _blob_views(batch.column(column)) for column in (kind, "errors")}
    summaries = []
    for shard in sorted(set(shards)):
        idx = [i for i, s in enumerate(shards) if s == shard]
        groups = _concat_by_schema([blobs[kind][i] for i in idx])
        errors = _concat_by_schema([blobs["errors"][i] for i in idx]) or [error_schema.empty_table()]
        errors = errors[0] if len(errors) == 1 else pa.concat_tables(errors)
        validate_error_rows(errors)
        part = uuid.uuid4().hex
        staged = write(store, shard, part, groups) if groups else []
        if errors.num_rows:
            staged.append(write_staged_parquet(store, shard, f"errors-{part}.parquet", errors))
        summaries.append({"shard": shard, "shard_total": totals[shard], "samples": sum(samples[i] for i in idx),
                          "rows": sum(g.num_rows for g in groups), "error_rows": errors.num_rows,
                          "files": json.dumps(staged)})
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


def _blob_views(column: pa.ChunkedArray) -> list[pa.Buffer | None]:
    """The values of a binary column as zero-copy slices of its data buffer (None where null): ``to_pylist`` and
    ``as_buffer`` would copy every map of the batch (~60 ms per 120 MiB batch)."""
    views: list[pa.Buffer | None] = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        nulls = chunk.is_null().to_numpy(zero_copy_only=False)
        views += [None if nulls[i] else data.slice(int(ends[i]), int(ends[i + 1] - ends[i]))
                  for i in range(len(chunk))]
    return views


def _concat_by_schema(blobs: Iterable[bytes]) -> list[pa.Table]:
    """The non-empty rows of the blobs' IPC streams, one table per schema (first-seen order)."""
    groups: dict[pa.Schema, list[pa.Table]] = {}
    for blob in blobs:
        for table in ipc_tables(blob) if blob else []:
            if table.num_rows:
                groups.setdefault(table.schema, []).append(table)
    return [tables[0] if len(tables) == 1 else pa.concat_tables(tables) for tables in groups.values()]


def _write_npz(store: OutputStore, shard: str, name: str, table: pa.Table, layout: MapLayout) -> str:
    """NPZ part: ``map`` [N, S, S] as stored, ``map_scale``, index arrays, and ``map_dtype`` / ``input_size``
    (schemas.maps.decode_maps turns map + map_scale into the methods' values)."""
    rel = posixpath.join("_staging", shard, name)
    store.fs.create_dir(store.path("_staging", shard), recursive=True)
    buffer = io.BytesIO()
    arrays = {"map": table.column("map").combine_chunks().to_numpy_ndarray()}
    if layout.size != layout.input_size or layout.levels:  # default-layout parts stay as they were
        arrays.update(map_dtype=np.array(layout.dtype), input_size=np.array(layout.input_size))
    for column in ("map_scale", "target", "target_rank", "label"):
        arrays[column] = table.column(column).to_numpy()
    for column in ("key", "shard", "model", "method"):
        arrays[column] = np.asarray(table.column(column).to_pylist(), dtype=str)
    np.savez_compressed(buffer, **arrays)
    with store.fs.open_output_stream(store.path(rel)) as f:
        f.write(buffer.getvalue())
    return rel


__all__ = ["write_metric_parts", "write_parts"]
