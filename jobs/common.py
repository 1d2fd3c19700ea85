"""What every job entry point shares: one-line CLI errors, Ray start-up, shard lists."""
from __future__ import annotations

import glob
import os
import posixpath
import sys
from typing import NoReturn

import braceexpand
import pyarrow.fs as pafs

from schemas.storage import resolve_filesystem
from workers.shards import shard_name


class JobError(Exception):
    """A problem with the job's input or arguments: reported as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


NON_TTY_PROGRESS_INTERVAL_S = 60


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
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=512 * 1024 ** 2, log_to_driver=False)
    if not sys.stdout.isatty():
        log_progress_briefly()


def log_progress_briefly(interval_s: int = NON_TTY_PROGRESS_INTERVAL_S) -> None:
    """Where stdout is no terminal (CI, a log file, ``ray job submit``'s log), Ray Data logs every operator's
    progress every 10 s, which buries the jobs' own lines (one per committed shard); keep only its total-progress
    line, every ``interval_s`` seconds. ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` set by the user wins."""
    import ray.data

    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(int(interval_s)))
    ray.data.DataContext.get_current().enable_operator_progress_bars = False


def actor_resources(gpus_per_worker: float | None, workers: int | None, cpus_per_worker: float | None,
                    batch_size: int | None, gpu_batch: int = 32, cpu_batch: int = 8) -> tuple[float, int, float, int]:
    """(GPUs per actor, actors, CPUs per actor, batch size) for a model-pinning actor pool on the connected cluster.

    Defaults: one actor per GPU with 1 CPU each; without GPUs one CPU actor that leaves one CPU to the read,
    decode and write tasks (an actor holding every CPU stalls the pipeline, ray#44687).
    """
    import ray

    resources = ray.cluster_resources()
    gpus = gpus_per_worker if gpus_per_worker is not None else (1 if resources.get("GPU") else 0)
    workers = workers or (max(1, int(resources.get("GPU", 0) // max(gpus, 1))) if gpus else 1)
    cpus = cpus_per_worker or (1 if gpus else max(1, int(resources.get("CPU", 2)) - 1))
    return gpus, workers, cpus, batch_size or (gpu_batch if gpus else cpu_batch)


def expand_shards(patterns: list[str]) -> list[str]:
    """Shard URIs from brace patterns (``val-{000000..000049}.tar``), local globs, or directories of ``*.tar``;
    each argument may also be a comma-separated list of those (``a.tar,b.tar``; commas inside braces belong to the
    brace pattern).

    Raises JobError when nothing matches, a listed local/remote shard does not exist, or two shards share a
    file name (outputs are keyed by it).
    """
    uris: list[str] = []
    for pattern in (item for argument in patterns for item in split_top_level_commas(argument)):
        for expanded in braceexpand.braceexpand(pattern):
            uris.extend(_expand_one(expanded))
    if not uris:
        raise JobError(f"no shards match {' '.join(patterns)}")
    names = [shard_name(u) for u in uris]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise JobError(f"two shards share the file name {duplicates[0]}: outputs are keyed by it")
    return uris


def split_top_level_commas(argument: str) -> list[str]:
    """``"a.tar, b-{0,1}.tar"`` -> ``["a.tar", "b-{0,1}.tar"]``: split at commas outside braces, drop empty items."""
    items, depth, current = [], 0, []
    for ch in argument:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth <= 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _expand_one(pattern: str) -> list[str]:
    if "://" not in pattern and any(ch in pattern for ch in "*?["):
        return sorted(glob.glob(pattern))
    try:
        fs, path = resolve_filesystem(pattern)
        info = fs.get_file_info(path)
        found = fs.get_file_info(pafs.FileSelector(path)) if info.type == pafs.FileType.Directory else []
    except OSError as exc:
        lines = str(exc).strip().splitlines()
        raise JobError(f"shard {pattern} cannot be read: {lines[0] if lines else type(exc).__name__}") from None
    if info.type == pafs.FileType.Directory:
        prefix = pattern.rstrip("/")
        return sorted(posixpath.join(prefix, f.base_name) for f in found if f.base_name.endswith(".tar"))
    if info.type != pafs.FileType.File:
        raise JobError(f"shard {pattern} does not exist")
    return [pattern]
