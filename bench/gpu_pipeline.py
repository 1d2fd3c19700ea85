"""bench.gpu_check's end-to-end sections on synthetic shards: (c) pipeline, ``jobs.attribute`` with one (GPU)
actor vs a bare loop of the same calls, and (d) evaluate, ``jobs.evaluate``'s perturbation metrics end to end and
in process vs the forward-pass floor."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attribution import models
from attribution.precision import compute_precision
from bench.gpu_plan import Plan
from bench.gpu_report import fmt, print_table
from bench.gpu_sampler import GpuSampler, gpu_index
from bench.timing import free_memory, sync


@dataclass
class Shards:
    """The synthetic shards of the pipeline and evaluate sections."""

    samples: list
    paths: list[Path]
    pattern: str
    sizes: list[int]



def actor_gpus(device: torch.device) -> int:
    """GPUs per actor for a section on ``device``: asked for explicitly, so a Ray that does not see the GPU fails the
    section in one line (jobs.common.check_gpu_request) instead of measuring CPU actors."""
    return 1 if device.type == "cuda" else 0

def synthetic_shards(plan: Plan, work: Path) -> Shards:
    """``plan.pipeline_images`` synthetic samples (``pipeline_unique`` distinct images, repeated under new keys:
    generating each costs ~20 ms of CPU) written as shards of ``plan.shard_size``."""
    from attribution.data.sample_sets import synthetic_samples
    from attribution.data.shards import Sample, write_shards
    size = models.preprocessing_for(plan.pipeline_model, None).input_size
    base = synthetic_samples(plan.pipeline_unique, seed=plan.seed, size=size)
    samples = []
    for i in range(plan.pipeline_images):
        b, key = base[i % len(base)], f"gpucheck_{i:06d}"
        samples.append(Sample(key, {**b.meta, "key": key}, b.image))
    shard_set = write_shards(samples, work / "shards", "gpucheck", plan.shard_size, log=lambda *_: None)
    paths = [work / "shards" / s["file"] for s in shard_set.shards]
    return Shards(samples, paths, shard_set.pattern, [s["samples"] for s in shard_set.shards])


def section_pipeline(plan: Plan, report: dict, work: Path, shards: Callable[[], Shards]) -> None:
    """jobs.attribute end to end with one (GPU) actor vs a bare loop of the same calls."""
    from bench.gpu_probe import ProbeWorker, read_probe_stats
    from bench.pipeline import bare_loop
    from jobs.attribute import AttributeConfig, run
    from jobs.common import ensure_ray
    from workers.attribution_worker import WorkerConfig

    out: dict[str, Any] = report["pipeline"]
    data = shards()
    n, batch, device, precision = len(data.samples), plan.pipeline_batch, plan.device, plan.pipeline_precision
    out.update(model=plan.pipeline_model, methods=plan.pipeline_methods, targets=plan.pipeline_targets,
               precision=precision, images=n, batch=batch, shards=len(data.paths),
               unique_images=plan.pipeline_unique)
    spec = models.load(plan.pipeline_model, None, device=device)
    with compute_precision(precision, device):
        bare_loop(spec, data.samples[:batch], plan.pipeline_methods, plan.pipeline_targets, batch)  # warm-up
        bare_s = bare_loop(spec, data.samples, plan.pipeline_methods, plan.pipeline_targets, batch)
    out["bare_loop_seconds"] = bare_s
    out["bare_loop_images_per_second"] = bare_ips = n / bare_s
    del spec
    free_memory(device)

    t0 = time.perf_counter()
    ensure_ray()
    out["ray_start_seconds"] = time.perf_counter() - t0
    stats_dir = work / "actor_stats"
    worker = WorkerConfig(model=plan.pipeline_model, methods=plan.pipeline_methods, targets=plan.pipeline_targets,
                          precision=precision, device=None if device.type == "cuda" else "cpu")
    config = AttributeConfig(shards=[data.pattern], out=str(work / "maps"), worker=worker, batch_size=batch,
                             quiet=True, overwrite=True, gpus_per_worker=actor_gpus(device))
    sampler = GpuSampler(gpu_index()) if device.type == "cuda" else contextlib.nullcontext()
    with sampler:
        wall0 = time.time()
        start = time.perf_counter()
        summary = run(config, worker_cls=ProbeWorker, worker_kwargs={"stats_dir": str(stats_dir)})
        seconds = time.perf_counter() - start
    stats = read_probe_stats(stats_dir)
    out.update(seconds=seconds, images_per_second=summary["samples"] / seconds if seconds > 0 else None,
               maps_written=summary["maps_written"], errors=summary["errors"], samples=summary["samples"],
               actors=stats["actors"], actor_batches=stats["calls"])
    out["ratio_to_bare"] = out["images_per_second"] / bare_ips if out["images_per_second"] else None
    steady = None
    if stats["first_end"] is not None and stats["last_end"] > stats["first_end"] and stats["steady_images"]:
        steady = stats["steady_images"] / (stats["last_end"] - stats["first_end"])
    out["steady_images_per_second"] = steady
    out["steady_ratio_to_bare"] = steady / bare_ips if steady else None
    out["actor_ready_seconds"] = stats["ready"] - wall0 if stats["ready"] is not None else None
    out["peak_gpu_memory_bytes"] = stats["peak_allocated_bytes"]
    out["peak_gpu_memory_reserved_bytes"] = stats["peak_reserved_bytes"]
    if isinstance(sampler, GpuSampler):
        out["gpu_busy_fraction"] = sampler.busy_fraction(wall0, wall0 + seconds)
        out["gpu_busy_fraction_steady"] = sampler.busy_fraction(stats["first_end"], stats["last_end"])
        out["device_memory_used_peak_bytes"] = sampler.peak_used_bytes()
        out["gpu_sampler"] = {"source": sampler.source, "samples": len(sampler.samples), "error": sampler.error}
    else:
        out.update(gpu_busy_fraction=None, gpu_busy_fraction_steady=None, device_memory_used_peak_bytes=None,
                   gpu_sampler=None)
    if summary["samples"] != n or summary["errors"]:
        out["problem"] = f"{summary['samples']} of {n} images done, {summary['errors']} error rows"
    out["maps_dir"] = config.out
    forecast_vs_run(config, work, out)
    mib = (lambda v: fmt(v / 2**20, 0) if v is not None else "-")
    print_table(f"(c) pipeline: {plan.pipeline_model} {','.join(plan.pipeline_methods)} {plan.pipeline_targets} "
                f"{precision}, {n} images, batch {batch}, {device}",
                ["run", "img/s", "x bare", "GPU busy", "peak GPU MiB"],
                [["bare loop (this process)", fmt(bare_ips), "1.00", "-", "-"],
                 [f"jobs.attribute ({seconds:.1f} s, Ray start {out['ray_start_seconds']:.1f} s apart)",
                  fmt(out["images_per_second"]), fmt(out["ratio_to_bare"], 2), fmt(out["gpu_busy_fraction"], 2),
                  mib(out["peak_gpu_memory_bytes"])],
                 [f"  steady (actor ready after {fmt(out['actor_ready_seconds'])} s)", fmt(steady),
                  fmt(out["steady_ratio_to_bare"], 2), fmt(out["gpu_busy_fraction_steady"], 2), ""],
                 [f"  --plan's forecast (actor only; x steady {fmt(out['plan_ratio_to_steady'], 2)})",
                  fmt(out["plan_images_per_second"]), fmt(out["plan_images_per_second"] / bare_ips, 2), "",
                  mib(out["plan_peak_gpu_memory_bytes"])]])


def forecast_vs_run(config: Any, work: Path, out: dict[str, Any]) -> None:
    """jobs.attribute --plan's forecast of the run just measured (jobs.plan.forecast, the same config, into an
    output folder that does not exist): ``plan_images_per_second`` (one actor's steady speed, 1 / its seconds per
    image), ``plan_ratio_to_steady`` (that over the run's steady speed: how far the forecast is off), ``plan_seconds``
    (what the forecast cost), ``plan_peak_gpu_memory_bytes`` and ``plan_output_bytes_ratio`` (forecast output bytes
    over the bytes the run wrote)."""
    from jobs.common import expand_shards
    from jobs.plan import forecast
    from workers.attribution_worker import AttributionWorker

    start = time.perf_counter()
    settings = dataclasses.replace(config, out=str(work / "plan_out"), overwrite=False)
    plan = forecast(settings, config.worker, expand_shards(config.shards), settings.out,
                    models.preprocessing_for(config.worker.model, config.worker.weights), AttributionWorker)
    out["plan_seconds"] = time.perf_counter() - start
    out["plan_images_per_second"] = 1 / plan["per_image"]["actor"]
    steady = out.get("steady_images_per_second")
    out["plan_ratio_to_steady"] = out["plan_images_per_second"] / steady if steady else None
    out["plan_peak_gpu_memory_bytes"] = plan["trial"]["peak_device_bytes"]
    written = sum(f.stat().st_size for f in Path(config.out, "attributions").rglob("*.parquet"))
    out["plan_output_bytes_ratio"] = plan["output_bytes"] / written if written else None
    out["plan_steps_seconds_per_image"] = {k: v["seconds_per_image"] for k, v in plan["steps"].items()}


def section_evaluate(plan: Plan, report: dict, work: Path, shards: Callable[[], Shards]) -> None:
    """jobs.evaluate's perturbation metrics: end to end, in process, and the forward-pass floor."""
    import pyarrow as pa

    from jobs.attribute import AttributeConfig
    from jobs.attribute import run as attribute_run
    from jobs.evaluate import EvaluateJobConfig
    from jobs.evaluate import run as evaluate_run
    from workers.attribution_worker import WorkerConfig
    from workers.decode import decode_batch
    from workers.evaluate_worker import EvaluateConfig, EvaluateWorker
    from workers.shards import RAW_SCHEMA, read_shard, shard_name
    from workers.sink import OutputStore

    out: dict[str, Any] = report["evaluate"]
    data = shards()
    device, batch, model = plan.device, plan.pipeline_batch, plan.pipeline_model
    count, total = 0, 0
    while count < len(data.paths) and total < plan.evaluate_images:
        total += data.sizes[count]
        count += 1
    uris = [str(p) for p in data.paths[:count]]
    maps_dir = report["pipeline"].get("maps_dir")
    methods = report["pipeline"].get("methods")
    committed = set(OutputStore(maps_dir).committed()) if maps_dir else set()
    if not maps_dir or not {shard_name(u) for u in uris} <= committed:
        maps_dir, methods = str(work / "maps_evaluate"), ["gradcam"]
        worker = WorkerConfig(model=model, methods=methods, targets="top1", device=None if device.type == "cuda"
                              else "cpu")
        attribute_run(AttributeConfig(shards=uris, out=maps_dir, worker=worker, batch_size=batch, quiet=True,
                                      overwrite=True, gpus_per_worker=actor_gpus(device)))
        out["maps"] = "a gradcam top1 run made for this section (the pipeline section's maps were not there)"
    else:
        out["maps"] = "the pipeline section's maps"
    precision_field = "precision" in {f.name for f in dataclasses.fields(EvaluateConfig)}
    precision = plan.pipeline_precision if precision_field else None
    ecfg = EvaluateConfig(attributions=maps_dir, model=model, metrics=list(plan.evaluate_metrics),
                          device=None if device.type == "cuda" else "cpu",
                          **({"precision": precision} if precision_field else {}))
    per_map = 0
    if "morf" in ecfg.metrics:
        per_map += len(ecfg.morf_fractions())
    if "lerf" in ecfg.metrics:
        per_map += len(ecfg.morf_fractions())
    if "insertion" in ecfg.metrics:
        per_map += len(ecfg.insertion_fractions()) + 1  # + the unperturbed image's reference forward
    for name in ("road_morf", "road_lerf"):
        if name in ecfg.metrics:
            per_map += len(ecfg.road_fractions)
    forwards_per_image = per_map * len(methods)  # one primary (top-1) map per image and method
    out.update(model=model, metrics=ecfg.metrics, methods=methods, shards=count, images=total, batch=batch,
               chunk_size=ecfg.chunk_size, forwards_per_image=forwards_per_image,
               precision=precision or "torch defaults (jobs.evaluate has no precision option yet)")

    job = EvaluateJobConfig(out=str(work / "metrics"), worker=ecfg, shards=uris, dataset_metrics=[],
                            batch_size=batch, overwrite=True, quiet=True, gpus_per_worker=actor_gpus(device))
    start = time.perf_counter()
    summary = evaluate_run(job)
    seconds = time.perf_counter() - start
    out.update(seconds=seconds, samples=summary["samples"], metric_rows=summary["metric_rows"],
               errors=summary["errors"], images_per_second=summary["samples"] / seconds if seconds > 0 else None)
    if summary["samples"] != total or summary["errors"]:
        out["problem"] = f"{summary['samples']} of {total} images done, {summary['errors']} error rows"

    # the actor class in this process: decoded batches in, metric rows out (no Ray), steady state
    rows: list[dict] = []
    for uri in uris:
        rows += read_shard(uri)
        if len(rows) >= plan.evaluate_worker_images:
            break
    rows = rows[:plan.evaluate_worker_images]
    preprocessing = models.preprocessing_for(model, None)
    decoded = decode_batch(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), preprocessing)
    batches = [decoded.slice(i, batch) for i in range(0, decoded.num_rows, batch)]
    evaluator = EvaluateWorker(ecfg)
    timed = batches[1:] or batches
    if len(batches) > 1:
        evaluator(batches[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    for b in timed:
        evaluator(b)
    sync(device)
    worker_s = time.perf_counter() - start
    worker_images = sum(b.num_rows for b in timed)
    out.update(worker_images=worker_images, worker_seconds=worker_s, worker_images_per_second=worker_images / worker_s)
    spec = evaluator.spec
    del evaluator

    # floor: the same perturbed images (count per image) through the model, bare, in the job's chunks
    chunk = ecfg.chunk_size
    size = spec.preprocessing.input_size
    floor_forwards = total * forwards_per_image
    if plan.evaluate_floor_forwards:
        floor_forwards = min(floor_forwards, plan.evaluate_floor_forwards)
    chunks = max(1, math.ceil(floor_forwards / chunk))
    x = torch.randn(chunk, 3, size, size, generator=torch.Generator().manual_seed(plan.seed)).to(device)
    context = compute_precision(precision, device) if precision else contextlib.nullcontext()
    with torch.inference_mode(), context:
        spec.module(x)  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(chunks):
            spec.module(x).float().softmax(dim=1)
        sync(device)
        floor_s = time.perf_counter() - start
    fps = chunks * chunk / floor_s
    out.update(floor_forwards_timed=chunks * chunk, floor_seconds=floor_s, floor_forwards_per_second=fps,
               floor_images_per_second=fps / forwards_per_image)
    out["ratio_to_floor"] = out["images_per_second"] / out["floor_images_per_second"]
    out["worker_ratio_to_floor"] = out["worker_images_per_second"] / out["floor_images_per_second"]
    del spec, x
    free_memory(device)
    print_table(f"(d) evaluate: {model} {','.join(ecfg.metrics)} on {total} images x {len(methods)} method(s), "
                f"{forwards_per_image} forwards per image, chunks of {chunk}, {device}",
                ["run", "img/s", "x floor"],
                [[f"jobs.evaluate end to end ({seconds:.1f} s)", fmt(out["images_per_second"]),
                  fmt(out["ratio_to_floor"], 2)],
                 [f"EvaluateWorker in process ({worker_images} images)", fmt(out["worker_images_per_second"]),
                  fmt(out["worker_ratio_to_floor"], 2)],
                 [f"forward floor ({fps:.0f} forwards/s)", fmt(out["floor_images_per_second"]), "1.00"]])
