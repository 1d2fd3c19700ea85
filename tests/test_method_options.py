"""Every option of every registry method reaches the method through ``attribute`` / ``attribute_with_extras``
and through the attribution actor's ``--method-options`` path (introspection over the registry: a new method or
option is covered without editing this test); an unexpected exception in one method becomes error rows."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from attribution import models
from attribution.errors import AttributionError
from attribution.methods import REGISTRY, attribute, attribute_with_extras, get_method
from tests.tolerances import unit_roundoff
from workers.attribution_worker import AttributionWorker, WorkerConfig
from workers.batches import ipc_tables

SIZE = 32
# Cheap values for the options that set a method's cost, so that one call per method stays fast; every other
# option is passed explicitly at its default. Names missing from a method's signature fail the test below.
CHEAP: dict[str, dict] = {
    "rise": {"masks": 8, "batch_size": 4},
    "extremal_perturbation": {"iterations": 2, "internal_batch_size": 4},
    "ig": {"steps": 4, "method": "riemann_trapezoid", "internal_batch_size": 4},
    "gig": {"steps": 4},
    "smoothgrad": {"samples": 2, "base": "ig", "base_options": {"steps": 2, "method": "riemann_left"}},
    "vargrad": {"samples": 2},
    "xrai": {"base_options": {"steps": 2, "method": "riemann_middle"}},
    "cameras": {"resolutions": [SIZE, SIZE + 8]},
}


@pytest.fixture(scope="module")
def spec() -> models.ModelSpec:
    """bench_resnet with random weights (seed 0) at 32 px: every method's machinery, in milliseconds."""
    return models.load("bench_resnet")


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return images, torch.tensor([[0, 3], [1, 2]])


def test_cheap_settings_name_real_options():
    for name, options in CHEAP.items():
        assert set(options) <= set(get_method(name).option_defaults()), name


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_option_reaches_the_method(spec, inputs, name):
    """All options at their defaults (cost options cheap) give exactly the maps of the call with only the cheap
    options: each option is accepted by ``attribute`` and ``attribute_with_extras`` and means its default."""
    images, targets = inputs
    cheap = CHEAP.get(name, {})
    options = {**get_method(name).option_defaults(), **cheap}
    explicit = attribute(name, spec, images, targets, **options)
    implicit = attribute(name, spec, images, targets, **cheap)
    assert explicit.shape == (2, 2, SIZE, SIZE) and torch.isfinite(explicit).all()
    torch.testing.assert_close(explicit, implicit, rtol=0, atol=0)  # same call, same batch, same threads
    extras = attribute_with_extras(name, spec, images, targets, **options)
    torch.testing.assert_close(extras.maps, explicit, rtol=0, atol=0)
    assert attribute(name, spec, images, targets[:, 0], **options).shape == (2, SIZE, SIZE)


def test_ig_method_option_is_passed_and_matters(spec, inputs):
    """The registry's own positional parameters no longer capture an option called ``method``."""
    images, targets = inputs
    maps = {rule: attribute("ig", spec, images, targets, steps=4, method=rule)
            for rule in ("riemann_trapezoid", "gausslegendre")}
    assert not torch.allclose(maps["riemann_trapezoid"], maps["gausslegendre"])
    via_extras = attribute_with_extras("ig", spec, images, targets, steps=4, method="riemann_trapezoid").maps
    torch.testing.assert_close(via_extras, maps["riemann_trapezoid"], rtol=0, atol=0)
    with pytest.raises(AttributionError, match="unknown method 'simpson'"):
        attribute("ig", spec, images, targets, method="simpson")


def _decoded(spec: models.ModelSpec, n: int) -> pa.Table:
    """n decoded rows (workers.decode) of random-noise JPEGs, decoded with the model's preprocessing."""
    import io

    from PIL import Image

    from workers.decode import decode_batch
    from workers.shards import RAW_SCHEMA

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        meta = {"key": f"s{i}", "label": i % 4, "wnid": "n0", "width": 48, "height": 40, "bboxes": []}
        rows.append({"key": f"s{i}", "shard": "t", "shard_total": n, "jpg": buffer.getvalue(),
                     "cls": str(i % 4).encode(), "json": json.dumps(meta).encode(), "stage": None, "error": None})
    return decode_batch(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), spec.preprocessing)


def _rows(column) -> list[dict]:
    """The rows of an actor output's blob column (one IPC stream or more per shard row)."""
    return [r for b in column.to_pylist() for t in ipc_tables(b) for r in t.to_pylist()]


def _stored_maps(rows: list[dict]) -> np.ndarray:
    size = int(np.sqrt(len(rows[0]["map"])))
    return np.stack([np.asarray(r["map"], dtype=np.float32).reshape(size, size) * r["map_scale"] for r in rows])


def test_worker_passes_every_ig_option():
    """``--method-options '{"ig": {"method": …, every other option}}'``: validated by the CLI, passed on by the
    actor, recorded in the row; the stored maps are the direct call's (same batch, same threads)."""
    from jobs.attribute import parse_args

    options = {"ig": {**get_method("ig").option_defaults(), **CHEAP["ig"]}}
    config = parse_args(["--shards", "x.tar", "--model", "bench_resnet", "--methods", "ig,gbp", "--out", "o",
                         "--method-options", json.dumps(options), "--map-dtype", "float32",
                         "--device", "cpu"]).worker
    worker = AttributionWorker(config)
    decoded = _decoded(worker.spec, 3)
    out = worker(decoded)
    assert not _rows(out["errors"])
    rows = [r for r in _rows(out["attributions"]) if r["method"] == "ig"]
    assert [r["key"] for r in rows] == ["s0", "s1", "s2"]
    assert json.loads(rows[0]["options"])["method"] == "riemann_trapezoid"
    pixels = torch.from_numpy(np.ascontiguousarray(decoded.column("pixels").combine_chunks().to_numpy()))
    images = worker.spec.preprocessing.normalise(pixels.float() / 255.0)
    direct = attribute("ig", worker.spec, images, torch.tensor([r["target"] for r in rows]), **options["ig"])
    np.testing.assert_allclose(_stored_maps(rows), direct.numpy(), rtol=0,
                               atol=4 * unit_roundoff() * float(direct.abs().max()))  # map / scale * scale


def test_unexpected_exception_in_one_method_becomes_error_rows(monkeypatch):
    """A TypeError (a bug, not bad input) inside one method on one batch: that method's error rows, named by
    type, for every sample; the other method's maps are all written; nothing raises."""
    config = WorkerConfig(model="bench_resnet", methods=["gbp", "saliency"], targets="top1", map_dtype="float32",
                          device="cpu")
    worker = AttributionWorker(config)

    def broken(self, images, targets, **options):
        raise TypeError("boom in the method")

    monkeypatch.setattr(REGISTRY["gbp"], "_attribute", broken)
    out = worker(_decoded(worker.spec, 3))
    errors = _rows(out["errors"])
    assert [(e["key"], e["method"], e["stage"]) for e in errors] == [(f"s{i}", "gbp", "attribute") for i in range(3)]
    assert all(e["reason"] == "TypeError: boom in the method" for e in errors)
    assert sorted(r["key"] for r in _rows(out["attributions"]) if r["method"] == "saliency") == ["s0", "s1", "s2"]
