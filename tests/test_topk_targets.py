"""Top-k targets decided by the method's own forward pass (attribution.methods.targets.TopKTargets): the same
classes, probabilities and maps as a separate top-k forward followed by explicit targets, for every registry
method; and the attribution actor runs one forward pass fewer per batch because of it."""
from __future__ import annotations

import pytest
import torch

from attribution import models
from attribution.errors import AttributionError
from attribution.methods import REGISTRY, attribute_with_extras, get_method
from attribution.methods.targets import TopKTargets, resolve_targets
from tests.test_method_options import CHEAP, SIZE, _decoded, _rows
from workers.attribution_worker import AttributionWorker, WorkerConfig
from workers.batches import DecodedBatch


@pytest.fixture(scope="module")
def spec() -> models.ModelSpec:
    return models.load("bench_resnet")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_topk_targets_equal_explicit_top_k(spec, images, name):
    """Same batch, same threads: the classes are the plain forward's top-2, the probabilities its softmax top-5,
    and the maps those of the explicit call, exactly."""
    with torch.no_grad():
        probs = spec.module(images).softmax(dim=1)
    prob5, top5 = probs.topk(5, dim=1)
    targets = TopKTargets(2)
    result = attribute_with_extras(name, spec, images, targets, **CHEAP.get(name, {}))
    assert targets.resolved and targets.num_classes == probs.shape[1]
    assert torch.equal(targets.classes, top5[:, :2]) and torch.equal(targets.top5, top5)
    torch.testing.assert_close(targets.top5_prob, prob5, rtol=0, atol=0)
    explicit = attribute_with_extras(name, spec, images, top5[:, :2], **CHEAP.get(name, {}))
    assert result.maps.shape == (3, 2, SIZE, SIZE)
    torch.testing.assert_close(result.maps, explicit.maps, rtol=0, atol=0)


def test_resolve_targets_leaves_tensors_alone_and_resolves_once():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 1.0, -1.0]])
    given = torch.tensor([[2], [0]])
    assert resolve_targets(given, logits) is given
    top = TopKTargets(columns=2)
    assert torch.equal(resolve_targets(top, logits), torch.tensor([[1, 3], [0, 2]]))
    assert top.top5.shape == (2, 4)  # 4 classes: k = 4
    assert torch.equal(resolve_targets(top, -logits), torch.tensor([[1, 3], [0, 2]]))  # resolved once
    with pytest.raises(AttributionError, match="at least one column"):
        TopKTargets(0)


def test_a_method_that_claims_predicts_targets_must_resolve(spec, images, monkeypatch):
    cls = get_method("saliency")
    monkeypatch.setattr(cls, "_attribute", lambda self, images, targets: None)
    with pytest.raises(AttributionError, match="did not resolve its targets"):
        attribute_with_extras("saliency", spec, images, TopKTargets(1))


@pytest.mark.parametrize("targets,methods,forwards", [
    ("top5", ["saliency", "gbp"], 2),     # the first method's forward decides the top-5: no separate pass
    ("top1", ["a_fmi", "saliency"], 1),   # saliency runs first (a_fmi runs features/head): one pass in all
    ("top1", ["a_fmi"], 1),               # no method can decide the targets: one plain pass first
    ("label", ["saliency", "gbp"], 3),    # labels are the targets; a plain pass gives the top-5 columns
])
def test_worker_forward_passes_per_batch(spec, targets, methods, forwards):
    """Count the model's forward passes in one actor batch; the rows' top-5 equal a plain forward's either way."""
    worker = AttributionWorker(WorkerConfig(model="bench_resnet", methods=methods, targets=targets,
                                            map_dtype="float32", device="cpu"))
    decoded = _decoded(worker.spec, 4)
    calls = []
    handle = worker.spec.module.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        out = worker(decoded)
    finally:
        handle.remove()
    assert len(calls) == forwards
    rows = _rows(out["attributions"])
    assert not _rows(out["errors"]) and len(rows) == 4 * len(methods) * (5 if targets == "top5" else 1)
    assert list(dict.fromkeys(r["method"] for r in rows)) == methods  # rows in the order of --methods
    batch = DecodedBatch(decoded)
    pixels = torch.from_numpy(batch.columns["pixels"])
    with torch.no_grad():
        top = worker.spec.module(worker.spec.preprocessing.normalise(pixels.float() / 255.0)).topk(5, dim=1)
    by_key = {r["key"]: r["top5"] for r in rows}
    assert [by_key[f"s{i}"] for i in range(4)] == top.indices.tolist()
