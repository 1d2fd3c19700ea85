"""python -m jobs.evaluate: an attribution run's maps + the shards' images in, per-image metric rows out, resumable.

    python -m jobs.evaluate --attributions runs/maps --out runs/metrics \\
        [--metrics ebpg,ibd,morf,lerf,insertion,road_morf,road_lerf,class_discrimination,seconds,fmi]
        [--methods gbp,tr_gbp] [--road-fractions 0.1,0.2,…,0.9] [--road-noise 0.01] [--road-seed 0]
        [--road-dtype float64|float32]

With a model-based metric (MoRF, LeRF, insertion, ROAD MoRF/LeRF): read shards -> decode (CPU tasks) -> evaluate
in actors that pin the attribution run's model on one GPU (or CPU), fetching each batch's maps from the attribution
Parquet by key, and batching all perturbation steps of all its images through the model -> write parts -> the
driver commits each shard. With map-only metrics alone (EBPG, IBD, class discrimination, time): the attribution
Parquet, one shard per CPU task, streamed in key order -> map-only metrics -> write parts -> commit; no image is
read and no model loaded. Either way the map-only metrics come from one function (workers.map_metrics).
Dataset-level metrics (FMI prototype accuracy) are computed by the driver at the end from the attribution rows.
A rerun with the same --out skips committed shards.
"""
from __future__ import annotations

import argparse
import sys
import zlib
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from attribution import models
from attribution.metrics.road import DEFAULT_FRACTIONS as ROAD_FRACTIONS
from attribution.metrics.road import PIXEL_NOISE, SOLVE_DTYPES
from jobs.common import JobError, expand_shards, fail
from jobs.plan import run_plan
from jobs.scaffold import (ActorJobSettings, ShardedRun, actor_settings, actor_stage, add_actor_arguments,
                           add_shards_argument, read_shards, require_at_least_one, run_cli)
from schemas.metrics import validate_dataset_metrics
from schemas.reader import OutputReader
from schemas.storage import StorageError
from workers.evaluate_worker import METRICS, MODEL_METRICS, EvaluateConfig, EvaluateWorker
from workers.map_metrics import MapMetricsConfig, ShardMapMetrics
from workers.shards import shard_name
from workers.staging import write_metric_parts

DATASET_METRICS = ("fmi",)
ALL_METRICS = METRICS + DATASET_METRICS
ROAD_METRICS = ("road_morf", "road_lerf")
DEFAULT_METRICS = tuple(m for m in ALL_METRICS if m not in ROAD_METRICS)  # ROAD (a CG solve per step) is opt-in


@dataclass
class EvaluateJobConfig(ActorJobSettings):
    """One evaluation run. ``shards`` None: the attribution run's own shards (from its manifest); the actor
    resources as ActorJobSettings."""

    out: str
    worker: EvaluateConfig
    shards: list[str] | None = None
    dataset_metrics: list[str] = field(default_factory=lambda: list(DATASET_METRICS))


def attribution_run(uri: str) -> dict:
    """The manifest of the attribution run at ``uri``; JobError unless it is one with committed shards."""
    reader = OutputReader(uri)
    manifest = reader.manifest()
    if not manifest or manifest.get("job") != "attribute":
        raise JobError(f"{uri} is not the output of jobs.attribute (no attribute manifest.json)")
    if not reader.committed():
        raise JobError(f"{uri} has no committed shards: run (or finish) jobs.attribute first")
    return manifest


