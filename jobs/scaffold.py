"""The scaffold of the model-pinning jobs (jobs.attribute, jobs.evaluate, jobs.sanity), in one place.

What each job keeps to itself: its worker, its schema, its own options. What they share lives here:

- the CLI arguments every job takes (shards; model, weights, methods and their options; precision and the actor
  resources) and their one-line checks;
- :class:`ActorJobSettings`, the fields of every job config that say where and how the actors run;
- :func:`actor_stage`: decode on CPU tasks -> the job's actor pool, sized for the connected cluster;
- :class:`ShardedRun`: the output directory of a resumable job — manifest (config key, versions, per-shard status),
  ``--overwrite``, the "same run?" check, resume (only uncommitted shards are done again), the commit loop with
  one progress line per committed shard (the pending shards run as consecutive Ray datasets of at most
  ``shards_per_dataset`` shards, so the driver's memory is bounded whatever the shard count), and the summary.

The commit records (``_commits/<shard>.json``) are the truth about which shards are done; ``manifest.json`` is a
view of them, written at the start, at most every MANIFEST_INTERVAL_S while shards commit, when the commit loop
ends, on failure and at the finish (rewriting it at every commit cost O(shards²) bytes over a run).
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

from attribution import models
from attribution.errors import AttributionError
from attribution.methods import REGISTRY, get_method
from attribution.precision import PRECISIONS
from jobs.common import (JobError, actor_resources, check_gpu_request, cluster_hardware, ensure_ray, fail,
                         ray_failure_line, ray_is_embedded)
from schemas.storage import StorageError
from workers.decode import decode_batch
from workers.shards import WebDatasetShards, shard_name
from workers.sink import OutputStore, compact_on_ray, compaction_slots

# The most shards one Ray dataset runs. Ray Data keeps some driver memory per block (one actor batch) for as long as
# its dataset lives (bench/driver_memory.py: ~10-13 KB per block in a no-work pipeline, 4,000 blocks: 38 MiB as one
# dataset, 14 MiB as four; jobs.attribute over 4,000 one-image shards: +9 MB, ~3.7 KB per block; bench/scale.py's
# 57 KB per 500-image shard is ~16 such blocks). ImageNet val (~1,600 batches) does not notice it; one dataset over
# millions of images would hold ~115 MB per million (batch 32). Consecutive datasets of at most 1000 shards bound it;
# each starts its actor pool anew (one model load per 1000 shards; 4 datasets of 1000 one-image shards: 159 s, one
# dataset: 158 s; ~4-6 s per start).
SHARDS_PER_DATASET = 1000

SHARDS_HELP = "tar shards: brace patterns, globs, dirs, s3:// gs://, or comma-separated lists of those"


# ------------------------------------------------------------------------------------------------------ config
@dataclass(kw_only=True)
class ActorJobSettings:
    """Where and how a job's actors run. ``workers``/``gpus_per_worker``/``cpus_per_worker``/``batch_size`` None:
    chosen from the connected cluster (jobs.common.actor_resources); ``address`` None: RAY_ADDRESS, else an
    embedded local Ray; ``quiet``: no progress lines. ``plan`` (jobs.attribute and jobs.evaluate): None runs the
    job; "" only prints its forecast (jobs.plan, from ``plan_batches`` batches); a path also writes it there as JSON."""

    batch_size: int | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    overwrite: bool = False
    address: str | None = None
    quiet: bool = False
    shards_per_dataset: int = SHARDS_PER_DATASET
    plan: str | None = None
    plan_batches: int = 2

    def say(self) -> Callable[..., None]:
        """The job's progress printer (silent when ``quiet``)."""
        return (lambda *a: None) if self.quiet else (lambda *a: print(*a, flush=True))


# --------------------------------------------------------------------------------------------------------- CLI
def add_shards_argument(p: argparse.ArgumentParser, required: bool = True, help: str = SHARDS_HELP) -> None:
    """``--shards`` (one or more patterns, each possibly a comma-separated list)."""
    p.add_argument("--shards", nargs="+", required=required, default=None, help=help)


