"""schemas.reader, the public reader of a job's outputs: committed rows only, filters pushed down to Parquet, maps in
the methods' units, local paths, file:// and s3:// URIs, and no Ray (or torch) import.

The output directory is built without Ray from the jobs' own steps: decode -> AttributionWorker -> write_parts ->
OutputStore.commit_complete (what jobs.attribute's pipeline and driver run), with one shard left uncommitted."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest

from attribution.data.sample_sets import synthetic_samples
from attribution.data.shards import write_shards
from attribution.models import preprocessing_for
from schemas.reader import OutputReader, maps_of, read_table
from workers.attribution_worker import AttributionWorker, WorkerConfig
from workers.decode import decode_batch
from workers.shards import RAW_SCHEMA, read_shard
from workers.sink import OutputStore
from workers.staging import write_parts
from tests import test_object_store

REPO = Path(__file__).resolve().parents[1]
BUCKET = test_object_store.BUCKET
s3 = test_object_store.s3  # the moto S3 server fixture
MODEL, METHODS = "bench_resnet", ["saliency", "gradcam"]


def attribute_into(out: str, shard_uris: list[str], commit: set[str]) -> dict[str, np.ndarray]:
    """Run the attribution job's steps on ``shard_uris`` into ``out``, committing only the shards in ``commit``;
    returns {f"{key}/{method}/{target}": the map as the worker computed it (float32, method units)}."""
    preprocessing = preprocessing_for(MODEL)
    worker = AttributionWorker(WorkerConfig(model=MODEL, methods=METHODS, targets="top5", device="cpu",
                                            map_dtype="float32"))
    store = OutputStore(out)
    store.ensure()
    expected = {}
    for uri in shard_uris:
        raw = pa.Table.from_pylist(read_shard(uri), schema=RAW_SCHEMA)
        rows = worker(decode_batch(raw, preprocessing))
        summaries = write_parts(rows, out, ("parquet",)).to_pylist()
        for blob in rows["attributions"].to_pylist():
            table = pa.ipc.open_stream(blob).read_all()
            for r, row in enumerate(table.select(["key", "method", "target"]).to_pylist()):
                expected[f"{row['key']}/{row['method']}/{row['target']}"] = maps_of(table.slice(r, 1))[0]
        if summaries[0]["shard"] in commit:
            assert [c["shard"] for c in store.commit_complete(summaries)] == [summaries[0]["shard"]]
    return expected


@pytest.fixture(scope="module")
def shard_uris(tmp_path_factory) -> list[str]:
    shard_set = write_shards(synthetic_samples(9, size=112), tmp_path_factory.mktemp("shards"), "syn", 3,
                             log=lambda *_: None)
    directory = Path(shard_set.pattern).parent
    return [str(directory / s["file"]) for s in shard_set.shards]


@pytest.fixture(scope="module")
def local_run(shard_uris, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("maps"))
    committed = {Path(u).name for u in shard_uris[:2]}  # the third is written (staged) but never committed
    return out, attribute_into(out, shard_uris, committed)


def test_reads_committed_rows_only_with_the_worker_maps(local_run, shard_uris):
    out, expected = local_run
    table = read_table(out)
    assert sorted(set(table.column("shard").to_pylist())) == sorted(Path(u).name for u in shard_uris[:2])
    assert table.num_rows == 6 * len(METHODS) * 5  # 6 committed samples x methods x top-5
    staged = list(Path(out, "_staging").rglob("*.parquet"))
    assert staged, "the uncommitted shard's part must exist on disk for this test to mean anything"
    maps = maps_of(table)
    assert maps.dtype == np.float32 and maps.shape == (table.num_rows, 112, 112)
    names = [f"{k}/{m}/{t}" for k, m, t in zip(*(table.column(c).to_pylist() for c in ("key", "method", "target")))]
    assert len(set(names)) == len(names)
    for name, m in zip(names, maps):
        np.testing.assert_array_equal(m, expected[name])  # float32 storage: stored · scale is the worker's map
    assert np.abs(maps).max() > 0


def test_filters_equal_filtering_the_whole_table(local_run, shard_uris):
    out, _ = local_run
    whole = read_table(out).to_pandas()
    key = whole["key"].iloc[0]
    target = int(whole[whole["target_rank"] == 1]["target"].iloc[0])
    run = OutputReader(out)
    cases = [
        ({"methods": ["gradcam"]}, whole["method"] == "gradcam"),
        ({"keys": [key]}, whole["key"] == key),
        ({"ranks": [0]}, whole["target_rank"] == 0),
        ({"targets": [target]}, whole["target"] == target),
        ({"shards": [Path(shard_uris[1]).name]}, whole["shard"] == Path(shard_uris[1]).name),
        ({"methods": ["saliency"], "ranks": [0, 1], "keys": [key]},
         (whole["method"] == "saliency") & whole["target_rank"].isin([0, 1]) & (whole["key"] == key)),
        ({"where": pc.field("target_rank") >= 3}, whole["target_rank"] >= 3),
        ({"methods": ["gradcam"], "where": (pc.field("target_kind") != "top5") | (pc.field("target_rank") == 0)},
         (whole["method"] == "gradcam") & (whole["target_rank"] == 0)),
    ]
    for filters, mask in cases:
        got = run.read(**filters).to_pandas()
        want = whole[mask]
        assert 0 < len(got) < len(whole), filters
        assert sorted(zip(got["key"], got["method"], got["target"])) == \
            sorted(zip(want["key"], want["method"], want["target"])), filters
    few = run.read(columns=["key", "method"], methods=["gradcam"])
    assert few.column_names == ["key", "method"] and few.num_rows == int((whole["method"] == "gradcam").sum())
    assert run.read(keys=["no-such-key"]).num_rows == 0
    assert run.read(shards=["no-such-shard.tar"]).num_rows == 0
    with pytest.raises(ValueError, match="kind must be one of"):
        run.read("npz")


class CountingFileSystem(pafs.FileSystemHandler):
    """A local filesystem that counts the bytes read through it (pyarrow.fs.PyFileSystem handler)."""

    def __init__(self) -> None:
        self.local, self.bytes_read = pafs.LocalFileSystem(), 0

    def get_type_name(self) -> str:
        return "counting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def open_input_file(self, path):
        handler = self

        class Counted(io.RawIOBase):
            def __init__(self) -> None:
                self.inner = open(path, "rb")

            def readable(self) -> bool:
                return True

            def seekable(self) -> bool:
                return True

            def seek(self, offset, whence=0):
                return self.inner.seek(offset, whence)

            def tell(self):
                return self.inner.tell()

            def readinto(self, buffer):
                n = self.inner.readinto(buffer)
                handler.bytes_read += n or 0
                return n

            def close(self) -> None:
                self.inner.close()
                super().close()

        return pa.PythonFile(io.BufferedReader(Counted(), buffer_size=4096), mode="r")

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def _unused(self, *args):
        raise NotImplementedError

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = move = copy_file = \
        open_output_stream = open_append_stream = _unused


def test_filters_are_pushed_down_to_parquet_row_groups(local_run, tmp_path):
    """One key out of a file of one-row groups: the reader decodes (and reads) only that key's row groups, far
    fewer bytes than the whole file — the predicate reaches Parquet's statistics, it is not applied afterwards."""
    import pyarrow.parquet as pq

    out, _ = local_run
    source = OutputReader(out)
    run_dir = tmp_path / "one-row-groups"
    for shard, record in source.committed().items():  # the same run, its parts rewritten in one-row groups
        for rel in record["files"]:
            target = run_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pq.read_table(source.path(rel)), target, row_group_size=1)
        (run_dir / "_commits").mkdir(exist_ok=True)
        (run_dir / "_commits" / f"{shard}.json").write_text(json.dumps(record))
    reader = OutputReader(str(run_dir))
    counting = CountingFileSystem()
    reader.fs = pafs.PyFileSystem(counting)
    whole = reader.read()
    everything = counting.bytes_read
    key = whole.column("key")[0].as_py()
    counting.bytes_read = 0
    one = reader.read(keys=[key], methods=["gradcam"], ranks=[0])
    assert one.num_rows == 1 and one.column("key")[0].as_py() == key
    # 1 of 60 row groups is wanted; footers and Parquet's coalesced reads add some (measured: 12 %); a filter
    # applied after reading would read 100 %
    assert counting.bytes_read < everything / 4, (counting.bytes_read, everything)


