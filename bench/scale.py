"""Scale: the procedural benchmark, 50,000 images in 100 shards, through jobs.attribute and the map-only
jobs.evaluate on this machine, next to a bare loop; resume after a SIGKILL at ~50 %.

    python -m bench.scale [--images 50000] [--shards 100] [--size 64] [--model bench_resnet]
                          [--method saliency] [--batch-size 32] [--kill-at 0.5] [--bare-images 2000]
                          [--work runs/scale] [--out bench/results/scale.json] [--tiny] [--profile-driver]

Phases, each timed on its own:

1. *shards*: ``jobs.make_benchmark``'s generator at ``--size`` px (val split, ``images / shards`` per shard),
   cached under ``--work`` (a rerun with the same images/shards/size reuses them); a benchmark model
   (``bench_*``) without weights gets a random-init checkpoint at ``--size`` px (cached too), so the maps are
   ``size`` x ``size``.
2. *bare loop*: in this process, on the first ``--bare-images`` images of the shards: tar bytes -> decode ->
   model top-k -> method, with :func:`bench.pipeline.bare_loop` (decode timed separately; wall and CPU time), at
   1 torch thread (what the CPU actor gets on 2 cores: the ratio's reference) and, unless --tiny, at this
   process's thread count. Then the same images through the pipeline's own stage functions in one process, no
   Ray (read_shard, decode_batch, AttributionWorker, write_parts): the plumbing's serial cost, stage by stage.
3. *pipeline*: ``python -m jobs.attribute`` as a subprocess, uninterrupted, into ``WORK/maps``. Sampled every
   0.5 s: the driver's RSS (and its exact peak, VmHWM), the RSS of all Ray processes (the driver's descendants;
   also without shared pages), the CPU time of every process (by kind: driver, actor, task workers by their last
   name, raylet, gcs, agents), the spill directory's size, the commit records; the CPU the rest of the machine
   used meanwhile. Afterwards: object-store spilling (spill directory, raylet's "Spilled" lines, Ray Data's
   per-operator ``obj_store_mem_spilled``), Ray Data's per-operator times, files and bytes written, the
   manifest's size and cost, every row checked.
4. *evaluate*: ``python -m jobs.evaluate --metrics ebpg,ibd`` (map-only: no image read, no model) on WORK/maps.
5. *resume*: ``python -m jobs.attribute`` into ``WORK/resume``, SIGKILLed (the driver process, as ``kill -9``
   would) once ``--kill-at`` of the shards have commit records; Ray processes left behind are counted and, after
   10 s, killed by pid. Then the same command again, timed: that is the resume. pyarrow reads every committed file
   of both runs: no (shard, key, method, target) row twice, none missing, no file outside a commit record.

Prints a table and writes JSON (``--out``). Every Ray is a fresh embedded one with its own temporary directory
(``RAY_TMPDIR``), so its logs and spill files are this run's alone, and ``RAY_worker_niceness=0`` (unless set): Ray's
workers run at this process's niceness, like the bare loop (Ray's default raises theirs by 15, which starves them
whenever anything else runs on the machine; ``ray job submit`` sets 0 too). On a shared machine wall-clock rates
move with the other load; the CPU seconds per image (pipeline, all its processes, vs the bare loop) do not. The code
measured (HEAD and the changed pipeline files) is recorded: each job imports the working tree as it is when it starts.
``--tiny`` (tests/test_scale_bench.py): 512 images in 8 shards, 200 in the bare loop.

This module is the CLI and the run's order; the parts: :mod:`bench.scale_data` (shards, checkpoint, keys, the rows
checks), :mod:`bench.scale_bare` (bare loop, stage timings), :mod:`bench.scale_monitor` (the job runner and its
process-tree sampler, spilling, Ray Data metrics, driver profile), :mod:`bench.scale_report` (derived figures,
headline, table).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from bench.scale_bare import bare, stages
from bench.scale_data import files_report, prepare_shards, prepare_weights, shard_keys, verify
from bench.scale_monitor import REPO, driver_profile, run_job
from bench.scale_report import commit_rate, driver_growth, headline, manifest_cost, print_table, thin

# --tiny: 8 shards of 64 images (two actor batches each), so commits come shard by shard and the kill at 50 % lands
# mid-run with half of the work still to resume; 200 images in the bare loop
TINY = {"images": 512, "shards": 8, "bare_images": 200}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``argv``; None: sys.argv) with --tiny's and the full run's defaults filled in (images,
    shards, bare-loop images); exits with a usage error on inconsistent counts."""
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=None, help="images (default 50000; --tiny: 512)")
    p.add_argument("--shards", type=int, default=None, help="shards (default 100; --tiny: 8)")
    p.add_argument("--size", type=int, default=64, help="image side, px (default 64)")
    p.add_argument("--model", default="bench_resnet", help="zoo model; bench_* get a random-init checkpoint at --size")
    p.add_argument("--method", default="saliency")
    p.add_argument("--targets", default="top1", choices=("top1", "top5", "label"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kill-at", type=float, default=0.5, help="share of shards committed when the job is killed")
    p.add_argument("--bare-images", type=int, default=None, help="images in the bare loop (default 2000; tiny 200)")
    p.add_argument("--work", default="runs/scale", help="shards, checkpoint and outputs (shards are reused)")
    p.add_argument("--out", default="bench/results/scale.json")
    p.add_argument("--tiny", action="store_true", help="512 images in 8 shards, 200 in the bare loop (about 2 minutes "
                   "on a busy 2-core machine: four Ray start-ups)")
    p.add_argument("--profile-driver", action="store_true", help="cProfile the uninterrupted run's driver")
    a = p.parse_args(argv)
    a.images = a.images or (TINY["images"] if a.tiny else 50000)
    a.shards = a.shards or (TINY["shards"] if a.tiny else 100)
    a.bare_images = min(a.bare_images or (TINY["bare_images"] if a.tiny else 2000), a.images)
    if a.images < 1 or a.shards < 1 or a.shards > a.images or not 0 < a.kill_at < 1 or a.batch_size < 1:
        p.error("need 1 <= --shards <= --images, --batch-size >= 1 and 0 < --kill-at < 1")
    return a


def main(argv: list[str] | None = None) -> dict:
    """The whole benchmark (module docstring's phases 1-5) with the command line ``argv``: prints the table, writes
    the JSON to ``--out`` and returns it as a dict (config, machine, code, shards, bare, stages, pipeline, evaluate,
    resume, headline, timelines; times in s, memory and files in bytes, rates in images per second)."""
    a = parse_args(argv)
    import torch

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "jobs.log"
    say = lambda *x: print(*x, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    code = code_state()

    say(f"shards: {a.images} images, {a.shards} shards, {a.size} px -> {work}")
    shard_info = prepare_shards(work, a.images, a.shards, a.size)
    uris, per_shard = shard_info["uris"], shard_info["config"]["per_shard"]
    expected = shard_keys(uris)
    weights = prepare_weights(work, a.model, a.size)
    say(f"  {'cached' if shard_info['cached'] else 'generated'}: {shard_info['seconds']} s, "
        f"{shard_info['bytes'] / 2**20:.0f} MiB")

    say(f"bare loop: {a.bare_images} images")
    threads = [1] if a.tiny else sorted({1, torch.get_num_threads()})
    bare_result = bare(uris, a.bare_images, weights, a.model, a.method, a.targets, a.batch_size, threads)
    stage_result = stages(bare_result.pop("rows"), weights, a.model, a.method, a.targets, a.batch_size, work)

    model_args = ["--model", a.model] + (["--weights", weights] if weights else [])
    pattern = (str(Path(uris[0]).parent / f"val-{{000000..{len(uris) - 1:06d}}}.tar") if len(uris) > 1
               else uris[0])
    attribute_args = ["--shards", pattern, *model_args, "--methods", a.method, "--targets", a.targets,
                      "--batch-size", str(a.batch_size)]
    maps, resume_out, metrics_out = work / "maps", work / "resume", work / "metrics"
    for directory in (maps, resume_out, metrics_out):
        shutil.rmtree(directory, ignore_errors=True)

    say("pipeline: jobs.attribute, uninterrupted")
    profile = work / "driver.prof" if a.profile_driver else None
    pipeline = run_job("jobs.attribute", [*attribute_args, "--out", str(maps)], maps, log, profile=profile)
    pipeline["summary"] = (json.loads((maps / "manifest.json").read_text()).get("summary")
                           if (maps / "manifest.json").exists() else None)
    pipeline["commit_rate"] = commit_rate(pipeline["lines"], per_shard)
    pipeline["driver_growth"] = driver_growth(pipeline["timeline"], a.shards)
    pipeline["manifest"] = manifest_cost(maps, a.shards, pipeline["wall_seconds"])
    pipeline["files"] = files_report(maps)
    pipeline["check"] = verify(maps, "attributions", expected, 1, ["shard", "key", "method", "target"])
    if profile:
        pipeline["driver_profile"] = driver_profile(profile)

    say("evaluate: jobs.evaluate --metrics ebpg,ibd (map-only)")
    evaluate = run_job("jobs.evaluate", ["--attributions", str(maps), "--out", str(metrics_out), "--metrics",
                                         "ebpg,ibd", "--border", str(shard_info["border_px"])], metrics_out, log)
    evaluate["summary"] = (json.loads((metrics_out / "manifest.json").read_text()).get("summary")
                           if (metrics_out / "manifest.json").exists() else None)
    evaluate["files"] = files_report(metrics_out)
    evaluate["check"] = verify(metrics_out, "metrics", expected, 2, ["shard", "key", "method", "target", "metric"])

    kill_at = max(1, min(a.shards - 1, math.ceil(a.kill_at * a.shards))) if a.shards > 1 else None
    say(f"resume: jobs.attribute killed at {kill_at}/{a.shards} commits, then rerun")
    killed = run_job("jobs.attribute", [*attribute_args, "--out", str(resume_out)], resume_out, log,
                     kill_at_commits=kill_at)
    committed_after_kill = len(list((resume_out / "_commits").glob("*.json")))
    killed["commits_after_kill"] = committed_after_kill
    resumed = run_job("jobs.attribute", [*attribute_args, "--out", str(resume_out)], resume_out, log)
    resumed["summary"] = (json.loads((resume_out / "manifest.json").read_text()).get("summary")
                          if (resume_out / "manifest.json").exists() else None)
    resume_check = verify(resume_out, "attributions", expected, 1, ["shard", "key", "method", "target"])

    report = {
        "config": {"images": a.images, "shards": a.shards, "per_shard": per_shard, "size": a.size, "model": a.model,
                   "weights": "random init" + (f" ({Path(weights).name})" if weights else ""), "method": a.method,
                   "targets": a.targets, "batch_size": a.batch_size, "kill_at": a.kill_at, "tiny": a.tiny},
        "machine": {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "code": code,
        "shards": {k: v for k, v in shard_info.items() if k != "uris"},
        "bare": bare_result["runs"],
        "stages": stage_result,
        "pipeline": _without_samples(pipeline),
        "evaluate": _without_samples(evaluate),
        "resume": {
            "killed": _without_samples(killed),
            "resumed": _without_samples(resumed),
            "check": resume_check,
        },
        "headline": headline(pipeline, evaluate, killed, resumed, resume_check, bare_result["runs"], per_shard),
    }
    report["timelines"] = {"pipeline": thin(pipeline["timeline"]), "killed": thin(killed["timeline"]),
                           "resumed": thin(resumed["timeline"])}
    print_table(report)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    say(f"JSON: {a.out}; job logs (stderr): {log}")
    return report


def code_state() -> dict:
    """The code measured: ``head`` (HEAD, short hash) and ``changed_pipeline_files``, the paths under jobs, workers,
    schemas and attribution that differ from it (the tree may hold uncommitted work); "" / [] without git."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [line[3:] for line in git("status", "--porcelain", "--", "jobs", "workers", "schemas",
                                        "attribution").splitlines() if line.strip()]
    return {"head": git("rev-parse", "--short", "HEAD").strip(), "changed_pipeline_files": changed}


def _without_samples(run: dict) -> dict:
    """A run_job result without its stdout lines and sample timeline (the JSON keeps a thinned timeline apart)."""
    return {k: v for k, v in run.items() if k not in ("lines", "timeline")}


if __name__ == "__main__":
    main(sys.argv[1:])
