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
"""
from __future__ import annotations

import argparse
import glob
import inspect
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from bench.pipeline import PeakMemory, bare_loop

REPO = Path(__file__).resolve().parents[1]
# --tiny: 8 shards of 64 images (two actor batches each), so commits come shard by shard and the kill at 50 % lands
# mid-run with half of the work still to resume; 200 images in the bare loop
TINY = {"images": 512, "shards": 8, "bare_images": 200}
SAMPLE_INTERVAL_S = 0.5


# ----------------------------------------------------------------------------------------------------------- inputs

def prepare_shards(work: Path, images: int, shards: int, size: int, seed: int = 0) -> dict:
    """The benchmark's val split as ``shards`` tar shards under ``work/shards-<images>-<shards>-<size>``; reused
    when ``done.json`` there records the same configuration. Returns paths and the generation time."""
    from attribution.data import benchmark
    from jobs.make_benchmark import make_benchmark

    per_shard = math.ceil(images / shards)
    directory = work / f"shards-{images}-{shards}-{size}-s{seed}"
    marker = directory / "done.json"
    wanted = {"images": images, "shards": shards, "size": size, "seed": seed, "per_shard": per_shard}
    if marker.exists() and json.loads(marker.read_text()).get("config") == wanted:
        done = json.loads(marker.read_text())
        return {**done, "cached": True, "uris": sorted(glob.glob(str(directory / "val-*.tar")))}
    if directory.exists():
        shutil.rmtree(directory)
    start = time.perf_counter()
    make_benchmark(directory, benchmark.BenchmarkConfig(size=size, seed=seed), {"val": images}, per_shard,
                   log=lambda *_: None)
    seconds = time.perf_counter() - start
    uris = sorted(glob.glob(str(directory / "val-*.tar")))
    done = {"config": wanted, "seconds": round(seconds, 2), "images_per_second": round(images / seconds, 1),
            "shard_files": len(uris), "bytes": sum(os.path.getsize(u) for u in uris),
            "border_px": benchmark.border_width(size)}
    marker.write_text(json.dumps(done, indent=1))
    return {**done, "cached": False, "uris": uris}


def prepare_weights(work: Path, model: str, size: int) -> str | None:
    """A random-init checkpoint of a benchmark model at ``size`` px (so it reads the shards unresized), cached;
    None for the other zoo models (random init, their own preprocessing)."""
    import torch

    from attribution import models
    from attribution.architectures import small_cnn

    if model not in models.BENCH_MODELS:
        return None
    path = work / f"{model}-{size}px-random.pt"
    if not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = small_cnn.build(model, models.BENCH_DEFAULT_CLASSES, size)
        checkpoint = small_cnn.checkpoint(module, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD,
                                          class_names=[f"class{i}" for i in range(module.num_classes)],
                                          training={"note": "random init (bench.scale)"})
        torch.save(checkpoint, path)
    return str(path)


def shard_keys(uris: list[str]) -> dict[str, list[str]]:
    """{shard file name: its sample keys} from the tar headers (what every run must cover exactly once)."""
    keys = {}
    for uri in uris:
        with tarfile.open(uri) as tar:
            keys[os.path.basename(uri)] = sorted({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return keys


# -------------------------------------------------------------------------------------------------------- bare loop

def bare(uris: list[str], count: int, weights: str | None, model: str, method: str, targets: str,
         batch: int, thread_counts: list[int]) -> dict:
    """The same decode + model + method in this process, on the first ``count`` images of ``uris``."""
    import torch

    from attribution import models
    from attribution.data.shards import Sample
    from workers.shards import read_shard

    rows = []
    for uri in uris:
        rows += read_shard(uri)
        if len(rows) >= count:
            break
    rows = rows[:count]
    samples = [Sample(r["key"], json.loads(r["json"]), lambda data=r["jpg"]: data) for r in rows]
    spec = models.load(weights or model, device="cpu")
    threads_default = torch.get_num_threads()
    runs = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        bare_loop(spec, samples[:batch], [method], targets, batch)  # warm-up
        with PeakMemory() as memory:
            start, cpu_start = time.perf_counter(), time.process_time()
            compute = bare_loop(spec, samples, [method], targets, batch)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        runs.append({"threads": threads, "images": len(samples), "seconds": round(wall, 3),
                     "decode_seconds": round(wall - compute, 3), "compute_seconds": round(compute, 3),
                     "images_per_second": round(len(samples) / wall, 2),
                     "compute_images_per_second": round(len(samples) / compute, 2),
                     "cpu_seconds": round(cpu, 3), "cpu_ms_per_image": round(1000 * cpu / len(samples), 3),
                     "peak_rss_bytes": memory.peak})
    torch.set_num_threads(threads_default)
    return {"runs": runs, "rows": rows}


def stages(rows: list[dict], weights: str | None, model: str, method: str, targets: str, batch: int,
           scratch: Path) -> dict:
    """The pipeline's own stage functions on ``rows`` (read_shard output) in this process, 1 torch thread, no
    Ray: seconds per stage and per image. The attribution actor's time minus the bare compute is its per-row
    Python (row dicts, IPC blobs); write_parts' is Arrow concat + Parquet + staging files."""
    import pyarrow as pa
    import torch

    from attribution import models
    from workers.attribution_worker import AttributionWorker, WorkerConfig
    from workers.decode import decode_batch
    from workers.shards import RAW_SCHEMA
    from workers.sink import write_parts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    preprocessing = models.preprocessing_for(weights or model)
    worker = AttributionWorker(WorkerConfig(model=model, weights=weights, methods=[method], targets=targets,
                                            device="cpu", threads=1))
    offered = {"uri": str(scratch / "stages"), "formats": ("parquet",), "map_size": preprocessing.input_size,
               "map_dtype": "float16"}
    write_kwargs = {k: v for k, v in offered.items() if k in inspect.signature(write_parts).parameters}
    totals = Counter()
    raw_batches = [pa.Table.from_pylist(rows[i:i + batch], schema=RAW_SCHEMA) for i in range(0, len(rows), batch)]
    worker(decode_batch(raw_batches[0], preprocessing))  # warm-up
    out = scratch / "stages"
    for raw in raw_batches:
        t0 = time.perf_counter()
        decoded = decode_batch(raw, preprocessing)
        t1 = time.perf_counter()
        result = worker(decoded)
        t2 = time.perf_counter()
        table = pa.Table.from_pydict({k: list(v) for k, v in result.items()})
        t3 = time.perf_counter()
        write_parts(table, **write_kwargs)
        t4 = time.perf_counter()
        totals.update({"decode_batch": t1 - t0, "attribution_worker": t2 - t1, "to_arrow": t3 - t2,
                       "write_parts": t4 - t3})
    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    n = len(rows)
    return {"images": n, "batch": batch,
            "seconds": {k: round(v, 3) for k, v in totals.items()},
            "ms_per_image": {k: round(1000 * v / n, 3) for k, v in totals.items()},
            "total_ms_per_image": round(1000 * sum(totals.values()) / n, 3)}


