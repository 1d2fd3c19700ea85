"""Issue 16: bench_vgg_plain (conv biases, no BatchNorm), EBPG/IBD of maps with no positive pixel (left out and
counted), and the TR-GBP readings study on a tiny benchmark."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from attribution import models
from attribution.architectures import small_cnn
from attribution.data import benchmark as bm
from attribution.methods import attribute, attribute_with_extras
from attribution.metrics.localisation import border_intensity, energy_pointing_game, has_energy
from jobs import make_benchmark, tr_gbp_readings, train_benchmark_model
from jobs.reporting.aggregates import aggregate
from jobs.reporting.tables import main_tables
from tests.conftest import randomise_batchnorm


def _plain(size: int = 64, classes: int = 5) -> models.ModelSpec:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = small_cnn.build("bench_vgg_plain", classes, size).eval()
    with torch.no_grad():  # trained-like: non-zero conv biases
        g = torch.Generator().manual_seed(1)
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
    return models.ModelSpec("bench_vgg_plain", module, models.benchmark_preprocessing(size), module.target_layer,
                            module.features, module.head)


def test_bench_vgg_plain_has_conv_biases_and_no_batchnorm():
    spec = _plain()
    convs = [m for m in spec.module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and all(c.bias is not None for c in convs)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in spec.module.modules())
    assert spec.module.arch == "bench_vgg_plain" and "bench_vgg_plain" in models.MODEL_NAMES
    fresh = small_cnn.build("bench_vgg_plain", 5, 64)
    assert all(float(c.bias.detach().abs().max()) == 0 for c in fresh.modules() if isinstance(c, nn.Conv2d))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(spec.head(spec.features(x)), spec.module(x))


def test_on_bench_vgg_plain_the_parameter_reading_is_the_effective_one():
    """No BatchNorm: the modules' own biases ARE the effective biases, so the two readings agree exactly."""
    spec = _plain()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[1, 3], [0, 4]])
    eff = attribute_with_extras("tr_gbp", spec, x, targets, return_layers=True)
    par = attribute_with_extras("tr_gbp", spec, x, targets, bias_terms="parameter", return_layers=True)
    assert set(eff.extras["layers"]) == set(par.extras["layers"])
    assert sum(n.startswith("features.") for n in eff.extras["layers"]) == 6
    torch.testing.assert_close(par.maps, eff.maps, rtol=0, atol=0)


@pytest.mark.slow
def test_bench_vgg_plain_trains_on_the_small_configuration(tmp_path):
    """Trainable like the others: the small configuration of test_benchmark_models (4 classes, 64 px, 1200
    training images, 10 epochs) reaches the accuracy stated there for bench_resnet (0.85)."""
    shards = tmp_path / "bench"
    make_benchmark.make_benchmark(shards, bm.BenchmarkConfig(size=64, num_classes=4, seed=0),
                                  {"train": 1200, "val": 300}, samples_per_shard=500, log=lambda _: None)
    config = train_benchmark_model.TrainConfig(arch="bench_vgg_plain", epochs=10, seed=0, device="cpu")
    result = train_benchmark_model.train(shards, config, tmp_path / "plain.pt", log=lambda _: None)
    assert result.summary["val"]["accuracy"] >= 0.85, result.summary["history"]


# ------------------------------------------------------------------------- item 5: maps with no positive pixel
def test_maps_without_a_positive_pixel_have_no_ebpg_or_ibd():
    maps = torch.stack([-torch.rand(8, 8) - 0.1, torch.zeros(8, 8), torch.rand(8, 8)])
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[:, 2:5, 2:5] = True
    assert has_energy(maps).tolist() == [False, False, True]
    assert has_energy(maps, clamp=False).tolist() == [True, False, True]
    ebpg, ibd = energy_pointing_game(maps, masks), border_intensity(maps, border=2)
    assert torch.isnan(ebpg[:2]).all() and torch.isnan(ibd[:2]).all()
    m = maps[2].double()  # the metric sums in float64
    expected = float(m[masks[2]].sum() / m.sum())
    assert math.isclose(float(ebpg[2]), expected, rel_tol=1e-12)


def _metric(key: str, method: str, metric: str, value: float | None, correct: bool = True) -> dict:
    return {"key": key, "shard": "s-000000.tar", "model": "toy", "weights": None, "method": method,
            "options": "{}", "target": 1, "target_kind": "top1", "target_rank": 0, "label": 1,
            "top1": 1 if correct else 2, "correct": correct, "n_boxes": 1, "box_share": 0.2, "metric": metric,
            "value": value, "steps": None, "curve": None}