def add_model_arguments(p: argparse.ArgumentParser, methods_default: str | None = None) -> None:
    """``--model``, ``--weights``, ``--methods`` (required unless ``methods_default``) and ``--method-options``."""
    p.add_argument("--model", required=True, help=f"one of {', '.join(models.MODEL_NAMES)}")
    p.add_argument("--weights", default=None, help="torchvision weights name, checkpoint path, or 'imagenet' "
                   "(efficientnet_lite0); default: random init")
    p.add_argument("--methods", required=methods_default is None, default=methods_default,
                   help=f"comma-separated: {', '.join(REGISTRY)}")
    p.add_argument("--method-options", default="{}", help='JSON {"method": {"option": value}}')


def add_actor_arguments(p: argparse.ArgumentParser, precision_help: str, overwrite_help: str,
                        workers_flags: Sequence[str] = ("--workers",), sharded: bool = True,
                        plannable: bool = False) -> None:
    """``--precision`` and the actor resources: ``--batch-size``, ``--workers``, ``--gpus-per-worker``,
    ``--cpus-per-worker``, ``--device``, ``--address``, ``--overwrite``, for jobs that run through ShardedRun
    (``sharded``) ``--shards-per-dataset``, and for jobs with a forecast (``plannable``, jobs.plan) ``--plan [JSON]``
    and ``--plan-batches``."""
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help=precision_help)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(*workers_flags, dest="workers", type=int, default=None,
                   help="actors (default: one per GPU, else 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per actor (default: 1 where the cluster has GPUs or its autoscaler reports some, else "
                        "0; 0.5: two actors per GPU)")
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--device", default=None, help="force a torch device for the actors (cpu: no GPU is asked for; "
                   "default: cuda for actors that hold a GPU, else cpu)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else embedded local Ray)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    if plannable:
        p.add_argument("--plan", nargs="?", const="", default=None, metavar="JSON",
                       help="do not run: time the first batches of the first shard to do in one actor and forecast "
                            "the run (time per step, output size, wall time, CPUs per actor for read/decode/write); "
                            "with JSON, also write the forecast there")
        p.add_argument("--plan-batches", type=int, default=2,
                       help="batches --plan times (default 2: the first is the warm-up)")
    if sharded:
        p.add_argument("--shards-per-dataset", type=int, default=SHARDS_PER_DATASET,
                       help=f"run at most this many shards per Ray dataset, the next ones in a new one (default "
                            f"{SHARDS_PER_DATASET}: bounds the driver's memory; each dataset starts its actors anew)")


def parse_methods(text: str) -> list[str]:
    """``"gbp, tr_gbp"`` -> ``["gbp", "tr_gbp"]``; exits with one error line on an unknown method or none."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REGISTRY]
    if not methods or unknown:
        fail(f"unknown method {unknown[0] if unknown else '(none)'!r}; known: {', '.join(REGISTRY)}")
    return methods


def parse_method_options(text: str, example: str) -> dict[str, dict[str, Any]]:
    """``--method-options`` JSON -> {method: {option: value}}; exits with one error line unless it is an object of
    objects (``example``: a valid value shown in that line)."""
    try:
        options = json.loads(text)
        assert isinstance(options, dict) and all(isinstance(v, dict) for v in options.values())
    except (ValueError, AssertionError):
        fail(f"--method-options must be a JSON object of objects, e.g. {example}, got {text!r}")
    return options


def require_at_least_one(a: argparse.Namespace, names: Sequence[str]) -> None:
    """Exit with one error line when one of the integer arguments ``names`` is given and < 1."""
    for name in names:
        value = getattr(a, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")


def actor_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed resource arguments as ActorJobSettings keyword arguments."""
    return {"batch_size": a.batch_size, "workers": a.workers, "gpus_per_worker": a.gpus_per_worker,
            "cpus_per_worker": a.cpus_per_worker, "overwrite": a.overwrite, "address": a.address,
            "shards_per_dataset": getattr(a, "shards_per_dataset", SHARDS_PER_DATASET),
            **({"plan": a.plan, "plan_batches": a.plan_batches} if hasattr(a, "plan") else {})}


def check_methods(methods: Sequence[str], options_for: Callable[[str], dict], precision: str) -> None:
    """Option and precision mistakes of every method fail here, in one line, before any work starts."""
    for method in methods:
        get_method(method)(None)._check_options(options_for(method))
        get_method(method).check_precision(precision)


# ------------------------------------------------------------------------------------------------ the pipeline
READ_CPUS = 0.25  # a read task mostly waits on I/O; Ray's default (1 CPU) starves the actor on small machines


def read_shards(uris: list[str]):
    """The Ray dataset of the shards' raw sample rows (workers.shards.WebDatasetShards): one read task and one
    block stream per shard. ``override_num_blocks`` keeps Ray Data from splitting each shard's output into many
    tiny blocks to reach its default minimum of 200 blocks (measured in bench/scale.py on 2 CPUs, 100 shards of
    500 64-px images: 143 -> 258 img/s together with READ_CPUS)."""
    import ray

    return ray.data.read_datasource(WebDatasetShards(uris), override_num_blocks=len(uris), num_cpus=READ_CPUS)


def actor_plan(settings: ActorJobSettings, worker_config: Any, gpu_batch: int = 32, cpu_batch: int = 8
               ) -> tuple[float, int, float, int, Any]:
    """(GPUs per actor, actors, CPUs per actor, batch size, the actors' copy of ``worker_config``) for the connected
    cluster (jobs.common.actor_resources), checked (jobs.common.check_gpu_request: GPUs that can never come are one
    JobError line) and printed as one line, with a warning line where one applies. The copy's threads default to the
    actor's CPUs, its device to "cuda" when the actors hold GPUs (an actor whose torch sees none then fails to start,
    rather than run on one CPU thread) and "cpu" when not."""
    gpus, workers, cpus, batch_size = actor_resources(settings.gpus_per_worker, settings.workers,
                                                      settings.cpus_per_worker, settings.batch_size,
                                                      gpu_batch=gpu_batch, cpu_batch=cpu_batch,
                                                      device=worker_config.device)
    warning = check_gpu_request(gpus, workers, ray_is_embedded(),
                                cpu_asked=worker_config.device == "cpu" or settings.gpus_per_worker == 0)
    config = type(worker_config)(**{**asdict(worker_config),
                                    "threads": worker_config.threads or max(1, int(cpus))})
    if config.device is None:  # an actor holding a GPU computes on it or fails to start (workers.device)
        config.device = "cuda" if gpus else "cpu"
    say = settings.say()
    if warning:
        say(warning)
    say(f"actors: {workers} x ({gpus:g} GPU, {cpus:g} CPU, {config.threads} threads) on {config.device}, "
        f"batches of {batch_size}")
    return gpus, workers, cpus, batch_size, config


def actor_stage(dataset, settings: ActorJobSettings, worker_cls: type, worker_config: Any,
                preprocessing, worker_kwargs: dict | None = None, gpu_batch: int = 32, cpu_batch: int = 8):
    """raw sample rows -> decode (CPU tasks) -> ``worker_cls(config=…)`` in an actor pool sized for the connected
    cluster (:func:`actor_plan`). ``worker_config``: a dataclass with ``threads`` and ``device`` fields. Returns (the
    Ray dataset of the actors' rows, the actor batch size).

    Prefetching is Ray Data's: each actor has 2 batches in flight (its max_concurrency 1 x
    RAY_DATA_ACTOR_DEFAULT_MAX_TASKS_IN_FLIGHT_TO_MAX_CONCURRENCY_FACTOR 2), so the next decoded batch is already
    at the actor while one computes, and decode tasks scale out over the node's free CPUs. On 2 CPUs one actor
    with 1 thread is the fastest setting measured (bench/scale.py: 1 actor x 1 CPU and 2 actors x 0.5 CPU both
    416 img/s on 20,000 64-px images; 2 actors x 0.75 CPU 293 vs 306 img/s on 10,000)."""
    import ray

    gpus, workers, cpus, batch_size, config = actor_plan(settings, worker_config, gpu_batch, cpu_batch)
    rows = (dataset
            .map_batches(decode_batch, fn_kwargs={"preprocessing": preprocessing}, batch_format="pyarrow",
                         batch_size=batch_size, num_cpus=0.5)
            .map_batches(worker_cls, fn_constructor_kwargs={"config": config, **(worker_kwargs or {})},
                         batch_format="pyarrow", batch_size=batch_size,
                         compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus, num_cpus=cpus))
    return rows, batch_size


def run_cli(config: Any, run: Callable[[Any], Any]) -> int:
    """``run(config)`` for a job's ``main``: the job's own input problems (JobError, AttributionError, StorageError)
    and a Ray actor or task stopped by one of them or unable to start (jobs.common.ray_failure_line: no GPU for
    torch, a GPU lost twice …) exit with one error line and status 2; returns 0."""
    try:
        run(config)
    except (JobError, AttributionError, StorageError) as exc:  # also Ray's error from a task that raised one
        fail(ray_failure_line(exc) or str(exc))
    except Exception as exc:
        line = ray_failure_line(exc)
        if line is None:
            raise
        fail(line)
    return 0


def versions() -> dict[str, str]:
    """Versions recorded in every manifest."""
    import pyarrow
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "pyarrow": pyarrow.__version__}


