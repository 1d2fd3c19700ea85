"""Pipeline overhead: jobs.attribute end to end vs a bare loop of the same method calls on the same images.

    python -m bench.pipeline [--model resnet18] [--methods gbp,gradcam] [--images 48] [--batch 8]
                             [--targets top1] [--out bench/results/pipeline.json]

Both sides decode the same shards with the same code, use the same model, methods, targets and batch size, and
run on the CPU (or the GPU when there is one). The bare loop is timed from decoded images to maps in memory; the
pipeline from ``run()`` to its last commit, with Ray already started (Ray start-up is reported separately) —
so actor start-up and model loading count against the pipeline. Peak memory: the largest resident set of this
process (bare loop) and the largest sum over this process and all its descendants, sampled every 50 ms
(pipeline: the embedded Ray's processes). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from attribution import models
from attribution.images import decode_sample
from attribution.methods import attribute
from attribution.methods.targets import TopKTargets
from jobs.attribute import AttributeConfig, run
from jobs.common import ensure_ray
from attribution.data.sample_sets import synthetic_samples
from attribution.data.shards import write_shards
from workers.attribution_worker import WorkerConfig


class PeakMemory:
    """Sample the summed RSS of this process and its descendants in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bare_loop(spec, samples, methods, targets_kind, batch) -> float:
    """Seconds for decoded images -> maps with plain attribute() calls, batch by batch (decode not timed)."""
    decoded = [decode_sample(s.image(), str(s.meta["label"]).encode(), json.dumps(s.meta).encode(),
                             spec.preprocessing) for s in samples]
    pixels = torch.stack([torch.from_numpy(d.pixels) for d in decoded]).to(spec.device)
    labels = torch.tensor([d.label for d in decoded], device=spec.device)
    start = time.perf_counter()
    for i in range(0, len(samples), batch):
        images = spec.preprocessing.normalise(pixels[i:i + batch].float() / 255.0)
        # top-k from the first method's own forward pass (TopKTargets), as the actor does; labels: given
        targets = labels[i:i + batch, None] if targets_kind == "label" else TopKTargets(5 if targets_kind == "top5"
                                                                                       else 1)
        for method in methods:
            attribute(method, spec, images, targets).cpu()
            targets = targets.classes if isinstance(targets, TopKTargets) else targets
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--methods", default="gbp,gradcam")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--targets", default="top1", choices=("top1", "top5", "label"))
    p.add_argument("--out", default="bench/results/pipeline.json")
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    threads = torch.get_num_threads()
    samples = synthetic_samples(a.images, seed=0)
    device = models.default_device()
    spec = models.load(a.model, device=device)
    bare_loop(spec, samples[: a.batch], methods, a.targets, a.batch)  # warm-up
    bare_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bare_seconds = bare_loop(spec, samples, methods, a.targets, a.batch)
    bare_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    t0 = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - t0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shard_set = write_shards(samples, Path(tmp) / "shards", "bench", max(1, a.images // 4), log=lambda *_: None)
        for actor_threads in sorted({1, threads}):
            worker = WorkerConfig(model=a.model, methods=methods, targets=a.targets, threads=actor_threads,
                                  device=None if device.type == "cuda" else "cpu")
            config = AttributeConfig(shards=[shard_set.pattern], out=str(Path(tmp) / f"out{actor_threads}"),
                                     worker=worker, batch_size=a.batch, quiet=True)
            with PeakMemory() as memory:
                start = time.perf_counter()
                summary = run(config)
                seconds = time.perf_counter() - start
            assert summary["samples"] == a.images and summary["errors"] == 0, summary
            results.append({"actor_threads": actor_threads, "seconds": seconds,
                            "images_per_second": a.images / seconds, "peak_rss_bytes": memory.peak})
    bare_ips = a.images / bare_seconds
    report = {
        "model": a.model, "methods": methods, "targets": a.targets, "images": a.images, "batch": a.batch,
        "device": str(device), "torch_threads": threads, "cpus": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "ray_start_seconds": ray_start,
        "bare": {"seconds": bare_seconds, "images_per_second": bare_ips, "peak_rss_bytes": bare_rss,
                 "rss_before_bytes": bare_rss_before},
        "pipeline": [{**r, "ratio_to_bare": r["images_per_second"] / bare_ips} for r in results],
    }
    print(f"\n{a.model} | {','.join(methods)} | targets {a.targets} | {a.images} images, batch {a.batch} | "
          f"{device} | {threads} torch threads | Ray start {ray_start:.1f} s")
    print(f"{'run':<28}{'seconds':>9}{'img/s':>9}{'x bare':>8}{'peak RSS':>11}")
    print(f"{'bare loop (this process)':<28}{bare_seconds:>9.2f}{bare_ips:>9.2f}{1.0:>8.2f}{bare_rss / 2**20:>9.0f}MB")
    for r in report["pipeline"]:
        label = f"pipeline, actor {r['actor_threads']} thread(s)"
        print(f"{label:<28}{r['seconds']:>9.2f}{r['images_per_second']:>9.2f}{r['ratio_to_bare']:>8.2f}"
              f"{r['peak_rss_bytes'] / 2**20:>9.0f}MB")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"JSON: {a.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
