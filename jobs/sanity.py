"""python -m jobs.sanity: cascading model-parameter randomisation (Adebayo et al. 2018; TR-GBP §5.2.2, Fig. 5/9/10).

    python -m jobs.sanity --model efficientnet_lite0 --weights imagenet \\
        --shards 'runs/sample_shards/photos-{000000..000001}.tar' --methods gbp,tr_gbp --out runs/sanity

read shards (the first --max-images samples) -> decode on CPU -> actors that pin the model compute, for each
image, every method's map on the original model and after each randomisation step (top block first, cumulative),
and the similarity of each map to the original -> the driver writes the rows and draws the figures:

    DIR/sanity/part-*.parquet   one row per (image, method, step): Spearman of map and of |map|, SSIM (schemas.metrics)
    DIR/errors/part-*.parquet   bad samples and failed methods (schemas.attributions.ERROR_SCHEMA)
    DIR/sanity_maps.npz         maps of the --grid-images first images: maps [G, S+1, M, H, W], images, names
    DIR/sanity_grid.png         rows = methods per grid image, columns = original then each step (TR-GBP Fig. 5)
    DIR/sanity_similarity.png   mean similarity to the original per method vs step
    DIR/manifest.json           job, config, versions, blocks, summary (mean similarities per step)

A small-sample job: no resume; the driver writes the parts as batches arrive. --overwrite replaces the outputs of
a previous run; without it a non-empty DIR is refused.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attribution import models
from jobs.common import JobError, ensure_ray, expand_shards, fail
from jobs.scaffold import (ActorJobSettings, actor_settings, actor_stage, add_actor_arguments, add_model_arguments,
                           add_shards_argument, check_methods, parse_method_options, parse_methods, read_shards,
                           record_failure, require_at_least_one, run_cli, versions)
from schemas.attributions import ERROR_SCHEMA, validate_errors
from schemas.metrics import SANITY_SCHEMA, validate_sanity
from workers.sanity_worker import SANITY_TARGETS, SanityConfig, SanityWorker, grid_id
from workers.sink import OutputStore, parquet_options

OUTPUTS = ("sanity", "errors", "manifest.json", "sanity_maps.npz", "sanity_grid.png", "sanity_similarity.png")
METRIC_TITLES = {"spearman_abs": "Spearman rank correlation of |map|", "spearman": "Spearman rank correlation of map",
                 "ssim": "SSIM (min-max normalised maps)"}


@dataclass
class SanityJobConfig(ActorJobSettings):
    """One sanity run. ``max_images``: the first N samples read (bad ones included, as error rows);
    ``grid_images``: how many of the first good samples go into the figure and the NPZ; the actor resources as
    ActorJobSettings."""

    shards: list[str]
    out: str
    worker: SanityConfig
    max_images: int = 16
    grid_images: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


def run(config: SanityJobConfig) -> dict:
    """Run a sanity job; returns the summary that is also written to the manifest (see the module docstring)."""
    import ray

    check_methods(config.worker.methods, lambda m: config.worker.method_options.get(m, {}), config.worker.precision)
    blocks = _blocks(config.worker)
    uris = expand_shards(config.shards)
    store = OutputStore(config.out)
    _prepare(store, config)
    say = config.say()
    manifest = _manifest(config, uris, blocks)
    store.write_json("manifest.json", manifest)
    say(f"{len(uris)} shards, up to {config.max_images} images, {len(config.worker.methods)} methods x "
        f"{len(blocks) + 1} steps ({', '.join(blocks)}) -> {config.out}")

    start = time.perf_counter()
    ensure_ray(config.address)
    try:
        raw = read_shards(uris)
        raw.context.execution_options.preserve_order = True  # the same images, in shard order, on every run
        raw = raw.limit(config.max_images).materialize()
        keys = raw.select_columns(["shard", "key", "error"]).take_all()
        grid = [grid_id(r["shard"], r["key"]) for r in keys if r["error"] is None][:config.grid_images]
        worker = SanityConfig(**{**asdict(config.worker), "grid_keys": grid})
        outcome = _collect(_pipeline(config, raw, worker, ray), store, grid)
    except Exception as exc:
        record_failure(store, manifest, exc)
        raise
    rows, errors, grids = outcome
    elapsed = time.perf_counter() - start
    names = [""] + blocks
    similarity = _mean_similarity(store, config.worker.methods, len(names))
    outputs = {"rows": "sanity/", **({"errors": "errors/"} if errors else {})}
    if grids:
        outputs.update(_figures(store, config, grids, names, similarity, rows["images"]))
    elif config.grid_images:
        say("warning: no grid image could be computed; no maps or figures written")
    images = rows["images"]
    summary = {"samples": len(keys), "images": images, "rows": rows["rows"], "errors": errors,
               "grid_images": len(grids), "seconds": round(elapsed, 2),
               "images_per_second": round(images / elapsed, 4) if elapsed > 0 and images else 0.0,
               "similarity": similarity}
    manifest.update(status="complete", summary=summary, outputs=outputs)
    store.write_json("manifest.json", manifest)
    say(_similarity_text(similarity, names))
    say(f"done: {images} images, {rows['rows']} rows, {errors} errors in {summary['seconds']} s")
    for name, rel in outputs.items():
        say(f"  {name:<11} {store.path(rel)}")
    return summary


def _blocks(worker: SanityConfig) -> list[str]:
    """Block names of the model, from a weightless build of the architecture (on torch's meta device)."""
    import torch

    from attribution.sanity import randomisation_blocks
    if worker.model in models.MODEL_NAMES:
        with torch.device("meta"):
            spec = models.load(worker.model, None)
    else:  # a benchmark checkpoint given as --model: it names its (small) architecture
        spec = models.load(worker.model)
    names = [name for name, _ in randomisation_blocks(spec)]
    if worker.steps is not None and not 0 <= worker.steps <= len(names):
        raise JobError(f"--steps must be in 0..{len(names)} for {worker.model}, got {worker.steps}")
    return names[:worker.steps] if worker.steps is not None else names


def _prepare(store: OutputStore, config: SanityJobConfig) -> None:
    """Refuse a non-empty --out unless --overwrite; with it, delete this job's previous outputs."""
    info = store.fs.get_file_info(store.root)
    if info.type == pafs.FileType.File:
        raise JobError(f"--out {config.out} is a file, not a directory")
    if info.type == pafs.FileType.Directory:
        entries = store.fs.get_file_info(pafs.FileSelector(store.root))
        if entries and not config.overwrite:
            raise JobError(f"--out {config.out} is not empty; use --overwrite or another --out")
        for name in OUTPUTS:
            kind = store.fs.get_file_info(store.path(name)).type
            if kind == pafs.FileType.Directory:
                store.fs.delete_dir(store.path(name))
            elif kind == pafs.FileType.File:
                store.fs.delete_file(store.path(name))
    store.ensure()


def _pipeline(config: SanityJobConfig, raw, worker: SanityConfig, ray):
    """decode (CPU tasks) -> cascading randomisation (actor pool)."""
    return actor_stage(raw, config, SanityWorker, worker, _preprocessing(worker), gpu_batch=16, cpu_batch=4)[0]


def _preprocessing(worker: SanityConfig):
    """The model's preprocessing without building it (a benchmark checkpoint sets its own input size)."""
    if worker.weights is not None and worker.model in getattr(models, "BENCH_MODELS", ()):
        return models.preprocessing_for(worker.model, worker.weights)
    return models.preprocessing_for(worker.model)


def _collect(dataset, store: OutputStore, grid: list[str]) -> tuple[dict, int, dict[str, dict]]:
    """Write each arriving batch's rows as one validated part; keep the grid samples' maps.
    Returns ({"rows", "images"}, error rows, {grid id: npz arrays})."""
    rows = images = errors = 0
    grids: dict[str, dict] = {}
    for part, batch in enumerate(dataset.iter_batches(batch_format="pyarrow", batch_size=None)):
        sanity = _concat(batch.column("sanity").to_pylist(), SANITY_SCHEMA)
        failed = _concat(batch.column("errors").to_pylist(), ERROR_SCHEMA)
        validate_sanity(sanity)
        validate_errors(failed)
        if sanity.num_rows:
            _write_parquet(store, f"sanity/part-{part:05d}.parquet", sanity)
            rows += sanity.num_rows
            images += len({(s, k) for s, k in zip(sanity.column("shard").to_pylist(),
                                                  sanity.column("key").to_pylist())})
        if failed.num_rows:
            _write_parquet(store, f"errors/part-{part:05d}.parquet", failed)
            errors += failed.num_rows
        for shard, keys, blobs in zip(*(batch.column(c).to_pylist() for c in ("shard", "keys", "grid"))):
            for key, blob in zip(keys, blobs):
                if blob:
                    with np.load(io.BytesIO(blob)) as npz:
                        grids[grid_id(shard, key)] = {name: npz[name] for name in npz.files}
    ordered = {g: grids[g] for g in grid if g in grids}
    return {"rows": rows, "images": images}, errors, ordered


def _concat(blobs: list[bytes], schema: pa.Schema) -> pa.Table:
    tables = [pa.ipc.open_stream(b).read_all() for b in blobs if b]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _write_parquet(store: OutputStore, rel: str, table: pa.Table) -> None:
    store.fs.create_dir(store.path(rel.rsplit("/", 1)[0]), recursive=True)
    with store.fs.open_output_stream(store.path(rel)) as f:
        pq.write_table(table, f, **parquet_options(table.schema))  # the options of every table the jobs write


def _mean_similarity(store: OutputStore, methods: list[str], steps: int) -> dict[str, dict[str, list]]:
    """{method: {metric: [mean over images per step]}} from the written rows (NaN -> None when no value)."""
    files = store.fs.get_file_info(pafs.FileSelector(store.path("sanity"), allow_not_found=True))
    parts = [pq.read_table(f.path, filesystem=store.fs) for f in files if f.base_name.endswith(".parquet")]
    if not parts:
        return {}
    frame = pa.concat_tables(parts).to_pandas()
    out: dict[str, dict[str, list]] = {}
    for method in methods:
        rows = frame[frame["method"] == method]
        if rows.empty:
            continue
        means = rows.groupby("step")[["spearman", "spearman_abs", "ssim"]].mean()
        out[method] = {metric: [_num(means[metric].get(k, math.nan)) for k in range(steps)]
                       for metric in ("spearman_abs", "spearman", "ssim")}
    return out


def _num(value: float) -> float | None:
    return round(float(value), 6) if value is not None and math.isfinite(float(value)) else None


def _figures(store: OutputStore, config: SanityJobConfig, grids: dict[str, dict], names: list[str],
             similarity: dict, images: int) -> dict[str, str]:
    """Write sanity_maps.npz, sanity_grid.png and sanity_similarity.png; returns {output: relative path}."""
    from jobs.figures import heatmap_grid, method_title

    methods = config.worker.methods
    samples = list(grids.values())
    buffer = io.BytesIO()
    np.savez_compressed(buffer, maps=np.stack([g["maps"] for g in samples]),
                        images=np.stack([g["image"] for g in samples]), keys=np.array(list(grids)),
                        targets=np.array([int(g["target"]) for g in samples]), methods=np.array(methods),
                        steps=np.array(names))
    _put(store, "sanity_maps.npz", buffer.getvalue())

    cells, labels, photos = [], [], []
    for gid, sample in grids.items():
        key = gid.split("/", 1)[1]
        for m, method in enumerate(methods):
            maps = sample["maps"][:, m]
            cells.append([None if np.isnan(maps[s]).all() else maps[s] for s in range(len(names))])
            labels.append(f"{key} ({int(sample['target'])}) · {method_title(method)}")
            photos.append(sample["image"])
    signed = any(bool(np.nanmin(c) < 0) for row in cells for c in row if c is not None)
    columns = ["original"] + names[1:]
    model = f"{config.worker.model} ({config.worker.weights or 'random init'})"
    with tempfile.TemporaryDirectory() as tmp:
        grid_png = heatmap_grid(cells, out=Path(tmp, "grid.png"), row_labels=labels, col_labels=columns,
                                images=photos, signed=signed,
                                title=f"Cascading randomisation of {model}, top block first, cumulative (seed "
                                      f"{config.worker.seed}); row label: image (class explained) · method; "
                                      "each map with its own colour scale")
        _put(store, "sanity_grid.png", grid_png.read_bytes())
        line_png = _similarity_plot(similarity, names, Path(tmp, "similarity.png"), model, images)
        _put(store, "sanity_similarity.png", line_png.read_bytes())
    return {"maps": "sanity_maps.npz", "grid": "sanity_grid.png", "similarity": "sanity_similarity.png"}


def _similarity_plot(similarity: dict, names: list[str], out: Path, model: str, images: int) -> Path:
    """Mean similarity to the original map per method vs randomisation step, one panel per metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jobs.figures import method_title

    metrics = ("spearman_abs", "spearman", "ssim")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.4), dpi=100, squeeze=False)
    x = np.arange(len(names))
    for ax, metric in zip(axes[0], metrics):
        for method, values in similarity.items():
            y = np.array([np.nan if v is None else v for v in values[metric]], dtype=np.float64)
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, label=method_title(method))
        ax.axhline(0.0, color="#999999", linewidth=0.8)
        ax.set_xticks(x, ["original"] + names[1:], rotation=60, ha="right", fontsize=8)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(METRIC_TITLES[metric], fontsize=10)
        ax.set_xlabel("randomised down to (cumulative from the top)", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0, 0].set_ylabel("mean similarity to the original map")
    fig.suptitle(f"Sanity check: cascading randomisation of {model}, mean over {images} images", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _put(store: OutputStore, rel: str, data: bytes) -> None:
    with store.fs.open_output_stream(store.path(rel)) as f:
        f.write(data)


def _similarity_text(similarity: dict, names: list[str]) -> str:
    """The mean similarities as a plain-text table (methods x steps)."""
    width = max([8] + [len(n) for n in names])
    lines = ["mean similarity to the original map (rows: step, randomised cumulative from the top)"]
    for metric in ("spearman_abs", "spearman", "ssim"):
        lines.append(f"  {metric:<{width}}  " + "  ".join(f"{m:>8}" for m in similarity))
        for step, name in enumerate(names):
            values = [similarity[m][metric][step] for m in similarity]
            lines.append(f"  {name or 'original':<{width}}  " + "  ".join(
                f"{'-' if v is None else f'{v:.3f}':>8}" for v in values))
    return "\n".join(lines)


def _manifest(config: SanityJobConfig, uris: list[str], blocks: list[str]) -> dict:
    w = config.worker
    return {
        "job": "sanity", "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"model": w.model, "weights": w.weights, "methods": w.methods, "method_options": w.method_options,
                   "targets": w.targets, "seed": w.seed, "steps": w.steps, "max_images": config.max_images,
                   "grid_images": config.grid_images, "shards": uris,
                   **({"precision": w.precision} if w.precision != "fp32" else {})},
        "blocks": blocks,
        "versions": versions(),
    }


def parse_args(argv: list[str] | None = None) -> SanityJobConfig:
    """CLI -> SanityJobConfig; any bad argument exits with one error line."""
    p = argparse.ArgumentParser(prog="python -m jobs.sanity", description=__doc__.split("\n")[0])
    add_shards_argument(p)
    add_model_arguments(p, methods_default="gbp,tr_gbp")
    p.add_argument("--targets", default="top1", choices=SANITY_TARGETS,
                   help="class to explain at every step: the original model's top-1, or the label")
    p.add_argument("--out", required=True, help="output directory or URI")
    p.add_argument("--max-images", type=int, default=16, help="the first N samples of the shards (default 16)")
    p.add_argument("--grid-images", type=int, default=2, help="images drawn in the figure grid (default 2)")
    p.add_argument("--seed", type=int, default=0, help="randomisation seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="randomise only the top N blocks (default: all)")
    add_actor_arguments(p, precision_help="compute precision of the methods' passes (bf16/fp16: autocast); maps "
                        "are float32", overwrite_help="replace the outputs of a previous run in --out",
                        workers_flags=("--num-workers", "--workers"), sharded=False)
    a = p.parse_args(argv)
    methods = parse_methods(a.methods)
    if len(set(methods)) != len(methods):
        fail(f"--methods lists a method twice: {a.methods}")
    if a.model not in models.MODEL_NAMES and not Path(a.model).is_file():
        fail(f"unknown model {a.model!r}; known: {', '.join(models.MODEL_NAMES)} (or a benchmark checkpoint)")
    options = parse_method_options(a.method_options, example='{"tr_gbp": {"relu": true}}')
    extra = sorted(set(options) - set(methods))
    if extra:
        fail(f"--method-options names {extra[0]!r}, which is not in --methods")
    require_at_least_one(a, ("max_images", "batch_size", "workers"))
    if a.grid_images < 0 or (a.steps is not None and a.steps < 0):
        fail("--grid-images and --steps must not be negative")
    worker = SanityConfig(model=a.model, weights=a.weights, methods=methods, method_options=options,
                          targets=a.targets, seed=a.seed, steps=a.steps, precision=a.precision, device=a.device)
    return SanityJobConfig(shards=a.shards, out=a.out, worker=worker, max_images=a.max_images,
                           grid_images=a.grid_images, **actor_settings(a))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    return run_cli(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
