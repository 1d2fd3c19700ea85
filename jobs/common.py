"""What every job entry point shares: one-line CLI errors, Ray start-up, shard lists."""
from __future__ import annotations

import glob
import os
import posixpath
import sys
from typing import NoReturn

import braceexpand
import pyarrow.fs as pafs

from workers.shards import resolve_filesystem, shard_name


class JobError(Exception):
    """A problem with the job's input or arguments: reported as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``address``, or RAY_ADDRESS as set by ``ray job submit``), else start an embedded
    local Ray with this machine's CPUs, no dashboard and a modest object store."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             object_store_memory=512 * 1024 ** 2, log_to_driver=False)


def expand_shards(patterns: list[str]) -> list[str]:
    """Shard URIs from brace patterns (``val-{000000..000049}.tar``), local globs, or directories of ``*.tar``.

    Raises JobError when nothing matches, a listed local/remote shard does not exist, or two shards share a
    file name (outputs are keyed by it).
    """
    uris: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
            uris.extend(_expand_one(expanded))
    if not uris:
        raise JobError(f"no shards match {' '.join(patterns)}")
    names = [shard_name(u) for u in uris]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise JobError(f"two shards share the file name {duplicates[0]}: outputs are keyed by it")
    return uris


def _expand_one(pattern: str) -> list[str]:
    if "://" not in pattern and any(ch in pattern for ch in "*?["):
        return sorted(glob.glob(pattern))
    fs, path = resolve_filesystem(pattern)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(path))
        prefix = pattern.rstrip("/")
        return sorted(posixpath.join(prefix, f.base_name) for f in found if f.base_name.endswith(".tar"))
    if info.type != pafs.FileType.File:
        raise JobError(f"shard {pattern} does not exist")
    return [pattern]
