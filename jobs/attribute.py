"""python -m jobs.attribute: WebDataset shards in, attribution maps out (Parquet and/or NPZ), resumable.

    python -m jobs.attribute --shards 'runs/sample_shards/photos-{000000..000001}.tar' \\
        --model efficientnet_lite0 --weights imagenet --methods tr_gbp,a_fmi --targets top5 --out runs/maps

The pipeline reads like a sentence: read shards -> decode on CPU -> attribute in actors that each pin one model on
one GPU (or CPU) -> write parts -> the driver commits each shard once all its samples are written. A rerun with the
same --out skips committed shards; --overwrite starts again.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from attribution import models
from attribution.errors import AttributionError
from attribution.methods import REGISTRY, get_method
from attribution.precision import PRECISIONS
from jobs.common import JobError, actor_resources, commit_as_written, ensure_ray, expand_shards, fail
from workers.attribution_worker import TARGET_KINDS, AttributionWorker, WorkerConfig
from workers.decode import decode_batch
from workers.shards import WebDatasetShards, shard_name
from workers.sink import OutputStore, StorageError, write_parts

FORMATS = {"parquet": ("parquet",), "npz": ("npz",), "both": ("parquet", "npz")}


@dataclass
class AttributeConfig:
    """One attribution run. ``workers``/``gpus_per_worker``/``cpus_per_worker`` None: chosen from the cluster."""

    shards: list[str]
    out: str
    worker: WorkerConfig
    format: str = "parquet"
    batch_size: int | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    overwrite: bool = False
    address: str | None = None
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def run(config: AttributeConfig, worker_cls: type = AttributionWorker, worker_kwargs: dict | None = None) -> dict:
    """Run (or resume) an attribution job; returns the summary that is also written to the manifest.

    ``worker_cls``/``worker_kwargs``: the actor class and extra constructor arguments (fault-injection tests).
    """
    import ray

    for method in config.worker.methods:  # option mistakes fail here, in one line, before any work starts
        get_method(method)(None)._check_options(config.worker.options_for(method))
        get_method(method).check_precision(config.worker.precision)
    uris = expand_shards(config.shards)
    store = OutputStore(config.out)
    if config.overwrite:
        store.clear()
    store.ensure()
    _check_same_run(store, config)
    committed = store.committed()
    pending = [u for u in uris if shard_name(u) not in committed]
    for uri in pending:
        store.reset_shard(shard_name(uri))
    manifest = _manifest(config, uris, committed)
    store.write_json("manifest.json", manifest)
    say = (lambda *a: None) if config.quiet else (lambda *a: print(*a, flush=True))
    say(f"{len(uris)} shards, {len(committed)} already committed, {len(pending)} to do -> {config.out}")

    start = time.perf_counter()
    samples = rows = errors = 0
    if pending:
        ensure_ray(config.address)
        dataset = _pipeline(config, pending, worker_cls, worker_kwargs or {}, ray)
        try:
            samples, rows, errors = commit_as_written(dataset.iter_rows(), store, manifest, len(uris), start, say,
                                                      noun="maps")
        except Exception as exc:
            manifest["status"] = "failed"
            manifest["failure"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            store.write_json("manifest.json", manifest)
            raise
    elapsed = time.perf_counter() - start
    incomplete = [shard_name(u) for u in pending if manifest["shards"][shard_name(u)]["status"] != "committed"]
    summary = {"shards": len(uris), "shards_committed": len(uris) - len(incomplete), "samples": samples,
               "maps_written": rows, "errors": errors, "seconds": round(elapsed, 2),
               "images_per_second": round(samples / elapsed, 3) if elapsed > 0 and samples else 0.0,
               "incomplete_shards": incomplete}
    manifest["status"] = "complete" if not incomplete else "incomplete"
    manifest["summary"] = summary
    store.write_json("manifest.json", manifest)
    say(f"done: {summary['samples']} images, {summary['maps_written']} maps, {summary['errors']} errors in "
        f"{summary['seconds']} s ({summary['images_per_second']} img/s); outputs in {config.out}")
    if incomplete:
        say(f"warning: {len(incomplete)} shards did not complete and were not committed: {incomplete[:5]}")
    return summary


def _pipeline(config: AttributeConfig, pending: list[str], worker_cls: type, worker_kwargs: dict, ray):
    """read -> decode (CPU tasks) -> attribute (actor pool) -> write parts (CPU tasks)."""
    gpus, workers, cpus, batch_size = actor_resources(config.gpus_per_worker, config.workers,
                                                      config.cpus_per_worker, config.batch_size)
    worker = WorkerConfig(**{**asdict(config.worker), "threads": config.worker.threads or max(1, int(cpus))})
    if not gpus and worker.device is None:
        worker.device = "cpu"
    preprocessing = models.preprocessing_for(worker.model, worker.weights)
    return (
        ray.data.read_datasource(WebDatasetShards(pending))
        .map_batches(decode_batch, fn_kwargs={"preprocessing": preprocessing}, batch_format="pyarrow",
                     batch_size=batch_size, num_cpus=0.5)
        .map_batches(worker_cls, fn_constructor_kwargs={"config": worker, **worker_kwargs}, batch_format="pyarrow",
                     batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                     num_gpus=gpus, num_cpus=cpus)
        .map_batches(write_parts, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
                     fn_kwargs={"uri": config.out, "formats": FORMATS[config.format],
                                "map_size": preprocessing.input_size, "map_dtype": worker.map_dtype})
    )


def _manifest(config: AttributeConfig, uris: list[str], committed: dict[str, dict]) -> dict:
    import pyarrow
    import ray
    import torch

    return {
        "job": "attribute", "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": _config_key(config),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                     "pyarrow": pyarrow.__version__},
        "shards": {shard_name(u): ({"status": "committed", "uri": u, **committed[shard_name(u)]}
                                   if shard_name(u) in committed else {"status": "pending", "uri": u})
                   for u in uris},
    }


def _config_key(config: AttributeConfig) -> dict:
    """The parts of a config that define its outputs (a resumed run must match them)."""
    w = config.worker
    return {"model": w.model, "weights": w.weights, "methods": w.methods, "method_options": w.method_options,
            "targets": w.targets, "map_dtype": w.map_dtype, "fmi": w.fmi, "layers": w.layers,
            **({"precision": w.precision} if w.precision != "fp32" else {}),  # fp32 runs keep their old key
            "format": config.format}


def _check_same_run(store: OutputStore, config: AttributeConfig) -> None:
    previous = store.read_json("manifest.json")
    if previous and previous.get("config") != _config_key(config) and store.committed():
        changed = sorted(k for k, v in _config_key(config).items() if previous["config"].get(k) != v)
        raise JobError(f"{config.out} holds a run with different {', '.join(changed)}; "
                       "use --overwrite or another --out")


def parse_args(argv: list[str] | None = None) -> AttributeConfig:
    """CLI -> AttributeConfig; any bad argument exits with one error line."""
    p = argparse.ArgumentParser(prog="python -m jobs.attribute", description=__doc__.split("\n")[0])
    p.add_argument("--shards", nargs="+", required=True,
                   help="tar shards: brace patterns, globs, dirs, s3:// gs://, or comma-separated lists of those")
    p.add_argument("--model", required=True, help=f"one of {', '.join(models.MODEL_NAMES)}")
    p.add_argument("--weights", default=None, help="torchvision weights name, checkpoint path, or 'imagenet' "
                   "(efficientnet_lite0); default: random init")
    p.add_argument("--methods", required=True, help=f"comma-separated: {', '.join(REGISTRY)}")
    p.add_argument("--method-options", default="{}", help='JSON {"method": {"option": value}}')
    p.add_argument("--targets", default="top1", choices=TARGET_KINDS)
    p.add_argument("--out", required=True, help="output directory or URI")
    p.add_argument("--format", default="parquet", choices=sorted(FORMATS))
    p.add_argument("--map-dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="compute precision of the forward/backward passes (bf16/fp16: autocast); maps are float32")
    p.add_argument("--fmi", action="store_true", help="store A-FMI's FMI vectors")
    p.add_argument("--layers", action="store_true", help="store TR-GBP's per-layer maps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="actors (default: one per GPU, else 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--device", default=None, help="force a torch device for the actors (cpu, cuda)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else embedded local Ray)")
    p.add_argument("--overwrite", action="store_true", help="delete previous outputs in --out first")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REGISTRY]
    if not methods or unknown:
        fail(f"unknown method {unknown[0] if unknown else '(none)'!r}; known: {', '.join(REGISTRY)}")
    if a.model not in models.MODEL_NAMES:
        fail(f"unknown model {a.model!r}; known: {', '.join(models.MODEL_NAMES)}")
    try:
        options = json.loads(a.method_options)
        assert isinstance(options, dict) and all(isinstance(v, dict) for v in options.values())
    except (ValueError, AssertionError):
        fail(f'--method-options must be a JSON object of objects, e.g. {{"a_fmi": {{"reference": "white"}}}}, '
             f"got {a.method_options!r}")
    for size in ("batch_size", "workers"):
        if getattr(a, size) is not None and getattr(a, size) < 1:
            fail(f"--{size.replace('_', '-')} must be at least 1")
    worker = WorkerConfig(model=a.model, weights=a.weights, methods=methods, method_options=options,
                          targets=a.targets, map_dtype=a.map_dtype, precision=a.precision, fmi=a.fmi, layers=a.layers,
                          device=a.device)
    return AttributeConfig(shards=a.shards, out=a.out, worker=worker, format=a.format, batch_size=a.batch_size,
                           workers=a.workers, gpus_per_worker=a.gpus_per_worker, cpus_per_worker=a.cpus_per_worker,
                           overwrite=a.overwrite, address=a.address)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    config = parse_args(argv)
    try:
        if config.worker.weights and not os.path.exists(config.worker.weights) and any(
                c in config.worker.weights for c in "/\\") and "://" not in config.worker.weights:
            raise JobError(f"checkpoint {config.worker.weights} does not exist")
        run(config)
    except (JobError, AttributionError, StorageError) as exc:
        fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