def test_reader_sees_a_snapshot_and_the_writer_sees_commits(shard_uris, tmp_path):
    out = str(tmp_path / "maps")
    attribute_into(out, shard_uris[:1], {Path(shard_uris[0]).name})
    reader, store = OutputReader(out), OutputStore(out)
    assert list(reader.committed()) == [Path(shard_uris[0]).name]
    attribute_into(out, shard_uris[1:2], {Path(shard_uris[1]).name})
    assert len(reader.committed()) == 1  # the reader's snapshot
    assert len(store.committed()) == 2 and len(OutputReader(out).committed()) == 2


def test_file_uri_and_s3_uri(local_run, s3, shard_uris):
    out, _ = local_run
    local = read_table(out)
    via_uri = read_table(f"file://{out}")
    assert via_uri.num_rows == local.num_rows and via_uri.column("key").to_pylist() == local.column("key").to_pylist()
    uri = f"s3://{BUCKET}/reader-test"
    expected = attribute_into(uri, shard_uris[:2], {Path(shard_uris[0]).name})
    remote = OutputReader(uri)
    assert list(remote.committed()) == [Path(shard_uris[0]).name]
    table = remote.read(methods=["saliency"], ranks=[0])
    assert table.num_rows == 3 and set(table.column("shard").to_pylist()) == {Path(shard_uris[0]).name}
    for r, name in enumerate(f"{k}/saliency/{t}" for k, t in zip(table.column("key").to_pylist(),
                                                                  table.column("target").to_pylist())):
        np.testing.assert_array_equal(maps_of(table)[r], expected[name])
    assert remote.manifest() is None
    fs = pafs.S3FileSystem(endpoint_override=s3["AWS_ENDPOINT_URL"].split("//")[1], scheme="http",
                           region="us-east-1")
    assert fs.get_file_info(f"{BUCKET}/reader-test/_commits/{Path(shard_uris[0]).name}.json").type == \
        pafs.FileType.File


def test_unreachable_location_is_one_storage_error(monkeypatch):
    from schemas.storage import StorageError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match=r"cannot read s3://nobucket/run"):
        OutputReader("s3://nobucket/run").committed()


def test_reader_imports_no_ray_and_no_torch():
    code = ("import sys, schemas.reader; bad = [m for m in ('ray', 'torch') if m in sys.modules]; "
            "print(json.dumps(bad))")
    result = subprocess.run([sys.executable, "-c", "import json; " + code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert json.loads(result.stdout) == []
