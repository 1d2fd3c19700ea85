"""Reading a job's outputs back: committed rows only, filters pushed down to Parquet, maps in the methods' units.

Pure pyarrow/NumPy (no Ray, no torch): what a downstream user imports to get maps or metric rows out of an output
directory written by ``jobs.attribute`` / ``jobs.evaluate`` (a local path or an ``s3://`` / ``gs://`` URI)::

    from schemas.reader import OutputReader, maps_of

    run = OutputReader("s3://bucket/runs/maps")                       # or a local directory
    top1 = run.read(methods=["tr_gbp"], ranks=[0], keys=["val_000042"])  # pyarrow.Table, schemas.attributions rows
    maps = maps_of(top1)                                              # float32 [N, 224, 224], the method's values
    metrics = run.read("metrics").to_pandas()                         # schemas.metrics rows

Only shards with a commit record (``_commits/<shard>.json``, written last by the job's driver) are read, so a
running or killed job never shows half a shard. Filters on method, key, shard, target class and target rank go to
Parquet as a predicate (the writer sorts rows by key in small row groups, so a key lookup reads little). A reader
lists the commit records once (on first use) and then works on that snapshot; make a new one to see later commits.

Maps may be stored smaller than the input and quantised (``jobs.attribute --map-size/--map-dtype``; one Parquet file
per storage layout, see schemas.maps). :func:`maps_of` is the one place where stored maps become the methods'
values at the input size: it dequantises and upsamples bilinearly, whatever the layout. A read whose rows span
several layouts (e.g. ``--map-size gradcam=14``) brings them to one: float32 at the input size, still divided by
``map_scale`` (``maps="input"`` always does that, ``maps="stored"`` refuses mixed layouts).
"""
from __future__ import annotations

import json
import posixpath
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.attributions import ERROR_SCHEMA
from schemas.maps import INPUT_SIZE, LEVELS, MapLayout, decode_maps, map_field_layout, upsample
from schemas.metrics import METRIC_SCHEMA
from schemas.storage import StorageError, first_line, resolve_filesystem

COMMITS = "_commits"
TABLE_KINDS = ("attributions", "errors", "metrics", "sanity")
_EMPTY = {"errors": ERROR_SCHEMA, "metrics": METRIC_SCHEMA}


class OutputReader:
    """A job's output directory, read-only. ``uri``: local path or object-store URI."""

    cache_commits = True  # a reader works on one snapshot of the commit records; the writer (OutputStore) does not

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = resolve_filesystem(uri)
        self._records: dict[str, dict] | None = None
        self._layouts: dict[str, MapLayout | None] = {}  # committed files are immutable: one footer read each

    def path(self, *parts: str) -> str:
        """Filesystem path of ``parts`` under the root."""
        return posixpath.join(self.root, *parts)

    def read_json(self, rel: str) -> dict | None:
        """The JSON document at ``rel``, or None when absent. StorageError when the location cannot be read."""
        try:
            info = self.fs.get_file_info(self.path(rel))
            if info.type != pafs.FileType.File:
                return None
            with self.fs.open_input_stream(self.path(rel)) as f:
                return json.loads(f.read())
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri}: {first_line(exc)}") from None

    def manifest(self) -> dict | None:
        """The run's manifest.json (job, config, versions, per-shard status, summary), or None."""
        return self.read_json("manifest.json")

    def committed(self) -> dict[str, dict]:
        """{shard name: its commit record (``files`` relative to the root, counts)} for every committed shard.
        StorageError when the location cannot be read."""
        if self._records is not None and self.cache_commits:
            return self._records
        records = {}
        try:
            directory = self.path(COMMITS)
            if self.fs.get_file_info(directory).type == pafs.FileType.Directory:
                for info in self.fs.get_file_info(pafs.FileSelector(directory)):
                    if info.base_name.endswith(".json"):
                        with self.fs.open_input_stream(info.path) as f:
                            record = json.loads(f.read())
                        records[record["shard"]] = record
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri}: {first_line(exc)}") from None
        self._records = records
        return records

    def committed_files(self, kind: str, shards: Sequence[str] | None = None) -> list[str]:
        """Paths (relative to the root) of committed files of ``kind`` (of ``shards`` only, when given), sorted by
        shard then part."""
        wanted = None if shards is None else set(shards)
        return sorted(f for shard, record in self.committed().items() if wanted is None or shard in wanted
                      for f in record["files"] if f.startswith(kind + "/"))

    def read(self, kind: str = "attributions", *, methods: Sequence[str] | None = None,
             keys: Sequence[str] | None = None, shards: Sequence[str] | None = None,
             targets: Sequence[int] | None = None, ranks: Sequence[int] | None = None,
             columns: Sequence[str] | None = None, maps: str = "auto", where: pc.Expression | None = None
             ) -> pa.Table:
        """Committed rows of ``kind`` ("attributions", "metrics", "errors", "sanity") as one table.

        Filters (None = all): ``methods`` names, sample ``keys``, input ``shards`` (file names; only their files
        are opened), ``targets`` (class indices) and ``ranks`` (target rank among the top-5, 0 = top-1; attribution
        rows). ``columns``: the columns to read (default all). ``maps``: "auto" keeps maps as stored when the rows
        have one storage layout and brings several to float32 at the input size; "input" always does that;
        "stored" refuses several. :func:`maps_of` turns either into the methods' values. ``where``: a further Arrow
        filter expression on the rows, applied while the files are read (rows it drops are never held in memory).
        """
        if kind not in TABLE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(TABLE_KINDS)}, got {kind!r}")
        if maps not in ("auto", "input", "stored"):
            raise ValueError(f"maps must be auto, input or stored, got {maps!r}")
        files = [self.path(f) for f in self.committed_files(kind, shards)]
        if not files:
            empty = _EMPTY.get(kind, pa.schema([]))
            return empty.empty_table() if columns is None or not len(empty) else \
                empty.empty_table().select(list(columns))
        predicate = _predicate(methods=methods, key=keys, target=targets, target_rank=ranks)  # shards: by file
        if where is not None:
            predicate = where if predicate is None else predicate & where
        wants_map = kind == "attributions" and (columns is None or "map" in columns)
        groups = self._layout_groups(files) if wants_map else {None: files}
        tables = {layout: self._read_files(group, predicate, columns) for layout, group in groups.items()}
        if len(tables) > 1:  # layouts that the filters leave no row of do not count
            tables = {layout: t for layout, t in tables.items() if t.num_rows} or dict([next(iter(tables.items()))])
        if len(tables) > 1 and maps == "stored":
            raise ValueError(f"{self.uri}: these rows have {len(tables)} map layouts "
                             f"({', '.join(f'{g.size}x{g.size} {g.dtype}' for g in tables)}); read them per method "
                             "or with maps='input'")
        if wants_map and (len(tables) > 1 or maps == "input"):
            tables = {layout: to_input_layout(t) for layout, t in tables.items()}
        return pa.concat_tables(list(tables.values())) if len(tables) > 1 else next(iter(tables.values()))

    def _read_files(self, files: list[str], predicate, columns: Sequence[str] | None) -> pa.Table:
        try:
            return pq.read_table(files, filesystem=self.fs, columns=None if columns is None else list(columns),
                                 filters=predicate)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{self.uri}: cannot read these filters/columns: {first_line(exc)}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri}: {first_line(exc)}") from None

    def _layout_groups(self, files: list[str]) -> dict[MapLayout | None, list[str]]:
        """{map layout: its files}, in the files' order (one footer read per file and reader)."""
        groups: dict[MapLayout | None, list[str]] = {}
        for path in files:
            if path not in self._layouts:
                try:
                    schema = pq.read_schema(path, filesystem=self.fs)
                except OSError as exc:
                    raise StorageError(f"cannot read {self.uri}: {first_line(exc)}") from None
                self._layouts[path] = map_field_layout(schema.field("map")) if "map" in schema.names else None
            groups.setdefault(self._layouts[path], []).append(path)
        return groups


