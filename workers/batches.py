"""What every model-pinning actor does with a batch of decoded samples around its own work, in one place.

In: a pyarrow table of decoded rows (workers.decode.DECODED_SCHEMA + ``pixels``). Out: one row per sample — ``key``,
``shard``, ``shard_total`` and Arrow IPC blobs of the sample's result rows and error rows — so Ray can split blocks
anywhere without splitting a sample. Samples that failed upstream (read, decode) carry their error row from the
start and are not passed to the actor's own work.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from workers.decode import DECODED_SCHEMA


class DecodedBatch:
    """A batch of decoded samples as the actors use it.

    ``columns``: {DECODED_SCHEMA column: list of N values}; ``pixels``: uint8 [N, 3, S, S]; ``rows[i]`` /
    ``errors[i]``: the result rows / error rows (dicts) of sample ``i``; ``good``: the samples without an upstream
    error, in batch order.
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

    def output(self, results: str, result_schema: pa.Schema | None, error_schema: pa.Schema,
               result_blobs: list[bytes] | None = None, **extra: list) -> dict[str, np.ndarray | list]:
        """The actor's output batch: ``key``, ``shard``, ``shard_total``, ``results`` (IPC blob of each sample's
        rows of ``result_schema``, or the given ``result_blobs``), ``errors`` (IPC blob of its rows of
        ``error_schema``) and the ``extra`` per-sample columns."""
        c = self.columns
        if result_blobs is None:
            result_blobs = [ipc_blob(r, result_schema) for r in self.rows]
        return {"key": c["key"], "shard": c["shard"], "shard_total": c["shard_total"],
                results: np.array(result_blobs, dtype=object),
                "errors": np.array([ipc_blob(e, error_schema) for e in self.errors], dtype=object),
                **{name: np.array(values, dtype=object) for name, values in extra.items()}}


def error_row(columns: dict[str, Any], i: int, stage: str | None, method: str | None, reason: str) -> dict:
    """Error row (schemas.attributions.ERROR_SCHEMA = schemas.metrics.METRIC_ERROR_SCHEMA fields) of sample ``i``:
    ``stage`` read | decode | attribute | evaluate (None: read), the ``method`` that failed or None, a one-line
    ``reason``."""
    return {"key": columns["key"][i], "shard": columns["shard"][i], "stage": stage or "read", "method": method,
            "reason": reason}


def ipc_blob(rows: list[dict], schema: pa.Schema) -> bytes:
    """Rows (dicts) as an Arrow IPC stream of ``schema`` (an empty list gives a valid empty stream). A ``map``
    column (fixed-shape tensor) is built from the rows' NumPy arrays in one piece."""
    table = _table_with_maps(rows, schema) if "map" in schema.names else pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_tables(blob: bytes) -> list[pa.Table]:
    """The tables of a blob that holds one or more IPC streams one after the other (:func:`ipc_blob` outputs
    concatenated: one per schema, e.g. per map layout); empty bytes -> []."""
    source = pa.BufferReader(blob)
    tables = []
    while source.tell() < len(blob):
        tables.append(pa.ipc.open_stream(source).read_all())
    return tables


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


__all__ = ["DecodedBatch", "error_row", "ipc_blob", "ipc_tables"]
