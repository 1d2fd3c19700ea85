"""jobs.evaluate --metrics road_morf,road_lerf end to end on embedded Ray: four rows per primary map, values equal
to a direct road_curves call with the job's seeds on the stored maps and decoded pixels, resume, the config check,
and the report's ROAD columns and curves."""
from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution import models
from attribution.data.sample_sets import photo_samples
from attribution.data.shards import write_shards
from attribution.images import decode_sample
from attribution.metrics.perturbation import curve_auc
from attribution.metrics.road import noise_for, road_curves
from jobs.attribute import AttributeConfig
from jobs.attribute import run as attribute_run
from jobs.common import JobError
from jobs.evaluate import EvaluateJobConfig
from jobs.evaluate import run as evaluate_run
from schemas.metrics import validate_metrics
from workers.attribution_worker import WorkerConfig
from workers.evaluate_worker import EvaluateConfig
from workers.sink import maps_of, read_table

REPO = Path(__file__).resolve().parents[1]
METHODS = ("gbp", "gradcam")  # gbp: LeRF ranked by |map| (the default --lerf-abs)
FRACTIONS = [0.3, 0.7]  # two steps keep the CPU solve short; the default is 0.1 … 0.9
ROAD_NAMES = ("road_morf", "road_morf_accuracy", "road_lerf", "road_lerf_accuracy")


@pytest.fixture(scope="module")
def maps_dir(ray_session, tmp_path_factory) -> Path:
    shards = write_shards(photo_samples()[:4], tmp_path_factory.mktemp("shards"), "photos", 2,
                          log=lambda *_: None).pattern
    out = tmp_path_factory.mktemp("maps")
    worker = WorkerConfig(model="efficientnet_lite0", weights="imagenet", methods=list(METHODS), targets="top1",
                          map_dtype="float32")
    attribute_run(AttributeConfig(shards=[shards], out=str(out), worker=worker, batch_size=4, quiet=True))
    return out


def road_config(maps: Path, out: Path, **worker) -> EvaluateJobConfig:
    config = EvaluateConfig(attributions=str(maps), model="efficientnet_lite0", weights="imagenet",
                            metrics=["road_morf", "road_lerf"], road_fractions=FRACTIONS, chunk_size=16, **worker)
    return EvaluateJobConfig(out=str(out), worker=config, batch_size=4, quiet=True)