# ------------------------------------------------------------------------------------------------------- job runner

class TreeMemory(PeakMemory):
    """PeakMemory for another process (a job's driver) and its descendants (its embedded Ray), also sampling the
    driver's own RSS, the commit records and the spill directory; keeps a timeline and every pid seen."""

    def __init__(self, pid: int, commits: Path, spill: Path, interval: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(interval)
        self.pid, self.commits, self.spill = pid, commits, spill
        self.driver_peak = self.ray_peak = self.tree_peak_private = self.spill_peak = 0
        self.timeline: list[dict] = []
        self.seen: dict[int, float] = {}
        self.cpu: dict[int, tuple[str, float]] = {}
        self.start = time.perf_counter()

    def cpu_by_kind(self) -> dict:
        """CPU seconds (user + system, as last sampled) and process counts by kind of process: the driver, the
        attribution actor, Ray Data task workers (by the last task name seen), raylet, gcs_server, agents."""
        kinds: dict[str, dict] = {}
        for kind, seconds in self.cpu.values():
            entry = kinds.setdefault(kind, {"processes": 0, "cpu_seconds": 0.0})
            entry["processes"] += 1
            entry["cpu_seconds"] = round(entry["cpu_seconds"] + seconds, 2)
        return dict(sorted(kinds.items(), key=lambda kv: -kv[1]["cpu_seconds"]))

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        n = 0
        while not self._stop.is_set():
            total = private = driver = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for proc in tree:
                try:
                    info = proc.memory_info()
                    self.seen.setdefault(proc.pid, proc.create_time())
                    cpu = proc.cpu_times()
                    self.cpu[proc.pid] = (_kind(proc, self.pid), cpu.user + cpu.system)
                except psutil.Error:
                    continue
                total += info.rss
                private += info.rss - getattr(info, "shared", 0)
                if proc.pid == self.pid:
                    driver = info.rss
                    self.driver_peak = max(self.driver_peak, _vm_hwm(self.pid), driver)
            spill = _tree_bytes(self.spill) if n % 4 == 0 else (self.timeline[-1]["spill_bytes"]
                                                                 if self.timeline else 0)
            self.peak, self.tree_peak_private = max(self.peak, total), max(self.tree_peak_private, private)
            self.ray_peak = max(self.ray_peak, total - driver)
            self.spill_peak = max(self.spill_peak, spill)
            commits = len(glob.glob(str(self.commits / "*.json")))
            self.timeline.append({"t": round(time.perf_counter() - self.start, 2), "commits": commits,
                                  "driver_rss": driver, "ray_rss": total - driver, "spill_bytes": spill})
            n += 1
            self._stop.wait(self.interval)


def _kind(proc: psutil.Process, driver: int) -> str:
    if proc.pid == driver:
        return "driver"
    argv = proc.cmdline()
    name = argv[0] if argv and argv[0].startswith("ray::") else proc.name()  # name(): 15 characters at most
    if name.startswith("ray::"):
        return name.split(".")[0].strip()  # ray::MapWorker(MapBatches(AttributionWorker)).submit -> …)
    cmd = " ".join(argv[:3])
    for known in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py", "default_worker"):
        if known in cmd or known in name:
            return known
    return name


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores) since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_bytes(path: Path) -> int:
    total = 0
    for directory, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(directory, name))
            except OSError:
                pass
    return total


