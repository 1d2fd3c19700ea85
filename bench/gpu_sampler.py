"""GPU utilisation and used memory sampled by a thread while a job runs (pynvml, else nvidia-smi)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.gpu_report import one_line


class GpuSampler:
    """Utilisation (percent of the last sample period in which a kernel ran) and used memory (bytes) of one GPU,
    read by a thread every ``interval_s``: through pynvml if importable (else the copy Ray ships), else by running
    ``nvidia-smi --query-gpu=utilization.gpu,memory.used`` once per sample (one short run per sample, not
    ``-lms``: a pipe would buffer its lines and their times would be wrong). ``samples``: (time.time(), percent,
    bytes); ``source``: where they came from; ``error``: why sampling stopped (the fields are then null)."""

    def __init__(self, index: str, interval_s: float = 0.2) -> None:
        self.index, self.interval_s = index, interval_s
        self.samples: list[tuple[float, float, int]] = []
        self.source: str | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._nvml: Any = None

    def __enter__(self) -> "GpuSampler":
        self._read = self._nvml_reader() or self._smi_reader()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                util, used = self._read()
            except Exception as exc:  # noqa: BLE001 -- a sampler that fails leaves null fields, not a failed section
                self.error = one_line(exc)
                return
            self.samples.append((time.time(), util, used))
            self._stop.wait(self.interval_s)

    def _nvml_reader(self) -> Callable[[], tuple[float, int]] | None:
        try:
            import pynvml
            self.source = "pynvml"
        except ImportError:
            try:
                from ray._private.thirdparty import pynvml
                self.source = "pynvml (the copy in ray)"
            except ImportError:
                return None
        try:
            pynvml.nvmlInit()
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(self.index)) if self.index.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(self.index))
        except Exception as exc:  # noqa: BLE001 -- fall back to nvidia-smi
            self.error = f"{self.source}: {one_line(exc)}"
            return None
        self._nvml = pynvml
        return lambda: (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        int(pynvml.nvmlDeviceGetMemoryInfo(handle).used))

    def _smi_reader(self) -> Callable[[], tuple[float, int]]:
        self.source = "nvidia-smi"
        command = ["nvidia-smi", "-i", self.index, "--query-gpu=utilization.gpu,memory.used",
                   "--format=csv,noheader,nounits"]

        def read() -> tuple[float, int]:
            text = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout
            util, used = text.strip().splitlines()[0].split(",")[:2]
            return float(util), int(float(used) * 2**20)
        return read

    def busy_fraction(self, t0: float | None = None, t1: float | None = None) -> float | None:
        """Mean utilisation in [0, 1] over the samples taken between ``t0`` and ``t1`` (None: no samples)."""
        values = [u for t, u, _ in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return sum(values) / len(values) / 100.0 if values else None

    def peak_used_bytes(self) -> int | None:
        """The most device memory (bytes, all processes) any sample saw; None: no samples."""
        return max((m for _, _, m in self.samples), default=None)


def gpu_index() -> str:
    """The physical GPU this process's cuda:0 is (CUDA_VISIBLE_DEVICES' first entry; nvidia-smi ignores it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"
