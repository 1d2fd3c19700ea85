"""Few files per shard: the write step stages one part per actor batch; at commit a shard's parts are merged into
one Parquet file per kind and map layout (workers.sink.compact_parts), with every row, sorted by key, in small row
groups; a size cap splits them; a failed compaction commits the parts as written. Built without Ray from the
jobs' own steps (decode -> AttributionWorker -> write_parts -> OutputStore.commit_complete)."""
from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution.data.sample_sets import synthetic_samples
from attribution.data.shards import write_shards
from attribution.models import preprocessing_for
from schemas.attributions import attribution_schema
from schemas.reader import OutputReader
from workers.attribution_worker import AttributionWorker, WorkerConfig
from workers.batches import ipc_tables
from workers.decode import decode_batch
from workers.shards import RAW_SCHEMA, read_shard
from workers.sink import ROW_GROUP_SIZE, OutputStore, compact_on_ray, compact_parts, compaction_slots
from workers.staging import write_parts

MODEL = "bench_resnet"
BATCH = 3  # 8 samples -> 3 actor batches -> 3 parts per layout before compaction


@pytest.fixture(scope="module")
def staged_batches(tmp_path_factory) -> tuple[list[pa.Table], int]:
    """The actor's output batches for one shard of 8 samples (one broken), two map layouts."""
    samples = synthetic_samples(8, size=112)
    shard_set = write_shards(samples, tmp_path_factory.mktemp("shards"), "syn", 8, log=lambda *_: None)
    uri = str(Path(shard_set.pattern).parent / shard_set.shards[0]["file"])
    rows = read_shard(uri)
    rows[2] = {**rows[2], "jpg": b"not a jpeg"}
    worker = AttributionWorker(WorkerConfig(model=MODEL, methods=["saliency", "gradcam"], targets="top5",
                                            device="cpu", map_dtype="int8", map_sizes={"gradcam": 14}))
    preprocessing = preprocessing_for(MODEL)
    outputs = [worker(decode_batch(pa.Table.from_pylist(rows[i:i + BATCH], schema=RAW_SCHEMA), preprocessing))
               for i in range(0, len(rows), BATCH)]
    return outputs, preprocessing.input_size


def _stage(outputs: list[pa.Table], out: Path) -> tuple[OutputStore, list[dict]]:
    store = OutputStore(str(out))
    store.ensure()
    return store, [s for batch in outputs for s in write_parts(batch, str(out), ("parquet",)).to_pylist()]


def _expected(outputs: list[pa.Table], column: str) -> list[dict]:
    return sorted((r for batch in outputs for blob in batch[column].to_pylist() for t in ipc_tables(blob)
                   for r in t.to_pylist()), key=lambda r: (r["key"], r.get("method") or "", r.get("target", 0)))


def _committed_rows(store: OutputStore, files: list[str]) -> list[dict]:
    rows = [r for f in files for r in pq.read_table(store.path(f)).to_pylist()]
    return sorted(rows, key=lambda r: (r["key"], r.get("method") or "", r.get("target", 0)))


