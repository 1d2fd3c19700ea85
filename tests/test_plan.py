"""jobs.attribute --plan (jobs.plan, workers.trial): the forecast's arithmetic, the image count from shards.json, and a
forecast checked against the run it forecasts (rows, images and bytes; times are not asserted)."""
from __future__ import annotations

import json

import pytest

from attribution.data.sample_sets import photo_samples
from attribution.data.shards import write_manifest, write_shards
from jobs.attribute import AttributeConfig, parse_args, run
from jobs.evaluate import EvaluateJobConfig
from jobs.evaluate import run as evaluate_run
from jobs.common import expand_shards
from jobs.plan import plan_lines, shard_sizes, summarise
from workers.attribution_worker import WorkerConfig
from workers.evaluate_worker import EvaluateConfig

def fake_trial(batch_seconds=(9.0, 2.0, 3.0), images=(4, 4, 2)) -> dict:
    """A trial as workers.trial.trial_batches returns it: 3 batches (4, 4, 2 images), two methods."""
    batches = []
    for seconds, n in zip(batch_seconds, images):
        batches.append({"images": n, "seconds": seconds, "write_seconds": 0.1 * n, "rows": 6 * n, "error_rows": 0,
                        "steps": {"gbp": seconds * 0.75, "gradcam": seconds * 0.25}})
    return {"device": "cpu", "device_name": "test", "threads": 1, "shard_samples": 10, "images": sum(images),
            "batch_size": 4, "read_seconds": 0.5, "read_samples": 10, "decode_seconds": 1.0, "load_seconds": 0.1,
            "batches": batches, "staged_bytes": 6_000_000, "group_bytes": {"gbp": 5_000_000, "gradcam": 800_000},
            "group_rows": {"gbp": 50, "gradcam": 10}, "chunk_sizes": {}, "errors": [], "peak_device_bytes": None,
            "peak_rss_bytes": 1}


def test_forecast_uses_the_batches_after_the_warm_up():
    plan = summarise(fake_trial(), images=36_000, workers=4)
    actor = (2.0 + 3.0) / 6  # batches 2 and 3: 5 s for 6 images; batch 1 (9 s) is the warm-up
    assert plan["steady"] and plan["per_image"]["actor"] == pytest.approx(actor)
    assert plan["actor_hours"] == pytest.approx(actor * 36_000 / 3600)
    assert plan["wall_hours"] == pytest.approx(actor * 36_000 / 3600 / 4)
    gbp, stored = plan["steps"]["gbp"], plan["outputs"]["gbp"]
    assert gbp["seconds_per_image"] == pytest.approx(0.75 * actor)  # image-weighted over the steady batches
    assert gbp["share"] == pytest.approx(0.75) and gbp["actor_hours"] == pytest.approx(0.75 * actor * 10)
    assert stored["rows_per_image"] == 5 and stored["bytes_per_row"] == 100_000
    assert stored["output_bytes"] == pytest.approx(5_000_000 / 10 * 36_000)
    assert plan["output_bytes"] == pytest.approx(600_000 * 36_000)
    p = plan["per_image"]
    assert (p["read"], p["decode"], p["write"]) == pytest.approx((0.05, 0.1, 0.1))
    assert p["cpus_per_actor"] == pytest.approx(0.25 / actor)


def test_one_batch_is_used_and_flagged_and_memory_trouble_is_a_warning():
    trial = fake_trial(batch_seconds=(8.0,), images=(4,))
    trial.update(images=4, group_rows={"gbp": 20, "gradcam": 4}, chunk_sizes={"gbp": 2},
                 errors=["k1: boom"])
    trial["batches"][0]["error_rows"] = 1
    plan = summarise(trial, images=100, workers=1)
    assert not plan["steady"] and plan["per_image"]["actor"] == pytest.approx(2.0)
    assert any("gbp ran out of device memory at 4 images; it ran 2 per call" in w for w in plan["warnings"])
    assert any("1 error rows, e.g. k1: boom" in w for w in plan["warnings"])
    plan.update(shards=3, shards_to_do=3, images_to_do=100, images_counted=100,
                actors={"workers": 1, "gpus": 0, "cpus": 1, "batch_size": 4, "device": "cpu", "precision": "fp32"})
    text = "\n".join(plan_lines(plan, "/out"))
    assert "warm-up included" in text and "gbp" in text and "~3.3 min of compute" in text


