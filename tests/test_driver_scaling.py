"""Driver-side costs that grow with the number of shards: manifest rewrites (throttled, the commit records are the
truth), commit-record listings, the duplicate check of expand_shards, and the embedded Ray's idle-worker limit.
No Ray is started here: ShardedRun.process gets a plain iterable of write-step summaries."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import jobs.scaffold as scaffold
from jobs.common import IDLE_WORKERS_PER_CPU, JobError, ensure_ray, expand_shards, local_system_config
from jobs.scaffold import ActorJobSettings, ShardedRun
from workers.sink import OutputStore

KEY = {"model": "m", "methods": ["saliency"]}


class FakeClock:
    """A monotonic clock (seconds) that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(ShardedRun, "clock", staticmethod(fake))
    monkeypatch.setattr(ShardedRun, "manifest_interval_s", 30.0)
    monkeypatch.setattr(scaffold, "ensure_ray", lambda *a, **k: None)
    return fake


@pytest.fixture()
def manifest_writes(monkeypatch) -> list[dict]:
    """Every manifest.json written, as written (a deep copy via JSON)."""
    written: list[dict] = []
    original = OutputStore.write_json

    def write_json(self, rel, data):
        if rel == "manifest.json":
            written.append(json.loads(json.dumps(data, default=str)))
        return original(self, rel, data)

    monkeypatch.setattr(OutputStore, "write_json", write_json)
    return written


def uris_of(n: int) -> list[str]:
    return [f"/data/val-{i:06d}.tar" for i in range(n)]


def summaries(names: list[str], clock: FakeClock, step_s: float):
    """One write-step summary row per shard (one sample, no files), the clock ``step_s`` later before each."""
    for name in names:
        clock.now += step_s
        yield {"shard": name, "shard_total": 1, "samples": 1, "rows": 2, "error_rows": 0, "files": "[]"}


def new_run(out: Path, uris: list[str]) -> ShardedRun:
    return ShardedRun("attribute", str(out), KEY, uris, ActorJobSettings(quiet=True), recorded={"shards": uris})


def test_manifest_is_written_every_interval_not_every_commit(tmp_path, clock, manifest_writes):
    uris = uris_of(10)
    job = new_run(tmp_path / "out", uris)
    assert len(manifest_writes) == 1 and manifest_writes[0]["status"] == "running"
    job.process(lambda pending: summaries([Path(u).name for u in pending], clock, step_s=10.0), noun="rows")
    # commits at t = 10, 20, …, 100 s: rewrites at 30, 60, 90 s, then once when the loop ends (t = 100 s)
    assert [sum(s["status"] == "committed" for s in m["shards"].values()) for m in manifest_writes] == \
        [0, 3, 6, 9, 10]
    summary = job.finish("rows", noun="rows")
    assert len(manifest_writes) == 6 == job.manifest_writes  # was 12: start + one per commit + finish
    final = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert final == manifest_writes[-1]
    assert final["status"] == "complete" and final["summary"]["shards_committed"] == 10
    assert summary["incomplete_shards"] == [] and summary["samples"] == 10 and summary["rows"] == 20
    records = OutputStore(str(tmp_path / "out")).committed()
    assert {name: {k: entry[k] for k in ("status", "samples", "rows", "files")} for name, entry in
            final["shards"].items()} == {name: {"status": "committed", "samples": 1, "rows": 2, "files": []}
                                         for name in records}
    assert set(records) == {Path(u).name for u in uris}


def test_slow_commits_still_rewrite_the_manifest_at_each_commit(tmp_path, clock, manifest_writes):
    """Commits further apart than the interval each show in the manifest as they happen."""
    job = new_run(tmp_path / "out", uris_of(4))
    job.process(lambda pending: summaries([Path(u).name for u in pending], clock, step_s=45.0), noun="rows")
    assert [sum(s["status"] == "committed" for s in m["shards"].values()) for m in manifest_writes] == \
        [0, 1, 2, 3, 4, 4]


def test_a_failure_writes_the_manifest_at_once(tmp_path, clock, manifest_writes):
    def pipeline(pending):
        yield from summaries([Path(u).name for u in pending[:3]], clock, step_s=1.0)
        raise RuntimeError("decode exploded\nsecond line")

    job = new_run(tmp_path / "out", uris_of(6))
    with pytest.raises(RuntimeError):
        job.process(pipeline, noun="rows")
    assert len(manifest_writes) == 2  # start, failure: the three commits were 1 s apart
    failed = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert failed["status"] == "failed" and failed["failure"] == "decode exploded"
    assert sum(s["status"] == "committed" for s in failed["shards"].values()) == 3


