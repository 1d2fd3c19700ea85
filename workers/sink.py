"""Where results go: the output layout, staged Parquet parts, their compaction and per-shard commits (the write
steps that stage an actor's rows, Ray Data map_batches steps, are in workers.staging).

Layout of an output directory (local path or object-store URI)::

    manifest.json                          run config, versions, per-shard status, summary
    attributions/<shard>/part-<id>.parquet rows of schemas.attributions   (committed shards only)
    errors/<shard>/part-<id>.parquet       rows of schemas.attributions.ERROR_SCHEMA
    metrics/<shard>/part-<id>.parquet      rows of schemas.metrics.METRIC_SCHEMA   (jobs.evaluate's output dir)
    npz/<shard>/part-<id>.npz              maps + index arrays (--format npz|both)
    _commits/<shard>.json                  commit record: the shard's files and counts
    _staging/<shard>/…                     parts of shards not yet complete

Exactly once: parts are written to ``_staging``; when the driver has seen every sample of a shard written, the
shard's parts are compacted (one Parquet file per kind and map layout, up to COMPACT_BYTES each, parts of KEEP_BYTES
and more kept as they are: the write step makes one part per actor batch), moved into place, and then the commit
record is written. A rerun trusts only commit records: everything of an uncommitted shard is deleted and recomputed.
Parts written by a retried task that never reported back are never listed in a commit, so they never reach a
reader. The public reader (schemas.reader: ``OutputReader``, ``read_table``, ``maps_of``, re-exported here) reads
committed shards only; ``pandas.read_parquet`` on ``attributions/`` or DuckDB see whole shards once a run has
finished.

On object stores (``s3://``, ``gs://``) a move is a copy and a delete, not atomic; the commit still is: the record
is one object written (as a whole) after every part is in place, and only records count. tests/test_object_store.py
kills a run on a local S3 server and resumes it.
"""
from __future__ import annotations

import contextlib
import json
import posixpath
import sys
import uuid
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.reader import COMMITS, OutputReader, maps_of, read_table
from schemas.storage import StorageError, first_line

KINDS = ("attributions", "errors", "npz", "metrics")
# One row per (batch, shard) from a write step: what the driver needs to commit a shard once all its samples are in.
SUMMARY_SCHEMA = pa.schema([("shard", pa.string()), ("shard_total", pa.int64()), ("samples", pa.int64()),
                            ("rows", pa.int64()), ("error_rows", pa.int64()), ("files", pa.string())])
ROW_GROUP_SIZE = 256  # rows are written sorted by key in small row groups, so a key filter reads little
COMPACT_BYTES = 512 * 1024 ** 2  # at most this much of a shard's staged parts goes into one compacted file
# A staged part this large stays as written: it is already a good file (object stores and readers want ~100 MB+ files;
# a key lookup prunes its sorted row groups), and merging it would rewrite it for nothing. 224-px float16 maps of 16
# methods x top-5 make ~240 MB per 32-image actor batch: ~70 s of one core and twice the object-store traffic per
# 500-image shard were spent on rewriting such parts (bench/compaction.py: ~50 MiB/s).
KEEP_BYTES = 128 * 1024 ** 2
COUNTS = ("samples", "rows", "error_rows")


