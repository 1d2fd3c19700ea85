"""Compact map storage: bytes per map and the change of every metric against full-size float16, per layout.

    python -m bench.map_storage [--datasets photos,benchmark] [--benchmark DIR --checkpoint PT] [--images 100]
                                [--work DIR] [--out bench/results/map_storage.json]

For each dataset (``photos``: the real EfficientNet-Lite0 on the 7 sample photos; ``benchmark``: a trained benchmark
model on the first ``--images`` validation images of a ``jobs.make_benchmark`` directory), one ``jobs.attribute``
run stores the maps of five methods (saliency, gbp, gradcam, tr_gbp, a_fmi; top-5 targets) in float32 at the input
size I. Every layout is then derived from it with the worker's own encoder (workers.attribution_worker.encode_maps)
and written by the job's own write step and commit (so its files are what ``jobs.attribute --map-size S
--map-dtype D`` writes, up to float32 rounding of the stored map), and ``jobs.evaluate`` (EBPG, IBD, MoRF, LeRF,
insertion, class discrimination) runs on each. Layouts: S in {I, I/2, I/4} x {float16, int8}, and int8 at I and at
I/4 with the coarse methods at I/16 (e.g. ``--map-size 56,gradcam=14,a_fmi=14``). Compared with full-size float16:
bytes per map (the Parquet files' size / rows) and, per metric, the largest change of the mean over images and the
mean |change| per image. Prints a table per dataset and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bench.tables import text_table
from schemas.maps import MapLayout
from schemas.reader import OutputReader, maps_of
from workers.attribution_worker import encode_maps
from workers.batches import ipc_blob, output_schema
from schemas.attributions import ERROR_SCHEMA, attribution_schema
from workers.sink import OutputStore
from workers.staging import write_parts

METHODS = ["saliency", "gbp", "gradcam", "tr_gbp", "a_fmi"]
COARSE = ("gradcam", "a_fmi")  # upsampled from the last conv layer's 7x7 (224 px) / 4x4 (112 px) grid
METRICS = ("ebpg", "ibd", "morf", "lerf", "insertion_accuracy", "insertion_softmax", "class_discrimination")
GOALS = {"bytes_per_map": 8 * 1024, "ebpg": 0.01, "insertion_softmax": 0.01, "insertion_accuracy": 0.01}


def layouts_for(input_size: int) -> list[dict]:
    """The compared layouts: {name, size, dtype, sizes (per method)} for a model with ``input_size``."""
    out = []
    for dtype in ("float16", "int8"):
        for size in (input_size, input_size // 2, input_size // 4):
            out.append({"name": f"{size} {dtype}", "size": size, "dtype": dtype, "sizes": {}})
    coarse = max(1, input_size // 16)
    for size in (input_size, input_size // 4):
        out.append({"name": f"{size} int8, coarse {coarse}", "size": size, "dtype": "int8",
                    "sizes": {m: coarse for m in COARSE}})
    return out


def derive(base: str, out: str, layout: dict) -> dict:
    """Write the float32 run ``base`` again into ``out`` in ``layout`` through the job's write step and commit;
    returns {files, bytes, rows}."""
    source = OutputReader(base)
    store = OutputStore(out)
    if (store.manifest() or {}).get("config", {}).get("map_sizes") == layout["sizes"] and \
            len(store.committed()) == len(source.committed()):
        return _written(store)
    store.clear()
    store.ensure()
    input_size = None
    for shard in sorted(source.committed()):
        table = source.read(shards=[shard], maps="stored")
        input_size = table.schema.field("map").type.shape[-1]
        values = torch.from_numpy(maps_of(table))
        rows = table.drop_columns(["map"]).to_pylist()
        groups: dict[MapLayout, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for method in sorted(set(r["method"] for r in rows)):
            index = [i for i, r in enumerate(rows) if r["method"] == method]
            spec = MapLayout(layout["sizes"].get(method, layout["size"]), layout["dtype"], input_size)
            stored, scale, _ = encode_maps(values[index], spec)
            for n, i in enumerate(index):
                groups[spec][rows[i]["key"]].append({**rows[i], "map": stored[n], "map_scale": float(scale[n])})
        keys = sorted(set(r["key"] for r in rows))
        blob = b"".join(ipc_blob([row for k in keys for row in by_key.get(k, [])],
                                 attribution_schema(spec.size, spec.dtype, input_size))
                        for spec, by_key in groups.items())
        schema = output_schema("attributions")
        batch = pa.Table.from_pydict({"shard": [shard], "shard_total": [len(keys)], "samples": [len(keys)],
                                      "keys": [keys], "attributions": [blob],
                                      "errors": [ipc_blob([], ERROR_SCHEMA)]}, schema=schema)
        list(store.commit_complete(write_parts(batch, out, ("parquet",)).to_pylist()))
    manifest = source.manifest()
    manifest["config"].update(map_dtype=layout["dtype"], map_size=layout["size"], map_sizes=layout["sizes"])
    store.write_json("manifest.json", manifest)
    return _written(store)


def _written(store: OutputStore) -> dict:
    files = [store.path(f) for f in store.committed_files("attributions")]
    total = sum(store.fs.get_file_info(f).size for f in files)
    return {"files": len(files), "bytes": total, "rows": OutputReader(store.uri).read(columns=["key"]).num_rows}


def evaluate(attributions: str, out: str, batch_size: int) -> dict[tuple, float]:
    """jobs.evaluate's default metrics on ``attributions`` (reused when ``out`` holds a complete evaluation of it):
    {(key, method, metric): value}."""
    done = OutputReader(out).manifest() if Path(out).exists() else None
    if not (done and done.get("status") == "complete"):
        _evaluate_job(attributions, out, batch_size)
    table = OutputReader(out).read("metrics", columns=["key", "method", "metric", "value"])
    return {(k, m, x): v for k, m, x, v in zip(*(table.column(c).to_pylist() for c in table.column_names))
            if v is not None}


def _evaluate_job(attributions: str, out: str, batch_size: int) -> None:
    from jobs.evaluate import EvaluateJobConfig, attribution_run, run
    from workers.evaluate_worker import EvaluateConfig

    source = attribution_run(attributions)["config"]
    worker = EvaluateConfig(attributions=attributions, model=source["model"], weights=source["weights"],
                            metrics=["ebpg", "ibd", "morf", "lerf", "insertion", "class_discrimination"])
    run(EvaluateJobConfig(out=out, worker=worker, dataset_metrics=[], batch_size=batch_size, quiet=True,
                          overwrite=True))


def compare(base: dict[tuple, float], other: dict[tuple, float]) -> dict[str, dict]:
    """Per metric: the largest |change of a method's mean over images| (``max_mean_change``), the mean |per-image
    change| over all methods, and per method {mean_change, mean_abs_change}."""
    out = {}
    for metric in METRICS:
        changes, per_method = [], {}
        for method in METHODS:
            keys = [k for k in base if k[1] == method and k[2] == metric and k in other]
            if not keys:
                continue
            a = np.array([base[k] for k in keys])
            b = np.array([other[k] for k in keys])
            changes.extend(np.abs(b - a).tolist())
            per_method[method] = {"mean_change": float(b.mean() - a.mean()),
                                  "mean_abs_change": float(np.abs(b - a).mean()), "images": len(keys)}
        if changes:
            out[metric] = {"max_mean_change": max(abs(v["mean_change"]) for v in per_method.values()),
                           "mean_abs_change": float(np.mean(changes)), "methods": per_method}
    return out


def _mean_change(result: dict, metric: str, method: str) -> float:
    return result["changes"].get(metric, {}).get("methods", {}).get(method, {}).get("mean_change", float("nan"))


def dataset_runs(name: str, args: argparse.Namespace, work: Path) -> tuple[str, int]:
    """(attribution run URI in float32 at the input size, input size) for one dataset."""
    from attribution import models
    from attribution.data.sample_sets import photo_samples
    from attribution.data.shards import write_shards
    from jobs.attribute import AttributeConfig, run
    from workers.attribution_worker import WorkerConfig

    out = work / name / "base"
    if name == "photos":
        shard_set = write_shards(photo_samples(), work / name / "shards", "photos", 4, log=lambda *_: None)
        shards, model, weights = [shard_set.pattern], "efficientnet_lite0", "imagenet"
    else:
        if not args.benchmark or not args.checkpoint:
            raise SystemExit("--datasets benchmark needs --benchmark DIR and --checkpoint PT")
        from workers.shards import read_shard
        rows = [r for r in read_shard(str(Path(args.benchmark) / "val-000000.tar")) if r["error"] is None]
        shards, model, weights = [_first_images(rows[:args.images], work / name / "shards")], "bench_resnet", \
            args.checkpoint
    worker = WorkerConfig(model=model, weights=weights, methods=METHODS, targets="top5", map_dtype="float32")
    if not (out / "manifest.json").exists() or json.loads((out / "manifest.json").read_text()).get("status") != \
            "complete":
        run(AttributeConfig(shards=shards, out=str(out), worker=worker, batch_size=args.batch_size, quiet=True,
                            overwrite=True))
    return str(out), models.preprocessing_for(model, weights).input_size


def _first_images(rows: list[dict], directory: Path) -> str:
    """The raw rows of a benchmark shard re-packed into one tar (same members), for a subset of images."""
    import io
    import tarfile

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "val-subset-000000.tar"
    with tarfile.open(path, "w") as tar:
        for r in rows:
            for suffix, column in (("jpg", "jpg"), ("cls", "cls"), ("json", "json")):
                info = tarfile.TarInfo(f"{r['key']}.{suffix}")
                info.size = len(r[column])
                tar.addfile(info, io.BytesIO(r[column]))
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.map_storage", description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="photos", help="comma-separated: photos, benchmark")
    p.add_argument("--benchmark", default=None, help="jobs.make_benchmark output directory (for 'benchmark')")
    p.add_argument("--checkpoint", default=None, help="bench_resnet checkpoint (jobs.train_benchmark_model)")
    p.add_argument("--images", type=int, default=100, help="benchmark validation images (default 100)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--work", default="/tmp/bench_map_storage")
    p.add_argument("--out", default="bench/results/map_storage.json")
    args = p.parse_args(argv)
    from jobs.common import ensure_ray
    ensure_ray(num_cpus=2)
    work = Path(args.work)
    report = {"bench": "map_storage", "python": platform.python_version(), "torch": torch.__version__,
              "goals": GOALS, "datasets": {}}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        start = time.perf_counter()
        base, input_size = dataset_runs(name, args, work)
        results, reference = [], None
        for layout in layouts_for(input_size):
            directory = work / name / layout["name"].replace(" ", "_").replace(",", "")
            written = derive(base, str(directory / "maps"), layout)
            metrics = evaluate(str(directory / "maps"), str(directory / "metrics"), args.batch_size)
            if reference is None:
                reference = metrics  # the first layout is full-size float16
            results.append({**layout, **written, "bytes_per_map": written["bytes"] / max(written["rows"], 1),
                            "changes": compare(reference, metrics)})
        report["datasets"][name] = {"input_size": input_size, "layouts": results,
                                    "seconds": round(time.perf_counter() - start, 1)}
        head = ["layout", "bytes/map", "x smaller"] + [f"Δ{m}" for m in METRICS]
        first = results[0]["bytes_per_map"]
        rows = [[r["name"], f"{r['bytes_per_map']:,.0f}", f"{first / r['bytes_per_map']:.1f}"]
                + [f"{r['changes'].get(m, {}).get('max_mean_change', float('nan')):.4f}" for m in METRICS]
                for r in results]
        print(f"\n{name} (input {input_size} px; Δ = largest change of a method's mean over images vs full-size "
              "float16)")
        print(text_table(head, rows))
        print(f"\n{name}, per method: change of the mean over images (EBPG, insertion softmax AUC, class "
              "discrimination) vs full-size float16")
        shown = ("ebpg", "insertion_softmax", "class_discrimination")
        print(text_table(["layout", "method"] + [f"Δ{m}" for m in shown],
                         [[r["name"], method] + [f"{_mean_change(r, m, method):+.4f}" for m in shown]
                          for r in results[1:] for method in METHODS]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
