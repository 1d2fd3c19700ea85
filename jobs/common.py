"""What every job entry point shares: one-line CLI errors, Ray start-up, shard lists."""
from __future__ import annotations

import glob
import os
import posixpath
import re
import sys
from collections import Counter
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


# Exceptions of ours whose message is the whole story when a Ray actor or task raises them (one line for the user)
_ONE_LINE_ERRORS = re.compile(
    r"^\s*(?:[\w.]+\.)?(AttributionError|JobError|StorageError|DeviceLostError|RepeatedCrashError): (.+)$")


def ray_failure_line(exc: BaseException) -> str | None:
    """One line for a job stopped by a Ray actor or task (``exc`` or what it was raised from), instead of Ray's
    multi-line report: an actor that died in its constructor -> "an actor could not start: " + its exception line
    (no GPU for torch, unreadable weights …); an actor or task that raised one of our own errors (DeviceLostError:
    a GPU lost twice; StorageError: the output store refused a write) -> "a Ray task stopped: " + its message.
    None for anything else (a bug keeps its traceback)."""
    import ray.exceptions

    seen = exc
    while seen is not None and not isinstance(seen, (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    lines = [line.strip() for line in str(seen).splitlines() if line.strip()]
    ours = next((m for m in map(_ONE_LINE_ERRORS.match, lines) if m), None)
    if isinstance(seen, ray.exceptions.RayActorError) and seen.actor_init_failed:
        if ours:
            return f"an actor could not start: {ours.group(2)}"
        name, _, message = (lines[-1] if lines else "unknown error").partition(": ")
        return f"an actor could not start: {name.rsplit('.', 1)[-1]}: {message}" if message else \
            f"an actor could not start: {name}"
    return f"a Ray task stopped: {ours.group(2)}" if ours else None


NON_TTY_PROGRESS_INTERVAL_S = 60


# Ray keeps at most this many idle workers per CPU of an embedded local Ray (its default: the CPUs not in use, which an
# actor holding 1 of 2 CPUs brings to 1, so the 0.25-CPU read and 0.5-CPU decode/write tasks' workers are killed
# after 1 s idle and restarted for the next task, each start importing pyarrow/torch again). 4 = one idle worker
# for each of the most tasks that can run at once (1 / jobs.scaffold.READ_CPUS per CPU). Measured with jobs.attribute
# on 30 shards of 200 64-px images, 2 shared CPUs, 4 runs each: 8-16 worker processes started and 3-10 idle exits
# -> 7 and 0; CPU seconds of the job's processes 57 -> 49 on average, 99 -> 125 img/s (noisy, other load 5-10).
IDLE_WORKERS_PER_CPU = 4


def local_system_config(num_cpus: int) -> dict[str, int]:
    """Ray ``_system_config`` of an embedded local Ray with ``num_cpus`` CPUs: ``num_workers_soft_limit`` (idle
    workers kept, a count) = IDLE_WORKERS_PER_CPU x CPUs. A ``RAY_num_workers_soft_limit`` set in the environment
    wins (a system config entry would override it)."""
    if os.environ.get("RAY_num_workers_soft_limit"):
        return {}
    return {"num_workers_soft_limit": IDLE_WORKERS_PER_CPU * max(1, int(num_cpus))}


_EMBEDDED = False  # whether the Ray this process runs on is one ensure_ray started here (no cluster to grow)


def ray_is_embedded() -> bool:
    """True when this process's Ray is an embedded local one that :func:`ensure_ray` started: it never gains
    resources. False for a connected cluster, and for a Ray the caller initialised itself."""
    import ray

    return _EMBEDDED and ray.is_initialized()


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``address``, or RAY_ADDRESS as set by ``ray job submit``), else start an embedded
    local Ray with ``num_cpus`` (default: this machine's) CPUs, no dashboard, a modest object store and enough
    idle workers kept (:func:`local_system_config`); a cluster's own settings are left alone."""
    import ray

    global _EMBEDDED
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _EMBEDDED = not (address or os.environ.get("RAY_ADDRESS"))
    if not _EMBEDDED:
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=512 * 1024 ** 2, log_to_driver=False,
                 _system_config=local_system_config(cpus))
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
                    batch_size: int | None, gpu_batch: int = 32, cpu_batch: int = 8,
                    device: str | None = None) -> tuple[float, int, float, int]:
    """(GPUs per actor, actors, CPUs per actor, batch size) for a model-pinning actor pool on the connected cluster.

    Defaults: one actor per GPU the cluster has, or can grow to where its autoscaler says (Ray's cluster config),
    with 1 CPU each; ``gpus_per_worker`` 0.5 gives two actors per GPU. ``device`` "cpu" asks for no GPU. Without
    GPUs one CPU actor that leaves one CPU to the read, decode and write tasks (an actor holding every CPU stalls
    the pipeline, ray#44687).
    """
    import ray

    resources = ray.cluster_resources()
    pool = max(resources.get("GPU", 0), most_cluster_gpus() or 0)
    if gpus_per_worker is None:
        gpus_per_worker = 0 if device == "cpu" else (1 if pool else 0)
    gpus = gpus_per_worker
    workers = workers or (max(1, int(pool / gpus + 1e-9)) if gpus else 1)
    cpus = cpus_per_worker or (1 if gpus else max(1, int(resources.get("CPU", 2)) - 1))
    return gpus, workers, cpus, batch_size or (gpu_batch if gpus else cpu_batch)