def test_one_file_per_kind_and_layout_with_every_row(staged_batches, tmp_path):
    outputs, input_size = staged_batches
    store, summaries = _stage(outputs, tmp_path)
    staged = [f for s in summaries for f in json.loads(s["files"])]
    assert len(staged) == 3 * 2 + 1  # per batch one part per layout; one errors part (the broken sample's batch)
    as_written = {pq.read_schema(store.path(f)).field("map").type.shape[0]: pq.read_schema(store.path(f))
                  for f in staged if "/attributions-" in f}  # a part's schema after its Parquet round trip
    (record,) = list(store.commit_complete(summaries))
    files = record["files"]
    by_kind = sorted(Path(f).parts[0] for f in files)
    assert by_kind == ["attributions", "attributions", "errors"] and record["samples"] == 8
    assert not Path(tmp_path, "_staging").exists() or not any(Path(tmp_path, "_staging").rglob("*"))
    maps = [f for f in files if f.startswith("attributions/")]
    assert sorted(str(pq.read_schema(store.path(f)).field("map").type.shape) for f in maps) == ["[112, 112]",
                                                                                              "[14, 14]"]
    for f in maps:
        layout = pq.read_schema(store.path(f)).field("map").type.shape[0]
        assert pq.read_schema(store.path(f)).equals(as_written[layout], check_metadata=True)
        assert pq.read_schema(store.path(f)).names == attribution_schema(layout, "int8", input_size).names
        metadata = pq.ParquetFile(store.path(f)).metadata
        keys = pq.read_table(store.path(f), columns=["key"]).column("key").to_pylist()
        assert keys == sorted(keys)
        assert metadata.num_row_groups == -(-metadata.num_rows // ROW_GROUP_SIZE)
    # every row once: 7 good samples x 2 methods x top-5, and the broken sample's error row
    attributions = _committed_rows(store, maps)
    assert len(attributions) == 7 * 2 * 5
    expected = _expected(outputs, "attributions")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(attributions) == strip(expected)
    errors = _committed_rows(store, [f for f in files if f.startswith("errors/")])
    assert errors == _expected(outputs, "errors") and [e["stage"] for e in errors] == ["decode"]
    assert OutputReader(str(tmp_path)).read(maps="input").num_rows == 7 * 2 * 5


def test_a_size_cap_splits_and_keeps_single_parts(staged_batches, tmp_path):
    outputs, _ = staged_batches
    store, summaries = _stage(outputs, tmp_path)
    staged = [f for s in summaries for f in json.loads(s["files"])]
    big = [f for f in staged if f.endswith("int8.parquet") and "-112" in f]
    one_part = Path(store.path(big[0])).stat().st_size
    merged = compact_parts(str(tmp_path), summaries[0]["shard"], staged, max_bytes=int(2.5 * one_part))
    full = [f for f in merged if f.startswith("_staging") and "-112int8" in f]
    assert len(full) == 2  # parts 1+2 merged, part 3 alone (kept as written)
    assert sum(pq.ParquetFile(store.path(f)).metadata.num_rows for f in full) == \
        sum(pq.ParquetFile(store.path(f)).metadata.num_rows for f in big)
    assert big[-1] in full


def test_large_parts_stay_as_written(tmp_path):
    """A part of at least keep_bytes passes through unmerged and splits the merge around it: the small parts before
    it and after it are merged separately (write order kept); every row is there once."""
    keys = [f"k{i:04d}" for i in range(18)]
    store, files = _bench_parts(tmp_path, [keys[0:2], keys[2:4], keys[4:14], keys[14:16], keys[16:18]])
    sizes = [Path(store.path(f)).stat().st_size for f in files]
    assert sizes[2] > 2 * max(sizes[:2] + sizes[3:])  # 10 samples' maps against 2 (plus fixed metadata)
    merged = compact_parts(str(tmp_path), "val-000000.tar", files, keep_bytes=sizes[2])
    assert len(merged) == 3 and merged[1] == files[2] and not set(merged) & set(files[:2] + files[3:])
    assert [pq.read_table(store.path(f)).column("key").to_pylist()[::10] for f in merged] == \
        [keys[0:4], keys[4:14], keys[14:18]]  # 10 rows (2 methods x top-5) per key
    everything = compact_parts(str(tmp_path), "val-000000.tar", files, keep_bytes=sizes[2] + 1)
    assert len(everything) == 1 and pq.read_table(store.path(everything[0])).num_rows == 18 * 10


def test_a_failed_compaction_commits_the_parts_as_written(staged_batches, tmp_path, capsys):
    outputs, _ = staged_batches
    store, summaries = _stage(outputs, tmp_path)

    def failing(uri, shard, files):
        future = Future()
        future.set_exception(OSError("disk full\nsecond line"))
        return future

    (record,) = list(store.commit_complete(summaries, submit=failing))
    assert len(record["files"]) == 3 * 2 + 1
    assert "compacting syn-000000.tar failed (disk full); committing its parts as written" in capsys.readouterr().err
    assert OutputReader(str(tmp_path)).read(maps="input").num_rows == 7 * 2 * 5


@pytest.mark.parametrize("max_running", [None, 2])
def test_compactions_in_flight_are_bounded(tmp_path, max_running):
    """commit_complete keeps at most max_running compactions in flight (the oldest is committed before the next is
    submitted) and still commits every shard once; without a bound all 4 complete shards' compactions run at once."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    store = OutputStore(str(tmp_path))
    lock, running, peak = threading.Lock(), [0], [0]

    def compaction(files):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.5)  # far longer than submitting 4 futures takes
        with lock:
            running[0] -= 1
        return files

    summaries = [{"shard": f"s{i}.tar", "shard_total": 1, "samples": 1, "rows": 5, "error_rows": 0, "files": "[]"}
                 for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        records = list(store.commit_complete(summaries, submit=lambda uri, shard, files: pool.submit(compaction, files),
                                             max_running=max_running))
    # unbounded: all 4 at once (>= 3 allows one late thread on a loaded machine)
    assert peak[0] >= 3 if max_running is None else peak[0] <= max_running
    assert sorted(r["shard"] for r in records) == [f"s{i}.tar" for i in range(4)]
    assert sorted(p.name for p in Path(tmp_path, "_commits").iterdir()) == [f"s{i}.tar.json" for i in range(4)]


def test_compaction_slots_follow_the_cluster(ray_session):
    """Half the connected cluster's CPUs, at least 2."""
    import ray

    assert compaction_slots() == max(2, int(ray.cluster_resources()["CPU"]) // 2)


def test_reset_shards_deletes_leftovers_of_the_named_shards_only(staged_batches, tmp_path):
    """Resume's reset: staged and half-moved parts of the named uncommitted shards go; others stay."""
    outputs, _ = staged_batches
    store, summaries = _stage(outputs, tmp_path)
    shard = summaries[0]["shard"]
    Path(tmp_path, "attributions", "other.tar").mkdir(parents=True)
    Path(tmp_path, "attributions", "other.tar", "part-x.parquet").write_bytes(b"kept")
    Path(tmp_path, "errors", shard).mkdir(parents=True)  # a half-moved shard
    store.reset_shards([shard, "never-started.tar"])
    assert not Path(tmp_path, "_staging", shard).exists() and not Path(tmp_path, "errors", shard).exists()
    assert Path(tmp_path, "attributions", "other.tar", "part-x.parquet").read_bytes() == b"kept"


def test_compaction_as_a_ray_task(ray_session, staged_batches, tmp_path):
    """What the jobs do: compact_on_ray submits the merge as a Ray task and the commit waits for it."""
    outputs, _ = staged_batches
    store, summaries = _stage(outputs, tmp_path)
    staged = [f for s in summaries for f in json.loads(s["files"])]
    future = compact_on_ray(str(tmp_path), summaries[0]["shard"], staged)
    assert not isinstance(future.result(timeout=120), Exception)
    (record,) = list(store.commit_complete(summaries, submit=compact_on_ray))
    assert sorted(Path(f).parts[0] for f in record["files"]) == ["attributions", "attributions", "errors"]
    assert len(_committed_rows(store, [f for f in record["files"] if f.startswith("attributions/")])) == 7 * 2 * 5


def _bench_parts(tmp_path: Path, keys_per_part: list[list[str]]) -> tuple[OutputStore, list[str]]:
    """Staged attribution parts (bench.compaction's actor-output batches: 2 methods x top-5, 16-px float16 maps of
    random values) with the given keys, one part per list, written by the job's write step."""
    import numpy as np

    from bench.compaction import batch_table

    rng = np.random.default_rng(1)
    store = OutputStore(str(tmp_path))
    store.ensure()
    files = []
    for keys in keys_per_part:
        summary, = write_parts(batch_table(keys, 2, 5, 16, "float16", rng), str(tmp_path), ("parquet",)).to_pylist()
        files += json.loads(summary["files"])
    return store, files


def _sorted_in_memory(store: OutputStore, files: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(store.path(f)) for f in files]).sort_by("key")


def test_consecutive_parts_are_streamed_row_group_by_row_group(tmp_path, monkeypatch):
    """Parts of consecutive samples (what actor batches are), staged out of order: the merge never reads a part
    whole (ParquetFile.read refused), and its file equals the in-memory concatenation sorted by key, in full row
    groups of ROW_GROUP_SIZE rows but the last, with the parts' schema."""
    import workers.sink as sink

    monkeypatch.setattr(sink, "ROW_GROUP_SIZE", 32)
    keys = [f"k{i:04d}" for i in range(50)]
    parts = [keys[20:27], keys[0:10], keys[10:20], keys[27:50]]  # 70, 100, 100, 230 rows
    store, files = _bench_parts(tmp_path, parts)
    expected = _sorted_in_memory(store, files)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("a part was read whole"))
    (merged,) = compact_parts(str(tmp_path), "val-000000.tar", files)
    result = pq.ParquetFile(store.path(merged))
    assert [result.metadata.row_group(i).num_rows for i in range(result.num_row_groups)] == [32] * 15 + [20]
    assert result.schema_arrow.equals(pq.read_schema(store.path(files[0])), check_metadata=True)
    monkeypatch.undo()
    assert pq.read_table(store.path(merged)).equals(expected)