def test_shard_sizes_come_from_shards_json(tmp_path):
    shard_set = write_shards(photo_samples(), tmp_path, "photos", 3, log=lambda *_: None)
    write_manifest(tmp_path, [(shard_set, 3)])
    uris = expand_shards([shard_set.pattern])
    stray = tmp_path / "other" / "x-000000.tar"
    stray.parent.mkdir()
    stray.write_bytes(b"")
    (stray.parent / "shards.json").write_text("{not json")
    sizes = shard_sizes(uris + [str(stray)])
    assert [sizes[u] for u in uris] == [s["samples"] for s in shard_set.shards]
    assert sizes[str(stray)] is None


def test_plan_arguments(capsys):
    base = ["--shards", "x.tar", "--model", "resnet18", "--methods", "gbp", "--out", "/o"]
    assert parse_args(base).plan is None
    assert parse_args(base + ["--plan"]).plan == ""
    assert parse_args(base + ["--plan", "p.json", "--plan-batches", "3"]).plan == "p.json"
    with pytest.raises(SystemExit) as stopped:
        parse_args(base + ["--plan", "--plan-batches", "0"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --plan-batches must be at least 1"]


@pytest.fixture(scope="module")
def planned(ray_session, tmp_path_factory):
    """A forecast of jobs.attribute (EfficientNet-Lite0, GBP + Grad-CAM, top-5, batches of 2) on the sample photos,
    then the run it forecasts."""
    tmp = tmp_path_factory.mktemp("plan")
    shard_set = write_shards(photo_samples(), tmp / "shards", "photos", 3, log=lambda *_: None)
    write_manifest(tmp / "shards", [(shard_set, 3)])
    out = tmp / "maps"
    worker = WorkerConfig(model="efficientnet_lite0", weights="imagenet", methods=["gbp", "gradcam"], targets="top5")
    config = AttributeConfig(shards=[shard_set.pattern], out=str(out), worker=worker, batch_size=2,
                             plan=str(tmp / "plan.json"))
    plan = run(config)
    planned_out_existed = out.exists()
    config.plan, config.quiet = None, True
    summary = run(config)
    return {"tmp": tmp, "shard_set": shard_set, "config": config, "plan": plan, "summary": summary,
            "planned_out_existed": planned_out_existed}


def test_forecast_matches_the_run(planned):
    """The forecast's rows and bytes against the real run of the same config; the plan writes nothing to --out and,
    once the run is committed, has nothing left to do."""
    plan, summary, shard_set, tmp = planned["plan"], planned["summary"], planned["shard_set"], planned["tmp"]
    assert not planned["planned_out_existed"]
    assert json.loads((tmp / "plan.json").read_text())["images_to_do"] == plan["images_to_do"]
    trial = plan["trial"]
    assert trial["images"] == 4 and len(trial["batches"]) == 2 and trial["read_samples"] >= 4
    assert plan["images_to_do"] == summary["samples"] == shard_set.num_samples
    outputs = plan["outputs"]
    assert outputs["gbp"]["rows_per_image"] == outputs["gradcam"]["rows_per_image"] == 5
    assert set(plan["steps"]) == {"gbp", "gradcam"}
    assert summary["maps_written"] == 10 * shard_set.num_samples
    written = sum(f.stat().st_size for f in (tmp / "maps" / "attributions").rglob("*.parquet"))
    # compaction re-encodes a shard's parts in one file: the same columns and codec, so within a few per cent
    assert plan["output_bytes"] == pytest.approx(written, rel=0.15)
    config = planned["config"]
    config.plan = ""
    try:
        assert run(config)["images_to_do"] == 0
    finally:
        config.plan = None


def test_evaluate_forecast_matches_its_run(planned, capsys):
    """jobs.evaluate --plan on the committed maps: its metric families are the steps, its metric rows per image
    those of the real evaluation."""
    maps = planned["tmp"] / "maps"
    worker = EvaluateConfig(attributions=str(maps), model="efficientnet_lite0", weights="imagenet",
                            metrics=["ebpg", "morf", "insertion"], morf_steps=4, insertion_steps=4)
    config = EvaluateJobConfig(out=str(planned["tmp"] / "metrics"), worker=worker, batch_size=2, plan="")
    plan = evaluate_run(config)
    printed = capsys.readouterr().out
    assert "forecast:" in printed and "insertion_accuracy" in printed
    assert {"read maps", "map metrics", "morf", "insertion"} <= set(plan["steps"])
    assert not (planned["tmp"] / "metrics").exists()
    config.plan, config.quiet = None, True
    summary = evaluate_run(config)
    assert plan["images_to_do"] == summary["samples"]
    rows = sum(o["rows_per_image"] for o in plan["outputs"].values()) * plan["images_to_do"]
    assert rows == pytest.approx(summary["metric_rows"])  # the photos' rows per image are all alike