def run(config: EvaluateJobConfig) -> dict:
    """Run (or resume) an evaluation; returns the summary that is also written to the manifest. With ``config.plan``
    set, only forecast it (jobs.plan.run_plan: model-based metrics) and return the forecast."""
    source = attribution_run(config.worker.attributions)
    committed_maps = OutputReader(config.worker.attributions).committed()
    uris = expand_shards(config.shards) if config.shards else [
        entry["uri"] for name, entry in sorted(source["shards"].items()) if name in committed_maps and "uri" in entry]
    if not uris:
        raise JobError(f"no shards to evaluate: give --shards (the manifest of {config.worker.attributions} "
                       "records none)")
    say = config.say()
    missing = [u for u in uris if shard_name(u) not in committed_maps]
    if missing:
        say(f"warning: {len(missing)} shards have no committed maps in {config.worker.attributions} and are "
            f"skipped: {[shard_name(u) for u in missing[:5]]}")
        uris = [u for u in uris if shard_name(u) in committed_maps]
        if not uris:
            raise JobError(f"none of the shards has committed maps in {config.worker.attributions}")
    if config.plan is not None:
        if not set(config.worker.metrics) & set(MODEL_METRICS):
            raise JobError(f"--plan forecasts the model-based metrics ({', '.join(MODEL_METRICS)}); map-only "
                           "metrics load no model and run on CPU tasks")
        preprocessing = models.preprocessing_for(config.worker.model, config.worker.weights)
        return run_plan(config, config.worker, uris, config.out, preprocessing, EvaluateWorker, config.plan_batches,
                        config.plan or None, write=write_metric_parts, results="metrics", group="metric")
    job = ShardedRun("evaluate", config.out, _config_key(config), uris, config, recorded={"shards": uris},
                     what="an evaluation")
    say(f"{len(uris)} shards, {job.already_committed} already evaluated, {len(job.pending)} to do -> {config.out}")
    pipeline = _pipeline if set(config.worker.metrics) & set(MODEL_METRICS) else _map_only_pipeline
    job.process(lambda pending: pipeline(config, pending).iter_rows(), noun="metric rows")
    dataset = dataset_metrics(config.worker.attributions, config.worker.methods) \
        if "fmi" in config.dataset_metrics else pa.table({})
    if dataset.num_rows:
        pq.write_table(dataset, job.store.path("dataset_metrics.parquet"), filesystem=job.store.fs)
        for row in dataset.to_pylist():
            say(f"{row['model']} {row['method']}: {row['metric']} = {row['value']:.4f} on {row['n']} images")
    return job.finish("metric_rows", noun="metric rows", extra={"dataset_metrics": dataset.num_rows})


def _pipeline(config: EvaluateJobConfig, pending: list[str]):
    """read -> decode (CPU tasks) -> evaluate (actor pool) -> write parts (CPU tasks)."""
    preprocessing = models.preprocessing_for(config.worker.model, config.worker.weights)
    rows, _ = actor_stage(read_shards(pending), config, EvaluateWorker, config.worker, preprocessing)
    return rows.map_batches(write_metric_parts, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
                            fn_kwargs={"uri": config.out})


def _map_only_pipeline(config: EvaluateJobConfig, pending: list[str]):
    """shard names -> map-only metrics from the attribution Parquet (CPU tasks, one shard each) -> write parts."""
    import ray

    worker = config.worker
    metrics_config = MapMetricsConfig(attributions=worker.attributions, metrics=list(worker.metrics),
                                      methods=worker.methods, border=worker.border)
    shards = [{"shard": shard_name(u)} for u in pending]
    return (
        ray.data.from_items(shards, override_num_blocks=len(shards))
        .map_batches(ShardMapMetrics, fn_constructor_kwargs={"config": metrics_config}, batch_format="pyarrow",
                     batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, len(shards))),
                     num_cpus=1)
        .map_batches(write_metric_parts, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
                     fn_kwargs={"uri": config.out})  # one block per shard already: one part per shard
    )