@pytest.mark.parametrize("order", ["in key order", "reversed"])
def test_write_step_sorts_by_key_keeping_each_keys_rows_in_order(tmp_path, order):
    """A staged part is sorted by key and each key's rows keep the actor's (method, target) order: an actor batch in
    key order is written as it came (the sort skipped), a reversed one is reordered by a stable sort."""
    import numpy as np
    import pyarrow.compute as pc

    from bench.compaction import batch_table

    keys = [f"k{i:04d}" for i in range(6)]
    batch = batch_table(keys if order == "in key order" else keys[::-1], 2, 5, 16, "float16", np.random.default_rng(4))
    (rows,) = ipc_tables(batch.column("attributions")[0].as_py())
    (summary,) = write_parts(batch, str(tmp_path), ("parquet",)).to_pylist()
    (part,) = json.loads(summary["files"])
    staged = pq.read_table(Path(tmp_path, part))
    by_key = {k: rows.filter(pc.equal(rows["key"], k)) for k in keys}
    assert staged.equals(pa.concat_tables([by_key[k] for k in keys]).replace_schema_metadata(staged.schema.metadata))


def test_blob_views_are_the_values_without_a_copy():
    """The write step's view of a binary column: every value (nulls, empty values, sliced and several chunks), each a
    slice of the column's own data buffer."""
    from workers.staging import _blob_views

    first = pa.array([b"abc", None, b"", b"xyz12"], pa.binary()).slice(1)
    column = pa.chunked_array([first, pa.array([b"q"], pa.binary())])
    views = _blob_views(column)
    assert [None if v is None else v.to_pybytes() for v in views] == [None, b"", b"xyz12", b"q"]
    data = first.buffers()[2]
    assert data.address <= views[2].address < data.address + data.size