def to_input_layout(table: pa.Table) -> pa.Table:
    """Attribution rows with their ``map`` column as float32 [I, I] at the input size I, still divided by
    ``map_scale`` (dequantised, upsampled bilinearly); other columns unchanged."""
    index = table.schema.get_field_index("map")
    field = table.schema.field(index)
    layout = map_field_layout(field)
    stored = table.column("map").combine_chunks().to_numpy_ndarray() if table.num_rows else \
        np.zeros((0, layout.size, layout.size), np.float32)
    levels = LEVELS.get(layout.dtype)
    relative = stored.astype(np.float32) / np.float32(levels) if levels else stored.astype(np.float32)
    maps = np.ascontiguousarray(upsample(relative, layout.input_size), dtype=np.float32)
    column_type = pa.fixed_shape_tensor(pa.float32(), [layout.input_size, layout.input_size])
    metadata = {**(field.metadata or {}), INPUT_SIZE: str(layout.input_size)}
    new_field = pa.field("map", column_type, field.nullable, metadata=metadata)
    storage = pa.FixedShapeTensorArray.from_numpy_ndarray(maps) if len(maps) else \
        pa.ExtensionArray.from_storage(column_type, pa.array([], column_type.storage_type))
    return table.set_column(index, new_field, pa.chunked_array([storage], type=column_type))


def _predicate(**values: Sequence | None) -> pc.Expression | None:
    """AND of ``column in values`` for every filter given (``methods`` filters the ``method`` column)."""
    predicate = None
    for column, wanted in values.items():
        if wanted is None:
            continue
        name = "method" if column == "methods" else column
        condition = pc.field(name).isin(list(wanted))
        predicate = condition if predicate is None else predicate & condition
    return predicate


def read_table(uri: str, kind: str = "attributions", **filters) -> pa.Table:
    """All committed rows of ``kind`` of the output directory ``uri`` as one table; ``filters`` as
    :meth:`OutputReader.read` (methods, keys, shards, targets, ranks, columns)."""
    return OutputReader(uri).read(kind, **filters)


def maps_of(table: pa.Table) -> np.ndarray:
    """The maps of attribution rows as float32 [N, I, I] in the methods' own units at the model's input size I:
    stored maps dequantised (int8: q · map_scale / 127, uint8: / 255, floats: map · map_scale) and upsampled
    bilinearly when stored smaller (schemas.maps)."""
    layout = map_field_layout(table.schema.field("map"))
    if not table.num_rows:
        return np.zeros((0, layout.input_size, layout.input_size), np.float32)
    stored = table.column("map").combine_chunks().to_numpy_ndarray()
    return decode_maps(stored, table.column("map_scale").to_numpy(), layout.dtype, layout.input_size)


__all__ = ["COMMITS", "OutputReader", "StorageError", "TABLE_KINDS", "maps_of", "read_table", "to_input_layout"]