@pytest.fixture(scope="module")
def evaluated(maps_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("road")
    return out, evaluate_run(road_config(maps_dir, out))


def direct_road(maps_dir: Path, dtype: torch.dtype = torch.float64) -> tuple[list[str], list[str], dict]:
    """road_curves on the stored maps and decoded pixels with the job's seeds: (keys, methods, curves), rows sorted
    by (key, method)."""
    spec = models.load("efficientnet_lite0", weights="imagenet")
    maps_table = read_table(str(maps_dir)).sort_by([("key", "ascending"), ("method", "ascending")])
    keys, methods = maps_table.column("key").to_pylist(), maps_table.column("method").to_pylist()
    samples = {s.key: s for s in photo_samples()}
    images = []
    for key in keys:
        s = samples[key]
        decoded = decode_sample(s.image(), str(s.meta["label"]).encode(), json.dumps(s.meta).encode(),
                                spec.preprocessing)
        images.append(torch.from_numpy(decoded.pixels).float() / 255.0)
    images = spec.preprocessing.normalise(torch.stack(images))
    maps = torch.from_numpy(maps_of(maps_table))
    targets = torch.tensor(maps_table.column("target").to_pylist())
    seeds = [zlib.crc32(f"0:{k}".encode()) for k in keys]  # the job's: crc32(f"{road_seed}:{key}")
    direct = road_curves(spec.module, images, maps, targets, FRACTIONS, lerf_by_abs=torch.tensor(
        [m == "gbp" for m in methods]), noise=noise_for(spec.preprocessing), seeds=seeds, chunk_size=5, dtype=dtype)
    return keys, methods, direct


def test_four_road_rows_per_map_equal_to_a_direct_call(evaluated, maps_dir):
    out, summary = evaluated
    table = read_table(str(out), "metrics")
    validate_metrics(table)
    frame = table.to_pandas()
    assert summary["errors"] == 0 and summary["samples"] == 4
    assert frame.groupby("metric").size().to_dict() == {name: 4 * len(METHODS) for name in ROAD_NAMES}
    for curve, steps in zip(frame.curve, frame.steps):
        assert list(steps) == pytest.approx(FRACTIONS) and len(curve) == len(FRACTIONS)

    keys, methods, direct = direct_road(maps_dir)
    for r, (key, method) in enumerate(zip(keys, methods)):
        got = frame[(frame.key == key) & (frame.method == method)].set_index("metric")
        for order in ("morf", "lerf"):
            row = got.loc[f"road_{order}"]
            np.testing.assert_allclose(row.curve, direct[order]["prob"][r].numpy(), rtol=1e-4, atol=1e-5)
            assert row.value == pytest.approx(float(direct[order]["prob_auc"][r]), rel=1e-4, abs=1e-5)
            hits = got.loc[f"road_{order}_accuracy"]
            np.testing.assert_array_equal(hits.curve, direct[order]["top1"][r].numpy())
            assert hits.value == pytest.approx(float(curve_auc(direct[order]["top1"][r:r + 1], FRACTIONS)[0]))
    assert direct["solver"].converged


def test_rerun_resumes_and_a_changed_road_setting_is_refused(evaluated, maps_dir):
    out, _ = evaluated
    before = read_table(str(out), "metrics").num_rows
    again = evaluate_run(road_config(maps_dir, out))
    assert again["samples"] == 0 and read_table(str(out), "metrics").num_rows == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["road_fractions"] == FRACTIONS and manifest["config"]["road_noise"] == 0.01
    with pytest.raises(JobError, match="road_seed"):
        evaluate_run(road_config(maps_dir, out, road_seed=1))
    with pytest.raises(JobError, match="road_dtype"):
        evaluate_run(road_config(maps_dir, out, road_dtype="float32"))


def test_float32_solve_rows_equal_a_direct_float32_call(maps_dir, tmp_path):
    """--road-dtype float32 reaches the solver: the rows equal road_curves(dtype=float32) on the same inputs."""
    evaluate_run(road_config(maps_dir, tmp_path / "road32", road_dtype="float32"))
    frame = read_table(str(tmp_path / "road32"), "metrics").to_pandas()
    keys, methods, direct = direct_road(maps_dir, torch.float32)
    for r, (key, method) in enumerate(zip(keys, methods)):
        got = frame[(frame.key == key) & (frame.method == method)].set_index("metric")
        for order in ("morf", "lerf"):
            np.testing.assert_allclose(got.loc[f"road_{order}"].curve, direct[order]["prob"][r].numpy(),
                                       rtol=1e-4, atol=1e-5)


def test_report_shows_road_columns_and_curves(evaluated, tmp_path):
    from jobs.report import ReportConfig, build

    out, _ = evaluated
    index = build(ReportConfig(runs=[str(out)], out=str(tmp_path / "report"), grid_images=0, quiet=True))
    html = Path(index).read_text()
    assert "ROAD MoRF AUC" in html and "ROAD LeRF AUC" in html and "ROAD LeRF Acc-AUC" in html
    figures = sorted(p.name for p in (tmp_path / "report" / "figures").glob("curves_*road*.png"))
    assert len(figures) == 4, figures
    frame = read_table(str(out), "metrics").to_pandas()
    for name in ("road_morf", "road_lerf"):
        expected = frame[(frame.metric == name) & (frame.method == "gradcam")].value.mean()
        assert f"{expected:.4f}" in html, name


def test_cli_rejects_bad_road_fractions(maps_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--attributions", str(maps_dir), "--out",
                             str(tmp_path / "o"), "--metrics", "road_morf", "--road-fractions", "0.5,1.0"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--road-fractions must be increasing values in [0, 1)" in lines[0]