def test_ctrl_c_marks_the_manifest_failed(tmp_path, clock):
    def pipeline(pending):
        yield from summaries([Path(u).name for u in pending[:1]], clock, step_s=1.0)
        raise KeyboardInterrupt

    job = new_run(tmp_path / "out", uris_of(3))
    with pytest.raises(KeyboardInterrupt):
        job.process(pipeline, noun="rows")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["failure"] == "KeyboardInterrupt"


def test_killed_between_manifest_writes_resumes_from_the_commit_records(tmp_path, clock, manifest_writes):
    """A kill right after some commits leaves a manifest that lags them; the rerun trusts the records."""
    out, uris = tmp_path / "out", uris_of(8)
    killed = new_run(out, uris)
    for record in killed.store.commit_complete(summaries([Path(u).name for u in uris[:5]], clock, step_s=1.0)):
        killed._committed(record, "rows")  # the commit loop of process(), then SIGKILL: no further write
    stale = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "pending" for s in stale["shards"].values())
    assert len(OutputStore(str(out)).committed()) == 5

    resumed = new_run(out, uris)
    assert resumed.already_committed == 5 == resumed.committed_count
    assert resumed.pending == uris[5:]
    assert sum(s["status"] == "committed" for s in manifest_writes[-1]["shards"].values()) == 5
    resumed.process(lambda pending: summaries([Path(u).name for u in pending], clock, step_s=1.0), noun="rows")
    summary = resumed.finish("rows", noun="rows")
    assert summary["shards_committed"] == 8 and summary["samples"] == 3
    assert all(s["status"] == "committed" for s in json.loads((out / "manifest.json").read_text())["shards"].values())


def test_commit_records_are_listed_once_per_run(tmp_path, clock, monkeypatch):
    out, uris = tmp_path / "out", uris_of(5)
    first = new_run(out, uris)
    first.process(lambda pending: summaries([Path(u).name for u in pending[:2]], clock, step_s=1.0), noun="rows")
    calls = []
    original = OutputStore.committed
    monkeypatch.setattr(OutputStore, "committed", lambda self: calls.append(1) or original(self))
    second = new_run(out, uris)  # a resume: the "same run?" check and the pending list share one listing
    second.process(lambda pending: summaries([Path(u).name for u in pending], clock, step_s=1.0), noun="rows")
    second.finish("rows", noun="rows")
    assert len(calls) == 1
    with pytest.raises(JobError, match="different model"):
        ShardedRun("attribute", str(out), {**KEY, "model": "other"}, uris, ActorJobSettings(quiet=True))


def test_progress_lines_count_committed_shards(tmp_path, clock, capsys):
    out, uris = tmp_path / "out", uris_of(4)
    new_run(out, uris).process(lambda p: summaries([Path(u).name for u in p[:1]], clock, 1.0), noun="rows")
    job = ShardedRun("attribute", str(out), KEY, uris, ActorJobSettings(), recorded={"shards": uris})
    job.process(lambda pending: summaries([Path(u).name for u in pending], clock, step_s=1.0), noun="rows")
    lines = [line.split(" committed")[0] for line in capsys.readouterr().out.splitlines()]
    assert lines == ["[2/4]", "[3/4]", "[4/4]"]


# ----------------------------------------------------------------------------------------------- expand_shards
def test_duplicate_names_among_many_shards_are_found(tmp_path):
    for directory in ("a", "b"):
        (tmp_path / directory).mkdir()
    for i in range(2000):
        (tmp_path / "a" / f"val-{i:06d}.tar").write_bytes(b"")
    for name in ("val-001999.tar", "val-000007.tar", "other.tar"):
        (tmp_path / "b" / name).write_bytes(b"")
    assert len(expand_shards([f"{tmp_path}/a/val-{{000000..001999}}.tar"])) == 2000
    with pytest.raises(JobError, match="two shards share the file name val-000007.tar"):
        expand_shards([str(tmp_path / "a"), str(tmp_path / "b")])
    assert len(expand_shards([str(tmp_path / "a"), str(tmp_path / "b" / "other.tar")])) == 2001


