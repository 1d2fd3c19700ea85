"""Driver memory per shard: how much of it is ours and how much is Ray Data's (issue 14: "driver memory flat in
the number of shards"; bench.scale measured +57 KB of driver RSS per committed shard at 100 shards).

    python -m bench.driver_memory [--shards 200,2000] [--ray-blocks 100,1000] [--out bench/results/driver_memory.json]
                                  [--ray-chunk K] [--job-shards N [--job-images-per-shard 5]] [--no-ray]

1. *ours*: :class:`jobs.scaffold.ShardedRun` — the driver loop of jobs.attribute / jobs.evaluate / jobs.sanity
   (commit records, manifest entries, progress) — fed one write-step summary per shard, no Ray; the Python heap it
   still holds afterwards (``tracemalloc``, after ``gc.collect()``), per shard, at each ``--shards`` count.
2. *ray*: a Ray Data pipeline with the same shape and no work — ``from_items`` of N blocks -> a ``map_batches``
   task per block -> the driver iterating the results, as ShardedRun does — on a fresh embedded Ray; the driver's
   RSS before and after, per block, at each ``--ray-blocks`` count. (RSS, not the heap: Ray Data's bookkeeping is
   partly in its C++ core worker.) With ``--ray-chunk K`` each count above K runs again as consecutive datasets of
   K blocks, as ShardedRun runs the shards (``shards_per_dataset``): a peak that stays at the K-block level is flat.

3. *job* (``--job-shards N``): ``jobs.attribute`` itself over N tiny shards (64 px, saliency), once as one dataset
   and once as four (``--shards-per-dataset N/4``): the driver's peak RSS and its growth per committed shard.

A per-shard figure that stays the same from the small count to the large one is a cost that grows linearly with the
shards; its size says whether it matters (10,000 shards × 1 KB = 10 MB). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Sequence

import psutil

from bench.tables import write_report

DEFAULT_OUT = Path("bench/results/driver_memory.json")


def ours_per_shard(shards: int) -> dict:
    """Python heap retained by ShardedRun after processing ``shards`` one-sample shards (bytes, and per shard)."""
    import jobs.scaffold as scaffold
    from jobs.scaffold import ActorJobSettings, ShardedRun

    ensure = scaffold.ensure_ray
    scaffold.ensure_ray = lambda *a, **k: None   # no Ray: the summaries come from a plain generator
    try:
        with tempfile.TemporaryDirectory() as tmp:
            uris = [f"/data/val-{i:06d}.tar" for i in range(shards)]
            gc.collect()
            tracemalloc.start()
            job = ShardedRun("attribute", str(Path(tmp) / "out"), {"model": "m", "methods": ["saliency"]}, uris,
                             ActorJobSettings(quiet=True), recorded={"shards": uris})
            gc.collect()
            base = tracemalloc.take_snapshot()

            def summaries(pending):
                for uri in pending:
                    yield {"shard": Path(uri).name, "shard_total": 500, "samples": 500, "rows": 500,
                           "error_rows": 0, "files": "[]"}

            t0 = time.perf_counter()
            job.process(summaries, noun="rows")
            seconds = time.perf_counter() - t0
            gc.collect()
            retained = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
            tracemalloc.stop()
    finally:
        scaffold.ensure_ray = ensure
    return {"shards": shards, "retained_bytes": retained, "bytes_per_shard": retained / shards,
            "seconds": seconds}


def ray_per_block(blocks: int, chunk: int | None = None) -> dict:
    """Driver RSS growth across a no-work Ray Data pipeline of ``blocks`` blocks (a fresh embedded Ray), run as one
    dataset or, with ``chunk``, as consecutive datasets of at most ``chunk`` blocks each (what
    jobs.scaffold.ShardedRun does with ``shards_per_dataset``). ``rss_peak``: the highest RSS seen after each
    dataset."""
    import numpy as np
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2 ** 20, log_to_driver=False,
             configure_logging=False)
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        process = psutil.Process()

        def touch(batch: dict) -> dict:
            return {"shard": batch["shard"], "samples": np.asarray(batch["samples"]) * 1}

        warm = ray.data.from_items([{"shard": i, "samples": 1} for i in range(4)], override_num_blocks=4)
        list(warm.map_batches(touch, batch_size=None).iter_rows())        # workers started, modules imported
        gc.collect()
        before = peak = process.memory_info().rss
        t0 = time.perf_counter()
        size = chunk or blocks
        seen = 0
        for start in range(0, blocks, size):
            n = min(size, blocks - start)
            ds = ray.data.from_items([{"shard": start + i, "samples": 1} for i in range(n)], override_num_blocks=n)
            seen += sum(1 for _ in ds.map_batches(touch, batch_size=None).iter_rows())
            peak = max(peak, process.memory_info().rss)
        seconds = time.perf_counter() - t0
        gc.collect()
        after = process.memory_info().rss
    finally:
        ray.shutdown()
    return {"blocks": blocks, "chunk": chunk, "rows": seen, "rss_before": before, "rss_after": after,
            "rss_peak": max(peak, after), "bytes_per_block": (after - before) / blocks, "seconds": seconds}


def job_driver(work: Path, shards: int, per_shard: int, size: int, shards_per_dataset: int) -> dict:
    """``jobs.attribute`` (bench_resnet, random init, saliency, top-1) over ``shards`` benchmark shards of
    ``per_shard`` ``size``-px images with ``--shards-per-dataset``, sampled by bench.scale_monitor.run_job: the
    driver's peak RSS, its RSS growth per committed shard (bench.scale_report.driver_growth: least squares over the
    samples), wall seconds, and every (shard, key) row checked."""
    from bench.scale_data import prepare_shards, prepare_weights, shard_keys, verify
    from bench.scale_monitor import run_job
    from bench.scale_report import driver_growth

    info = prepare_shards(work, shards * per_shard, shards, size)
    weights = prepare_weights(work, "bench_resnet", size)
    out = work / f"maps-{shards_per_dataset}"
    shutil.rmtree(out, ignore_errors=True)
    pattern = str(Path(info["uris"][0]).parent / f"val-{{000000..{shards - 1:06d}}}.tar")
    result = run_job("jobs.attribute", ["--shards", pattern, "--model", "bench_resnet", "--weights", weights,
                                        "--methods", "saliency", "--targets", "top1", "--batch-size", "32",
                                        "--shards-per-dataset", str(shards_per_dataset), "--out", str(out)],
                     out, work / "jobs.log")
    check = verify(out, "attributions", shard_keys(info["uris"]), 1, ["shard", "key", "method", "target"])
    return {"shards": shards, "per_shard": per_shard, "size": size, "shards_per_dataset": shards_per_dataset,
            "datasets": -(-shards // shards_per_dataset), "returncode": result["returncode"],
            "wall_seconds": result["wall_seconds"], "driver_peak_rss_bytes": result["driver_peak_rss_bytes"],
            "driver_growth": driver_growth(result["timeline"], shards), "check": check}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.driver_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default="200,2000", help="shard counts for ShardedRun (comma-separated)")
    p.add_argument("--ray-blocks", default="100,1000", help="block counts for the Ray Data pipeline")
    p.add_argument("--ray-chunk", type=int, default=None,
                   help="also run each block count above this as datasets of this many blocks (ShardedRun's "
                        "shards_per_dataset)")
    p.add_argument("--job-shards", type=int, default=0,
                   help="also run jobs.attribute over this many tiny shards, as one dataset and as four")
    p.add_argument("--job-images-per-shard", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path("runs/driver_memory"), help="shards and outputs of --job-shards")
    p.add_argument("--no-ray", action="store_true", help="only the ShardedRun part (seconds; the test runs this)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    report: dict = {"ours": [ours_per_shard(int(n)) for n in a.shards.split(",")], "ray": []}
    if not a.no_ray:
        counts = [int(n) for n in a.ray_blocks.split(",") if n.strip()]
        report["ray"] = [ray_per_block(n) for n in counts]
        if a.ray_chunk:
            report["ray"] += [ray_per_block(n, a.ray_chunk) for n in counts if n > a.ray_chunk]
    print(f"{'part':<36}{'count':>8}{'bytes / unit':>16}{'peak RSS growth':>17}{'seconds':>10}")
    for r in report["ours"]:
        print(f"{'ours: ShardedRun (heap)':<36}{r['shards']:>8}{r['bytes_per_shard']:>16.0f}{'':>17}"
              f"{r['seconds']:>10.2f}")
    for r in report["ray"]:
        what = "Ray Data pipeline (RSS)" + (f", by {r['chunk']}" if r["chunk"] else "")
        growth = (r["rss_peak"] - r["rss_before"]) / 2 ** 20
        print(f"{what:<36}{r['blocks']:>8}{r['bytes_per_block']:>16.0f}{growth:>13.1f} MiB{r['seconds']:>10.2f}")
    if a.job_shards and not a.no_ray:
        a.work.mkdir(parents=True, exist_ok=True)
        report["job"] = [job_driver(a.work.resolve(), a.job_shards, a.job_images_per_shard, 64, k)
                         for k in (a.job_shards, -(-a.job_shards // 4))]
        print(f"\n{'jobs.attribute, shards':<24}{'datasets':>9}{'wall s':>8}{'driver peak MiB':>17}"
              f"{'growth B/shard':>16}{'rows ok':>9}")
        for r in report["job"]:
            print(f"{r['shards']:<24}{r['datasets']:>9}{r['wall_seconds']:>8.1f}"
                  f"{r['driver_peak_rss_bytes'] / 2 ** 20:>17.0f}"
                  f"{r['driver_growth'].get('bytes_per_committed_shard', float('nan')):>16.0f}"
                  f"{str(r['check'].get('ok', r['check'])):>9}")
    write_report(a.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
