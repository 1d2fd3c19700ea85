"""Compact map storage (jobs.attribute --map-size / --map-dtype, schemas.maps): stored and read back equals the direct
map area-averaged to S then upsampled bilinearly to the input size, within the quantisation step; per-method layouts
(one Parquet file each) read back together; uint8 refuses signed maps per sample; the CLI's one-line errors.

The bound of a round trip, per pixel, relative to the map's ``map_scale`` (max |area-averaged map|): half a
quantisation level (int8 0.5/127, uint8 0.5/255, float16 2^-11) — bilinear upsampling is a convex combination, so
it does not grow — plus float32 rounding of the pooling and the two upsampling matmuls (tests/tolerances.sum_atol
over their reduction lengths)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 -- pa.compute
import pyarrow.parquet  # noqa: F401 -- pa.parquet
import pytest
import torch
import torch.nn.functional as F

from attribution import models
from attribution.data.sample_sets import synthetic_samples
from attribution.data.shards import write_shards
from attribution.methods import attribute
from schemas.maps import MapLayout, bilinear_matrix, decode_maps, upsample
from schemas.reader import OutputReader, maps_of
from workers.attribution_worker import AttributionWorker, WorkerConfig
from workers.decode import decode_batch
from workers.shards import RAW_SCHEMA, read_shard
from workers.sink import OutputStore
from workers.staging import write_parts
from tests.tolerances import gamma, sum_atol, unit_roundoff

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench_resnet"  # random init, 112 px


@pytest.mark.parametrize("size,out", [(56, 224), (14, 224), (7, 224), (112, 224), (13, 224), (50, 112), (224, 224)])
def test_bilinear_upsampling_equals_torch_interpolate(size, out):
    x = np.random.default_rng(size).standard_normal((3, size, size)).astype(np.float32)
    ours = upsample(x, out)
    ref = F.interpolate(torch.from_numpy(x)[:, None], size=(out, out), mode="bilinear",
                        align_corners=False)[:, 0].numpy()
    # two length-`size` convex combinations per output; torch computes the source index in float32 (5e-6 at 13->224)
    atol = sum_atol(2 * size, float(np.abs(x).max())) + 1e-5 * float(np.abs(x).max())
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
    assert np.allclose(bilinear_matrix(out, size).sum(axis=1), 1.0, atol=1e-6)  # rows are convex weights


def test_decode_semantics_of_each_dtype():
    scale = np.array([2.0, 0.5], np.float32)
    q = np.array([[[127, -127], [0, 64]], [[255, 0], [128, 1]]], np.int16)
    np.testing.assert_allclose(decode_maps(q[:1].astype(np.int8), scale[:1], "int8", 2)[0],
                               [[2.0, -2.0], [0.0, 64 * 2 / 127]], rtol=1e-6)
    np.testing.assert_allclose(decode_maps(q[1:].astype(np.uint8), scale[1:], "uint8", 2)[0],
                               [[0.5, 0.0], [128 * 0.5 / 255, 0.5 / 255]], rtol=1e-6)
    np.testing.assert_allclose(decode_maps(np.full((1, 2, 2), 0.25, np.float16), scale[:1], "float16", 4)[0],
                               np.full((4, 4), 0.5), rtol=1e-6)
    with pytest.raises(ValueError, match="map size must be in 1..112"):
        MapLayout(size=113, dtype="int8", input_size=112)


@pytest.fixture(scope="module")
def shard_uri(tmp_path_factory) -> str:
    shard_set = write_shards(synthetic_samples(4, size=112), tmp_path_factory.mktemp("shards"), "syn", 4,
                             log=lambda *_: None)
    return str(Path(shard_set.pattern).parent / shard_set.shards[0]["file"])


@pytest.fixture(scope="module")
def decoded(shard_uri) -> pa.Table:
    return decode_batch(pa.Table.from_pylist(read_shard(shard_uri), schema=RAW_SCHEMA),
                        models.preprocessing_for(MODEL))


def stored_run(decoded: pa.Table, out: Path, **storage) -> tuple[OutputReader, dict]:
    """The worker + write step + commit on ``decoded`` with ``storage`` options; (reader, worker output)."""
    worker = AttributionWorker(WorkerConfig(model=MODEL, methods=["saliency", "gbp", "gradcam"], targets="top5",
                                            device="cpu", **storage))
    rows = worker(decoded)
    store = OutputStore(str(out))
    store.ensure()
    list(store.commit_complete(write_parts(rows, str(out), ("parquet", "npz")).to_pylist()))
    return OutputReader(str(out)), rows


def direct_maps(table: pa.Table, images: dict[str, torch.Tensor]) -> dict[tuple, torch.Tensor]:
    """{(key, method, target): the map computed directly}: one call per method on the whole batch, each image's
    top-5 as stored (rank order)."""
    spec = models.load(MODEL, device="cpu")
    rows = table.select(["key", "method", "target", "target_rank"]).to_pylist()
    out = {}
    for method in sorted({r["method"] for r in rows}):
        keys = sorted({r["key"] for r in rows if r["method"] == method})
        ranked = {k: [r["target"] for r in sorted((r for r in rows if r["method"] == method and r["key"] == k),
                                                   key=lambda r: r["target_rank"])] for k in keys}
        maps = attribute(method, spec, torch.stack([images[k] for k in keys]), torch.tensor([ranked[k] for k in keys]))
        for i, k in enumerate(keys):
            for t, cls in enumerate(ranked[k]):
                out[(k, method, cls)] = maps[i, t]
    return out


def test_round_trip_equals_area_then_bilinear_within_the_quantisation_step(decoded, tmp_path):
    spec = models.load(MODEL, device="cpu")
    pixels = decoded.column("pixels").combine_chunks().to_numpy()
    normalised = spec.preprocessing.normalise(torch.from_numpy(np.ascontiguousarray(pixels)).float() / 255.0)
    images = dict(zip(decoded.column("key").to_pylist(), normalised))
    cases = [({"map_size": 56, "map_dtype": "int8"}, {"saliency": (56, "int8"), "gbp": (56, "int8"),
                                                      "gradcam": (56, "int8")}),
             ({"map_size": 28, "map_dtype": "float16", "map_sizes": {"gradcam": 7},
               "map_dtypes": {"saliency": "uint8"}},
              {"saliency": (28, "uint8"), "gbp": (28, "float16"), "gradcam": (7, "float16")})]
    for storage, layouts in cases:
        reader, _ = stored_run(decoded, tmp_path / json.dumps(storage, sort_keys=True).replace('"', ""), **storage)
        table = reader.read()
        assert table.num_rows == 4 * 3 * 5
        files = reader.committed_files("attributions")
        assert len(files) == len(set(layouts.values()))  # one Parquet file per layout and write batch
        got = maps_of(table)
        assert got.shape == (table.num_rows, 112, 112) and got.dtype == np.float32
        direct = direct_maps(table, images)
        worst = {}
        for r, (key, method, cls) in enumerate(zip(*(table.column(c).to_pylist() for c in ("key", "method",
                                                                                              "target")))):
            size, dtype = layouts[method]
            pooled = F.adaptive_avg_pool2d(direct[(key, method, cls)][None, None].float(), size)
            want = F.interpolate(pooled, size=(112, 112), mode="bilinear", align_corners=False)[0, 0].numpy()
            scale = float(pooled.abs().max())
            layout = MapLayout(size=size, dtype=dtype, input_size=112)
            bound = scale * layout.step() + sum_atol(2 * size + (112 // size) ** 2, scale) \
                + 16 * unit_roundoff(torch.float32) * scale  # the direct call and the worker's batch differ by
            error = float(np.abs(got[r] - want).max())   # float rounding (same batch, same threads here)
            assert error <= bound, (method, size, dtype, error, bound)
            worst[method] = max(worst.get(method, 0.0), error / scale)
            assert np.abs(want).max() > 0
        for method, (size, dtype) in layouts.items():  # the stored maps are really quantised: errors reach the step
            if dtype in ("int8", "uint8"):
                assert worst[method] > 0.25 * MapLayout(size, dtype, 112).step(), (method, worst[method])
        # the criterion can fail: the maps without the area step (bilinear from the full map) break the bound
        r = table.column("method").to_pylist().index("gbp")
        key, cls = table.column("key")[r].as_py(), table.column("target")[r].as_py()
        full = direct[(key, "gbp", cls)].numpy()
        scale = float(F.adaptive_avg_pool2d(torch.tensor(full)[None, None], layouts["gbp"][0]).abs().max())
        assert float(np.abs(got[r] - full).max()) > 10 * MapLayout(layouts["gbp"][0], "int8", 112).step() * scale
        stored = reader.read(methods=["gbp"], maps="stored")
        assert stored.schema.field("map").type.shape == [layouts["gbp"][0]] * 2
        if len(set(layouts.values())) > 1:
            with pytest.raises(ValueError, match="map layouts"):
                reader.read(maps="stored")
        as_input = reader.read(maps="input")
        np.testing.assert_allclose(maps_of(as_input), got, rtol=0, atol=1e-6 * float(np.abs(got).max()))


def test_uint8_refuses_signed_maps_per_sample(decoded, tmp_path):
    reader, rows = stored_run(decoded, tmp_path / "u8", map_dtype="uint8")
    table = reader.read()
    assert sorted(set(table.column("method").to_pylist())) == ["gradcam", "saliency"]  # non-negative by construction
    errors = pa.concat_tables([pa.ipc.open_stream(b).read_all() for b in rows["errors"].to_pylist()])
    assert errors.num_rows == 4 and set(errors.column("method").to_pylist()) == {"gbp"}
    assert "non-negative maps only" in errors.column("reason")[0].as_py()
    assert maps_of(table).min() >= 0


def test_npz_parts_record_the_layout(decoded, tmp_path):
    reader, _ = stored_run(decoded, tmp_path / "npz", map_size=14, map_dtype="int8")
    table = reader.read()
    parquet = {(k, m, t): r for r, (k, m, t) in enumerate(zip(*(table.column(c).to_pylist()
                                                                 for c in ("key", "method", "target"))))}
    values = maps_of(table)
    (npz,) = reader.committed_files("npz")
    with np.load(reader.path(npz)) as data:
        assert data["map"].dtype == np.int8 and data["map"].shape[1:] == (14, 14)
        assert int(data["input_size"]) == 112 and str(data["map_dtype"]) == "int8"
        decoded_npz = decode_maps(data["map"], data["map_scale"], str(data["map_dtype"]), int(data["input_size"]))
        index = [parquet[(k, m, int(t))] for k, m, t in zip(data["key"], data["method"], data["target"])]
    assert len(index) == table.num_rows
    np.testing.assert_array_equal(decoded_npz, values[index])


def test_cli_parses_per_method_layouts_and_refuses_bad_ones(tmp_path, capsys):
    from jobs.attribute import parse_args

    config = parse_args(["--shards", "x.tar", "--model", MODEL, "--methods", "gbp,gradcam", "--out", "o",
                         "--map-size", "56,gradcam=14", "--map-dtype", "int8,gradcam=uint8"])
    w = config.worker
    assert (w.map_size, w.map_sizes, w.map_dtype, w.map_dtypes) == (56, {"gradcam": 14}, "int8", {"gradcam": "uint8"})
    assert w.layout_for("gbp", 112) == MapLayout(56, "int8", 112)
    assert w.layout_for("gradcam", 112) == MapLayout(14, "uint8", 112)
    default = parse_args(["--shards", "x.tar", "--model", MODEL, "--methods", "gbp", "--out", "o"]).worker
    assert default.layout_for("gbp", 112) == MapLayout(112, "float16", 112)

    base = ["--shards", str(tmp_path / "none.tar"), "--model", MODEL, "--methods", "gbp", "--out", str(tmp_path / "o")]

    def error(*args: str) -> str:
        """The parser's exit (status 2) and its one stderr line, in this process."""
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            parse_args([*base, *args])
        stderr = capsys.readouterr().err
        assert exited.value.code == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        return lines[0]

    assert "a map size is a positive number of pixels, got 'x'" in error("--map-size", "x")
    assert "names 'gradcam', which is not in --methods" in error("--map-size", "gradcam=14")
    assert "a map dtype is one of float16, float32, int8, uint8, got 'int4'" in error("--map-dtype", "int4")
    # a size past the model's input is found when the job runs (the model sets the input size): a real process,
    # and the one line is all its stderr holds
    result = subprocess.run([sys.executable, "-m", "jobs.attribute", *base, "--map-size", "224"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "map size must be in 1..112" in line


def test_attribute_and_evaluate_jobs_on_compact_maps(ray_session, shard_uri, tmp_path):
    """jobs.attribute with per-method layouts, then jobs.evaluate through both of its pipelines (map-only, and
    the model actors with MoRF): every (sample, method) scored, no error rows, and the two pipelines' EBPG equal
    (both read the compact maps back through schemas.reader) up to the summation order of its two sums over the
    112x112 map (rule 2: the pipelines score different batches)."""
    from jobs.attribute import AttributeConfig
    from jobs.attribute import run as attribute_run
    from jobs.evaluate import EvaluateJobConfig
    from jobs.evaluate import run as evaluate_run
    from workers.evaluate_worker import EvaluateConfig

    worker = WorkerConfig(model=MODEL, methods=["saliency", "gbp", "gradcam"], targets="top5", map_size=28,
                          map_sizes={"gradcam": 7}, map_dtype="int8")
    summary = attribute_run(AttributeConfig(shards=[shard_uri], out=str(tmp_path / "maps"), worker=worker,
                                            batch_size=4, quiet=True))
    assert (summary["maps_written"], summary["errors"]) == (4 * 3 * 5, 0)
    reader = OutputReader(str(tmp_path / "maps"))
    shapes = sorted(pa.parquet.read_schema(reader.path(f)).field("map").type.shape[0]
                    for f in reader.committed_files("attributions"))
    assert shapes == [7, 28]
    values = {}
    for name, metrics in (("map_only", ["ebpg", "ibd", "class_discrimination"]), ("model", ["ebpg", "morf"])):
        config = EvaluateConfig(attributions=str(tmp_path / "maps"), model=MODEL, metrics=metrics)
        result = evaluate_run(EvaluateJobConfig(out=str(tmp_path / name), worker=config, dataset_metrics=[],
                                                batch_size=4, quiet=True))
        assert result["errors"] == 0
        table = OutputReader(str(tmp_path / name)).read("metrics")
        rows = table.filter(pa.compute.equal(table.column("metric"), "ebpg"))
        values[name] = dict(zip(zip(rows.column("key").to_pylist(), rows.column("method").to_pylist()),
                                rows.column("value").to_pylist()))
        assert len(values[name]) == 4 * 3
    assert values["map_only"].keys() == values["model"].keys()
    bound = 2 * gamma(112 * 112)  # EBPG = inside sum / total sum of non-negative terms: relative error each
    for key, value in values["map_only"].items():
        assert abs(value - values["model"][key]) <= bound * abs(value) + 1e-12, key
