"""``--plan`` of jobs.attribute and jobs.evaluate: what a run will cost, measured on its own hardware before it starts.

One Ray task with the resources of one of the run's actors (so on a cluster it lands where the actors would, on a
GPU node, with the same device and precision) runs the first batches of the first shard still to do through the job's
own steps (workers.trial: read, decode, the actor class, the write step into a temporary directory). From that, and
the number of images still to do (counted from the ``shards.json`` that jobs.make_shards writes beside the shards,
else assumed equal to the tried shard's), the driver forecasts per step of the actor (a method; for jobs.evaluate a
metric family, and the reading of the maps): seconds per image, share of the actor's time, actor time for the whole
run; per output group (a method; a metric): rows per image, stored bytes per row, output bytes; and for the run:
its wall time with the pool's actors, and the CPUs the read, decode and write steps need per actor to keep pace.

Assumptions, printed with the table: the steady state is the batches after the first (the first pays the warm-up;
with one batch its time is used, flagged); the actors scale linearly (one per GPU they do: nothing is shared but the
network and the output store); the write step was timed into a local temporary directory (to an object store it
also uploads, which costs bandwidth, not much CPU). Nothing is written to ``--out``.
"""
from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from typing import Any, Callable

from attribution.data.shards import MANIFEST
from jobs.common import ensure_ray
from jobs.scaffold import ActorJobSettings, actor_plan
from schemas.storage import resolve_filesystem
from workers.shards import shard_name
from workers.sink import OutputStore
from workers.trial import trial_batches

def shard_sizes(uris: list[str]) -> dict[str, int | None]:
    """{shard URI: its number of samples} from the ``shards.json`` of each shard's directory (None where the shard
    is not listed there or there is no such file; an unreadable one counts as none). One read per directory."""
    listed: dict[str, dict[str, int]] = {}
    sizes: dict[str, int | None] = {}
    for uri in uris:
        directory = posixpath.dirname(uri)
        if directory not in listed:
            listed[directory] = _listed_sizes(posixpath.join(directory, MANIFEST))
        sizes[uri] = listed[directory].get(shard_name(uri))
    return sizes