def run_job(module: str, args: list[str], out: Path, log: Path, kill_at_commits: int | None = None,
            profile: Path | None = None, keep_ray_tmp: bool = False) -> dict:
    """``python -m <module> <args>`` with its own Ray temp dir; sampled (TreeMemory); optionally SIGKILLed once
    ``kill_at_commits`` commit records exist. Returns times, memory, spilling, Ray Data operator stats, the
    job's stdout lines with their times."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    spill = ray_tmp / "spill"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp),
           "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"),
           "RAY_object_spilling_directory": str(spill), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    python = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
    lines: list[tuple[float, str]] = []
    machine_before = _busy_cpu_seconds()
    start = time.perf_counter()
    with open(log, "ab") as stderr:
        proc = subprocess.Popen([*python, "-m", module, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=stderr, start_new_session=True)
        reader = threading.Thread(target=lambda: [lines.append((time.perf_counter() - start, raw.decode().rstrip()))
                                                  for raw in proc.stdout], daemon=True)
        reader.start()
        killed = None
        with TreeMemory(proc.pid, out / "_commits", spill) as memory:
            while proc.poll() is None:
                if kill_at_commits is not None and len(glob.glob(str(out / "_commits" / "*.json"))) >= kill_at_commits:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = {"at_seconds": round(time.perf_counter() - start, 2),
                              "commits_at_kill_signal": len(glob.glob(str(out / "_commits" / "*.json")))}
                    break
                time.sleep(0.05)
            proc.wait()
            wall = time.perf_counter() - start
        reader.join(timeout=10)
    result = {"command": " ".join(["python", "-m", module, *args]), "returncode": proc.returncode,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - wall)),
              "wall_seconds": round(wall, 2), "driver_peak_rss_bytes": memory.driver_peak,
              "ray_peak_rss_bytes": memory.ray_peak, "driver_and_ray_peak_rss_bytes": memory.peak,
              "driver_and_ray_peak_private_bytes": memory.tree_peak_private,
              "processes_seen": len(memory.seen), "cpu_by_process": memory.cpu_by_kind(),
              "lines": [{"t": round(t, 2), "line": line} for t, line in lines]}
    machine = _busy_cpu_seconds() - machine_before
    ours = sum(v["cpu_seconds"] for v in result["cpu_by_process"].values())
    result["cpu"] = {"job_cpu_seconds": round(ours, 2), "machine_busy_cpu_seconds": round(machine, 2),
                     "other_processes_cpu_seconds": round(max(0.0, machine - ours), 2),
                     "machine_cpu_seconds_available": round(wall * (os.cpu_count() or 1), 2)}
    if killed:
        killed["left_behind"] = _reap(memory.seen, proc.pid)
        result["killed"] = killed
    result["spilling"] = spill_report(ray_tmp, spill, memory.spill_peak)
    result["ray_data"] = ray_data_operators(ray_tmp)
    result["timeline"] = memory.timeline
    if keep_ray_tmp:
        result["ray_tmp"] = str(ray_tmp)
    else:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return result


def _reap(seen: dict[int, float], driver: int, grace: float = 10.0) -> dict:
    """After a SIGKILL of the driver: wait up to ``grace`` s for the Ray processes it started to exit on their
    own (Ray fate-shares them with the driver); SIGKILL by pid whatever is still alive."""
    def alive() -> list[psutil.Process]:
        procs = []
        for pid, created in seen.items():
            try:
                proc = psutil.Process(pid)
                if pid != driver and proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    procs.append(proc)
            except psutil.Error:
                pass
        return procs

    start = time.perf_counter()
    at_kill = len(alive())
    while alive() and time.perf_counter() - start < grace:
        time.sleep(0.2)
    survivors = alive()
    names = sorted({" ".join(p.cmdline()[:1] + p.cmdline()[1:3])[:60] for p in survivors if _safe(p.cmdline)})
    for proc in survivors:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return {"ray_processes_alive_at_kill": at_kill, "exited_within_seconds": round(time.perf_counter() - start, 2)
            if not survivors else None, "killed_after_grace": len(survivors), "survivors": names}


def _safe(fn) -> bool:
    try:
        fn()
        return True
    except psutil.Error:
        return False


def spill_report(ray_tmp: Path, spill: Path, peak: int) -> dict:
    """Object-store spilling of one job: the spill directory's peak size (sampled), the last cumulative
    "Spilled …" line of the raylet, restored bytes, Ray Data's per-operator obj_store_mem_spilled."""
    raylet = "\n".join(Path(p).read_text(errors="replace")
                       for p in glob.glob(str(ray_tmp / "ray" / "session_*" / "logs" / "raylet.out")))
    spilled = re.findall(r"Spilled (\d+) MiB, (\d+) objects", raylet)
    restored = re.findall(r"Restored (\d+) MiB, (\d+) objects", raylet)
    return {"spill_dir_peak_bytes": peak,
            "raylet_spilled_mib": int(spilled[-1][0]) if spilled else 0,
            "raylet_spilled_objects": int(spilled[-1][1]) if spilled else 0,
            "raylet_restored_mib": int(restored[-1][0]) if restored else 0,
            "ray_data_spilled_bytes": sum(op.get("obj_store_mem_spilled", 0)
                                          for op in ray_data_operators(ray_tmp).values())}


