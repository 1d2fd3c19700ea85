"""bench.scale's job runner and what it measures: ``python -m <job>`` as a subprocess with its own Ray temporary
directory, the process tree sampled (RSS of the driver and of its Ray, CPU by kind of process, spill directory,
commit records), an optional SIGKILL once enough shards have committed and the reaping of Ray processes left
behind; afterwards object-store spilling, Ray Data's per-operator metrics and the driver's cProfile."""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.pipeline import PeakMemory

REPO = Path(__file__).resolve().parents[1]
SAMPLE_INTERVAL_S = 0.5


class TreeMemory(PeakMemory):
    """PeakMemory for another process (a job's driver, ``pid``) and its descendants (its embedded Ray), sampled
    every ``interval`` s, also sampling the driver's own RSS, the commit records (``commits/*.json``) and the spill
    directory ``spill`` (every 4th sample). Peaks in bytes: ``peak`` (driver + Ray), ``driver_peak`` (with VmHWM),
    ``ray_peak``, ``tree_peak_private`` (without shared pages), ``spill_peak``; ``timeline``: one dict a sample
    (t in s, commits, driver_rss / ray_rss / spill_bytes in bytes); ``seen``: {pid: create time}; ``cpu``: {pid:
    (kind, CPU s)}."""

    def __init__(self, pid: int, commits: Path, spill: Path, interval: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(interval)
        self.pid, self.commits, self.spill = pid, commits, spill
        self.driver_peak = self.ray_peak = self.tree_peak_private = self.spill_peak = 0
        self.timeline: list[dict] = []
        self.seen: dict[int, float] = {}
        self.cpu: dict[int, tuple[str, float]] = {}
        self.start = time.perf_counter()

    def cpu_by_kind(self) -> dict:
        """{kind: {"processes": count, "cpu_seconds": user + system as last sampled}}, most CPU first, by kind of
        process: the driver, the attribution actor, Ray Data task workers (by the last task name seen), raylet,
        gcs_server, agents."""
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
    """"driver", a Ray worker's task or actor name ("ray::…" up to its first "."), a known Ray daemon, else the
    process name."""
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
    """The peak RSS (VmHWM) of process ``pid`` in bytes; 0 where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_bytes(path: Path) -> int:
    """Bytes in the files under ``path`` (0 if absent)."""
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
    """``python -m <module> <args>`` with its own Ray temp dir, stderr appended to ``log``, sampled by
    :class:`TreeMemory`; optionally SIGKILLed once ``kill_at_commits`` commit records exist under ``out/_commits``
    (then the Ray processes left behind are reaped); ``profile``: cProfile the driver into that file. Returns the
    command, return code, start time, ``wall_seconds``, peak RSS in bytes (driver, Ray, both, both without shared
    pages), processes seen, CPU seconds by process kind and in all (job, machine, other processes, available),
    ``killed``, spilling, Ray Data operator stats, ``lines`` (the job's stdout, each with its time ``t`` in s) and
    ``timeline`` (the samples)."""
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


def _safe(fn: Callable[[], Any]) -> bool:
    """Whether ``fn()`` runs without a psutil error (the process may have gone)."""
    try:
        fn()
        return True
    except psutil.Error:
        return False


def spill_report(ray_tmp: Path, spill: Path, peak: int) -> dict:
    """Object-store spilling of one job from its Ray temp dir ``ray_tmp``: the spill directory's peak size
    ``peak`` (bytes, sampled), the last cumulative "Spilled N MiB, M objects" line of the raylet (MiB, objects),
    restored MiB, the sum of Ray Data's per-operator obj_store_mem_spilled (bytes)."""
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
    """{operator name: totals} from Ray Data's log under ``ray_tmp`` ("Operator … completed. Operator Metrics:
    {…}"): the :data:`_OP_FIELDS` (counts, seconds, bytes as Ray Data names them), ``max_uss_bytes``, ``blocks``
    and ``block_rows_avg``."""
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



def driver_profile(path: Path, top: int = 25) -> list[str]:
    """The driver's cProfile at ``path`` (``--profile-driver``): pstats' lines for the ``top`` functions by
    cumulative time (and its header line); [] if there is no profile."""
    import io
    import pstats

    if not path.exists():
        return []
    buffer = io.StringIO()
    pstats.Stats(str(path), stream=buffer).sort_stats("cumulative").print_stats(top)
    return [line for line in buffer.getvalue().splitlines() if line.strip()][-top - 1:]

