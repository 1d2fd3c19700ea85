"""What every model-pinning actor does with a batch of decoded samples around its own work, in one place.

In: a pyarrow table of decoded rows (workers.decode.DECODED_SCHEMA + ``pixels``). Out: one row per input shard of
the batch (:func:`output_schema`) — ``shard``, ``shard_total``, ``samples`` (how many of the shard's samples the
row holds), ``keys`` and Arrow IPC blobs of those samples' result rows and error rows. A row is never split by
Ray, so a sample's results always travel whole; one blob per shard and batch (not one per sample) keeps the
actors' and the write step's per-sample Python out of the way (bench/scale.py). Samples that failed upstream
(read, decode) carry their error row from the start and are not passed to the actor's own work.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.attributions import BOXES
from workers.decode import DECODED_SCHEMA


def output_schema(results: str, **extra: pa.DataType) -> pa.Schema:
    """Schema of an actor's output rows: ``shard``, ``shard_total``, ``samples``, ``keys``, the ``results`` blob,
    the ``errors`` blob, then one list column per ``extra`` (values aligned with ``keys``)."""
    return pa.schema([("shard", pa.string()), ("shard_total", pa.int64()), ("samples", pa.int64()),
                      ("keys", pa.list_(pa.string())), (results, pa.binary()), ("errors", pa.binary()),
                      *[(name, pa.list_(dtype)) for name, dtype in extra.items()]])


class DecodedBatch:
    """A batch of decoded samples as the actors use it.

    ``columns``: {DECODED_SCHEMA column: list of N values}; ``pixels``: uint8 [N, 3, S, S]; ``rows[i]`` /
    ``errors[i]``: the result rows / error rows (dicts) of sample ``i``; ``good``: the samples without an upstream
    error, in batch order. :meth:`sample_arrays` gives the per-sample columns as Arrow arrays for actors that
    build their result tables column by column.
    """

    def __init__(self, table: pa.Table) -> None:
        self.columns: dict[str, Any] = {name: table.column(name).to_pylist() for name in DECODED_SCHEMA.names}
        self.columns["pixels"] = table.column("pixels").combine_chunks().to_numpy()
        n = table.num_rows
        self.rows: list[list[dict]] = [[] for _ in range(n)]
        self.errors: list[list[dict]] = [[] for _ in range(n)]
        failed = self.columns["error"]
        for i in range(n):
            if failed[i] is not None:
                self.errors[i].append(error_row(self.columns, i, self.columns["stage"][i], None, failed[i]))
        self.good = [i for i in range(n) if failed[i] is None]

    def sample_arrays(self) -> dict[str, pa.Array]:
        """Per-sample columns [N] in the result schemas' types: ``key``, ``shard``, ``wnid`` (string), ``label``,
        ``width``, ``height`` (int32; pixels of the original image), ``bboxes``, ``bboxes_input`` (boxes
        [x0, y0, x1, y1], original / map pixels)."""
        c = self.columns
        out = {name: pa.array(c[name], pa.string()) for name in ("key", "shard", "wnid")}
        out.update({name: pa.array(c[name], pa.int32()) for name in ("label", "width", "height")})
        out.update({name: pa.array([json.loads(v) for v in c[name]], BOXES) for name in ("bboxes", "bboxes_input")})
        return out

    def output(self, results: str, result_schema: pa.Schema | None, error_schema: pa.Schema,
               tables: Sequence[pa.Table] | None = None, **extra: tuple[pa.DataType, list]) -> pa.Table:
        """The actor's output batch (:func:`output_schema`): one row per shard of the batch, in first-seen order.
        Its ``results`` blob holds the shard's rows of ``result_schema`` — from ``self.rows``, or, when ``tables``
        is given, the rows of those tables (one IPC stream per table schema, e.g. per map layout; each table has a
        ``shard`` column); ``errors`` holds the shard's ``self.errors`` as ``error_schema`` rows; each ``extra``
        (name=(type, per-sample values [N])) becomes a list column aligned with ``keys``."""
        c = self.columns
        shards = c["shard"]
        order = list(dict.fromkeys(shards))
        members = {shard: [i for i, s in enumerate(shards) if s == shard] for shard in order}
        schema = output_schema(results, **{name: dtype for name, (dtype, _) in extra.items()})
        out: dict[str, list] = {name: [] for name in schema.names}
        for shard in order:
            idx = members[shard]
            if tables is None:
                blob = ipc_blob([row for i in idx for row in self.rows[i]], result_schema)
            else:  # the maps: kept in Arrow buffers (bytes would be two more copies of every map in the actor)
                parts = [_rows_of_shard(t, shard, len(order) == 1) for t in tables]
                blob = ipc_buffer(*[part for part in parts if part.num_rows])
            out["shard"].append(shard)
            out["shard_total"].append(c["shard_total"][idx[0]])
            out["samples"].append(len(idx))
            out["keys"].append([c["key"][i] for i in idx])
            out[results].append(blob)
            out["errors"].append(ipc_blob([row for i in idx for row in self.errors[i]], error_schema))
            for name, (_, values) in extra.items():
                out[name].append([values[i] for i in idx])
        if tables is not None:
            out[results] = binary_chunks(out[results])
        return pa.Table.from_pydict(out, schema=schema)


def error_row(columns: dict[str, Any], i: int, stage: str | None, method: str | None, reason: str) -> dict:
    """Error row (schemas.attributions.ERROR_SCHEMA = schemas.metrics.METRIC_ERROR_SCHEMA fields) of sample ``i``:
    ``stage`` read | decode | attribute | evaluate (None: read), the ``method`` that failed or None, a one-line
    ``reason``."""
    return {"key": columns["key"][i], "shard": columns["shard"][i], "stage": stage or "read", "method": method,
            "reason": reason}


def ipc_blob(rows: list[dict] | pa.Table, schema: pa.Schema | None = None) -> bytes:
    """Rows as an Arrow IPC stream: a table as it is, or dicts of ``schema`` (an empty list gives a valid empty
    stream; a ``map`` column — fixed-shape tensor — is built from the rows' NumPy arrays in one piece)."""
    if isinstance(rows, pa.Table):
        table = rows
    elif "map" in schema.names:
        table = _table_with_maps(rows, schema)
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    return ipc_buffer(table).to_pybytes()


def ipc_buffer(*tables: pa.Table) -> pa.Buffer:
    """``tables`` as Arrow IPC streams one after the other (:func:`ipc_tables` reads them back) in one Arrow buffer,
    without :func:`ipc_blob`'s copy into bytes; no tables: an empty buffer."""
    sink = pa.BufferOutputStream()
    for table in tables:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return sink.getvalue()


def binary_chunks(values: Sequence[pa.Buffer]) -> pa.ChunkedArray:
    """A binary column whose value i is ``values[i]``, one chunk per value, each chunk's data the buffer itself (no
    copy; each value under 2 GiB, the binary type's offsets). Measured on a 123 MiB batch of maps: 14 ms from table
    to column, against ~100 ms through Python bytes."""
    return pa.chunked_array([pa.Array.from_buffers(pa.binary(), 1, [None, pa.py_buffer(
        np.array([0, value.size], np.int32).tobytes()), value]) for value in values], type=pa.binary())


def ipc_tables(blob: bytes | pa.Buffer) -> list[pa.Table]:
    """The tables of a blob that holds one or more IPC streams one after the other (:func:`ipc_blob` outputs
    concatenated: one per schema, e.g. per map layout); empty bytes -> []."""
    source = pa.BufferReader(blob)
    tables = []
    while source.tell() < len(blob):
        tables.append(pa.ipc.open_stream(source).read_all())
    return tables


def _rows_of_shard(table: pa.Table, shard: str, only_shard: bool) -> pa.Table:
    return table if only_shard else table.filter(pc.equal(table.column("shard"), shard))


def _table_with_maps(rows: list[dict], schema: pa.Schema) -> pa.Table:
    map_field = schema.field("map")
    if not rows:
        return schema.empty_table()
    maps = np.stack([r["map"] for r in rows])
    plain = [{k: v for k, v in r.items() if k != "map"} for r in rows]
    others = pa.schema([f for f in schema if f.name != "map"])
    table = pa.Table.from_pylist(plain, schema=others)
    storage = pa.FixedShapeTensorArray.from_numpy_ndarray(maps)
    return table.add_column(schema.get_field_index("map"), map_field, pa.chunked_array([storage],
                                                                                       type=map_field.type))


__all__ = ["DecodedBatch", "binary_chunks", "error_row", "ipc_blob", "ipc_buffer", "ipc_tables", "output_schema"]