# ------------------------------------------------------------------------------------------------- ensure_ray
def test_embedded_ray_keeps_idle_workers_and_a_cluster_is_left_alone(monkeypatch):
    import ray

    import jobs.common as common

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(common, "log_progress_briefly", lambda *a: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_num_workers_soft_limit", raising=False)
    ensure_ray(num_cpus=2)
    assert calls[-1]["num_cpus"] == 2
    assert calls[-1]["_system_config"] == {"num_workers_soft_limit": 2 * IDLE_WORKERS_PER_CPU}
    ensure_ray(address="ray://head:10001")
    assert calls[-1] == {"address": "ray://head:10001", "log_to_driver": True}
    monkeypatch.setenv("RAY_num_workers_soft_limit", "3")  # the user's setting wins
    assert local_system_config(16) == {}
    ensure_ray(num_cpus=2)
    assert calls[-1]["_system_config"] == {}


def test_driver_memory_bench_runs_without_ray(tmp_path, capsys):
    """bench.driver_memory --no-ray (the script cannot rot): ShardedRun's retained heap per shard is measured at
    each count and written; every shard leaves its manifest entry behind, so it is positive."""
    from bench import driver_memory

    out = tmp_path / "dm.json"
    assert driver_memory.main(["--shards", "20,40", "--no-ray", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["shards"] for r in report["ours"]] == [20, 40] and report["ray"] == []
    assert all(r["bytes_per_shard"] > 0 for r in report["ours"])
    assert "ours: ShardedRun (heap)" in capsys.readouterr().out


def test_pending_shards_run_as_consecutive_datasets_of_bounded_size(tmp_path, clock):
    """shards_per_dataset = 3 over 8 shards, 2 already committed: the pipeline is called on slices of 3, 3 of the 6
    pending shards, in order, each only once the previous slice's rows are exhausted (one Ray dataset alive at a
    time), and every shard commits once."""
    uris = uris_of(8)
    first = new_run(tmp_path / "out", uris)
    first.process(lambda pending: summaries([Path(u).name for u in pending[:2]], clock, step_s=1.0), noun="rows")
    calls: list[list[str]] = []
    exhausted: list[int] = []

    def pipeline(part: list[str]):  # called when the dataset is built, like the jobs' lambdas
        assert len(exhausted) == len(calls), "a dataset was built before the previous one was exhausted"
        calls.append([Path(u).name for u in part])

        def rows():
            yield from summaries(calls[-1], clock, step_s=1.0)
            exhausted.append(len(calls))
        return rows()

    job = ShardedRun("attribute", str(tmp_path / "out"), KEY, uris,
                     ActorJobSettings(quiet=True, shards_per_dataset=3), recorded={"shards": uris})
    assert job.slices() == [uris[2:5], uris[5:8]]
    job.process(pipeline, noun="rows")
    assert calls == [[Path(u).name for u in uris[2:5]], [Path(u).name for u in uris[5:8]]]
    summary = job.finish("rows", noun="rows")
    assert summary["shards_committed"] == 8 and summary["samples"] == 6
    assert set(OutputStore(str(tmp_path / "out")).committed()) == {Path(u).name for u in uris}


@pytest.mark.parametrize("size, expected", [(1, [[0], [1], [2]]), (2, [[0, 1], [2]]), (1000, [[0, 1, 2]])])
def test_slices_cover_the_pending_shards_in_order(tmp_path, clock, size, expected):
    uris = uris_of(3)
    job = ShardedRun("attribute", str(tmp_path / "out"), KEY, uris,
                     ActorJobSettings(quiet=True, shards_per_dataset=size), recorded={"shards": uris})
    assert job.slices() == [[uris[i] for i in part] for part in expected]


def test_shards_per_dataset_flag(tmp_path):
    from jobs.attribute import parse_args

    common = ["--shards", "s.tar", "--model", "resnet18", "--methods", "gbp", "--out", str(tmp_path)]
    assert parse_args(common).shards_per_dataset == scaffold.SHARDS_PER_DATASET
    assert parse_args(common + ["--shards-per-dataset", "5"]).shards_per_dataset == 5
    with pytest.raises(SystemExit) as exc:
        parse_args(common + ["--shards-per-dataset", "0"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_driver_memory_bench_runs_the_job_as_one_and_as_four_datasets(tmp_path):
    """bench.driver_memory --job-shards (the script cannot rot): jobs.attribute over 8 tiny shards as one dataset
    and as four (two embedded-Ray jobs, ~1 min), every (shard, key) row once in both."""
    from bench import driver_memory

    out = tmp_path / "driver_memory.json"
    assert driver_memory.main(["--shards", "20", "--ray-blocks", "", "--job-shards", "8", "--job-images-per-shard",
                               "2", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    jobs = json.loads(out.read_text())["job"]
    assert [(j["shards_per_dataset"], j["datasets"]) for j in jobs] == [(8, 1), (2, 4)]
    for job in jobs:
        assert job["returncode"] == 0 and job["check"]["ok"] and job["check"]["rows"] == 16
        assert job["driver_peak_rss_bytes"] > 50 * 2 ** 20