MANIFEST_INTERVAL_S = 30.0  # seconds between manifest rewrites while shards commit


def record_failure(store: OutputStore, manifest: dict, exc: BaseException) -> None:
    """Mark the run failed in its manifest, with the exception's first line."""
    manifest["status"] = "failed"
    manifest["failure"] = ray_failure_line(exc) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    store.write_json("manifest.json", manifest)


# ------------------------------------------------------------------------------------------- a resumable run
class ShardedRun:
    """The output directory of a resumable sharded job, from start to summary.

    Construction does the bookkeeping before any work: ``--overwrite`` clears, the "same run?" check refuses an
    output directory whose committed shards came from another ``key``, leftovers of uncommitted shards are
    deleted, and the manifest (``job``, ``config`` = ``key`` + ``recorded``, ``versions``, per-shard status) is
    written; from the first commit on it also holds ``hardware`` (jobs.common.cluster_hardware: the cluster's CPUs,
    GPUs and GPU types, the most seen while this run's shards committed). ``recorded``: config entries kept in the
    manifest but not compared (e.g. the shard list); ``what``: how the refusal names a run ("a run", "an
    evaluation").

    While shards commit the manifest is rewritten at most every ``manifest_interval_s`` seconds of ``clock`` (a
    monotonic clock in seconds; both class attributes, so tests can change them). Mid-run its per-shard status may
    lag the commit records (a commit shows at the first commit ``manifest_interval_s`` after the last write, or when
    the loop ends), never the other way round; resume reads the commit records only.
    """

    manifest_interval_s: float = MANIFEST_INTERVAL_S
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, job: str, out: str, key: dict, uris: list[str], settings: ActorJobSettings,
                 recorded: dict | None = None, what: str = "a run") -> None:
        self.job, self.out, self.key, self.uris, self.settings = job, out, key, uris, settings
        self.say = settings.say()
        self.store = OutputStore(out)
        if settings.overwrite:
            self.store.clear()
        self.store.ensure()
        recorded = recorded or {}
        committed = self.store.committed()  # lists and reads every commit record: once per run
        self._check_same_run(committed, recorded, what)
        self.already_committed = len(committed)
        self.pending = [u for u in uris if shard_name(u) not in committed]
        self.store.reset_shards([shard_name(u) for u in self.pending])
        self.manifest = {
            "job": job, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {**key, **recorded}, "versions": versions(),
            "shards": {shard_name(u): ({"status": "committed", "uri": u, **committed[shard_name(u)]}
                                       if shard_name(u) in committed else {"status": "pending", "uri": u})
                       for u in uris},
        }
        self.committed_count = len(uris) - len(self.pending)  # shards of ``uris`` committed so far
        self.manifest_writes, self._manifest_written_at = 0, float("-inf")
        self._write_manifest()
        self.counts = {"samples": 0, "rows": 0, "error_rows": 0}
        self.started = time.perf_counter()

    def _write_manifest(self, force: bool = True) -> None:
        """Write the manifest now (``force``) or only when ``manifest_interval_s`` has passed since the last write."""
        now = self.clock()
        if force or now - self._manifest_written_at >= self.manifest_interval_s:
            self.store.write_json("manifest.json", self.manifest)
            self._manifest_written_at = now
            self.manifest_writes += 1

    def _check_same_run(self, committed: dict, recorded: dict, what: str) -> None:
        previous = self.store.read_json("manifest.json")
        if not previous or not committed:
            return
        old = {k: v for k, v in previous.get("config", {}).items() if k not in recorded}
        if old != self.key:
            changed = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
            raise JobError(f"{self.out} holds {what} with different {', '.join(changed)}; "
                           "use --overwrite or another --out")

    def process(self, pipeline: Callable[[list[str]], Iterable[dict[str, Any]]], noun: str) -> None:
        """Run ``pipeline(shard URIs)`` (an iterable of workers.sink.SUMMARY_SCHEMA rows, e.g. a Ray dataset's
        ``iter_rows()``) over the pending shards and commit each shard as soon as all its samples are written, with
        one progress line per shard (``noun``: what a result row is called). The pending shards go to ``pipeline``
        in consecutive slices of at most ``settings.shards_per_dataset`` (:meth:`slices`), each started when the
        previous one is exhausted. Nothing to do: no Ray start. The manifest is written when the loop ends; an
        exception (Ctrl-C included) marks it failed and propagates."""
        self.started = time.perf_counter()
        if not self.pending:
            return
        ensure_ray(self.settings.address)
        try:
            summaries = itertools.chain.from_iterable(pipeline(part) for part in self.slices())
            # each complete shard's parts are compacted by a Ray task, then committed here
            for record in self.store.commit_complete(summaries, submit=compact_on_ray,
                                                     max_running=compaction_slots()):
                self._committed(record, noun)
        except BaseException as exc:
            record_failure(self.store, self.manifest, exc)
            self.manifest_writes += 1
            raise
        self._write_manifest()

    def slices(self) -> list[list[str]]:
        """The pending shard URIs in consecutive slices of at most ``settings.shards_per_dataset`` (one Ray dataset
        each: Ray Data's per-block driver state lives as long as its dataset)."""
        size = max(1, self.settings.shards_per_dataset)
        return [self.pending[i:i + size] for i in range(0, len(self.pending), size)]

    def _committed(self, record: dict, noun: str) -> None:
        shard = record["shard"]
        entry = self.manifest["shards"].get(shard, {})
        if entry.get("status") != "committed":
            self.committed_count += 1
        self.manifest["shards"][shard] = {**entry, "status": "committed", **record}
        self.manifest["hardware"] = cluster_hardware(self.manifest.get("hardware"))
        self._write_manifest(force=False)
        for name in self.counts:
            self.counts[name] += record[name]
        rate = self.counts["samples"] / max(time.perf_counter() - self.started, 1e-9)
        self.say(f"[{self.committed_count}/{len(self.uris)}] committed {shard}: {record['samples']} samples, "
                 f"{record['rows']} {noun}, {record['error_rows']} errors ({rate:.2f} img/s)")

    def finish(self, rows_key: str, noun: str, extra: dict | None = None) -> dict:
        """Write the summary into the manifest (status complete | incomplete) and print the closing lines; returns
        the summary: shards, shards_committed, samples, ``rows_key`` (result rows), errors, ``extra``, seconds,
        images_per_second, incomplete_shards."""
        elapsed = time.perf_counter() - self.started
        samples = self.counts["samples"]
        incomplete = [shard_name(u) for u in self.pending
                      if self.manifest["shards"][shard_name(u)]["status"] != "committed"]
        summary = {"shards": len(self.uris), "shards_committed": len(self.uris) - len(incomplete),
                   "samples": samples, rows_key: self.counts["rows"], "errors": self.counts["error_rows"],
                   **(extra or {}), "seconds": round(elapsed, 2),
                   "images_per_second": round(samples / elapsed, 3) if elapsed > 0 and samples else 0.0,
                   "incomplete_shards": incomplete}
        self.manifest["status"] = "complete" if not incomplete else "incomplete"
        self.manifest["summary"] = summary
        self._write_manifest()
        self.say(f"done: {samples} images, {self.counts['rows']} {noun}, {self.counts['error_rows']} errors in "
                 f"{summary['seconds']} s ({summary['images_per_second']} img/s); outputs in {self.out}")
        if incomplete:
            self.say(f"warning: {len(incomplete)} shards did not complete and were not committed: {incomplete[:5]}")
        return summary


__all__ = ["ActorJobSettings", "MANIFEST_INTERVAL_S", "SHARDS_HELP", "SHARDS_PER_DATASET", "ShardedRun",
           "actor_settings", "actor_stage", "add_actor_arguments", "add_model_arguments", "add_shards_argument",
           "check_methods", "parse_method_options", "parse_methods", "read_shards", "record_failure",
           "require_at_least_one", "run_cli", "versions"]
