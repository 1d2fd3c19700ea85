"""Object storage end to end: shards read from, and every output committed to, a local S3-compatible server
(moto's server mode, started here on 127.0.0.1) through the pyarrow S3 filesystem that users reach real S3 with
(``AWS_ENDPOINT_URL``, credentials from the environment). attribute -> SIGKILL after the first commit -> resume
-> evaluate -> report, all on ``s3://`` URIs, every (sample, method, target) exactly once."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from attribution import models
from attribution.data.sample_sets import photo_samples
from attribution.data.shards import write_shards
from attribution.images import decode_sample
from attribution.methods import attribute
from workers.shards import read_shard, resolve_filesystem
from workers.sink import OutputStore, maps_of, read_table

REPO = Path(__file__).resolve().parents[1]
BUCKET = "xai-test"
# Dummy credentials for the local server only; the tests check that no output or log ever contains the secret.
SECRET = "moto-secret-never-logged"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (its own process, stopped by PID afterwards) with one bucket; yields the
    environment a job needs to reach it. The test process gets the same variables for its own reads."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "moto-test-key",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}
    # for the jobs' embedded Ray only: its memory monitor counts the whole machine's memory and would kill their
    # workers for other programs' use on a shared machine (the kernel's OOM killer still applies)
    job_env = {**env, "RAY_memory_monitor_refresh_ms": "0"}
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None, f"moto server exited: {log.read_text()[-2000:]}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "moto server did not start within 60 s"
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
                mp.delenv(name, raising=False)
            for name, value in env.items():
                mp.setenv(name, value)
            pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                              allow_bucket_creation=True).create_dir(BUCKET)
            yield job_env
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def s3_shards(s3, tmp_path_factory) -> str:
    """The real sample photos, one per shard, uploaded to s3://xai-test/shards/; returns a brace pattern."""
    local = tmp_path_factory.mktemp("shards")
    shard_set = write_shards(photo_samples(), local, "one", 1, log=lambda *_: None)
    fs, root = resolve_filesystem(f"s3://{BUCKET}/shards")
    pafs.copy_files(str(local), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    last = len(shard_set.shards) - 1
    return f"s3://{BUCKET}/shards/one-{{000000..{last:06d}}}.tar"


def job(module: str, *args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m jobs.<module>`` as a user would (own embedded Ray), with the S3 environment."""
    return subprocess.run([sys.executable, "-m", f"jobs.{module}", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env, "PYTHONPATH": str(REPO)}, timeout=timeout)


def triples(table) -> list[tuple]:
    return list(zip(table.column("key").to_pylist(), table.column("method").to_pylist(),
                    table.column("target").to_pylist()))


def test_s3_filesystem_reads_shards_through_the_endpoint_variable(s3, s3_shards):
    fs, path = resolve_filesystem(s3_shards.replace("{000000..000006}", "000000"))
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{BUCKET}/shards/one-000000.tar"
    rows = read_shard(f"s3://{BUCKET}/shards/one-000000.tar")
    assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["jpg"][:2] == b"\xff\xd8"
    assert rows[0]["key"] == sorted(s.key for s in photo_samples())[0]


@pytest.mark.slow  # ~90 s: attribute, SIGKILL, resume, evaluate, report on S3; `make test-slow`
def test_attribute_kill_resume_evaluate_report_on_s3(s3, s3_shards, tmp_path, capsys):
    """The whole chain on s3:// URIs; the attribution job is SIGKILLed after its first commit and resumed."""
    timings = {}
    maps_uri, metrics_uri = f"s3://{BUCKET}/runs/maps", f"s3://{BUCKET}/runs/metrics"
    args = ["--shards", s3_shards, "--model", "efficientnet_lite0", "--weights", "imagenet", "--methods", "tr_gbp",
            "--targets", "top1", "--batch-size", "1", "--map-dtype", "float32", "--out", maps_uri]
    store = OutputStore(maps_uri)
    samples = photo_samples()

    # 1. attribute, killed (process group, SIGKILL) as soon as one shard is committed on S3
    start = time.perf_counter()
    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall the job
        proc = subprocess.Popen([sys.executable, "-m", "jobs.attribute", *args], cwd=REPO, start_new_session=True,
                                env={**os.environ, **s3, "PYTHONPATH": str(REPO)}, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not store.committed():
            assert proc.poll() is None, f"the job ended before it could be killed: {log_path.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_log = log_path.read_text(errors="replace")
    timings["attribute until killed"] = time.perf_counter() - start
    committed = store.committed()
    assert 1 <= len(committed) < len(samples), "the kill came too late to interrupt the run"
    # readers see whole committed shards only, never the staged parts of the killed run
    before = read_table(maps_uri)
    assert sorted(before.column("shard").to_pylist()) == sorted(committed)
    assert before.num_rows == sum(r["rows"] for r in committed.values()) == len(committed)

    # 2. resume: committed shards skipped, the rest computed once
    start = time.perf_counter()
    resumed = job("attribute", *args, env=s3)
    timings["attribute resumed"] = time.perf_counter() - start
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"{len(samples)} shards, {len(committed)} already committed, {len(samples) - len(committed)} to do"
            in resumed.stdout)
    assert f"done: {len(samples) - len(committed)} images, {len(samples) - len(committed)} maps" in resumed.stdout
    table = read_table(maps_uri)
    found = triples(table)
    assert len(found) == len(set(found)) == len(samples)
    assert sorted(k for k, _, _ in found) == sorted(s.key for s in samples)
    assert all(row["target"] == row["top5"][0] for row in table.select(["target", "top5"]).to_pylist())
    fs, root = resolve_filesystem(maps_uri)
    leftovers = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{root}/_staging", recursive=True,
                                                                   allow_not_found=True))
                 if i.type == pafs.FileType.File]
    assert leftovers == []
    manifest = store.read_json("manifest.json")
    assert manifest["status"] == "complete" and manifest["summary"]["incomplete_shards"] == []
    assert all(entry["status"] == "committed" for entry in manifest["shards"].values())
    # the stored map of one sample equals a direct call on the same image
    spec = models.load("efficientnet_lite0", weights="imagenet")
    sample = min(samples, key=lambda s: s.key)
    decoded = decode_sample(sample.image(), str(sample.meta["label"]).encode(), json.dumps(sample.meta).encode(),
                            spec.preprocessing)
    image = spec.preprocessing.normalise(torch.from_numpy(decoded.pixels).float()[None] / 255.0)
    row = found.index(next(t for t in found if t[0] == sample.key))
    direct = attribute("tr_gbp", spec, image, torch.tensor([found[row][2]])).numpy()[0]
    np.testing.assert_allclose(maps_of(table)[row], direct, rtol=1e-4, atol=float(np.abs(direct).max()) * 1e-4)

    # 3. evaluate: maps from S3 by key, images read again from the S3 shards (MoRF needs the model)
    start = time.perf_counter()
    evaluated = job("evaluate", "--attributions", maps_uri, "--out", metrics_uri, "--metrics", "ebpg,ibd,morf",
                    "--morf-steps", "4", "--batch-size", "4", env=s3)
    timings["evaluate"] = time.perf_counter() - start
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = read_table(metrics_uri, "metrics").to_pylist()
    keys = [(m["key"], m["method"], m["target"], m["metric"]) for m in metrics]
    assert len(keys) == len(set(keys))
    for metric in ("ebpg", "ibd", "morf"):
        rows = [m for m in metrics if m["metric"] == metric]
        assert sorted(m["key"] for m in rows) == sorted(s.key for s in samples if metric != "ebpg"
                                                        or s.meta.get("bboxes")), metric
        assert all(0.0 <= m["value"] <= 1.0 for m in rows), metric
    assert OutputStore(metrics_uri).read_json("manifest.json")["status"] == "complete"

    # 4. report from the S3 runs into a local folder (the grids' photos come from the S3 shards); no Ray, so it
    # runs in this process, which has the same environment
    from jobs.report import main as report_main

    start = time.perf_counter()
    capsys.readouterr()
    page = report_main(["--runs", metrics_uri, "--out", str(tmp_path / "report"), "--grid-images", "2",
                        "--ebpg-sample", "3", "--ebpg-repeats", "2"])
    report_output = capsys.readouterr()
    timings["report"] = time.perf_counter() - start
    html = Path(page).read_text()
    assert maps_uri in html and metrics_uri in html and "tr_gbp" in html
    assert list((tmp_path / "report" / "figures").glob("*grid*.png"))

    logs = [killed_log, resumed.stdout, resumed.stderr, evaluated.stdout, evaluated.stderr, report_output.out,
            report_output.err, html, json.dumps(manifest)]
    assert not any(SECRET in text for text in logs), "a credential reached a log or an output"
    print("\n" + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
          + f"; killed after {len(committed)} of {len(samples)} shards committed; {len(found)} maps, 0 duplicates")


@pytest.mark.parametrize("case", ["no bucket", "endpoint down"])
def test_storage_problems_are_one_line_errors(s3, s3_shards, case, monkeypatch, capsys):
    from jobs.attribute import main

    shard = f"s3://{BUCKET}/shards/one-000000.tar"
    out = f"s3://{BUCKET}/runs/unused"
    if case == "no bucket":
        out = "s3://no-such-bucket/runs/x"
        expected = f"error: cannot write to {out}: Bucket 'no-such-bucket' not found"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
        expected = f"error: shard {shard} cannot be read: "
    with pytest.raises(SystemExit) as exit_info:
        main(["--shards", shard, "--model", "resnet18", "--methods", "gbp", "--out", out])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith(expected) and len(stderr.splitlines()) == 1, stderr
    assert SECRET not in stderr