def _listed_sizes(manifest_uri: str) -> dict[str, int]:
    try:
        fs, path = resolve_filesystem(manifest_uri)
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read().decode("utf-8"))
        return {entry["file"]: int(entry["samples"]) for shard_set in manifest.get("sets", {}).values()
                for entry in shard_set.get("shards", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def forecast(settings: ActorJobSettings, worker_config: Any, uris: list[str], out: str, preprocessing: Any,
             worker_cls: type, batches: int = 2, write: Callable[..., Any] | None = None,
             results: str = "attributions", group: str = "method",
             trial: Callable[..., dict] = trial_batches) -> dict[str, Any]:
    """Measure one actor's first ``batches`` batches of the first shard still to do (workers.trial.trial_batches,
    with the job's ``write`` step, ``results`` column and ``group`` column) and forecast the run of ``uris`` into
    ``out`` (committed shards there are done already, unless ``settings.overwrite``).

    Returns :func:`summarise`'s dict plus ``shards``, ``shards_to_do``, ``images_to_do``, ``images_counted``
    (images of shards listed in a shards.json; the rest are assumed as large as the tried shard), ``group`` and
    ``actors`` ({workers, gpus, cpus, batch_size, device, precision})."""
    store = OutputStore(out)
    committed = set() if settings.overwrite else set(store.committed())
    to_do = [u for u in uris if shard_name(u) not in committed]
    tried = to_do or uris[:1]
    ensure_ray(settings.address)
    import ray

    gpus, workers, cpus, batch_size, config = actor_plan(settings, worker_config)
    settings.say()(f"plan: trying {batches} batch{'es' * (batches > 1)} from {shard_name(tried[0])} on in one "
                   f"actor ...")
    task = ray.remote(trial).options(num_gpus=gpus, num_cpus=cpus, max_retries=0)
    measured = ray.get(task.remote(worker_cls, config, tried, preprocessing, batch_size, batches, write, results,
                                   group))
    sizes = shard_sizes(to_do)
    counted = sum(n for n in sizes.values() if n is not None)
    assumed = sum(1 for n in sizes.values() if n is None) * measured["shard_samples"]
    plan = summarise(measured, counted + assumed, workers)
    plan.update({"shards": len(uris), "shards_to_do": len(to_do), "images_to_do": counted + assumed,
                 "images_counted": counted, "group": group,
                 "actors": {"workers": workers, "gpus": gpus, "cpus": cpus, "batch_size": batch_size,
                            "device": config.device, "precision": config.precision}})
    return plan


def summarise(trial: dict[str, Any], images: int, workers: int) -> dict[str, Any]:
    """The forecast for ``images`` images on ``workers`` actors from one actor's trial (workers.trial).

    Returns ``trial``, ``steady`` (whether batches after the first were timed: the first is the warm-up and is left
    out when there are more), ``per_image`` (seconds per image: ``actor`` (its whole call), ``read``, ``decode``,
    ``write``; ``cpus_per_actor``: the CPUs read + decode + write need per actor to keep pace), ``steps`` ({the
    worker's step (a method, a metric family): seconds_per_image, share of the actor's call, actor_hours}),
    ``outputs`` ({group value (a method, a metric): rows_per_image, bytes_per_row, output_bytes}), ``actor_hours``,
    ``wall_hours`` (with ``workers`` actors), ``output_bytes`` (everything the write step stages, all formats),
    ``warnings`` (lines)."""
    timed = trial["batches"][1:] or trial["batches"]
    timed_images = sum(b["images"] for b in timed)
    actor = sum(b["seconds"] for b in timed) / timed_images
    per_image = {"actor": actor, "read": trial["read_seconds"] / max(1, trial["read_samples"]),
                 "decode": trial["decode_seconds"] / trial["images"],
                 "write": sum(b["write_seconds"] for b in timed) / timed_images}
    per_image["cpus_per_actor"] = (per_image["read"] + per_image["decode"] + per_image["write"]) / actor
    seconds: dict[str, float] = defaultdict(float)
    for b in timed:
        for step, total in b["steps"].items():
            seconds[step] += total / timed_images
    steps = {step: {"seconds_per_image": s, "share": s / actor, "actor_hours": s * images / 3600}
             for step, s in seconds.items()}
    outputs = {name: {"rows_per_image": rows / trial["images"], "bytes_per_row": trial["group_bytes"][name] / rows,
                      "output_bytes": trial["group_bytes"][name] / trial["images"] * images}
               for name, rows in trial["group_rows"].items()}
    warnings = [f"warning: {m} ran out of device memory at {trial['batch_size']} images; it ran {n} per call "
                f"(a smaller --batch-size may be faster)" for m, n in trial["chunk_sizes"].items()]
    errors = sum(b["error_rows"] for b in trial["batches"])
    if errors:
        warnings.append(f"warning: the trial's {trial['images']} images gave {errors} error rows, e.g. "
                        f"{trial['errors'][0] if trial['errors'] else '?'}")
    return {"trial": trial, "steady": len(trial["batches"]) > 1, "per_image": per_image, "steps": steps,
            "outputs": outputs, "actor_hours": actor * images / 3600,
            "wall_hours": actor * images / 3600 / max(1, workers),
            "output_bytes": trial["staged_bytes"] / trial["images"] * images, "warnings": warnings}


def plan_lines(plan: dict[str, Any], out: str) -> list[str]:
    """The forecast as printed: a header, one line per step of the actor (and per output group where those are not
    the same, e.g. metric families and metrics), the run's totals and the assumptions."""
    t, a, p = plan["trial"], plan["actors"], plan["per_image"]
    first, rest = t["batches"][0], t["batches"][1:]
    timing = (f"batch 1 (warm-up) {first['seconds']:.1f} s, then {_mean(rest, 'seconds'):.1f} s per batch"
              if rest else f"one batch, {first['seconds']:.1f} s, warm-up included (only the steady state of "
                           f"two or more batches is a forecast)")
    memory = (f"; peak device memory {t['peak_device_bytes'] / 2**30:.1f} GiB"
              if t["peak_device_bytes"] is not None else "")
    counted = ("" if plan["images_counted"] == plan["images_to_do"] else
               f" ({plan['images_to_do'] - plan['images_counted']:,} assumed: shards without a shards.json entry "
               f"counted as {t['shard_samples']} images like the tried one)")
    lines = [f"plan: {plan['shards']} shards, {plan['shards_to_do']} to do, {plan['images_to_do']:,} images{counted}",
             f"trial: {t['images']} images in batches of {t['batch_size']} on {t['device_name']} ({t['device']}, "
             f"{a['precision']}, {t['threads']} threads): {timing}{memory}"]
    steps, outputs, group = plan["steps"], plan["outputs"], plan.get("group", "method")
    merged = set(steps) == set(outputs)
    lines.append(f"{('step' if not merged else group):<24}{'s/img':>9}{'share':>8}{'actor time':>12}"
                 + (f"{'rows/img':>10}{'KiB/row':>9}{'output':>10}" if merged else ""))
    for step, m in sorted(steps.items(), key=lambda kv: -kv[1]["seconds_per_image"]):
        line = f"{step:<24}{m['seconds_per_image']:>9.4f}{m['share']:>8.0%}{_duration(m['actor_hours']):>12}"
        if merged:
            o = outputs[step]
            line += f"{o['rows_per_image']:>10.1f}{o['bytes_per_row'] / 1024:>9.1f}{_size(o['output_bytes']):>10}"
        lines.append(line)
    lines.append(f"{'actor call (all)':<24}{p['actor']:>9.4f}{1:>8.0%}{_duration(plan['actor_hours']):>12}"
                 + (f"{'':>19}{_size(plan['output_bytes']):>10}" if merged else ""))
    if not merged:
        lines.append(f"{group:<24}{'rows/img':>9}{'KiB/row':>9}{'output':>10}")
        for name, o in sorted(outputs.items()):
            lines.append(f"{name:<24}{o['rows_per_image']:>9.1f}{o['bytes_per_row'] / 1024:>9.2f}"
                         f"{_size(o['output_bytes']):>10}")
    lines.append(f"outside the actors, per image: read {p['read']:.4f} s, decode {p['decode']:.4f} s, write "
                 f"{p['write']:.4f} s of CPU: {p['cpus_per_actor']:.2f} CPUs per actor keep pace with it")
    lines.append(f"forecast: {plan['images_to_do']:,} images on {a['workers']} actor{'s' * (a['workers'] > 1)} x "
                 f"({a['gpus']:g} GPU, {a['cpus']:g} CPU): ~{_duration(plan['wall_hours'])} of compute, "
                 f"~{_size(plan['output_bytes'])} to {out} (actors scale linearly; the write step was "
                 f"timed to a local disk)")
    return lines + plan["warnings"]


def run_plan(settings: ActorJobSettings, worker_config: Any, uris: list[str], out: str, preprocessing: Any,
             worker_cls: type, batches: int, json_path: str | None, **job_steps: Any) -> dict[str, Any]:
    """:func:`forecast` (``job_steps``: its ``write``, ``results``, ``group``), printed (:func:`plan_lines`) and,
    with ``json_path``, written there as JSON."""
    plan = forecast(settings, worker_config, uris, out, preprocessing, worker_cls, batches, **job_steps)
    for line in plan_lines(plan, out):
        print(line, flush=True)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(plan, f, indent=1, default=str)
    return plan


def _mean(batches: list[dict], key: str) -> float:
    return sum(b[key] for b in batches) / len(batches)


def _size(num_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"


__all__ = ["forecast", "plan_lines", "run_plan", "shard_sizes", "summarise"]