def dataset_metrics(attributions: str, methods: list[str] | None = None) -> pa.Table:
    """FMI prototype-classification accuracy (A-FMI §4.1) of every a_fmi configuration in an attribution run.

    Uses the rows whose target is the label (run jobs.attribute with ``--targets label --fmi``): FMI^c of an
    image of class c is its feature vector. Prototypes are class means over the training images, test images
    are classified by cosine similarity. Split: shards whose name starts with ``train`` give the prototypes
    and the other shards are tested; without training shards, a 2-fold split by a hash of the key (accuracy =
    mean of the two folds). Rows of schemas.metrics.DATASET_METRIC_SCHEMA; empty when no FMI vectors exist.
    """
    import json

    import numpy as np
    import torch

    from attribution.metrics.faithfulness import prototype_accuracy
    from schemas.metrics import DATASET_METRIC_SCHEMA

    store = OutputReader(attributions)
    files = [store.path(f) for f in store.committed_files("attributions")]
    if not files or (methods and "a_fmi" not in methods):
        return DATASET_METRIC_SCHEMA.empty_table()
    columns = ["key", "shard", "model", "weights", "method", "options", "target", "label", "fmi"]
    table = pq.read_table(files, filesystem=store.fs, columns=columns,
                          filters=(pc.field("method") == "a_fmi") & pc.field("fmi").is_valid()
                          & (pc.field("target") == pc.field("label")))
    rows = []
    for (model, weights, options), group in table.to_pandas().groupby(["model", "weights", "options"],
                                                                     dropna=False):
        features = torch.tensor(np.stack(group["fmi"].to_list()), dtype=torch.float32)
        labels = torch.tensor(group["label"].to_numpy(), dtype=torch.long)
        is_train = group["shard"].str.startswith("train").to_numpy()
        if is_train.any() and (~is_train).any():
            folds = [(is_train, ~is_train)]
            detail = {"split": "train shards -> other shards", "train": int(is_train.sum()),
                      "test": int((~is_train).sum())}
        else:
            fold = np.array([zlib.crc32(k.encode()) % 2 for k in group["key"]]) == 0
            folds = [(fold, ~fold), (~fold, fold)]
            detail = {"split": "2-fold by crc32(key)", "fold_sizes": [int(fold.sum()), int((~fold).sum())]}
        accuracies = [prototype_accuracy(features[a], labels[a], features[b], labels[b])
                      for a, b in folds if a.any() and b.any()]
        if not accuracies:
            continue
        detail["folds"] = [round(float(x), 6) for x in accuracies]
        rows.append({"model": model, "weights": None if weights is None or weights != weights else weights,
                     "method": "a_fmi", "options": options, "metric": "fmi_prototype_accuracy",
                     "value": float(np.mean(accuracies)), "n": len(group), "detail": json.dumps(detail)})
    result = pa.Table.from_pylist(rows, schema=DATASET_METRIC_SCHEMA)
    validate_dataset_metrics(result)
    return result


def _config_key(config: EvaluateJobConfig) -> dict:
    """The parts of a config that define its outputs (a resumed run must match them)."""
    w = config.worker
    key = {"attributions": w.attributions, "model": w.model, "weights": w.weights, "metrics": w.metrics,
           "methods": w.methods, "morf_steps": w.morf_steps, "insertion_steps": w.insertion_steps,
           "lerf_abs_methods": w.lerf_abs_methods, "border": w.border}
    if set(ROAD_METRICS) & set(w.metrics):  # only then (runs without ROAD resume as before)
        key.update(road_fractions=list(w.road_fractions), road_noise=w.road_noise, road_seed=w.road_seed)
        if w.road_dtype != "float64":  # float64 runs keep their old key
            key["road_dtype"] = w.road_dtype
    if w.precision != "fp32":  # fp32 runs keep their old key
        key["precision"] = w.precision
    return key


