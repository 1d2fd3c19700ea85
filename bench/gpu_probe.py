"""The attribution actor of ``bench.gpu_check``'s pipeline section, instrumented: what the actor alone can see.

:class:`ProbeWorker` is :class:`workers.attribution_worker.AttributionWorker` unchanged, plus a small JSON file
per actor process written after every batch: when the actor was ready, when each batch ended (wall clock,
``time.time()``, so the driver can compare it with its own samples), how many images it saw, and the peak GPU
memory of the actor's CUDA caching allocator (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, in
bytes; None on the CPU). It lives in its own small module so that the Ray worker importing it does not import
the benchmark's reference libraries.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from workers.attribution_worker import AttributionWorker, WorkerConfig


class ProbeWorker(AttributionWorker):
    """AttributionWorker that records its own timing and peak GPU memory in ``<stats_dir>/<pid>.json``."""

    def __init__(self, config: WorkerConfig, stats_dir: str) -> None:
        super().__init__(config)
        self._path = Path(stats_dir) / f"{os.getpid()}.json"
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._stats: dict[str, Any] = {"pid": os.getpid(), "device": str(self.spec.device), "ready": time.time(),
                                       "calls": 0, "images": 0, "first_end": None, "first_images": 0,
                                       "last_end": None, "peak_allocated_bytes": None, "peak_reserved_bytes": None}
        self._write()

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        out = super().__call__(table)  # the maps are on the host when this returns (one .cpu() per method)
        stats, now = self._stats, time.time()
        stats["calls"] += 1
        stats["images"] += table.num_rows
        if stats["first_end"] is None:
            stats["first_end"], stats["first_images"] = now, table.num_rows
        stats["last_end"] = now
        if self.spec.device.type == "cuda":
            stats["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.spec.device))
            stats["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.spec.device))
        self._write()
        return out

    def _write(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._stats))
        tmp.replace(self._path)


def read_probe_stats(stats_dir: str | Path) -> dict[str, Any]:
    """The actors' records combined: ``actors``, ``images``, ``calls``, ``ready`` (earliest), ``first_end``
    (earliest end of an actor's first batch), ``steady_images`` (images of the batches after each actor's first),
    ``last_end`` (latest), ``peak_allocated_bytes`` / ``peak_reserved_bytes`` (largest; None on the CPU)."""
    records = [json.loads(p.read_text()) for p in sorted(Path(stats_dir).glob("*.json"))]
    done = [r for r in records if r["calls"]]

    def pick(fn, key):
        values = [r[key] for r in records if r[key] is not None]
        return fn(values) if values else None

    return {"actors": len(records), "images": sum(r["images"] for r in records),
            "calls": sum(r["calls"] for r in records), "ready": pick(min, "ready"),
            "first_end": pick(min, "first_end"), "last_end": pick(max, "last_end"),
            "steady_images": sum(r["images"] - r["first_images"] for r in done),
            "peak_allocated_bytes": pick(max, "peak_allocated_bytes"),
            "peak_reserved_bytes": pick(max, "peak_reserved_bytes")}
