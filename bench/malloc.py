"""What keeping freed memory (workers.device.retain_freed_memory, on in every actor) does to an attribution actor.

    python -m bench.malloc [--model resnet18] [--methods saliency,gbp,gradcam,tr_gbp,a_fmi] [--images 16]
                           [--calls 12] [--out bench/results/malloc.json]

Two child processes, one with ``XAI_MALLOC=system`` (glibc's defaults) and one with the actor's setting, each build
an AttributionWorker on the CPU (1 thread) and call it ``--calls`` times on decoded batches of random-noise JPEGs
whose sizes cycle through ``--images``, its half, a quarter and 1 (as the last batches of shards do), after one
warm-up call per size. Per mode: CPU seconds per image (this process: what to read on a shared machine) and minor
page faults per call, per batch size (glibc's default mmap threshold rises to at most 32 MiB, so only batches with
larger tensors fault, as a GPU actor's batches of 64 do on the host); the resident set after the first and the last
call (whether a long run's memory creeps) and the process's peak (ru_maxrss: what a node must provide; glibc's
defaults free their large blocks before a call returns, so after-call figures understate their peak). Prints a
table and the ratios, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from bench.tables import text_table, write_report

DEFAULT_OUT = Path("bench/results/malloc.json")
MODES = ("system", "retain")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(model: str, methods: list[str], images: int, calls: int) -> dict:
    """In the child process (its allocator set by XAI_MALLOC before the worker is built): time the calls."""
    import torch

    from bench.worker_overhead import decoded_batch
    from workers.attribution_worker import AttributionWorker, WorkerConfig

    torch.set_num_threads(1)
    worker = AttributionWorker(WorkerConfig(model=model, methods=methods, targets="top5", device="cpu", threads=1))
    sizes = sorted({images, max(1, images // 2), max(1, images // 4), 1}, reverse=True)
    batches = {n: decoded_batch(worker, n, seed=n) for n in sizes}
    for n in sizes:
        worker(batches[n])
    cpu, faults, rss, counted = [], [], [], 0
    for i in range(calls):
        n = sizes[i % len(sizes)]
        f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        worker(batches[n])
        cpu.append(time.process_time() - c0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        rss.append(_rss_mib())
        counted += n
    by_size = {n: [i for i in range(calls) if sizes[i % len(sizes)] == n] for n in sizes}
    return {"cpu_s_per_image": sum(cpu) / counted,
            "cpu_s_per_image_by_batch": {n: statistics.median(cpu[i] for i in idx) / n for n, idx in by_size.items()},
            "faults_per_call_by_batch": {n: statistics.median(faults[i] for i in idx) for n, idx in by_size.items()},
            "rss_first_mib": rss[0], "rss_last_mib": rss[-1], "rss_peak_mib": max(rss),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_s": cpu,
            "faults": faults, "rss_mib": rss, "batch_sizes": sizes, "images": counted}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.malloc", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--methods", default="saliency,gbp,gradcam,tr_gbp,a_fmi")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.model, a.methods.split(","), a.images, a.calls)))
        return 0
    results = {}
    for mode in MODES:
        args = [sys.executable, "-m", "bench.malloc", "--child", "--model", a.model, "--methods", a.methods,
                "--images", str(a.images), "--calls", str(a.calls)]
        done = subprocess.run(args, env={**os.environ, "XAI_MALLOC": mode}, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"bench.malloc: the {mode} child failed (exit {done.returncode}): {last}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    sizes = results["system"]["batch_sizes"]
    rows = [[mode] + [f"{r['cpu_s_per_image_by_batch'][str(n)]:.3f}" for n in sizes]
            + [" / ".join(f"{r['faults_per_call_by_batch'][str(n)] / 1000:,.0f}k" for n in sizes),
               f"{r['rss_first_mib']:.0f} / {r['rss_last_mib']:.0f} / {r['peak_rss_mib']:.0f}"]
            for mode, r in results.items()]
    print(f"{a.model}, methods {a.methods}, top-5, {a.calls} calls cycling through batches of {sizes} images, "
          "1 thread")
    headers = (["malloc"] + [f"CPU s/img, batch {n}" for n in sizes]
               + [f"page faults / call, batch {' / '.join(map(str, sizes))}", "RSS MiB after call 1 / last, peak"])
    print(text_table(headers, rows))
    system, retain = results["system"], results["retain"]
    ratios = {"cpu": retain["cpu_s_per_image"] / system["cpu_s_per_image"],
              "cpu_largest_batch": retain["cpu_s_per_image_by_batch"][str(sizes[0])]
              / system["cpu_s_per_image_by_batch"][str(sizes[0])],
              "peak_rss": retain["peak_rss_mib"] / system["peak_rss_mib"]}
    print(f"retain / system: CPU time {ratios['cpu']:.2f} over all calls, {ratios['cpu_largest_batch']:.2f} at batch "
          f"{sizes[0]}; peak RSS {ratios['peak_rss']:.2f}")
    write_report(a.out, {"config": vars(a) | {"out": str(a.out)}, "results": results, "ratios": ratios,
                         "machine": {"python": platform.python_version(), "processor": platform.processor()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
