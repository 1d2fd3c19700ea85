"""The procedural benchmark: exact masks and boxes, marks where the json says, deterministic shards in the
ImageNet sample format, and EBPG of oracle / distractor maps on its ground truth."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution.data import benchmark as bm
from attribution.data import shapes
from attribution.images import decode_sample
from attribution.metrics.localisation import box_mask, energy_pointing_game
from attribution.models import benchmark_preprocessing
from jobs import make_benchmark
from schemas.samples import validate_sample_json
from workers.shards import read_shard

REPO = Path(__file__).resolve().parents[1]


def _box_region(box, size: int) -> np.ndarray:
    region = np.zeros((size, size), dtype=bool)
    x0, y0, x1, y1 = box
    region[y0:y1, x0:x1] = True
    return region


def _band(size: int) -> np.ndarray:
    b = bm.border_width(size)
    band = np.ones((size, size), dtype=bool)
    band[b:size - b, b:size - b] = False
    return band


@pytest.mark.parametrize("size", [64, 112])
def test_object_pixels_are_exactly_the_mask_and_the_box(size):
    config = bm.BenchmarkConfig(size=size, num_classes=10, seed=3)
    band = _band(size)
    for index, plan in enumerate(bm.split_plan(config, "val", 30)):
        with_object = bm.render_sample(config, "val", index, plan.label)
        without = bm.render_sample(config, "val", index, plan.label, draw_object=False)
        mask = with_object.mask
        painted = (with_object.image != without.image).any(axis=2)
        box = with_object.meta["bboxes"][0]
        assert not (painted & ~mask).any(), f"sample {index}: object pixels outside the mask"
        assert painted[mask].mean() >= 0.99, f"sample {index}: mask pixels the object did not paint"
        assert not (mask & ~_box_region(box, size)).any()
        assert shapes.tight_box(mask) == box                      # the stored box is the mask's tight box
        assert np.array_equal(shapes.rle_to_mask(with_object.meta["mask"]), mask)
        assert not (mask & band).any()                        # the object never enters the border band
        for d_box in with_object.meta["distractors"]:         # distractors keep off the object's box
            assert not (_box_region(d_box, size) & _box_region(box, size)).any()
        assert 0.02 < mask.mean() < 0.5


def test_rle_is_coco_uncompressed_column_major():
    mask = np.array([[1, 0, 0], [1, 1, 0]], dtype=bool)  # column-major: 1 1 | 0 1 | 0 0
    assert shapes.mask_to_rle(mask) == {"size": [2, 3], "counts": [0, 2, 1, 1, 2]}
    assert shapes.mask_to_rle(~mask) == {"size": [2, 3], "counts": [2, 1, 1, 2]}
    assert shapes.mask_to_rle(np.zeros((2, 2), bool))["counts"] == [4]
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((7, 5)) < 0.4
        assert np.array_equal(shapes.rle_to_mask(shapes.mask_to_rle(m)), m)
    with pytest.raises(ValueError, match="counts sum to 5"):
        shapes.rle_to_mask({"size": [2, 3], "counts": [2, 3]})


def test_shortcut_marks_are_where_the_json_says():
    config = bm.BenchmarkConfig(size=112, num_classes=8, shortcut=0.6, shortcut_wrong=0.5, seed=1)
    band, (thick, length) = _band(112), bm.mark_size(112)
    val = bm.split_plan(config, "val", 50)
    marked = [p for p in val if p.mark is not None]
    wrong = [p for p in marked if p.mark != p.label]
    assert len(marked) == 30 and len(wrong) == 15 and all(p.mark_correct is False for p in wrong)
    train = bm.split_plan(config, "train", 50)
    assert sum(p.mark is not None for p in train) == 30
    assert all(p.mark == p.label for p in train if p.mark is not None)
    for index, plan in enumerate(val):
        sample = bm.render_sample(config, "val", index, plan.label, plan.mark)
        shortcut = sample.meta["shortcut"]
        if plan.mark is None:
            assert shortcut is None
            continue
        assert shortcut["label"] == plan.mark and shortcut["correct"] == (plan.mark == plan.label)
        assert shortcut["wnid"] == bm.class_wnid(plan.mark)
        no_mark = bm.render_sample(config, "val", index, plan.label, plan.mark, draw_mark=False)
        painted = (sample.image != no_mark.image).any(axis=2)
        region = _box_region(shortcut["box"], 112)
        assert region.sum() == thick * length and not (region & ~band).any()   # the mark lies in the band
        assert not (painted & ~region).any() and painted[region].mean() > 0.9
        x0, y0, x1, y1 = shortcut["box"]
        fill = sample.image[y0 + 1:y1 - 1, x0 + 1:x1 - 1].reshape(-1, 3).astype(float).mean(axis=0)
        assert np.abs(fill - bm.mark_colour(plan.mark)).max() < 8           # pixel noise sigma 6, mean of 25
        assert (np.abs(sample.image[y0, x0:x1].astype(float) - bm.OUTLINE).max(axis=1) < 30).all()


def _make(out: Path, seed: int, shortcut: float = 0.5) -> dict:
    return make_benchmark.make_benchmark(out, bm.BenchmarkConfig(size=64, num_classes=4, shortcut=shortcut,
                                                                 seed=seed),
                                         {"train": 24, "val": 12}, samples_per_shard=10, log=lambda _: None)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "shards.json"}


def test_same_seed_gives_identical_shards_and_another_seed_different_ones(tmp_path):
    _make(tmp_path / "a", seed=7)
    _make(tmp_path / "b", seed=7)
    _make(tmp_path / "c", seed=8)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert sorted(a) == ["README.md", "classes.json", "train-000000.tar", "train-000001.tar", "train-000002.tar",
                         "val-000000.tar", "val-000001.tar"]
    assert a == b
    assert all(a[name] != c[name] for name in a if name.endswith(".tar"))
    manifest = json.loads((tmp_path / "a" / "shards.json").read_text())
    assert manifest["sets"]["train"]["num_samples"] == 24 and manifest["sets"]["val"]["num_samples"] == 12


def test_shards_validate_and_decode_like_imagenet_shards(tmp_path):
    description = _make(tmp_path, seed=2, shortcut=1.0)
    assert description["splits"]["val"] == {"samples": 12, "marked": 12, "marked_wrong": 6,
                                            "pattern": "val-{000000..000001}.tar",
                                            "shards": 2}
    assert [c["name"] for c in description["classes"]] == ["disc_solid", "disc_striped", "cross_solid",
                                                            "cross_striped"]
    config = bm.BenchmarkConfig(size=64, num_classes=4, shortcut=1.0, seed=2)
    plans = bm.split_plan(config, "val", 12)
    preprocessing = benchmark_preprocessing(64)
    rows = read_shard(str(tmp_path / "val-000000.tar")) + read_shard(str(tmp_path / "val-000001.tar"))
    assert [r["key"] for r in rows] == [f"val_{i:06d}" for i in range(12)]
    for index, row in enumerate(rows):
        assert row["error"] is None
        meta = json.loads(row["json"])
        assert validate_sample_json(meta, row["key"]) == []
        assert int(row["cls"]) == meta["label"] == plans[index].label
        assert meta["wnid"] == bm.class_wnid(meta["label"]) and meta["source"] == "benchmark"
        decoded = decode_sample(row["jpg"], row["cls"], row["json"], preprocessing)
        assert decoded.pixels.shape == (3, 64, 64)
        assert decoded.bboxes_input == decoded.bboxes == [[float(v) for v in meta["bboxes"][0]]]
        rendered = bm.render_sample(config, "val", index, plans[index].label, plans[index].mark)
        assert rendered.meta == meta
        error = np.abs(decoded.pixels.transpose(1, 2, 0).astype(float) - rendered.image.astype(float))
        assert error.mean() < 4.0                              # JPEG quality 95, 4:4:4
        x0, y0, x1, y1 = meta["shortcut"]["box"]                # the mark survives JPEG: its fill colour
        fill = decoded.pixels[:, y0 + 1:y1 - 1, x0 + 1:x1 - 1].reshape(3, -1).astype(float).mean(axis=1)
        assert np.abs(fill - bm.mark_colour(meta["shortcut"]["label"])).max() < 40


def test_schema_rejects_broken_benchmark_fields():
    sample = next(bm.generate(bm.BenchmarkConfig(size=64, num_classes=2, shortcut=1.0), "train", 1))
    assert validate_sample_json(sample.meta, sample.key) == []
    broken = {**sample.meta, "mask": {"size": [64, 64], "counts": [1, 2]}}
    assert "mask size" in validate_sample_json(broken, sample.key)[0]
    broken = {**sample.meta, "shortcut": {**sample.meta["shortcut"], "box": [60, 0, 70, 4]}}
    assert "outside the 64x64 image" in validate_sample_json(broken, sample.key)[0]


def test_cli_writes_shards_and_rejects_bad_arguments(tmp_path):
    run = [sys.executable, "-m", "jobs.make_benchmark", "--out", str(tmp_path), "--size", "64", "--classes", "3",
           "--train", "6", "--val", "3", "--shortcut", "0.5", "--samples-per-shard", "4"]
    done = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "val: 3 samples (2 marked, 1 pointing to a wrong class)" in done.stdout
    assert (tmp_path / "README.md").read_text().count("| n9000000") == 3
    bad = subprocess.run(run[:-1] + ["0"] + ["--classes", "11"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "num_classes must be" in bad.stderr


def test_ebpg_of_oracle_map_is_one_and_of_distractor_map_is_zero():
    config = bm.BenchmarkConfig(size=112, num_classes=8, seed=4)
    samples = [s for s in bm.generate(config, "val", 12) if s.meta["distractors"]]
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))
    boxes = torch.stack([box_mask(s.meta["bboxes"], 112, 112) for s in samples])
    oracle = masks.float()
    on_distractor = torch.from_numpy(np.stack([_box_region(s.meta["distractors"][0], 112)
                                               for s in samples])).float()
    assert torch.equal(energy_pointing_game(oracle, masks), torch.ones(len(samples), dtype=torch.float64))
    assert torch.equal(energy_pointing_game(oracle, boxes), torch.ones(len(samples), dtype=torch.float64))
    assert torch.equal(energy_pointing_game(on_distractor, boxes), torch.zeros(len(samples), dtype=torch.float64))
    # half the energy on the object, half on a distractor (negative evidence elsewhere is clamped away)
    mixed = oracle / oracle.sum((1, 2), keepdim=True) + on_distractor / on_distractor.sum((1, 2), keepdim=True)
    elsewhere = torch.from_numpy(np.stack([_band(112)] * len(samples))) & (oracle == 0) & (on_distractor == 0)
    mixed = mixed - 5.0 * elsewhere.float()
    torch.testing.assert_close(energy_pointing_game(mixed, masks), torch.full((len(samples),), 0.5,
                                                                              dtype=torch.float64))
