"""jobs.claims: verdicts follow the measured numbers; the whole chain on a tiny benchmark (slow)."""
from __future__ import annotations

import json
import math

import pytest

from jobs import claim_verdicts as verdicts
from jobs import claims as claims_job


def test_verdict_is_the_stated_direction_of_the_measured_numbers():
    holds = verdicts.less("P", "a below b", "s", "a", 0.1, "b", 0.5)
    assert holds.holds is True and holds.measured == "a 0.100 vs b 0.500"
    assert verdicts.less("P", "a below b", "s", "a", 0.5, "b", 0.1).holds is False
    assert verdicts.less("P", "a below b", "s", "a", 0.5, "b", 0.5).holds is False
    assert verdicts.less("P", "a at most b", "s", "a", 0.5, "b", 0.5, or_equal=True).holds is True
    missing = verdicts.less("P", "c", "s", "a", math.nan, "b", 0.5)
    assert missing.holds is None and missing.as_row()["verdict"] == "n/a" and "—" in missing.measured
    table = verdicts.claims_markdown([holds, missing])
    assert table.count("\n") == 3 and "**holds**" in table and "**n/a**" in table


@pytest.mark.slow
def test_claims_chain_on_a_tiny_benchmark(ray_session, tmp_path):
    """make_benchmark -> train -> attribute -> evaluate -> sanity -> report on a tiny configuration: every claim
    is measured (a verdict, never a crash) and the report shows the claims table."""
    config = claims_job.ClaimsConfig(out=tmp_path / "claims", train=120, val=24, classes=3, size=64, epochs=2,
                                     sanity_images=2, reference_images=8, ig_steps=4, lite0=False)
    claims = claims_job.run(config, say=lambda *_: None)
    rows = json.loads((tmp_path / "claims" / "claims.json").read_text())
    # per model: 6 claims + MoRF/LeRF with black pixels and with ROAD (4); the VGG-gap and IBD claims
    assert len(rows) == len(claims) == len(claims_job.ARCHS) * (6 + 4) + 2
    assert {r["verdict"] for r in rows} <= {"holds", "does not hold", "n/a"}
    assert sum(r["verdict"] != "n/a" for r in rows) >= 10
    html = (tmp_path / "claims" / "report" / "index.html").read_text()
    assert "The papers&#x27; claims, measured" in html or "The papers' claims, measured" in html


def test_cli_sizes_override_the_configuration_and_bad_sizes_fail_in_one_line(tmp_path, capsys):
    config = claims_job.parse_args(["--out", str(tmp_path), "--road-images", "40", "--val", "200"])
    assert (config.road_images, config.val, config.train) == (40, 200, 3000)
    assert claims_job.parse_args(["--out", str(tmp_path), "--quick"]).road_images == 24
    with pytest.raises(SystemExit):
        claims_job.parse_args(["--out", str(tmp_path), "--road-images", "3"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--road-images must be at least 10" in err


def test_image_limits_take_the_fewest_leading_shards_that_hold_them(tmp_path):
    """--road-images / reference images: the first N validation images, rounded up to whole shards; the claims
    benchmark is written in shards of SHARD_SIZE so the default 100 is exact (one 300-image shard took all 300)."""
    from attribution.data import benchmark as bm
    from jobs import make_benchmark

    make_benchmark.make_benchmark(tmp_path, bm.BenchmarkConfig(size=48, num_classes=3), {"val": 120},
                                  samples_per_shard=claims_job.SHARD_SIZE, log=lambda _: None)
    uris = sorted(str(p) for p in tmp_path.glob("val-*.tar"))
    assert len(uris) == 3 and claims_job.SHARD_SIZE == 50
    assert claims_job.first_shards(uris, 100) == uris[:2]          # exactly 100 images
    assert claims_job.first_shards(uris, 24) == uris[:1]           # rounded up to one shard
    assert claims_job.first_shards(uris, 101) == uris             # 50 + 50 + 20
    assert claims_job.first_shards(uris, 1000) == uris