def most_cluster_gpus() -> float | None:
    """The most GPUs the connected cluster's autoscaler may bring up, from the cluster config it reports to Ray
    (what Ray Data itself reads for its resource limits); None where no such config is known (an embedded local Ray,
    a fixed set of ``ray start`` nodes)."""
    try:
        from ray._private.state import state
        return (state.get_max_resources_from_cluster_config() or {}).get("GPU") or None
    except Exception:  # a private API: a Ray without it has no autoscaler limits to read
        return None


def check_gpu_request(gpus: float, workers: int, embedded: bool, cpu_asked: bool = False) -> str | None:
    """Whether ``workers`` actors of ``gpus`` GPUs each can ever run: raises JobError (one line) when they cannot —
    an embedded local Ray has fewer GPUs (it never gains any: the job would wait forever), or the cluster's
    autoscaler cannot reach that many. Returns a warning line when a connected cluster has fewer now and may get
    them later (an autoscaling cluster whose GPU nodes start on demand), or when it has none and the actors will
    run on CPUs without the user having asked for that (``cpu_asked``: --device cpu or --gpus-per-worker 0); else
    None."""
    import ray

    need, now, most = gpus * workers, ray.cluster_resources().get("GPU", 0), most_cluster_gpus()
    if not gpus:
        return (None if embedded or cpu_asked or now or most else
                "warning: the cluster has no GPU now, so the actors run on CPUs; for GPU nodes that an autoscaler "
                "starts on demand pass --gpus-per-worker 1 --workers N")
    if need <= now + 1e-9:
        return None
    asked = f"{workers} actor{'s' * (workers > 1)} x {gpus:g} GPU"
    if embedded:
        raise JobError(f"{asked} asked for, but this machine's Ray has {now:g} GPU: fewer --workers or "
                       f"--gpus-per-worker, or --device cpu")
    if most is not None and need > most + 1e-9:
        raise JobError(f"{asked} asked for, but the cluster's autoscaler can bring up at most {most:g} GPU")
    return f"waiting for GPUs: {asked} asked for, the cluster has {now:g} GPU now (its autoscaler may add nodes)"


def cluster_hardware(seen: dict | None = None) -> dict:
    """What the connected Ray cluster has now, merged with ``seen`` (the most of each so far, so an autoscaling
    cluster's largest size is kept): {"cpus": CPUs, "gpus": GPUs (Ray's resource counts), "gpu_types": Ray's
    accelerator types of its GPU nodes, e.g. ["A10G"]}. What a run's times per image were measured on."""
    import ray

    resources = ray.cluster_resources()
    types = {key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:")}
    seen = seen or {}
    return {"cpus": max(resources.get("CPU", 0.0), seen.get("cpus", 0.0)),
            "gpus": max(resources.get("GPU", 0.0), seen.get("gpus", 0.0)),
            "gpu_types": sorted(types | set(seen.get("gpu_types", [])))}


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
    duplicates = sorted(name for name, count in Counter(shard_name(u) for u in uris).items() if count > 1)
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
