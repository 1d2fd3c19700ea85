"""workers.crash_guard: a sample that kills its process every time becomes an error row after two deaths, and the
other samples of its batch are kept; a process that died once for another reason costs one batch run sample by
sample, nothing more. Processes really die here (os._exit), in child processes and in a Ray actor."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.crash_guard import POISON_REASON

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
import pyarrow as pa
import os
from workers.crash_guard import guarded


def exit_on_key(table, key):  # the step: dies when key ("*": any) is a sample without an upstream error
    pairs = zip(table.column("key").to_pylist(), table.column("error").to_pylist())
    if any(key in (k, "*") and e is None for k, e in pairs):
        os._exit(1)
    return table.select(["key", "stage", "error"]).append_column("pid", pa.array([os.getpid()] * table.num_rows))


keys, poison, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
table = pa.table({"key": keys, "shard": ["s.tar"] * len(keys), "stage": pa.array([None] * len(keys), pa.string()),
                  "error": pa.array([None] * len(keys), pa.string())})
result = guarded(table, lambda rows: exit_on_key(rows, poison), "decode")
open(out, "w").write(json.dumps(result.to_pylist()))
"""


def attempt(tmp_path: Path, keys: list[str], poison: str) -> tuple[int, list[dict] | None]:
    """One attempt at the batch in a fresh process, as Ray's retry would make: (exit status, rows or None)."""
    out = tmp_path / "rows.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "XAI_CRASH_LEDGER": str(tmp_path / "ledger"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(keys), poison, str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, json.loads(out.read_text()) if out.exists() else None


def test_a_sample_that_kills_every_time_becomes_an_error_row(tmp_path):
    keys = ["a", "b", "c", "d"]
    assert attempt(tmp_path, keys, "c") == (1, None)  # the whole batch: c kills it
    assert attempt(tmp_path, keys, "c") == (1, None)  # alone, one by one: a, b pass, c kills it again
    status, rows = attempt(tmp_path, keys, "c")
    assert status == 0
    by_key = {r["key"]: r for r in rows}
    assert sorted(by_key) == keys and len(rows) == 4
    assert (by_key["c"]["stage"], by_key["c"]["error"]) == ("decode", POISON_REASON)
    assert all(by_key[k]["error"] is None for k in "abd")
    assert list((tmp_path / "ledger").iterdir()) == []  # the batch's record is gone once it is done


def test_a_process_that_dies_on_every_sample_stops_the_job(tmp_path):
    """Two samples of one batch that each kill the process alone: the node, not the samples; no error rows."""
    keys = ["a", "b", "c"]
    for _ in range(3):  # the batch; a alone; b alone (a is marked)
        assert attempt(tmp_path, keys, "*") == (1, None)
    env = {**os.environ, "XAI_CRASH_LEDGER": str(tmp_path / "ledger"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(keys), "*", str(tmp_path / "rows.json")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and not (tmp_path / "rows.json").exists()
    assert ("RepeatedCrashError: the process died on 2 samples of one batch of s.tar, each run alone (a, b)"
            in done.stderr)
    assert line_of(done.stderr) == ("a Ray task stopped: the process died on 2 samples of one batch of s.tar, each "
                                    "run alone (a, b): the node or its device fails, not the samples")


def line_of(stderr: str) -> str | None:
    """What jobs.common.ray_failure_line makes of a Ray task that raised this (its text is the task's traceback)."""
    import ray.exceptions

    from jobs.common import ray_failure_line
    return ray_failure_line(ray.exceptions.RayTaskError("step", stderr, RuntimeError("x")))


def test_one_death_costs_one_run_sample_by_sample(tmp_path):
    keys = ["a", "b", "c"]
    assert attempt(tmp_path, keys, "b") == (1, None)
    status, rows = attempt(tmp_path, keys, "nothing")  # whatever killed it is gone: nothing is marked
    assert status == 0 and [r["error"] for r in rows] == [None] * 3 and sorted(r["key"] for r in rows) == keys
    assert len({r["pid"] for r in rows}) == 1
    status, rows = attempt(tmp_path, keys, "nothing")  # and the next attempt is a plain one again
    assert status == 0 and len(rows) == 3


def test_a_live_or_healthy_run_is_not_touched(tmp_path):
    status, rows = attempt(tmp_path, ["a", "b"], "nothing")
    assert status == 0 and [r["key"] for r in rows] == ["a", "b"]
    assert not list((tmp_path / "ledger").iterdir())


def test_records_of_killed_jobs_are_swept_after_a_day(tmp_path):
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    old, recent = ledger / "old.json", ledger / "recent.json"
    for path in (old, recent):
        path.write_text("{}")
    os.utime(old, (1e9, 1e9))  # 2001
    assert attempt(tmp_path, ["a"], "nothing")[0] == 0
    assert sorted(p.name for p in ledger.iterdir()) == ["recent.json"]


def test_no_place_for_records_runs_the_step_unguarded(tmp_path, monkeypatch, capsys):
    from workers import crash_guard
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XAI_CRASH_LEDGER", str(tmp_path / "file" / "ledger"))  # under a file: cannot be made
    monkeypatch.setattr(crash_guard, "_WARNED", False)
    table = pa.table({"key": ["a"], "shard": ["s.tar"], "stage": pa.array([None], pa.string()),
                      "error": pa.array([None], pa.string())})
    assert crash_guard.guarded(table, lambda rows: rows.select(["key"]), "decode").to_pylist() == [{"key": "a"}]
    assert "cannot keep in-flight records" in capsys.readouterr().err


@pytest.mark.slow  # ~25 s (two actor restarts); make test-slow. The default suite has the retry after a death
# (tests/test_pipeline.py::test_actor_that_dies_once_loses_nothing) and the poison logic with real deaths (above).
def test_a_poison_sample_in_a_ray_actor_becomes_one_error_row(ray_session, tmp_path):
    """jobs.attribute with an actor that dies whenever it computes one sample: the job completes, that sample is one
    error row of the attribute stage, every other sample has its maps."""
    from attribution.data.sample_sets import photo_samples
    from attribution.data.shards import write_shards
    from jobs.attribute import AttributeConfig, run
    from workers.attribution_worker import WorkerConfig
    from workers.testing import PoisonWorker

    shard_set = write_shards(photo_samples(), tmp_path / "shards", "photos", 4, log=lambda *_: None)
    samples = sorted(s.key for s in photo_samples())
    poison = samples[1]
    config = AttributeConfig(shards=[shard_set.pattern], out=str(tmp_path / "maps"), batch_size=4, quiet=True,
                             worker=WorkerConfig(model="efficientnet_lite0", weights="imagenet",
                                                 methods=["gradcam"], targets="top1"))
    summary = run(config, worker_cls=PoisonWorker, worker_kwargs={"poison_key": poison})
    assert summary["samples"] == len(samples) and summary["errors"] == 1
    errors = pq.read_table(tmp_path / "maps" / "errors").to_pylist()
    assert [(e["key"], e["stage"], e["reason"]) for e in errors] == [(poison, "attribute", POISON_REASON)]
    maps = pq.read_table(tmp_path / "maps" / "attributions", columns=["key"]).column("key").to_pylist()
    assert sorted(maps) == [k for k in samples if k != poison]
