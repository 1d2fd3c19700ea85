"""python -m jobs.attribute: WebDataset shards in, attribution maps out (Parquet and/or NPZ), resumable.

    python -m jobs.attribute --shards 'runs/sample_shards/photos-{000000..000001}.tar' \\
        --model efficientnet_lite0 --weights imagenet --methods tr_gbp,a_fmi --targets top5 --out runs/maps
    python -m jobs.attribute … --plan [plan.json]     # forecast the run's time and storage first (jobs.plan)

The pipeline reads like a sentence: read shards -> decode on CPU -> attribute in actors that each pin one model on
one GPU (or CPU) -> write parts -> the driver commits each shard once all its samples are written. A rerun with the
same --out skips committed shards; --overwrite starts again.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from attribution import models
from jobs.common import JobError, expand_shards, fail
from jobs.plan import run_plan
from jobs.scaffold import (ActorJobSettings, ShardedRun, actor_settings, actor_stage, add_actor_arguments,
                           add_model_arguments, add_shards_argument, check_methods, parse_method_options,
                           parse_methods, read_shards, require_at_least_one, run_cli)
from schemas.maps import MAP_DTYPES
from workers.attribution_worker import TARGET_KINDS, AttributionWorker, WorkerConfig
from workers.staging import write_parts

FORMATS = {"parquet": ("parquet",), "npz": ("npz",), "both": ("parquet", "npz")}


@dataclass
class AttributeConfig(ActorJobSettings):
    """One attribution run: shards in, maps to ``out``; the actor resources as ActorJobSettings."""

    shards: list[str]
    out: str
    worker: WorkerConfig
    format: str = "parquet"
    extra: dict[str, Any] = field(default_factory=dict)


def run(config: AttributeConfig, worker_cls: type = AttributionWorker, worker_kwargs: dict | None = None) -> dict:
    """Run (or resume) an attribution job; returns the summary that is also written to the manifest. With
    ``config.plan`` set, only forecast the run (jobs.plan.run_plan) and return the forecast.

    ``worker_cls``/``worker_kwargs``: the actor class and extra constructor arguments (fault-injection tests).
    """
    check_methods(config.worker.methods, config.worker.options_for, config.worker.precision)
    input_size = models.preprocessing_for(config.worker.model, config.worker.weights).input_size
    for method in config.worker.methods:
        try:
            config.worker.layout_for(method, input_size)
        except ValueError as exc:
            raise JobError(f"--map-size/--map-dtype for {method}: {exc}") from None
    uris = expand_shards(config.shards)
    if config.plan is not None:
        return run_plan(config, config.worker, uris, config.out, models.preprocessing_for(config.worker.model,
                        config.worker.weights), worker_cls, config.plan_batches, config.plan or None,
                        write=functools.partial(write_parts, formats=FORMATS[config.format]))
    job = ShardedRun("attribute", config.out, _config_key(config), uris, config)
    job.say(f"{len(uris)} shards, {job.already_committed} already committed, {len(job.pending)} to do -> "
            f"{config.out}")
    job.process(lambda pending: _pipeline(config, pending, worker_cls, worker_kwargs or {}).iter_rows(),
                noun="maps")
    return job.finish("maps_written", noun="maps")


def _pipeline(config: AttributeConfig, pending: list[str], worker_cls: type, worker_kwargs: dict):
    """read -> decode (CPU tasks) -> attribute (actor pool) -> write parts (CPU tasks)."""
    preprocessing = models.preprocessing_for(config.worker.model, config.worker.weights)
    rows, _ = actor_stage(read_shards(pending), config, worker_cls, config.worker, preprocessing, worker_kwargs)
    return rows.map_batches(write_parts, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
                            fn_kwargs={"uri": config.out, "formats": FORMATS[config.format]})


def _config_key(config: AttributeConfig) -> dict:
    """The parts of a config that define its outputs (a resumed run must match them)."""
    w = config.worker
    return {"model": w.model, "weights": w.weights, "methods": w.methods, "method_options": w.method_options,
            "targets": w.targets, "map_dtype": w.map_dtype, "fmi": w.fmi, "layers": w.layers,
            **({"precision": w.precision} if w.precision != "fp32" else {}),  # fp32 runs keep their old key
            **{name: getattr(w, name) for name in ("map_size", "map_sizes", "map_dtypes") if getattr(w, name)},
            "format": config.format}


def parse_args(argv: list[str] | None = None) -> AttributeConfig:
    """CLI -> AttributeConfig; any bad argument exits with one error line."""
    p = argparse.ArgumentParser(prog="python -m jobs.attribute", description=__doc__.split("\n")[0])
    add_shards_argument(p)
    add_model_arguments(p)
    p.add_argument("--targets", default="top1", choices=TARGET_KINDS)
    p.add_argument("--out", required=True, help="output directory or URI")
    p.add_argument("--format", default="parquet", choices=sorted(FORMATS))
    p.add_argument("--map-size", default=None, metavar="S[,METHOD=S…]",
                   help="store maps at S×S (area-averaged; default: the input size), per method with METHOD=S, "
                        "e.g. 56,gradcam=14,a_fmi=14; readers upsample back to the input size")
    p.add_argument("--map-dtype", default="float16", metavar="DTYPE[,METHOD=DTYPE…]",
                   help=f"stored map dtype: {', '.join(MAP_DTYPES)} (int8: q·scale/127; uint8: non-negative maps, "
                        "q·scale/255), per method with METHOD=DTYPE, e.g. int8,saliency=uint8")
    p.add_argument("--fmi", action="store_true", help="store A-FMI's FMI vectors")
    p.add_argument("--layers", action="store_true", help="store TR-GBP's per-layer maps")
    add_actor_arguments(p, precision_help="compute precision of the forward/backward passes (bf16/fp16: autocast); "
                        "maps are float32", overwrite_help="delete previous outputs in --out first", plannable=True)
    a = p.parse_args(argv)
    methods = parse_methods(a.methods)
    if a.model not in models.MODEL_NAMES:
        fail(f"unknown model {a.model!r}; known: {', '.join(models.MODEL_NAMES)}")
    options = parse_method_options(a.method_options, example='{"a_fmi": {"reference": "white"}}')
    require_at_least_one(a, ("batch_size", "workers", "shards_per_dataset", "plan_batches"))
    map_size, map_sizes = per_method("--map-size", a.map_size, methods, _map_size)
    map_dtype, map_dtypes = per_method("--map-dtype", a.map_dtype, methods, _map_dtype)
    worker = WorkerConfig(model=a.model, weights=a.weights, methods=methods, method_options=options,
                          targets=a.targets, map_dtype=map_dtype or "float16", map_size=map_size, map_sizes=map_sizes,
                          map_dtypes=map_dtypes, precision=a.precision, fmi=a.fmi, layers=a.layers, device=a.device)
    return AttributeConfig(shards=a.shards, out=a.out, worker=worker, format=a.format, **actor_settings(a))


def per_method(flag: str, text: str | None, methods: list[str], cast: Callable[[str], Any]) -> tuple[Any, dict]:
    """``"56,gradcam=14"`` -> (56, {"gradcam": 14}): a default and per-method values (``cast`` checks each and
    raises ValueError); exits with one error line on a malformed item or a method not in ``methods``."""
    default, overrides = None, {}
    for item in [i.strip() for i in (text or "").split(",") if i.strip()]:
        method, _, value = item.rpartition("=")
        try:
            parsed = cast(value.strip())
        except ValueError as exc:
            fail(f"{flag} {text!r}: {exc}")
        if not method:
            if default is not None:
                fail(f"{flag} {text!r}: give one default value, then METHOD=VALUE items")
            default = parsed
        elif method.strip() not in methods:
            fail(f"{flag} names {method.strip()!r}, which is not in --methods")
        else:
            overrides[method.strip()] = parsed
    return default, overrides


def _map_size(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"a map size is a positive number of pixels, got {value!r}")
    return int(value)


def _map_dtype(value: str) -> str:
    if value not in MAP_DTYPES:
        raise ValueError(f"a map dtype is one of {', '.join(MAP_DTYPES)}, got {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    config = parse_args(argv)
    weights = config.worker.weights
    if weights and not os.path.exists(weights) and any(c in weights for c in "/\\") and "://" not in weights:
        fail(f"checkpoint {weights} does not exist")
    return run_cli(config, run)


if __name__ == "__main__":
    sys.exit(main())