_OP_FIELDS = ("num_tasks_finished", "function_body_time_s", "task_scheduling_time_s",
              "task_submission_backpressure_time", "task_output_backpressure_time_s", "block_serialization_time_s",
              "obj_store_mem_spilled", "num_task_outputs_generated", "rows_task_outputs_generated")


def ray_data_operators(ray_tmp: Path) -> dict:
    """Per-operator totals from Ray Data's log ("Operator … completed. Operator Metrics: {…}")."""
    text = "\n".join(Path(p).read_text(errors="replace")
                     for p in glob.glob(str(ray_tmp / "ray" / "session_*" / "logs" / "ray-data" / "ray-data.log")))
    ops = {}
    for name, body in re.findall(r"Operator (\S+) completed\. Operator Metrics:\n(\{.*\})", text):
        entry = {}
        for field in _OP_FIELDS:
            found = re.search(rf"'{field}': ([0-9.e+-]+)", body)
            if found:
                value = float(found.group(1))
                entry[field] = round(value, 3) if not value.is_integer() else int(value)
        uss = re.search(r"'max_uss_bytes': \{[^}]*'max': (\d+)", body)
        if uss:
            entry["max_uss_bytes"] = int(uss.group(1))
        rows = re.search(r"'block_size_rows': \(samples: (\d+), avg: ([0-9.]+)\)", body)
        if rows:
            entry["blocks"], entry["block_rows_avg"] = int(rows.group(1)), float(rows.group(2))
        ops[name] = entry
    return ops


