"""jobs.evaluate end to end on embedded Ray: one row per (sample, method, metric), values equal to direct calls of
attribution.metrics on the stored maps and decoded images, resume, dataset metrics, one-line CLI errors."""
from __future__ import annotations

import json
import shutil
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
from attribution.metrics.discrimination import class_discrimination
from attribution.metrics.faithfulness import prototype_accuracy
from attribution.metrics.localisation import border_intensity, box_mask, energy_pointing_game
from attribution.metrics.perturbation import black_baseline, curve_auc, perturbation_curves, pixel_order
from jobs.attribute import AttributeConfig
from jobs.attribute import run as attribute_run
from jobs.evaluate import EvaluateJobConfig, dataset_metrics
from jobs.evaluate import run as evaluate_run
from schemas.metrics import validate_metrics
from workers.attribution_worker import WorkerConfig
from workers.evaluate_worker import EvaluateConfig
from workers.map_metrics import MAP_METRICS
from workers.sink import maps_of, read_table
from tests.tolerances import network_atol

REPO = Path(__file__).resolve().parents[1]
METHODS = ("gbp", "gradcam")


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    return write_shards(photo_samples(), out, "photos", 4, log=lambda *_: None).pattern


@pytest.fixture(scope="module")
def maps_dir(ray_session, photo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("maps")
    worker = WorkerConfig(model="efficientnet_lite0", weights="imagenet", methods=list(METHODS), targets="top5",
                          map_dtype="float32")
    attribute_run(AttributeConfig(shards=[photo_shards], out=str(out), worker=worker, batch_size=4, quiet=True))
    return out


def evaluate_config(maps: Path, out: Path, **kw) -> EvaluateJobConfig:
    worker = EvaluateConfig(attributions=str(maps), model="efficientnet_lite0", weights="imagenet", morf_steps=4,
                            insertion_steps=5, **kw.pop("worker", {}))
    return EvaluateJobConfig(out=str(out), worker=worker, batch_size=4, quiet=True, **kw)


@pytest.fixture(scope="module")
def evaluated(maps_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("metrics")
    summary = evaluate_run(evaluate_config(maps_dir, out))
    return out, summary


def test_rows_per_sample_method_metric(evaluated, maps_dir):
    out, summary = evaluated
    table = read_table(str(out), "metrics")
    validate_metrics(table)
    samples = photo_samples()
    assert summary["samples"] == len(samples) and summary["errors"] == 0
    frame = table.to_pandas()
    per_metric = frame.groupby("metric").size().to_dict()
    n, m = len(samples), len(METHODS)
    with_boxes = sum(1 for s in samples if s.meta["bboxes"])
    assert per_metric["ebpg"] == with_boxes * m                  # the top-1 map of images with boxes
    for name in ("ibd", "morf", "lerf", "insertion_accuracy", "insertion_softmax", "class_discrimination", "seconds"):
        assert per_metric[name] == n * m, name                   # one per (sample, method): the top-1 map
    for name in ("ebpg", "ibd", "morf", "insertion_softmax"):
        assert set(frame.loc[frame.metric == name, "target_rank"]) == {0}
    labelled = frame[frame.label >= 0]
    assert (labelled.correct == (labelled.top1 == labelled.label)).all()
    assert frame.loc[frame.label < 0, "correct"].isna().all()
    one_box = frame[(frame.metric == "ebpg") & (frame.n_boxes == 1)]
    assert ((one_box.box_share > 0) & (one_box.box_share < 1)).all()


def test_values_equal_direct_calls(evaluated, maps_dir):
    """Recompute every metric of one photo from its stored maps and decoded pixels with attribution.metrics."""
    out, _ = evaluated
    frame = read_table(str(out), "metrics").to_pandas()
    maps_table = read_table(str(maps_dir))
    spec = models.load("efficientnet_lite0", weights="imagenet")
    sample = next(s for s in photo_samples() if s.key == "chelsea")
    decoded = decode_sample(sample.image(), str(sample.meta["label"]).encode(), json.dumps(sample.meta).encode(),
                            spec.preprocessing)
    image = spec.preprocessing.normalise(torch.from_numpy(decoded.pixels).float()[None] / 255.0)
    keys = np.asarray(maps_table.column("key").to_pylist())
    for method in METHODS:
        rows = maps_table.filter((keys == sample.key) & (np.asarray(maps_table.column("method").to_pylist())
                                                         == method))
        rows = rows.sort_by("target_rank")
        maps = torch.from_numpy(maps_of(rows))
        got = frame[(frame.key == sample.key) & (frame.method == method)]
        ibd = got[got.metric == "ibd"].value.to_numpy()
        np.testing.assert_allclose(ibd, border_intensity(maps[:1], border=16).numpy(), rtol=1e-6)
        masks = box_mask(decoded.bboxes_input, 224, 224)[None]
        ebpg = got[got.metric == "ebpg"].value.to_numpy()
        np.testing.assert_allclose(ebpg, energy_pointing_game(maps[:1], masks).numpy(), rtol=1e-6)
        cd = got[got.metric == "class_discrimination"].value.to_numpy()
        np.testing.assert_allclose(cd, class_discrimination(maps[None]).numpy(), rtol=1e-6)
        target = torch.tensor([int(rows.column("target")[0].as_py())])
        fractions = [0.0, 0.25, 0.5, 0.75, 1.0]
        morf = perturbation_curves(spec.module, image, pixel_order(maps[:1], most_relevant_first=True), target,
                                   fractions, mode="remove", baseline=black_baseline(spec.preprocessing))["prob"]
        row = got[got.metric == "morf"].iloc[0]
        # the actor sends the steps through the model in other batches and threads: each probability is within
        # twice the rounding bound of the logits of one forward pass (softmax is 2-Lipschitz in max-norm here)
        with torch.no_grad():
            atol = 2 * network_atol(spec.module, float(spec.module(image).abs().max()))
        assert row.curve[0] - row.curve[-1] > 5 * atol  # the bound stays well below what the curve measures
        np.testing.assert_allclose(row.curve, morf[0].numpy(), rtol=0, atol=atol)
        assert row.value == pytest.approx(float(curve_auc(morf, fractions)[0]), rel=0, abs=atol)
        # fraction 0 is the untouched image: the top-1 probability the attribution job recorded
        assert row.curve[0] == pytest.approx(rows.column("top5_prob")[0].as_py()[0], rel=0, abs=atol)
        accuracy = got[got.metric == "insertion_accuracy"].iloc[0]
        assert list(accuracy.steps) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
        assert accuracy.curve[-1] == 1.0  # everything inserted: the image itself, whose top-1 is the target
        softmax = got[got.metric == "insertion_softmax"].iloc[0]
        assert softmax.curve[-1] == pytest.approx(1.0, rel=1e-5)


def test_rerun_resumes_and_adds_nothing(evaluated, maps_dir):
    out, _ = evaluated
    before = read_table(str(out), "metrics").num_rows
    summary = evaluate_run(evaluate_config(maps_dir, out))
    assert summary["samples"] == 0 and summary["shards_committed"] == summary["shards"]
    assert read_table(str(out), "metrics").num_rows == before


def test_map_only_metrics_read_only_the_parquet(evaluated, maps_dir, tmp_path):
    """Map-only metrics alone: the shards are never read (their recorded URIs point nowhere here), the rows equal
    those of the image pipeline, one bad sample costs one error row, and a rerun adds nothing."""
    copy = tmp_path / "maps"
    shutil.copytree(maps_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["shards"].values():
        entry["uri"] = str(tmp_path / "gone" / Path(entry["uri"]).name)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "metrics"
    summary = evaluate_run(evaluate_config(copy, out, worker={"metrics": list(MAP_METRICS)}))
    assert summary["samples"] == len(photo_samples()) and summary["errors"] == 0
    ours = read_table(str(out), "metrics").to_pandas()
    full = read_table(str(evaluated[0]), "metrics").to_pandas()
    full = full[full.metric.isin(MAP_METRICS)]
    columns = ["key", "method", "metric", "target", "target_rank", "top1", "correct", "n_boxes"]
    ours, full = (f.sort_values(columns[:3]).reset_index(drop=True) for f in (ours, full))
    assert len(ours) == len(full) > 0
    assert ours[columns].equals(full[columns])
    np.testing.assert_allclose(ours.value, full.value, rtol=1e-6, atol=1e-9)
    again = evaluate_run(evaluate_config(copy, out, worker={"metrics": list(MAP_METRICS)}))
    assert again["samples"] == 0 and read_table(str(out), "metrics").num_rows == len(ours)


def test_shard_map_metrics_streams_whole_samples_and_isolates_a_failure(maps_dir, monkeypatch):
    """Reading 7 rows at a time (a sample has 10: 2 methods x top-5) gives the same rows as reading all at once;
    a sample whose metrics raise gets one error row and the others keep theirs."""
    import pyarrow as pa

    import workers.map_metrics as mm

    attributions = read_table(str(maps_dir)).to_pandas()
    shard = attributions.shard.iloc[0]
    keys = sorted(set(attributions.key[attributions.shard == shard]))
    batch = pa.table({"shard": [shard]})

    def by_key(result, column="metrics"):
        """{key: its rows} of the one output row (the one shard) of a ShardMapMetrics call."""
        (row,) = result.to_pylist()
        out = {key: [] for key in row["keys"]}
        for r in pa.ipc.open_stream(row[column]).read_all().to_pylist():
            out[r["key"]].append(r)
        return out

    whole = mm.ShardMapMetrics(mm.MapMetricsConfig(attributions=str(maps_dir), read_rows=10_000))(batch)
    streamed = mm.ShardMapMetrics(mm.MapMetricsConfig(attributions=str(maps_dir), read_rows=7))(batch)
    assert whole["keys"].to_pylist() == streamed["keys"].to_pylist() == [keys]
    assert streamed["shard_total"].to_pylist() == streamed["samples"].to_pylist() == [len(keys)]
    assert by_key(whole) == by_key(streamed) and all(by_key(streamed).values())

    real, bad = mm.map_metric_rows, keys[0]

    def failing(context, maps, metrics, border=16):
        if bad in context.meta["key"]:
            raise ValueError(f"broken map for {bad}")
        return real(context, maps, metrics, border)

    monkeypatch.setattr(mm, "map_metric_rows", failing)
    result = mm.ShardMapMetrics(mm.MapMetricsConfig(attributions=str(maps_dir), read_rows=7))(batch)
    errors = by_key(result, "errors")
    assert result["keys"].to_pylist() == [keys]
    assert errors[bad] == [{"key": bad, "shard": shard, "stage": "evaluate", "method": None,
                            "reason": f"broken map for {bad}"}]
    rows = by_key(result)
    assert rows[bad] == [] and all(rows[k] == by_key(whole)[k] for k in keys[1:])
    assert not any(errors[k] for k in keys[1:])


def test_fmi_prototype_accuracy_from_label_targets(ray_session, photo_shards, tmp_path):
    worker = WorkerConfig(model="efficientnet_lite0", weights="imagenet", methods=["a_fmi"], targets="label",
                          fmi=True)
    attribute_run(AttributeConfig(shards=[photo_shards], out=str(tmp_path / "m"), worker=worker, batch_size=4,
                                  quiet=True))
    table = dataset_metrics(str(tmp_path / "m")).to_pylist()
    assert len(table) == 1 and table[0]["metric"] == "fmi_prototype_accuracy"
    rows = read_table(str(tmp_path / "m")).to_pandas()
    assert table[0]["n"] == len(rows) == sum(1 for s in photo_samples() if s.meta["label"] >= 0)
    fold = np.array([zlib.crc32(k.encode()) % 2 for k in rows.key]) == 0
    features = torch.tensor(np.stack(rows.fmi.to_list()), dtype=torch.float32)
    labels = torch.tensor(rows.label.to_numpy())
    expected = [prototype_accuracy(features[a], labels[a], features[b], labels[b])
                for a, b in ((fold, ~fold), (~fold, fold)) if a.any() and b.any()]
    assert table[0]["value"] == pytest.approx(float(np.mean(expected)))


@pytest.mark.parametrize("args, message", [
    (["--attributions", "{tmp}", "--out", "{tmp}/o"], "is not the output of jobs.attribute"),
    (["--attributions", "{maps}", "--out", "{tmp}/o", "--metrics", "ebpg,bogus"], "unknown metric 'bogus'"),
    (["--attributions", "{maps}", "--out", "{tmp}/o", "--methods", "lrp"], "method 'lrp' is not in the attribution"),
])
def test_cli_errors_are_one_line(maps_dir, tmp_path, args, message):
    argv = [a.format(tmp=tmp_path, maps=maps_dir) for a in args]
    result = subprocess.run([sys.executable, "-m", "jobs.evaluate", *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