def test_actor_output_blobs_are_arrow_buffers_read_back_whole():
    """The actor's map blobs (workers.batches.ipc_buffer -> binary_chunks): several IPC streams in one value, an empty
    value, each chunk's data the stream's own buffer (not a copy), and the write step's views read them back."""
    from workers.batches import binary_chunks, ipc_buffer
    from workers.staging import _blob_views

    first, second = pa.table({"key": ["a", "b"], "x": [1, 2]}), pa.table({"key": ["c"], "y": [0.5]})
    streams = [ipc_buffer(first, second), ipc_buffer()]
    column = binary_chunks(streams)
    assert column.type == pa.binary() and column.num_chunks == 2 and column[1].as_py() == b""
    assert column.chunk(0).buffers()[2].address == streams[0].address
    tables = [ipc_tables(view) for view in _blob_views(column)]
    assert [[t.to_pydict() for t in ts] for ts in tables] == [[first.to_pydict(), second.to_pydict()], []]


def test_overlapping_parts_are_sorted_in_memory(tmp_path):
    """Parts whose key ranges interleave cannot be streamed in order: the merge reads them and sorts; every row,
    sorted by key."""
    keys = [f"k{i:04d}" for i in range(12)]
    store, files = _bench_parts(tmp_path, [keys[0::2], keys[1::2]])
    (merged,) = compact_parts(str(tmp_path), "val-000000.tar", files)
    table = pq.read_table(store.path(merged))
    assert table.num_rows == 12 * 2 * 5 and table.column("key").to_pylist() == sorted(table.column("key").to_pylist())
    assert table.equals(_sorted_in_memory(store, files))


