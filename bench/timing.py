"""Timing on a shared machine: device sync, interleaved rounds with warm-up, the CPU time other processes used
meanwhile (and waiting for them to go quiet), and per-image statistics (glibc's freed-memory retention is in
workers.device)."""
from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and, on CUDA, return the caching allocator's unused blocks to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ForeignLoad:
    """CPU time other processes used while a timed call ran, in cores (Linux /proc/stat; None elsewhere).

    Timings on a shared machine are only comparable when nobody else computes meanwhile: with 2 cores and a
    second busy process, OpenMP threads wait on each other and a run can be 10x slower."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy_s(self) -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / self.tick

    def start(self) -> None:
        """Begin a measurement (CPU seconds of the machine and of this process, wall clock)."""
        self._busy0, self._own0, self._wall0 = self._busy_s(), _own_cpu_s(), time.perf_counter()

    def stop(self) -> float | None:
        """Cores other processes used on average since :meth:`start` (None: /proc/stat unreadable)."""
        busy = self._busy_s()
        wall = time.perf_counter() - self._wall0
        if busy is None or self._busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self._busy0) - (_own_cpu_s() - self._own0)) / wall


def wait_until_quiet(meter: ForeignLoad, max_foreign: float, budget_s: float) -> None:
    """Sleep in 0.3 s probes until other processes use at most ``max_foreign`` cores (or ``budget_s`` is spent)."""
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline:
        meter.start()
        time.sleep(0.3)
        load = meter.stop()
        if load is None or load <= max_foreign:
            return


def _own_cpu_s() -> float:
    """CPU seconds (user + system) this process and its waited-for children used so far."""
    t = os.times()
    return t.user + t.system


def interleaved(fns: dict[str, Callable], repeats: int, device: torch.device, max_foreign: float,
                retries: int, wait_quiet_s: float = 0.0, warmup: bool = True
                ) -> tuple[dict, dict[str, list[float]], dict[str, list[float | None]]]:
    """One warm-up call of each fn (its result kept), then ``repeats`` rounds timing each fn once per round.
    Returns (first result per label, wall seconds per label [repeats], foreign cores per label [repeats]).

    A timed call during which other processes used more than ``max_foreign`` cores is retried (after a short
    pause) up to ``retries`` times; the foreign load of each kept run is returned too. With ``wait_quiet_s`` > 0,
    each timed call first waits up to that long for the other processes to go quiet. ``warmup=False`` (calls of
    many seconds, whose one-time costs are negligible): no warm-up call, the first timed call's result is kept."""
    results: dict[str, Any] = {}
    if warmup:
        for label, fn in fns.items():
            results[label] = fn()
            sync(device)
    times: dict[str, list[float]] = {label: [] for label in fns}
    loads: dict[str, list[float | None]] = {label: [] for label in fns}
    meter = ForeignLoad()
    for _ in range(repeats):
        for label, fn in fns.items():
            for attempt in range(retries + 1):
                if wait_quiet_s > 0:
                    wait_until_quiet(meter, max_foreign, wait_quiet_s)
                gc.collect()
                sync(device)
                meter.start()
                start = time.perf_counter()
                out = fn()
                sync(device)
                elapsed = time.perf_counter() - start
                foreign = meter.stop()
                if foreign is None or foreign <= max_foreign or attempt == retries:
                    break
                time.sleep(0.5)
            results.setdefault(label, out)
            times[label].append(elapsed)
            loads[label].append(foreign)
    return results, times, loads


def per_image_stats(times: list[float], loads: list[float | None], batch: int) -> dict[str, Any]:
    """Wall seconds per call ``times`` of ``batch`` images as JSON: median / min / every run in seconds per image,
    and the foreign cores of each run (rounded to 0.01; None where unmeasured)."""
    per_image = [t / batch for t in times]
    return {"s_per_image": statistics.median(per_image), "min_s_per_image": min(per_image),
            "runs_s_per_image": per_image,
            "foreign_cores": [None if v is None else round(v, 2) for v in loads]}


def median_seconds(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: bool = True
                   ) -> dict[str, float]:
    """Median wall seconds per call of each fn: :func:`interleaved` with ``repeats`` rounds, no foreign-load
    retries, one warm-up call each unless ``warmup`` is False (device synchronised around every call)."""
    _, times, _ = interleaved(fns, repeats, device, max_foreign=math.inf, retries=0, warmup=warmup)
    return {label: statistics.median(t) for label, t in times.items()}
