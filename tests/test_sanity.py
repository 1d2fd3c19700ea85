"""Cascading model-parameter randomisation (attribution.sanity, workers.sanity_worker, jobs.sanity).

The blocks are the papers' (TR-GBP Fig. 5/9/10), the caller's model is never touched, step k randomises exactly
the top k blocks, the draws are seeded; on the real EfficientNet-Lite0 and real photos GBP keeps its map while the
top of the network is destroyed and TR-GBP does not (Adebayo et al. 2018; TR-GBP §5.2.2); the job end to end.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from attribution import models
from attribution.data.sample_sets import photo_samples
from attribution.data.shards import Sample, write_shards
from attribution.errors import AttributionError
from attribution.images import decode_sample
from attribution.methods import attribute
from attribution.sanity import cascading_maps, randomisation_blocks, randomised_copy, similarity_to_original
from jobs.common import JobError
from jobs.figures import figure_size_px
from schemas.metrics import validate_sanity
from workers.decode import decode_batch
from workers.sanity_worker import SanityConfig, SanityWorker
from tests.tolerances import torch_threads, unit_roundoff
from workers.shards import RAW_SCHEMA, read_shard

LITE0_BLOCKS = ["classifier", "head", "stage7", "stage6", "stage5", "stage4", "stage3", "stage2", "stage1", "stem"]


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def block_of(spec: models.ModelSpec) -> dict[str, str]:
    """Parameter name -> the name of the block that holds it ('' if none)."""
    owner = {}
    for name, modules in randomisation_blocks(spec):
        for module in modules:
            for p in module.parameters():
                owner[id(p)] = name
    return {n: owner.get(id(p), "") for n, p in spec.module.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# Blocks

def test_block_names_and_contents(resnet18, vgg11_bn, lite0):
    def names(spec):
        return [n for n, _ in randomisation_blocks(spec)]

    assert names(resnet18) == ["fc", "layer4", "layer3", "layer2", "layer1", "conv1"]
    assert randomisation_blocks(resnet18)[-1][1] == [resnet18.module.conv1, resnet18.module.bn1]
    assert names(vgg11_bn) == ["classifier", "block5", "block4", "block3", "block2", "block1"]
    # VGG-11: convs per block between max-pools 1,1,2,2,2 (listed top-down); the classifier is one step (Fig. 9)
    convs = [sum(isinstance(m, nn.Conv2d) for mod in mods for m in mod.modules())
             for _, mods in randomisation_blocks(vgg11_bn)[1:]]
    assert convs == [2, 2, 2, 1, 1]
    assert names(lite0) == LITE0_BLOCKS
    mbconvs = [len(mods) for _, mods in randomisation_blocks(lite0)[2:-1]]
    assert mbconvs == [1, 4, 3, 3, 2, 2, 1]  # Lite0 stages 1,2,2,3,3,4,1, top-down
    for spec in (resnet18, vgg11_bn, lite0):  # the blocks partition the parameters
        assert "" not in block_of(spec).values(), spec.name


def test_benchmark_models_blocks():
    if "bench_resnet" not in models.MODEL_NAMES:
        pytest.skip("the benchmark models are not in attribution.models")
    resnet, vgg = models.load("bench_resnet"), models.load("bench_vgg")
    assert [n for n, _ in randomisation_blocks(resnet)] == ["fc", "layer3", "layer2", "layer1", "stem"]
    assert [n for n, _ in randomisation_blocks(vgg)] == ["classifier", "block4", "block3", "block2", "block1"]
    for spec in (resnet, vgg):
        assert "" not in block_of(spec).values(), spec.name


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.fc(self.pool(self.body(x)))


def test_generic_rule_for_wrapped_models():
    assert [n for n, _ in randomisation_blocks(models.wrap(Net()))] == ["fc", "body"]
    # one child with parameters: the rule descends into it
    assert [n for n, _ in randomisation_blocks(models.wrap(nn.Sequential(Net())))] == ["0.fc", "0.body"]
    with pytest.raises(AttributionError, match="no parameters"):
        randomisation_blocks(models.wrap(nn.Sequential(nn.ReLU())))


# ---------------------------------------------------------------------------------------------------------------
# Randomised copies

def test_step_k_randomises_exactly_the_top_k_blocks(resnet18):
    before = state(resnet18.module)
    owner = block_of(resnet18)
    order = [n for n, _ in randomisation_blocks(resnet18)]
    for k in (0, 1, 3, 6):
        twin = randomised_copy(resnet18, k, seed=0)
        params = dict(twin.module.named_parameters())
        for name, p in resnet18.module.named_parameters():
            changed = not torch.equal(p, params[name])
            assert changed == (order.index(owner[name]) < k), (k, name)
        for name, buffer in resnet18.module.named_buffers():  # BatchNorm running statistics are kept
            assert torch.equal(buffer, dict(twin.module.named_buffers())[name]), name
        assert not twin.module.training
    after = state(resnet18.module)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is unchanged


def test_redrawn_tensors_keep_their_scale(resnet18):
    twin = randomised_copy(resnet18, 2, seed=0)  # fc and layer4
    new = dict(twin.module.named_parameters())
    for name in ("fc.weight", "fc.bias", "layer4.0.conv1.weight", "layer4.1.bn2.weight", "layer4.1.bn2.bias"):
        old = dict(resnet18.module.named_parameters())[name].double()
        n = old.numel()
        # kernels: N(0, std), vectors: N(mean, std); sample mean within 5 standard errors, sample std within 5 of
        # its standard errors
        expected_mean = old.mean() if old.ndim < 2 else 0.0
        assert abs(new[name].double().mean() - expected_mean) < 5 * old.std() / n ** 0.5, name
        assert abs(new[name].double().std() / old.std() - 1) < 5 / (2 * n) ** 0.5, name
        assert torch.corrcoef(torch.stack([new[name].double().flatten(), old.flatten()]))[0, 1].abs() < 5 / n ** 0.5


def test_copy_points_its_split_at_its_own_modules(resnet18, vgg11_bn, lite0):
    for spec in (resnet18, vgg11_bn, lite0):
        twin = randomised_copy(spec, 1, seed=0)
        own = {id(m) for m in twin.module.modules()}
        assert id(twin.target_layer) in own and id(twin.target_layer) not in {id(m) for m in spec.module.modules()}
        weighted = [m for part in (twin.features, twin.head) for m in part.modules()
                    if next(m.parameters(recurse=False), None) is not None]
        assert weighted and all(id(m) in own for m in weighted)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():  # the split still composes to the (randomised) model
            assert torch.allclose(twin.head(twin.features(x)), twin.module(x), atol=1e-5)


def test_determinism_per_seed(resnet18):
    a = state(randomised_copy(resnet18, 3, seed=7).module)
    b = state(randomised_copy(resnet18, 3, seed=7).module)
    c = state(randomised_copy(resnet18, 3, seed=8).module)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layer3.0.conv1.weight"], c["layer3.0.conv1.weight"])
    # cascading: step 2's blocks are the same draws in step 3's copy
    two = state(randomised_copy(resnet18, 2, seed=7).module)
    assert torch.equal(two["fc.weight"], a["fc.weight"]) and torch.equal(two["layer4.1.conv2.weight"],
                                                                        a["layer4.1.conv2.weight"])
    with pytest.raises(AttributionError, match="steps must be in 0..6"):
        randomised_copy(resnet18, 7, seed=0)


def test_cascading_maps_equal_maps_of_randomised_copies(resnet18):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 48, 48)
    targets = torch.tensor([3, 500])
    before = state(resnet18.module)
    names, maps = cascading_maps(resnet18, images, targets, ["gbp", "gradcam"], seed=5)
    assert names == ["original", "fc", "layer4", "layer3", "layer2", "layer1", "conv1"]
    assert maps.shape == (7, 2, 2, 48, 48) and maps.dtype == torch.float32
    for k in (0, 2, 6):
        twin = randomised_copy(resnet18, k, seed=5)
        for m, method in enumerate(["gbp", "gradcam"]):
            assert torch.equal(maps[k, m], attribute(method, twin, images, targets)), (k, method)
    assert torch.equal(maps[0, 0], attribute("gbp", resnet18, images, targets))
    after = state(resnet18.module)
    assert all(torch.equal(before[k], after[k]) for k in before)
    sim = similarity_to_original(maps)
    assert set(sim) == {"spearman", "spearman_abs", "ssim"} and sim["ssim"].shape == (7, 2, 2)
    constant = maps[0].flatten(2).std(dim=2) == 0  # [M, B]: e.g. a Grad-CAM map that relu made all zero
    assert torch.equal(torch.isnan(sim["spearman"][0]), constant)  # no rank correlation for a constant map
    assert torch.allclose(sim["spearman"][0][~constant], torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(sim["ssim"][0], torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(AttributionError, match="not among the methods"):
        cascading_maps(resnet18, images, targets, ["gbp"], options={"tr_gbp": {}})


def test_vgg_classifier_step_uses_the_copys_layers(vgg11_bn):
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([10])
    names, maps = cascading_maps(vgg11_bn, images, targets, ["gradcam"], seed=0, steps=1)
    assert names == ["original", "classifier"]
    twin = randomised_copy(vgg11_bn, 1, seed=0)
    assert torch.equal(maps[1, 0], attribute("gradcam", twin, images, targets))
    assert not torch.equal(maps[1, 0], maps[0, 0])


# ---------------------------------------------------------------------------------------------------------------
# The paper's claim on the real EfficientNet-Lite0

def test_lite0_gbp_keeps_its_map_while_tr_gbp_changes(lite0, photos):
    images = photos[:2]  # chelsea (tabby 281), coffee (espresso 967)
    with torch.no_grad():
        targets = lite0.module(images).argmax(dim=1)
    assert targets.tolist() == [281, 967]
    names, maps = cascading_maps(lite0, images, targets, ["gbp", "tr_gbp"], seed=0)
    assert names == ["original"] + LITE0_BLOCKS
    sim = {k: v.mean(dim=2) for k, v in similarity_to_original(maps).items()}  # mean over the 2 photos: [S+1, 2]
    for metric in ("spearman_abs", "spearman", "ssim"):
        for m, method in enumerate(("gbp", "tr_gbp")):
            print(f"{metric:<12} {method:<6}", " ".join(f"{v:6.3f}" for v in sim[metric][:, m].tolist()))
    gbp_abs, tr_abs = sim["spearman_abs"][:, 0], sim["spearman_abs"][:, 1]
    gbp_ssim, tr_ssim = sim["ssim"][:, 0], sim["ssim"][:, 1]
    # Margins from the spread over seeds 0-5 (steps: classifier, head, stage7, ..., stem):
    # GBP is unchanged while the top of the network is random: Spearman(|map|) >= 0.992, Spearman(map) >= 0.998
    # after classifier, head and stage7.
    assert gbp_abs[1:4].min() > 0.95 and sim["spearman"][1:4, 0].min() > 0.99
    # TR-GBP is not: after the classifier and after the head its map is close to the NEGATIVE of the original
    # (Spearman(map) -0.47 ... -0.94: the mean over the randomised model's new top-5 dominates) and its
    # Spearman(|map|) is below GBP's (0.47-0.93 vs >= 0.996).
    assert sim["spearman"][1:3, 1].max() < -0.3
    assert (gbp_abs[1:3] - tr_abs[1:3]).min() > 0.05
    # SSIM of the normalised maps: GBP stays above TR-GBP at every step down to stage1 (smallest gap 0.17) and
    # on average over all steps GBP keeps 0.80-0.83, TR-GBP 0.28-0.37.
    assert (gbp_ssim[1:-1] - tr_ssim[1:-1]).min() > 0.05
    assert gbp_ssim[1:].mean() > 0.7 and tr_ssim[1:].mean() < 0.45
    # Mean Spearman(|map|) over all steps: GBP 0.59-0.62, TR-GBP 0.33-0.44.
    assert gbp_abs[1:].mean() - tr_abs[1:].mean() > 0.08
    # GBP is no edge detector of the input alone: once the low stages are random its ranks are gone too (<= 0.17).
    assert gbp_abs[-1] < 0.3


# ---------------------------------------------------------------------------------------------------------------
# Worker and job

def sample_set(tmp: Path, names=("chelsea", "coffee"), broken: bool = True) -> str:
    """Shards with the named real photos plus, optionally, a sample whose JPEG is corrupt (key sorts last)."""
    photos = {s.key: s for s in photo_samples()}
    samples = [photos[n] for n in names]
    if broken:
        meta = dict(photos[names[0]].meta, key="zz_broken")
        samples.append(Sample("zz_broken", meta, lambda: b"\xff\xd8\xff not a jpeg"))
    return write_shards(samples, tmp, "photos", 8, log=lambda *_: None).pattern


def test_worker_rows_errors_and_grid(tmp_path):
    shard = sample_set(tmp_path, names=("chelsea",))
    raw = pa.Table.from_pylist(read_shard(shard), schema=RAW_SCHEMA)
    decoded = decode_batch(raw, models.preprocessing_for("resnet18"))
    config = SanityConfig(model="resnet18", methods=["gbp", "saliency"], steps=2, targets="label",
                          grid_keys=["photos-000000.tar/chelsea"])
    out = SanityWorker(config)(decoded).to_pylist()
    assert len(out) == 1 and out[0]["keys"] == ["chelsea", "zz_broken"] and out[0]["samples"] == 2
    rows = pa.ipc.open_stream(out[0]["sanity"]).read_all()
    validate_sanity(rows)
    assert rows.num_rows == 2 * 3 and set(rows.column("target").to_pylist()) == {281}  # label target
    assert set(rows.column("key").to_pylist()) == {"chelsea"}  # the broken sample has no rows
    assert rows.column("randomised").to_pylist()[:3] == ["", "fc", "layer4"]
    errors = pa.ipc.open_stream(out[0]["errors"]).read_all().to_pylist()
    assert len(errors) == 1 and errors[0]["stage"] == "decode" and errors[0]["key"] == "zz_broken"
    grid, no_grid = out[0]["grid"]
    with np.load(io.BytesIO(grid)) as npz:
        assert npz["maps"].shape == (3, 2, 224, 224) and npz["image"].shape == (224, 224, 3)
        assert list(npz["steps"]) == ["", "fc", "layer4"]
    assert no_grid == b""


def test_job_end_to_end(ray_session, lite0, tmp_path, capsys):
    from jobs.sanity import SanityJobConfig, parse_args, run

    shards = sample_set(tmp_path / "shards")
    out = tmp_path / "sanity"
    config = SanityJobConfig(shards=[shards], out=str(out), max_images=3, grid_images=2,
                             worker=SanityConfig(model="efficientnet_lite0", weights="imagenet",
                                                 methods=["gbp", "tr_gbp"], steps=3, threads=1))
    summary = run(config)
    printed = capsys.readouterr().out
    assert "sanity_grid.png" in printed and "stage7" in printed and "stage6" not in printed
    table = pq.read_table(out / "sanity")
    validate_sanity(table)
    parts = list((out / "sanity").glob("*.parquet")) + list((out / "errors").glob("*.parquet"))
    assert parts and {pq.ParquetFile(p).metadata.row_group(0).column(0).compression for p in parts} == {"ZSTD"}
    steps = 3 + 1  # original, classifier, head, stage7
    assert table.num_rows == 2 * 2 * steps == summary["rows"]  # images x methods x (steps + 1)
    assert summary["images"] == 2 and summary["errors"] == 1 and summary["samples"] == 3
    errors = pq.read_table(out / "errors").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("zz_broken", "decode")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"] == "sanity" and manifest["status"] == "complete" and manifest["blocks"] == LITE0_BLOCKS[:3]

    # the job's numbers are the library's numbers on the same decoded images
    raw = read_shard(shards)
    decoded = [decode_sample(r["jpg"], r["cls"], r["json"], lite0.preprocessing) for r in raw[:2]]
    images = lite0.preprocessing.normalise(torch.from_numpy(np.stack([d.pixels for d in decoded])).float() / 255)
    with torch.no_grad():
        targets = lite0.module(images).argmax(dim=1)
    with torch_threads(1):  # like with like: the actor's thread count and batch (the 2 good samples)
        _, maps = cascading_maps(lite0, images, targets, ["gbp", "tr_gbp"], seed=0, steps=3)
    sim = similarity_to_original(maps)
    frame = table.to_pandas().set_index(["key", "method", "step"]).sort_index()
    for j, key in enumerate(["chelsea", "coffee"]):
        for m, method in enumerate(["gbp", "tr_gbp"]):
            for metric in ("spearman", "spearman_abs", "ssim"):
                got = frame.loc[(key, method), metric].to_numpy()
                # same threads, same batch, same code: equal up to the float32 → float64 storage of the value
                np.testing.assert_allclose(got, sim[metric][:, m, j].numpy(), rtol=0, atol=2 * unit_roundoff(),
                                           err_msg=f"{key} {method} {metric}")
    assert summary["similarity"]["gbp"]["spearman_abs"][0] == 1.0

    with np.load(out / "sanity_maps.npz") as npz:
        assert list(npz["keys"]) == ["photos-000000.tar/chelsea", "photos-000000.tar/coffee"]
        assert npz["maps"].shape == (2, steps, 2, 224, 224)
        expected = maps.permute(2, 0, 1, 3, 4).numpy()
        scale = np.abs(expected).max(axis=(-2, -1), keepdims=True)
        assert (np.abs(npz["maps"] - expected) <= 1e-3 * scale).all()
        assert list(npz["steps"]) == [""] + LITE0_BLOCKS[:3]
    with Image.open(out / "sanity_grid.png") as grid:
        grid.verify()
    with Image.open(out / "sanity_grid.png") as grid:
        assert grid.size == figure_size_px(4, steps + 1)  # 2 images x 2 methods rows; photo + 11 map columns
    with Image.open(out / "sanity_similarity.png") as line:
        line.verify()

    with pytest.raises(JobError, match="not empty; use --overwrite"):
        run(config)
    with pytest.raises(SystemExit):
        parse_args(["--model", "efficientnet_lite0", "--shards", shards, "--out", str(out), "--methods", "nope"])
    assert "unknown method 'nope'" in capsys.readouterr().err
