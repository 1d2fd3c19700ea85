"""A sample that kills the process working on it becomes an error row instead of an endless crash loop.

Ray restarts a dead actor and retries a dead task without limit (Ray Data asks for ``max_restarts=-1`` and
``max_task_retries=-1`` for its actors and ``max_retries=-1`` for its tasks), which is what a lost node needs. But a
sample that kills its process every time — a segfault in an image decoder or a kernel, a reproducible out-of-memory
kill — would then be retried forever and the job would never end, nor say why.

:func:`guarded` runs a step (the decode task, an actor's call) on a batch while a small record on the node's local
disk names the batch's samples in flight and the process that runs them; the record is removed when the step returns
or raises. A retry of the batch (in the same Ray job, on the same node) that finds the record of a process that no
longer runs knows the batch killed it:

1. the whole batch was in flight: now each of its samples runs alone, each under its own record;
2. one sample was in flight alone: it killed the process twice (with its batch, then alone), so it becomes an error
   row of the step (``stage``: "the process died twice while working on this sample …") and is not run again; the
   batch's other samples run alone;
3. a second sample of the batch kills the process alone too: that is the node (a broken driver, a failing GPU), not
   the samples, so :class:`RepeatedCrashError` stops the job (one line) rather than commit a shard of error rows.

Ray retries a dead task on any node; where the retry lands on another node it starts there from step 1. The records
live in ``XAI_CRASH_LEDGER`` (default ``<tmp>/xai-crash-ledger``). A record costs one small file write and delete per
batch; records of killed jobs are deleted after a day.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa


class RepeatedCrashError(RuntimeError):
    """Processes died on more than one sample of a batch, each run alone: the node or its device fails (a broken
    driver, a bad GPU), not the samples; the job stops instead of writing every sample off as an error row."""


POISON_REASON = ("the process died twice while working on this sample (with its batch, then alone): a crash or an "
                 "out-of-memory kill; skipped")


def ledger_dir() -> Path:
    """Where the in-flight records of this node's processes are kept."""
    return Path(os.environ.get("XAI_CRASH_LEDGER") or Path(tempfile.gettempdir()) / "xai-crash-ledger")


def guarded(table: pa.Table, step: Callable[[pa.Table], pa.Table], stage: str) -> pa.Table:
    """``step(table)`` for a batch of samples (a table with ``key``, ``shard``, ``stage`` and ``error`` columns: the
    raw or decoded rows), or, when an earlier attempt at the same batch died with its process, the batch one sample at
    a time, with any sample that killed the process alone marked failed (``stage``, :data:`POISON_REASON`) so that the
    step emits its error row. The step's outputs are concatenated (one table per call)."""
    keys = table.column("key").to_pylist()
    shards = table.column("shard").to_pylist()
    record = ledger_dir() / f"{_batch_id(_scope(), shards, keys)}.json"
    previous = _read(record)
    if previous is None or _alive(previous):
        if not _write(record, "batch", keys, []):
            return step(table)  # no local disk to keep records on: unguarded, as Ray alone would run it
        try:
            return step(table)
        finally:
            _remove(record)
    poison = list(previous.get("poison", []))
    if previous.get("mode") == "single":
        poison += [k for k in previous.get("running", []) if k not in poison]
    if len(poison) > 1:
        _remove(record)
        raise RepeatedCrashError(f"the process died on {len(poison)} samples of one batch of {shards[0]}, each run "
                                 f"alone ({', '.join(poison[:3])}): the node or its device fails, not the samples")
    if poison:
        table = _mark_failed(table, set(poison), stage)
    failed = table.column("error").to_pylist()
    outputs = []
    try:
        for i in [i for i, error in enumerate(failed) if error is None]:
            _write(record, "single", [keys[i]], poison)
            outputs.append(step(table.slice(i, 1)))
        rest = [i for i, error in enumerate(failed) if error is not None]
        if rest or not outputs:
            outputs.append(step(table.take(rest)))
    finally:
        _remove(record)
    return outputs[0] if len(outputs) == 1 else pa.concat_tables(outputs)


def _mark_failed(table: pa.Table, poison: set[str], stage: str) -> pa.Table:
    keys = table.column("key").to_pylist()
    stages, errors = table.column("stage").to_pylist(), table.column("error").to_pylist()
    for i, key in enumerate(keys):
        if key in poison and errors[i] is None:
            stages[i], errors[i] = stage, POISON_REASON
    table = table.set_column(table.schema.get_field_index("stage"), table.schema.field("stage"),
                             pa.array(stages, table.schema.field("stage").type))
    return table.set_column(table.schema.get_field_index("error"), table.schema.field("error"),
                            pa.array(errors, table.schema.field("error").type))


def _scope() -> str:
    """This Ray job on this node (a node's id is new at every Ray start, a job's is unique in its cluster), so a
    record left by a killed job is never taken for one of a later job; "" outside Ray."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is not in one
    try:
        if ray is not None and ray.is_initialized():
            context = ray.get_runtime_context()
            return f"{context.get_node_id()}:{context.get_job_id()}"
    except Exception:  # noqa: BLE001 -- no Ray, or no runtime context: one scope
        pass
    return ""


def _batch_id(scope: str, shards: list[str], keys: list[str]) -> str:
    digest = hashlib.sha1(scope.encode())
    for shard, key in zip(shards, keys):
        digest.update(f"{shard}\0{key}\0".encode())
    return digest.hexdigest()[:24]


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22), so a reused pid is not
    taken for the process that wrote a record; None where /proc has no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _own_start() -> str | None:
    """This process's start time (:func:`_process_start`), read once per process (a fork reads its own)."""
    global _OWN
    if _OWN is None or _OWN[0] != os.getpid():
        _OWN = (os.getpid(), _process_start(os.getpid()))
    return _OWN[1]


_OWN: tuple[int, str | None] | None = None


def _alive(record: dict) -> bool:
    """Whether the process that wrote ``record`` still runs (the same pid with the same start time)."""
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    start = _process_start(pid)
    if start is not None or record.get("start") is not None:  # a /proc to tell reused pids apart
        return start is not None and start == record.get("start")
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _read(record: Path) -> dict | None:
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(record: Path, mode: str, running: list[str], poison: list[str]) -> bool:
    """Write the in-flight record; False (with one warning per process) where it cannot be written."""
    global _WARNED
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        _sweep(record.parent)
        tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "start": _own_start(), "mode": mode,
                                   "running": running, "poison": poison}), encoding="utf-8")
        os.replace(tmp, record)
        return True
    except OSError as exc:
        if not _WARNED:
            _WARNED = True
            print(f"warning: cannot keep in-flight records in {record.parent} ({exc}); a sample that kills its "
                  f"process will be retried by Ray without limit", file=sys.stderr, flush=True)
        return False


_WARNED = False
_SWEPT: set[Path] = set()
STALE_S = 24 * 3600  # a record this old belongs to a job that was killed (its batches are retried within minutes)


def _sweep(directory: Path) -> None:
    """Once per process: delete records left by killed jobs (older than STALE_S), so the folder does not grow."""
    if directory in _SWEPT:
        return
    _SWEPT.add(directory)
    cutoff = time.time() - STALE_S
    for path in directory.glob("*.json"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


def _remove(record: Path) -> None:
    try:
        record.unlink()
    except OSError:
        pass


__all__ = ["POISON_REASON", "RepeatedCrashError", "guarded", "ledger_dir"]