class OutputStore(OutputReader):
    """An output directory with the layout above, for writing: a schemas.reader.OutputReader that also stages,
    commits and resets shards. Unlike a reader it lists the commit records afresh at every call."""

    cache_commits = False

    def ensure(self) -> None:
        """Create the root directory (on object stores: its marker; the bucket must exist). StorageError when the
        location cannot be written."""
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as exc:
            raise StorageError(f"cannot write to {self.uri}: {first_line(exc)}") from None

    def reset_shard(self, shard: str) -> None:
        """Delete everything an unfinished attempt left of ``shard`` (staging and half-moved parts)."""
        for directory in [self.path("_staging", shard)] + [self.path(kind, shard) for kind in KINDS]:
            if self.fs.get_file_info(directory).type == pafs.FileType.Directory:
                self.fs.delete_dir(directory)

    def reset_shards(self, shards: Iterable[str]) -> None:
        """:meth:`reset_shard` for each of ``shards`` that has leftovers: one listing per output kind (and of
        ``_staging``), not a few lookups per shard (a fresh 10,000-shard run on S3 would make ~50,000 requests)."""
        wanted = set(shards)
        present: set[str] = set()
        for directory in ("_staging",) + KINDS:
            found = self.fs.get_file_info(pafs.FileSelector(self.path(directory), allow_not_found=True))
            present.update(info.base_name for info in found if info.type == pafs.FileType.Directory)
        for shard in sorted(wanted & present):
            self.reset_shard(shard)

    def clear(self) -> None:
        """Delete every output of previous runs (--overwrite). StorageError when the location cannot be reached."""
        try:
            for name in KINDS + ("_staging", COMMITS):
                if self.fs.get_file_info(self.path(name)).type == pafs.FileType.Directory:
                    self.fs.delete_dir(self.path(name))
            if self.fs.get_file_info(self.path("manifest.json")).type == pafs.FileType.File:
                self.fs.delete_file(self.path("manifest.json"))
        except OSError as exc:
            raise StorageError(f"cannot clear {self.uri}: {first_line(exc)}") from None

    def commit(self, shard: str, staged: list[str], counts: dict) -> dict:
        """Move ``shard``'s staged parts (paths relative to the root) into place, then write its commit record."""
        files = []
        for rel in sorted(staged):
            kind, name = posixpath.basename(rel).split("-", 1)
            final = posixpath.join(kind, shard, f"part-{name}")
            self.fs.create_dir(self.path(kind, shard), recursive=True)
            self.fs.move(self.path(rel), self.path(final))
            files.append(final)
        record = {"shard": shard, "files": files, **counts}
        self.write_json(posixpath.join(COMMITS, f"{shard}.json"), record)
        staging = self.path("_staging", shard)
        if self.fs.get_file_info(staging).type == pafs.FileType.Directory:
            self.fs.delete_dir(staging)
        return record

    def commit_complete(self, summaries: Iterable[dict[str, Any]],
                        submit: Callable[[str, str, list[str]], Future] | None = None,
                        max_running: int | None = None) -> Iterator[dict]:
        """The driver's side of exactly-once: consume write-step summaries (SUMMARY_SCHEMA rows, in any order and
        split) and commit each shard once all its samples are written; yields each commit record (``shard``,
        ``files``, ``samples``, ``rows``, ``error_rows``) right after it is written.

        Before its commit a complete shard's staged parts are compacted (:func:`compact_parts`: at most a few
        Parquet files per shard and kind). ``submit(uri, shard, files)`` runs that elsewhere and returns a
        Future of the compacted file list (jobs submit a Ray task, so the driver only moves files); None:
        compact here. A shard is committed when its compaction is done; the ones still running when the
        summaries end are waited for, in order. At most ``max_running`` (None: no limit) compactions are in flight:
        before submitting another, the oldest is waited for and committed (the summaries wait meanwhile, which
        holds back the pipeline: back-pressure, not a queue). A failed compaction commits the parts as they were
        written."""
        seen: dict[str, dict] = {}
        running: dict[str, tuple[Future, dict]] = {}
        for part in summaries:
            shard = part["shard"]
            state = seen.setdefault(shard, {**{k: 0 for k in COUNTS}, "files": []})
            for key in COUNTS:
                state[key] += part[key]
            state["files"] += json.loads(part["files"])
            if state["samples"] == part["shard_total"]:
                if submit is None:
                    yield self.commit(shard, compact_parts(self.uri, shard, state["files"]),
                                      {k: state[k] for k in COUNTS})
                else:
                    while max_running is not None and len(running) >= max(1, max_running):
                        oldest = next(iter(running))
                        yield self._commit_compacted(oldest, *running.pop(oldest))
                    running[shard] = (submit(self.uri, shard, state["files"]), state)
            for done in [name for name, (future, _) in running.items() if future.done()]:
                yield self._commit_compacted(done, *running.pop(done))
        for name in list(running):
            yield self._commit_compacted(name, *running.pop(name))

    def _commit_compacted(self, shard: str, future: Future, state: dict) -> dict:
        try:
            files = future.result()
        except Exception as exc:  # noqa: BLE001 -- the parts as written are a correct (if many-file) output
            print(f"warning: compacting {shard} failed ({first_line(exc)}); committing its parts as written",
                  file=sys.stderr, flush=True)
            files = state["files"]
        return self.commit(shard, files, {k: state[k] for k in COUNTS})

    def write_json(self, rel: str, data: dict) -> None:
        """Write JSON at ``rel`` atomically (temporary file, then move)."""
        self.fs.create_dir(posixpath.dirname(self.path(rel)), recursive=True)
        tmp = self.path(f"{rel}.tmp-{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode())
        self.fs.move(tmp, self.path(rel))


def compact_parts(uri: str, shard: str, files: list[str], max_bytes: int | None = None,
                  keep_bytes: int | None = None) -> list[str]:
    """Merge a complete shard's staged Parquet parts (paths relative to ``uri``) into few files and return the
    shard's new staged file list (other formats, e.g. NPZ, and single parts pass through unchanged).

    Parts of one kind and map layout (the part name's suffix) are merged in write order, at most ``max_bytes``
    (default COMPACT_BYTES) of input per output file, sorted by key in row groups of ROW_GROUP_SIZE rows, like every
    part (:func:`_merge`: streamed, so a task's memory does not grow with the shard). A part of at least
    ``keep_bytes`` (default KEEP_BYTES) stays as written. Rows are never split or dropped, so a sample's rows of one
    method stay in one file. The merged parts stay where they are until the commit deletes the shard's staging
    directory, so a retried or failed compaction never loses a part."""
    limit = COMPACT_BYTES if max_bytes is None else max_bytes
    keep = KEEP_BYTES if keep_bytes is None else keep_bytes
    store = OutputStore(uri)
    out, groups = _parquet_groups(files)
    for (kind, layout), parts in groups.items():
        if len(parts) == 1:
            out += parts
            continue
        sizes = {rel: store.fs.get_file_info(store.path(rel)).size for rel in parts}
        chunks: list[list[str]] = [[]]
        for rel in parts:
            if sizes[rel] >= keep:
                chunks += [[rel], []]  # alone: passes through below
                continue
            if chunks[-1] and sum(sizes[c] for c in chunks[-1]) + sizes[rel] > limit:
                chunks.append([])
            chunks[-1].append(rel)
        for chunk in [c for c in chunks if c]:
            if len(chunk) == 1:
                out += chunk
                continue
            out.append(_merge(store, shard, f"{kind}-{uuid.uuid4().hex}{layout}.parquet", chunk))
    return out


def _merge(store: "OutputStore", shard: str, name: str, parts: list[str]) -> str:
    """Merge staged Parquet ``parts`` (each sorted by key) into one staged file ``name``, sorted by key in row groups
    of ROW_GROUP_SIZE rows; returns its path. When the parts' key ranges do not overlap — the normal case: an actor
    batch is a run of consecutive samples of its shard — the parts are streamed in key order one row group at a
    time (memory: about two row groups, whatever the shard's size); otherwise they are read whole and sorted."""
    with contextlib.ExitStack() as opened:  # every part is closed again (on object stores: its connection)
        files = [opened.enter_context(pq.ParquetFile(store.path(rel), filesystem=store.fs)) for rel in parts]
        return _merge_files(store, shard, name, files)


def _merge_files(store: "OutputStore", shard: str, name: str, files: list[pq.ParquetFile]) -> str:
    """:func:`_merge` on the opened parts."""
    ranges = [_key_range(f) for f in files]
    order = sorted(range(len(files)), key=lambda i: ranges[i]) if None not in ranges else []
    if not order or any(ranges[a][1] > ranges[b][0] for a, b in zip(order, order[1:])):  # cannot stream: sort
        return write_staged_parquet(store, shard, name, pa.concat_tables([f.read() for f in files]))
    rel = posixpath.join("_staging", shard, name)
    pending: pa.Table | None = None
    schema = files[0].schema_arrow
    with pq.ParquetWriter(store.path(rel), schema, filesystem=store.fs, **parquet_options(schema)) as writer:
        for i in order:
            for group in range(files[i].num_row_groups):
                table = files[i].read_row_group(group)
                pending = table if pending is None else pa.concat_tables([pending, table])
                while pending.num_rows >= ROW_GROUP_SIZE:
                    writer.write_table(pending.slice(0, ROW_GROUP_SIZE))
                    pending = pending.slice(ROW_GROUP_SIZE)
        if pending is not None and pending.num_rows:
            writer.write_table(pending)
    return rel


def _key_range(file: pq.ParquetFile) -> tuple[str, str] | None:
    """(first key, last key) of a part sorted by key, from its row groups' statistics; None without them."""
    meta = file.metadata
    columns = [j for j in range(meta.num_columns) if meta.row_group(0).column(j).path_in_schema == "key"] \
        if meta.num_row_groups else []
    if not columns:
        return None
    column = columns[0]
    first = meta.row_group(0).column(column).statistics
    last = meta.row_group(meta.num_row_groups - 1).column(column).statistics
    if first is None or last is None or not (first.has_min_max and last.has_min_max):
        return None
    return first.min, last.max


def _parquet_groups(files: list[str]) -> tuple[list[str], dict[tuple[str, str], list[str]]]:
    """(the files that are not Parquet, {(kind, layout suffix): its Parquet parts in order})."""
    others, groups = [], {}
    for rel in files:
        name = posixpath.basename(rel)
        if not name.endswith(".parquet"):
            others.append(rel)
            continue
        kind, rest = name[:-len(".parquet")].split("-", 1)
        groups.setdefault((kind, rest[32:]), []).append(rel)  # rest: <uuid hex (32)>[-<layout>]
    return others, groups


_REMOTE_COMPACT: Any = None


def compact_on_ray(uri: str, shard: str, files: list[str]) -> Future:
    """``submit`` for :meth:`OutputStore.commit_complete`: :func:`compact_parts` as a Ray task (0 CPUs: it is
    mostly I/O, and a task waiting for a CPU the pipeline holds would hold back every commit; retried twice).
    A shard with nothing to merge (at most one part per kind and layout) and a driver without a connected Ray (a
    loop fed by plain iterables) get no task: the work is done here and the Future is returned finished."""
    import ray

    if all(len(parts) == 1 for parts in _parquet_groups(files)[1].values()) or not ray.is_initialized():
        future: Future = Future()
        try:
            future.set_result(compact_parts(uri, shard, files))
        except Exception as exc:  # noqa: BLE001 -- reported by commit_complete, which commits the parts as written
            future.set_exception(exc)
        return future
    global _REMOTE_COMPACT
    if _REMOTE_COMPACT is None:
        _REMOTE_COMPACT = ray.remote(num_cpus=0, max_retries=2)(compact_parts)
    return _REMOTE_COMPACT.remote(uri, shard, files).future()


def compaction_slots() -> int:
    """How many :func:`compact_on_ray` tasks a driver keeps in flight: half the connected Ray cluster's CPUs, at
    least 2 (2 without Ray). The tasks take 0 CPUs so that a commit never waits for a CPU the pipeline holds, so
    nothing else bounds them: every running one is a Ray worker process of its own (a Ray Data task process here:
    110-160 MiB USS, bench.ray_data_log) decoding and encoding a shard's maps next to the pipeline's own CPU work."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    return max(2, int(cpus) // 2)


MAP_LEAF = "map.list.element"  # the Parquet column of a map's values (pyarrow's compliant nested-type names)


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Keyword arguments of pyarrow.parquet.write_table / ParquetWriter for every staged and compacted Parquet part
    (attributions, errors, metrics): zstd; the other flat columns with dictionaries; a float ``map`` column without a
    dictionary — float16 PLAIN, float32 in BYTE_STREAM_SPLIT (its bytes split into per-byte streams, so zstd finds
    the exponents' redundancy); int8/uint8 maps keep theirs.

    Measured by bench/parquet_encoding.py (224-px top-5 maps of the real EfficientNet-Lite0 on the photos;
    tests/test_compaction.py checks the encodings): pyarrow's default dictionary-encodes a float16 map column and
    never falls back (at most 65,536 values fit its dictionary limit); PLAIN writes 1.3-3.4x and reads 3.4-4.3x
    faster at 0.89-1.01 of the bytes (e.g. 93 / 59 KiB per GBP / Grad-CAM map; reads ~260-320 MiB/s on this CPU,
    where the dictionary gave 72-88). BYTE_STREAM_SPLIT would make float16 maps 9-36 % smaller still, but DuckDB
    (2.0) cannot read it for FLOAT16 ("only supported for FLOAT, DOUBLE, INT32 or INT64"), and plain
    pandas/pyarrow/DuckDB access to the maps is part of the output's contract. int8/uint8 maps keep the dictionary:
    its run-length-coded indices are smaller there than plain bytes (GBP int8: 17 vs 39 KiB).

    Statistics (min/max per row group and page) are written for the flat columns only (key, shard, method, target …:
    what readers filter on and what compaction's merge orders by), not for the map, its per-layer maps or the other
    lists: a map's min/max selects nothing, and for float16 computing it took 16-33 % of the write time
    (bench/parquet_encoding.py, written alternately, fastest of 15: float16 maps 1.19-1.50x faster without; int8
    1.01-1.04x)."""
    options: dict[str, Any] = {"compression": "zstd"}
    if "map" in schema.names:
        flat = [f.name for f in schema if f.name != "map" and not pa.types.is_nested(f.type)]
        options["write_statistics"] = flat
        value_type = schema.field("map").type.value_type
        if pa.types.is_floating(value_type):
            options["use_dictionary"] = flat
        if pa.types.is_float32(value_type):
            options["column_encoding"] = {MAP_LEAF: "BYTE_STREAM_SPLIT"}
    return options


def write_staged_parquet(store: OutputStore, shard: str, name: str, table: pa.Table) -> str:
    """Write ``table`` as the staged Parquet part ``_staging/<shard>/<name>`` (sorted by key unless it is already,
    row groups of ROW_GROUP_SIZE, :func:`parquet_options`); returns that path relative to the store's root."""
    rel = posixpath.join("_staging", shard, name)
    store.fs.create_dir(store.path("_staging", shard), recursive=True)
    if "key" in table.column_names and table.num_rows > 1 and not _sorted(table.column("key")):
        table = table.sort_by("key")  # a stable sort: rows of one key keep their order
    pq.write_table(table, store.path(rel), filesystem=store.fs, row_group_size=ROW_GROUP_SIZE,
                   **parquet_options(table.schema))
    return rel


def _sorted(keys: pa.ChunkedArray) -> bool:
    """Whether ``keys`` are in ascending order already (the actor emits a batch's rows key by key, so the sort, a copy
    of every map, is then skipped)."""
    return bool(pc.all(pc.less_equal(keys[:-1], keys[1:])).as_py())


__all__ = ["COMPACT_BYTES", "COUNTS", "KEEP_BYTES", "KINDS", "MAP_LEAF", "OutputStore", "ROW_GROUP_SIZE",
           "SUMMARY_SCHEMA", "StorageError", "compact_on_ray", "compact_parts", "compaction_slots", "maps_of",
           "parquet_options", "read_table", "write_staged_parquet"]