def parse_args(argv: list[str] | None = None) -> EvaluateJobConfig:
    """CLI -> EvaluateJobConfig; any bad argument exits with one error line."""
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--attributions", required=True, help="output directory (or URI) of jobs.attribute")
    p.add_argument("--out", required=True, help="output directory or URI for the metric rows")
    add_shards_argument(p, required=False,
                        help="the shards the maps were computed on (default: those recorded by the attribution run)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated: {', '.join(ALL_METRICS)} (default: all but {', '.join(ROAD_METRICS)})")
    p.add_argument("--methods", default=None, help="comma-separated subset of the run's methods (default: all)")
    p.add_argument("--morf-steps", type=int, default=10, help="MoRF/LeRF curve points: 0, 1/n, …, 100%% of pixels")
    p.add_argument("--insertion-steps", type=int, default=20, help="insertion at PI = 100/n, …, 100%% (20: 5%% steps)")
    p.add_argument("--lerf-abs", default=",".join(EvaluateConfig.__dataclass_fields__["lerf_abs_methods"]
                                                  .default_factory()),
                   help="methods whose LeRF ranking uses |map| (signed gradient maps)")
    p.add_argument("--border", type=int, default=16, help="IBD's border width in map pixels")
    p.add_argument("--road-fractions", default=",".join(f"{f:g}" for f in ROAD_FRACTIONS),
                   help="ROAD: comma-separated shares of pixels removed, each in [0, 1)")
    p.add_argument("--road-noise", type=float, default=PIXEL_NOISE,
                   help="ROAD: σ of the imputation noise in [0, 1] pixel units (the authors' 0.01)")
    p.add_argument("--road-seed", type=int, default=0, help="ROAD: noise seed (per sample: crc32 of seed:key)")
    p.add_argument("--road-dtype", choices=tuple(SOLVE_DTYPES), default="float64",
                   help="ROAD: precision of the imputation solve (float32: 4-6x faster, pixels within ~1e-4)")
    p.add_argument("--chunk-size", type=int, default=64, help="perturbed images per forward pass")
    add_actor_arguments(p, precision_help="compute precision of the perturbed images' forward passes "
                        "(bf16/fp16: autocast)", overwrite_help="delete previous outputs in --out first",
                        plannable=True)
    a = p.parse_args(argv)
    wanted = [m.strip() for m in a.metrics.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in ALL_METRICS]
    if not wanted or unknown:
        fail(f"unknown metric {unknown[0] if unknown else '(none)'!r}; known: {', '.join(ALL_METRICS)}")
    require_at_least_one(a, ("morf_steps", "insertion_steps", "chunk_size", "batch_size", "workers",
                               "shards_per_dataset", "plan_batches"))
    if a.border < 0:
        fail("--border must be non-negative")
    try:
        road_fractions = [float(f) for f in a.road_fractions.split(",") if f.strip()]
    except ValueError:
        fail(f"--road-fractions: comma-separated numbers, got {a.road_fractions!r}")
    if not road_fractions or any(not 0 <= f < 1 for f in road_fractions) \
            or sorted(set(road_fractions)) != road_fractions:
        fail(f"--road-fractions must be increasing values in [0, 1), got {a.road_fractions!r}")
    if a.road_noise < 0:
        fail("--road-noise must be non-negative")
    try:
        source = attribution_run(a.attributions)
    except (JobError, StorageError) as exc:
        fail(str(exc))
    model, weights = source["config"]["model"], source["config"]["weights"]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    absent = [m for m in methods or [] if m not in source["config"]["methods"]]
    if absent:
        fail(f"method {absent[0]!r} is not in the attribution run {a.attributions} "
             f"(it has {', '.join(source['config']['methods'])})")
    worker = EvaluateConfig(attributions=a.attributions, model=model, weights=weights,
                            metrics=[m for m in wanted if m in METRICS], methods=methods,
                            morf_steps=a.morf_steps, insertion_steps=a.insertion_steps,
                            lerf_abs_methods=[m for m in a.lerf_abs.split(",") if m], border=a.border,
                            chunk_size=a.chunk_size, road_fractions=road_fractions, road_noise=a.road_noise,
                            road_seed=a.road_seed, road_dtype=a.road_dtype, precision=a.precision, device=a.device)
    return EvaluateJobConfig(out=a.out, worker=worker, shards=a.shards,
                             dataset_metrics=[m for m in wanted if m in DATASET_METRICS], **actor_settings(a))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    return run_cli(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
