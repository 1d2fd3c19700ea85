"""bench.scale --tiny end to end: shards, bare loop, jobs.attribute, the map-only jobs.evaluate, a SIGKILL at ~50 %
and the resume; the JSON's claims are checked against the files themselves. Four embedded-Ray jobs: about 2-3 min
on a busy 2-core machine (each job's start-up costs ~30 CPU-s), hence slow."""
from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from bench import scale


@pytest.mark.slow
def test_tiny_scale_run(tmp_path):
    work, out = tmp_path / "work", tmp_path / "scale.json"
    report = scale.main(["--tiny", "--work", str(work), "--out", str(out)])
    assert json.loads(out.read_text())["headline"] == report["headline"]
    c, h = report["config"], report["headline"]
    images, shards, per_shard = c["images"], c["shards"], c["per_shard"]
    assert (images, shards) == (512, 8) and report["shards"]["shard_files"] == shards

    # every image has exactly one row (top1, one method), in the uninterrupted run and after the resume
    for check in (report["pipeline"]["check"], report["resume"]["check"]):
        assert check["ok"], check
        assert check["rows"] == check["distinct"] == images
        assert check["duplicates"] == check["missing"] == check["stray_files"] == check["staging_files"] == 0
        assert check["images_covered"] == images and check["commit_records"] == shards
    evaluated = report["evaluate"]["check"]
    assert evaluated["ok"] and evaluated["rows"] == 2 * images  # ebpg + ibd per image
    assert report["pipeline"]["summary"]["samples"] == images

    # the kill happened mid-run, and the resume recomputed exactly the shards without a commit record
    killed = report["resume"]["killed"]
    assert killed["returncode"] == -9 and killed["killed"]["commits_at_kill_signal"] >= math.ceil(c["kill_at"] * shards)
    assert 1 <= h["killed_at_commits"] < shards
    assert report["resume"]["resumed"]["returncode"] == 0
    assert h["resume_images"] == images - h["killed_at_commits"] * per_shard
    assert h["resume_seconds"] > 0

    # throughput: real positive numbers, the ratio is pipeline / bare
    assert h["bare_images_per_second"] > 0 and h["pipeline_images_per_second"] > 0
    assert 0 < h["ratio_to_bare"] == pytest.approx(h["pipeline_images_per_second"] / h["bare_images_per_second"],
                                                   abs=1e-3)  # the JSON rounds it to 3 decimals
    assert h["pipeline_cpu_ms_per_image"] > 0 and 0 < h["cpu_ratio_bare_to_pipeline"]
    assert all(v > 0 for v in report["stages"]["ms_per_image"].values())

    # memory and files: measured, and the file counts agree with the output directory
    assert h["driver_peak_rss_bytes"] > 50 * 2**20 and h["ray_peak_rss_bytes"] > 50 * 2**20
    assert report["pipeline"]["driver_and_ray_peak_rss_bytes"] >= h["ray_peak_rss_bytes"]
    assert report["pipeline"]["processes_seen"] > 3 and "driver" in report["pipeline"]["cpu_by_process"]
    assert h["spilled_bytes"] >= 0
    maps = work / "maps"
    on_disk = [p for p in maps.rglob("*") if p.is_file()]
    assert h["files_written"] == len(on_disk) > 0
    assert h["bytes_written"] == sum(p.stat().st_size for p in on_disk)
    parquet = list((maps / "attributions").rglob("*.parquet"))
    assert h["attribution_files"] == len(parquet) > 0
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in parquet) == images
    assert 0 < h["bytes_per_map"] < 64 * 64 * 2 * 2  # a 64 x 64 float16 map plus its row, compressed
