"""Fault injection for tests and chaos drills: actors that die the way real ones do (they must live in an
importable package so Ray workers can load them)."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from workers.attribution_worker import AttributionWorker, WorkerConfig


class CrashOnceWorker(AttributionWorker):
    """Kills its own process (as an OOM kill or a segfault would) on call number ``crash_on_call``, once per
    run: the first actor to get there creates ``crash_marker`` and dies; restarted actors carry on."""

    def __init__(self, config: WorkerConfig, crash_marker: str, crash_on_call: int = 2) -> None:
        super().__init__(config)
        self.crash_marker = Path(crash_marker)
        self.crash_on_call = crash_on_call

    def __call__(self, table: pa.Table):
        if self.calls + 1 == self.crash_on_call and not self.crash_marker.exists():
            self.crash_marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(table)


class LostDeviceWorker(AttributionWorker):
    """Loses its device on call ``lose_on_call`` as a GPU whose CUDA context dies would: in this process every method
    fails from then on and the device reports itself unusable (workers.device.device_is_healthy). In the first actor
    only, unless ``again``: then in the actor Ray restarts too. ``marker``: a file that records the first loss."""

    def __init__(self, config: WorkerConfig, marker: str, lose_on_call: int = 2, again: bool = False) -> None:
        super().__init__(config)
        self.marker, self.lose_on_call, self.again = Path(marker), lose_on_call, again

    def __call__(self, table: pa.Table):
        if self.calls + 1 == self.lose_on_call and (self.again or not self.marker.exists()):
            self.marker.write_text(str(os.getpid()))
            import workers.attribution_worker as aw
            import workers.device as device

            def lost(*_args, **_kwargs):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            device.device_is_healthy = lambda _device: False
            aw.attribute_with_extras = lost
        return super().__call__(table)


class PoisonWorker(AttributionWorker):
    """Kills its own process (as a segfault would) whenever sample ``poison_key`` is among the samples it computes,
    every time: the sample that workers.crash_guard must turn into an error row."""

    def __init__(self, config: WorkerConfig, poison_key: str) -> None:
        super().__init__(config)
        self.poison_key = poison_key

    def _attribute(self, decoded, tables) -> None:
        if self.poison_key in [decoded.columns["key"][i] for i in decoded.good]:
            os._exit(1)
        super()._attribute(decoded, tables)