def test_report_leaves_empty_maps_out_and_says_how_many():
    rows = []
    for i in range(6):  # "tr": 2 of 6 maps without a positive pixel; "none": every map
        rows.append(_metric(f"k{i}", "tr", "ebpg", None if i < 2 else 0.1 * i))
        rows.append(_metric(f"k{i}", "tr", "ibd", None if i < 2 else 0.1 * i, correct=i % 2 == 0))
        rows.append(_metric(f"k{i}", "none", "ebpg", None))
    aggregates = aggregate(pd.DataFrame(rows))
    by = {(r.method, r.metric): r for r in aggregates.itertuples(index=False)}
    tr = by[("tr", "ebpg")]
    assert tr.n == 4 and tr.left_out == 2 and math.isclose(tr.mean, np.mean([0.2, 0.3, 0.4, 0.5]))
    assert "2 maps with no positive pixel left out" in tr.protocol
    assert by[("tr", "ibd_auc")].left_out == 2 and by[("tr", "ibd_auc")].n == 4
    empty = by[("none", "ebpg")]
    assert empty.n == 0 and empty.left_out == 6 and math.isnan(empty.mean)
    (table,) = main_tables(aggregates)
    notes = " ".join(table.notes)
    assert "leaves out 2 of 6 maps with no positive pixel" in notes and "leaves out 6 of 6" in notes
    none_row = next(r for r in table.rows if r[0] == "none")
    assert none_row[2] == "—"  # the cell is empty, and the note above says why


# --------------------------------------------------------------------------------------- the readings study
def test_readings_study_on_a_tiny_benchmark(tmp_path):
    """The study measures each asked-for reading on every model (here 2 of the 12, to stay fast; the README's
    table measures all 12); the numbers are in range and GBP's EBPG equals the GBP maps' EBPG computed directly."""
    size, classes = 48, 3
    bench, shortcut = tmp_path / "bench", tmp_path / "bench_shortcut"
    for folder, share in ((bench, 0.0), (shortcut, 0.5)):
        make_benchmark.make_benchmark(folder, bm.BenchmarkConfig(size=size, num_classes=classes, seed=0,
                                                                 shortcut=share),
                                      {"train": 1, "val": 10}, samples_per_shard=100, log=lambda _: None)
    names = [c.name for c in bm.benchmark_classes(classes)]
    checkpoints = {}
    for arch in ("bench_resnet", "bench_vgg_plain"):
        with torch.random.fork_rng(devices=[]):       # the same weights whatever ran before
            torch.manual_seed(0)
            spec = _plain(size, classes) if arch == "bench_vgg_plain" else randomise_batchnorm(models.ModelSpec(
                arch, small_cnn.build(arch, classes, size).eval()))
        checkpoints[arch] = tmp_path / f"{arch}.pt"
        torch.save(small_cnn.checkpoint(spec.module, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD,
                                        class_names=names), checkpoints[arch])
    readings = [tr_gbp_readings.DEFAULT_READING,
                {"bias_terms": "parameter", "layer_norm": "max", "input_term": "gradient_x_input"}]
    config = tr_gbp_readings.StudyConfig(out=tmp_path / "out", bench=bench, checkpoints=checkpoints,
                                         shortcut_bench=shortcut, shortcut_checkpoint=checkpoints["bench_resnet"],
                                         lite0=False, images=6, sanity_images=2, batch_size=4, readings=readings)
    table = tr_gbp_readings.run(config, say=lambda _: None)
    assert len(tr_gbp_readings.READINGS) == 12
    assert len(table) == 2 * 3 and set(table.reading) == {"gbp", "effective/none/gradient",
                                                         "parameter/max/gradient_x_input"}
    defined = table[table["empty"] < table["ebpg_images"]]       # (table.empty is pandas' is-empty flag)
    assert len(defined) >= 4
    assert ((defined.ebpg >= 0) & (defined.ebpg <= 1)).all()
    assert ((table.class_discrimination >= -1) & (table.class_discrimination <= 1)).all()
    assert table[table.model == "bench_resnet"].ibd_auc.notna().any()
    # GBP's EBPG by hand on the same images
    spec = models.load("bench_resnet", weights=str(checkpoints["bench_resnet"]))
    split = tr_gbp_readings.load_split([str(p) for p in sorted(bench.glob("val-*.tar"))], spec.preprocessing, 6)
    top1 = spec.module(split.images).argmax(1)
    gbp = attribute("gbp", spec, split.images, top1)
    by_hand = float(torch.nanmean(energy_pointing_game(gbp[split.eligible], split.masks[split.eligible])))
    ours = float(table[(table.model == "bench_resnet") & (table.reading == "gbp")].ebpg.iloc[0])
    assert math.isclose(ours, by_hand, rel_tol=1e-9)
    box_share = split.masks[split.eligible].float().mean((1, 2)).mean()        # chance: a constant map's EBPG
    assert math.isclose(float(table[table.model == "bench_resnet"].ebpg_chance.iloc[0]), float(box_share),
                        rel_tol=1e-6)
    assert "EBPG of a constant map (chance)" in (tmp_path / "out" / "readings.md").read_text()
    for name in ("readings.csv", "readings.md", "bias_stats.csv", "resolution_shares.csv", "summary.json",
                 "grid_bench_resnet.png", "grid_bench_vgg_plain.png"):
        assert (tmp_path / "out" / name).exists(), name
    shares = pd.read_csv(tmp_path / "out" / "resolution_shares.csv")
    for (_, _), g in shares.groupby(["model", "removal"]):
        assert math.isclose(g.l2_share.sum(), 1.0, rel_tol=1e-6)
    biases = pd.read_csv(tmp_path / "out" / "bias_stats.csv")
    assert set(biases.reading) == {"effective", "parameter"}
    plain = biases[biases.model == "bench_vgg_plain"]
    eff, par = (plain[plain.reading == r].set_index("unit") for r in ("effective", "parameter"))
    pd.testing.assert_series_equal(eff["mean"], par["mean"])  # no BatchNorm: the two readings coincide