# ------------------------------------------------------------------------------------------------- outputs, checks

def files_report(out: Path) -> dict:
    """Files and bytes under an output directory by top-level entry (attributions, errors, metrics, _commits,
    manifest.json, …)."""
    kinds: dict[str, dict] = {}
    for path in out.rglob("*"):
        if path.is_file():
            kind = path.relative_to(out).parts[0]
            entry = kinds.setdefault(kind, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += path.stat().st_size
    return {"files": sum(k["files"] for k in kinds.values()), "bytes": sum(k["bytes"] for k in kinds.values()),
            "by_kind": kinds}


def verify(out: Path, kind: str, expected: dict[str, list[str]], per_image: int, group: list[str]) -> dict:
    """Every committed file of ``kind`` read with pyarrow: rows per (``group``) counted; expected keys of every
    shard present ``per_image`` times; files on disk that no commit record lists (stray) counted."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    records = [json.loads(p.read_text()) for p in sorted((out / "_commits").glob("*.json"))]
    files = [f for r in records for f in r["files"] if f.startswith(kind + "/")]
    table = pa.concat_tables([pq.read_table(out / f, columns=group) for f in files]) if files else None
    on_disk = {str(p.relative_to(out)) for k in ("attributions", "errors", "metrics", "npz")
               for p in (out / k).rglob("*") if p.is_file()}
    listed = {f for r in records for f in r["files"]}
    report = {"commit_records": len(records), "files": len(files), "rows": table.num_rows if table else 0,
              "stray_files": len(on_disk - listed), "listed_but_absent": len(listed - on_disk),
              "staging_files": sum(1 for p in (out / "_staging").rglob("*") if p.is_file())
              if (out / "_staging").exists() else 0}
    if table is None:
        return {**report, "duplicates": 0, "missing": sum(len(k) for k in expected.values()), "ok": False}
    counts = table.group_by(group).aggregate([([], "count_all")])
    report["distinct"] = counts.num_rows
    report["duplicates"] = int(pc.sum(pc.subtract(counts["count_all"], 1)).as_py() or 0)
    present = Counter(zip(table["shard"].to_pylist(), table["key"].to_pylist()))
    want = [(s, k) for s, keys in expected.items() for k in keys]
    report["missing"] = sum(1 for pair in want if present.get(pair, 0) < per_image)
    report["unexpected"] = len(set(present) - set(want))
    report["images_covered"] = sum(1 for pair in want if present.get(pair, 0) >= per_image)
    report["ok"] = (report["duplicates"] == 0 and report["missing"] == 0 and report["unexpected"] == 0
                    and report["stray_files"] == 0 and report["listed_but_absent"] == 0)
    return report


def commit_rate(lines: list[dict], per_shard: int) -> dict:
    """From a job's progress lines ("[i/n] committed …" with times): first/last commit time and the steady rate
    between them (start-up excluded)."""
    times = [entry["t"] for entry in lines if "] committed " in entry["line"]]
    if not times:
        return {"commits_seen": 0}
    later = [t for t in times if t - times[0] > 0.2]  # commits come in bursts (a write part holds several shards)
    span = times[-1] - times[0]
    return {"commits_seen": len(times), "first_commit_s": times[0], "last_commit_s": times[-1],
            "steady_images_per_second": round(len(later) * per_shard / span, 2) if later else None}


def driver_growth(timeline: list[dict], shards: int) -> dict:
    """Driver RSS against committed shards (least squares over the samples with at least one commit)."""
    points = [(p["commits"], p["driver_rss"]) for p in timeline if p["commits"] > 0 and p["driver_rss"]]
    if len(points) < 3 or len({c for c, _ in points}) < 2:
        return {}
    n = len(points)
    mx, my = sum(c for c, _ in points) / n, sum(r for _, r in points) / n
    slope = sum((c - mx) * (r - my) for c, r in points) / sum((c - mx) ** 2 for c, _ in points)
    first = next(r for c, r in points)
    return {"driver_rss_at_first_commit": first, "driver_rss_at_last_sample": points[-1][1],
            "bytes_per_committed_shard": round(slope), "extrapolated_10000_shards_bytes": round(my + slope *
                                                                                               (10000 - mx))}


def manifest_cost(out: Path, shards: int) -> dict:
    """What jobs.common.commit_as_written's rewrite of manifest.json at every commit costs: the final manifest's
    size and the time to serialise + write it once (measured here), times the number of commits (each rewrite
    is about as large as the number of shards committed so far, so the total grows as shards²)."""
    from workers.sink import OutputStore

    path = out / "manifest.json"
    if not path.exists():
        return {}
    manifest = json.loads(path.read_text())
    store = OutputStore(str(out / "_manifest_probe"))
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        store.write_json("manifest.json", manifest)
    once = (time.perf_counter() - start) / repeats
    shutil.rmtree(out / "_manifest_probe", ignore_errors=True)
    size = path.stat().st_size
    return {"manifest_bytes": size, "write_seconds_once": round(once, 5),
            "rewrites_per_run": shards + 2, "bytes_written_by_rewrites_est": round(size * (shards + 1) / 2),
            "seconds_in_rewrites_est": round(once * (shards + 1) / 2, 3)}


def driver_profile(path: Path, top: int = 25) -> list[str]:
    """The driver's cProfile (``--profile-driver``), top functions by cumulative time, as text lines."""
    import io
    import pstats

    if not path.exists():
        return []
    buffer = io.StringIO()
    pstats.Stats(str(path), stream=buffer).sort_stats("cumulative").print_stats(top)
    return [line for line in buffer.getvalue().splitlines() if line.strip()][-top - 1:]


# --------------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    pipeline["manifest"] = manifest_cost(maps, a.shards)
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

    bare_actor = next(r for r in bare_result["runs"] if r["threads"] == 1)
    bare_best = max(bare_result["runs"], key=lambda r: r["images_per_second"])
    summary = pipeline["summary"] or {}
    ips = summary.get("images_per_second") or 0.0
    images_done = summary.get("samples") or 0
    steady = pipeline["commit_rate"].get("steady_images_per_second")
    attributions = pipeline["files"]["by_kind"].get("attributions", {"files": 0, "bytes": 0})
    rows = pipeline["check"]["rows"]
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
        "pipeline": {k: v for k, v in pipeline.items() if k not in ("lines", "timeline")},
        "evaluate": {k: v for k, v in evaluate.items() if k not in ("lines", "timeline")},
        "resume": {
            "killed": {k: v for k, v in killed.items() if k not in ("lines", "timeline")},
            "resumed": {k: v for k, v in resumed.items() if k not in ("lines", "timeline")},
            "check": resume_check,
        },
        "headline": {
            "pipeline_images_per_second": ips,
            "pipeline_steady_images_per_second": steady,
            "bare_images_per_second": bare_actor["images_per_second"],
            "bare_best_images_per_second": bare_best["images_per_second"],
            "ratio_to_bare": round(ips / bare_actor["images_per_second"], 3) if ips else 0.0,
            "steady_ratio_to_bare": round(steady / bare_actor["images_per_second"], 3) if steady else None,
            "ratio_to_best_bare": round(ips / bare_best["images_per_second"], 3) if ips else 0.0,
            "pipeline_cpu_ms_per_image": round(1000 * pipeline["cpu"]["job_cpu_seconds"] / images_done, 3)
            if images_done else None,
            "bare_cpu_ms_per_image": bare_actor["cpu_ms_per_image"],
            "cpu_ratio_bare_to_pipeline": round(bare_actor["cpu_ms_per_image"] * images_done
                                                / (1000 * pipeline["cpu"]["job_cpu_seconds"]), 3)
            if images_done and pipeline["cpu"]["job_cpu_seconds"] else None,
            "other_processes_cpu_share": round(pipeline["cpu"]["other_processes_cpu_seconds"]
                                               / pipeline["cpu"]["machine_cpu_seconds_available"], 3),
            "driver_peak_rss_bytes": pipeline["driver_peak_rss_bytes"],
            "ray_peak_rss_bytes": pipeline["ray_peak_rss_bytes"],
            "bench_process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "spilled_bytes": max(pipeline["spilling"]["spill_dir_peak_bytes"],
                                 pipeline["spilling"]["raylet_spilled_mib"] * 2**20),
            "files_written": pipeline["files"]["files"], "bytes_written": pipeline["files"]["bytes"],
            "attribution_files": attributions["files"],
            "bytes_per_map": round(attributions["bytes"] / rows, 1) if rows else None,
            "evaluate_images_per_second": (evaluate["summary"] or {}).get("images_per_second"),
            "killed_at_commits": committed_after_kill, "resume_seconds": resumed["wall_seconds"],
            "resume_first_commit_seconds": commit_rate(resumed["lines"], per_shard).get("first_commit_s"),
            "ray_processes_left_after_kill": ((killed.get("killed") or {}).get("left_behind") or {})
            .get("killed_after_grace"),
            "resume_images": (resumed["summary"] or {}).get("samples"),
            "resume_ok": resume_check["ok"], "pipeline_ok": pipeline["check"]["ok"],
            "evaluate_ok": evaluate["check"]["ok"],
        },
    }
    report["timelines"] = {"pipeline": _thin(pipeline["timeline"]), "killed": _thin(killed["timeline"]),
                           "resumed": _thin(resumed["timeline"])}
    print_table(report)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    say(f"JSON: {a.out}; job logs (stderr): {log}")
    return report