def test_compaction_bench_dry_run(tmp_path):
    """bench.compaction end to end at a tiny size: staged parts, one merged file, every check passed."""
    from bench.compaction import main

    out = tmp_path / "compaction.json"
    assert main(["--images", "20", "--methods", "2", "--size", "16", "--batch", "4", "--work", str(tmp_path / "w"),
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["staged"]["parts"] == 5 and report["compacted"]["files"] == 1
    assert report["compacted"]["rows"] == 20 * 2 * 5 and report["compacted"]["ok"]


def _map_chunk(path: str):
    from workers.sink import MAP_LEAF

    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(0).column(j) for j in range(meta.num_columns)
            if meta.row_group(0).column(j).path_in_schema == MAP_LEAF][0]


def test_float16_maps_are_plain_without_a_dictionary(tmp_path):
    """workers.sink.parquet_options in the staged parts and the merged file: a float16 map column has no dictionary
    page and no byte split (pyarrow's default dictionary made writes 1.3-3.4x and reads 3.4-4.3x slower,
    bench/parquet_encoding.py; DuckDB cannot read a byte-split FLOAT16), the key keeps its dictionary, and the maps
    read back exactly. Statistics: the key's, not the map's (they cost ~20 % of the write and select nothing)."""
    keys = [f"k{i:04d}" for i in range(10)]
    store, files = _bench_parts(tmp_path, [keys[:5], keys[5:]])
    (merged,) = compact_parts(str(tmp_path), "val-000000.tar", files)
    for rel in files + [merged]:
        chunk = _map_chunk(store.path(rel))
        assert not chunk.has_dictionary_page and "BYTE_STREAM_SPLIT" not in chunk.encodings, (rel, chunk.encodings)
        key = pq.ParquetFile(store.path(rel)).metadata.row_group(0).column(0)
        assert key.has_dictionary_page and key.is_stats_set  # compaction's merge orders parts by the key's min/max
        assert not chunk.is_stats_set, rel  # no min/max over 50,176 map values per row
    assert pq.read_table(store.path(merged)).equals(_sorted_in_memory(store, files))


def test_float32_maps_are_byte_stream_split(tmp_path):
    import numpy as np

    from bench.compaction import batch_table
    from workers.batches import ipc_tables
    from workers.sink import parquet_options

    batch = batch_table(["a", "b"], 2, 5, 16, "float32", np.random.default_rng(2))
    table = ipc_tables(batch.column("attributions")[0].as_py())[0]
    pq.write_table(table, tmp_path / "f32.parquet", **parquet_options(table.schema))
    chunk = _map_chunk(str(tmp_path / "f32.parquet"))
    assert "BYTE_STREAM_SPLIT" in chunk.encodings and not chunk.has_dictionary_page
    assert pq.read_table(tmp_path / "f32.parquet").equals(table)


def test_int8_maps_keep_their_dictionary(staged_batches, tmp_path):
    """int8 maps stay dictionary-encoded (smaller there than plain: 17 vs 39 KiB per GBP map)."""
    outputs, _ = staged_batches
    store, summaries = _stage(outputs, tmp_path)
    staged = [f for s in summaries for f in json.loads(s["files"]) if "/attributions-" in f]
    assert staged and all(_map_chunk(store.path(f)).has_dictionary_page for f in staged)
    assert not any(_map_chunk(store.path(f)).is_stats_set for f in staged)


def test_host_steps_bench_dry_run(tmp_path, capsys):
    """bench.host_steps on a tiny batch: both output paths and the write step measured, per map, written."""
    from bench import host_steps

    out = tmp_path / "host_steps.json"
    assert host_steps.main(["--images", "2", "--methods", "2", "--size", "16", "--repeats", "1",
                            "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["maps"] == 2 * 2 * 5
    assert set(report["ms_per_map"]) == {"output_bytes", "output_ours", "write_parts", "parquet_write_table"}
    assert all(v > 0 for v in report["ms_per_map"].values())
    assert "actor output as Arrow buffers (ours)" in capsys.readouterr().out
