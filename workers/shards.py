"""WebDataset tar shards as a Ray Data source: one read task per shard, raw bytes per sample, read errors as rows.

Why not ``ray.data.read_webdataset``: a truncated or unreadable tar makes its read task raise, which fails the
whole dataset (or, with ``max_errored_blocks``, silently drops the block). Here the samples before the damage are
kept and the damage becomes an error row. Every row carries ``shard_total``, the number of rows its shard
produced, so the sink can tell when a shard is complete and commit it.
"""
from __future__ import annotations

import posixpath
import tarfile
from typing import Iterator

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from schemas.storage import resolve_filesystem

RAW_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("shard_total", pa.int32()),
    ("jpg", pa.binary()), ("cls", pa.binary()), ("json", pa.binary()),
    ("stage", pa.string()), ("error", pa.string()),
])
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
BLOCK_ROWS = 256


def shard_name(path: str) -> str:
    """The name a shard is known by in outputs: its file name (``val-000003.tar``)."""
    return posixpath.basename(path.rstrip("/"))


def read_shard(uri: str) -> list[dict]:
    """All samples of one tar shard as row dicts (see RAW_SCHEMA), damage as error rows.

    Members ``<key>.<suffix>`` (key: the member path up to the first '.' of its file name) must be adjacent;
    an image member may be .jpg/.jpeg/.png/.webp. A sample whose members are split up, or cut off by a
    truncated tar, becomes an error row; so does an unreadable shard (key '').
    """
    name = shard_name(uri)
    rows: list[dict] = []
    seen: set[str] = set()
    current: dict | None = None

    def flush() -> None:
        if current is not None:
            rows.append(current)

    try:
        fs, path = resolve_filesystem(uri)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, base = posixpath.split(member.name)
                if "." not in base:
                    continue
                stem, suffix = base.split(".", 1)
                key = posixpath.join(directory, stem) if directory else stem
                if current is None or current["key"] != key:
                    flush()
                    if key in seen:
                        current = _error_row(key, name, "read", "members of this sample are not adjacent in the tar")
                    else:
                        current = {"key": key, "shard": name, "jpg": None, "cls": None, "json": None,
                                   "stage": None, "error": None}
                    seen.add(key)
                if current["error"] is not None:
                    continue
                column = "jpg" if suffix.lower() in IMAGE_SUFFIXES else suffix.lower()
                if column in ("jpg", "cls", "json"):
                    current[column] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        complete = len(rows)
        if current is not None:  # the sample being read when the damage hit may be incomplete
            rows.append(_error_row(current["key"], name, "read", f"cut off by a damaged tar: {_one_line(exc)}"))
        rows.append(_error_row("", name, "read", f"tar unreadable after {complete} samples: {_one_line(exc)}"))
        current = None
    flush()
    for row in rows:
        row["shard_total"] = len(rows)
    return rows


def _error_row(key: str, shard: str, stage: str, reason: str) -> dict:
    return {"key": key, "shard": shard, "jpg": None, "cls": None, "json": None, "stage": stage, "error": reason}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class WebDatasetShards(Datasource):
    """Ray Data source over tar shards (local paths or object-store URIs); one read task per shard."""

    def __init__(self, uris: list[str]) -> None:
        super().__init__()
        self.uris = list(uris)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(lambda uri=uri: _blocks(uri),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[uri]),
                         schema=RAW_SCHEMA)
                for uri in self.uris]


def _blocks(uri: str) -> Iterator[pa.Table]:
    rows = read_shard(uri)
    for start in range(0, len(rows), BLOCK_ROWS):
        yield pa.Table.from_pylist(rows[start:start + BLOCK_ROWS], schema=RAW_SCHEMA)