def code_state() -> dict:
    """The code measured: HEAD and the pipeline's files that differ from it (the tree may hold uncommitted work)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [line[3:] for line in git("status", "--porcelain", "--", "jobs", "workers", "schemas",
                                        "attribution").splitlines() if line.strip()]
    return {"head": git("rev-parse", "--short", "HEAD").strip(), "changed_pipeline_files": changed}


def _thin(timeline: list[dict], points: int = 120) -> list[dict]:
    step = max(1, len(timeline) // points)
    return timeline[::step] + (timeline[-1:] if timeline and (len(timeline) - 1) % step else [])


def print_table(r: dict) -> None:
    c, h = r["config"], r["headline"]
    mib = lambda b: f"{(b or 0) / 2**20:,.0f} MiB"  # noqa: E731
    print(f"\nbench.scale: {c['images']} images in {c['shards']} shards, {c['size']} px | {c['model']} "
          f"({c['weights']}) | {c['method']} | targets {c['targets']} | batch {c['batch_size']} | "
          f"{r['machine']['cpus']} CPUs, load {r['machine']['loadavg_before'][0]} -> "
          f"{r['machine']['loadavg_after'][0]}")
    rows = [("shard generation", f"{r['shards']['seconds']} s" + (" (cached)" if r["shards"]["cached"] else ""),
             f"{r['shards']['images_per_second']} img/s, {mib(r['shards']['bytes'])}")]
    for b in r["bare"]:
        rows.append((f"bare loop, {b['threads']} thread(s)", f"{b['seconds']} s",
                     f"{b['images_per_second']} img/s on {b['images']} (decode {b['decode_seconds']} s, "
                     f"compute {b['compute_seconds']} s), peak {mib(b['peak_rss_bytes'])}"))
    s = r["stages"]
    rows.append(("stages, 1 process, no Ray", f"{s['total_ms_per_image']} ms/img",
                 ", ".join(f"{k} {v}" for k, v in s["ms_per_image"].items())))
    p = r["pipeline"]
    rows += [
        ("pipeline (jobs.attribute)", f"{p['wall_seconds']} s",
         f"{h['pipeline_images_per_second']} img/s (job), steady {h['pipeline_steady_images_per_second']} img/s"),
        ("  ratio to bare (1 thread)", f"{h['ratio_to_bare']}", f"steady {h['steady_ratio_to_bare']}; "
                                                               f"to best bare {h['ratio_to_best_bare']}"),
        ("  CPU per image", f"{h['pipeline_cpu_ms_per_image']} ms",
         f"bare {h['bare_cpu_ms_per_image']} ms (ratio {h['cpu_ratio_bare_to_pipeline']}); other processes used "
         f"{100 * h['other_processes_cpu_share']:.0f} % of the machine meanwhile"),
        ("  CPU by process", f"{p['cpu']['job_cpu_seconds']} s",
         ", ".join(f"{k.replace('ray::', '')} {v['cpu_seconds']}" for k, v in list(p["cpu_by_process"].items())[:6])),
        ("  driver peak RSS", mib(h["driver_peak_rss_bytes"]),
         f"growth {p['driver_growth'].get('bytes_per_committed_shard', '?')} B/shard"),
        ("  Ray processes peak RSS", mib(h["ray_peak_rss_bytes"]),
         f"with the driver {mib(p['driver_and_ray_peak_rss_bytes'])} (without shared pages "
         f"{mib(p['driver_and_ray_peak_private_bytes'])}); {p['processes_seen']} processes started"),
        ("  object-store spilling", mib(h["spilled_bytes"]),
         f"spill dir peak {mib(p['spilling']['spill_dir_peak_bytes'])}, raylet {p['spilling']['raylet_spilled_mib']} "
         f"MiB / {p['spilling']['raylet_spilled_objects']} objects"),
        ("  files written", f"{h['files_written']}", f"{mib(h['bytes_written'])}; {h['attribution_files']} "
                                                     f"attribution files, {h['bytes_per_map']} B/map"),
        ("  manifest.json", f"{p['manifest'].get('manifest_bytes', 0):,} B",
         f"rewritten {p['manifest'].get('rewrites_per_run')}x, ~{p['manifest'].get('seconds_in_rewrites_est')} s"),
        ("  rows check", "ok" if h["pipeline_ok"] else "FAILED",
         f"{p['check']['rows']} rows, {p['check']['duplicates']} duplicates, {p['check']['missing']} missing"),
    ]
    e = r["evaluate"]
    rows += [("evaluate (ebpg,ibd)", f"{e['wall_seconds']} s",
              f"{h['evaluate_images_per_second']} img/s; driver {mib(e['driver_peak_rss_bytes'])}, Ray "
              f"{mib(e['ray_peak_rss_bytes'])}; {e['files']['files']} files; rows "
              f"{'ok' if h['evaluate_ok'] else 'FAILED'} ({e['check']['rows']})")]
    k, ck = r["resume"]["killed"], r["resume"]["check"]
    killed = k.get("killed") or {}
    rows += [
        ("killed run", f"{killed.get('at_seconds', '-')} s",
         f"SIGKILL at {killed.get('commits_at_kill_signal', '-')}/{c['shards']} commits "
         f"({h['killed_at_commits']} after); Ray processes alive at kill "
         f"{(killed.get('left_behind') or {}).get('ray_processes_alive_at_kill', '-')}, killed after grace "
         f"{(killed.get('left_behind') or {}).get('killed_after_grace', '-')}"),
        ("resume", f"{h['resume_seconds']} s", f"{h['resume_images']} images recomputed; first commit after "
                                                 f"{h['resume_first_commit_seconds']} s"),
        ("  rows check", "ok" if h["resume_ok"] else "FAILED",
         f"{ck['rows']} rows, {ck['duplicates']} duplicates, {ck['missing']} missing, {ck['stray_files']} stray files"),
    ]
    width = max(len(name) for name, _, _ in rows) + 2
    for name, value, detail in rows:
        print(f"{name:<{width}}{value:>16}  {detail}")


if __name__ == "__main__":
    main(sys.argv[1:])
