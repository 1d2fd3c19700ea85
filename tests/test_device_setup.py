"""workers.device: the actors' device setup and batch transfer. channels_last (automatic on CUDA with bf16/fp16,
forced here on the CPU) gives the same maps as the default layout; the transfer is the plain normalisation."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_method_options import _decoded, _rows
from workers.attribution_worker import AttributionWorker, WorkerConfig
from workers.device import device_images, load_model

METHODS = ["saliency", "gradcam", "tr_gbp", "a_fmi"]


def _maps(rows: list[dict]) -> dict[tuple, np.ndarray]:
    size = int(np.sqrt(len(rows[0]["map"])))
    return {(r["key"], r["method"], r["target"]): np.asarray(r["map"], np.float32).reshape(size, size) * r["map_scale"]
            for r in rows}


def test_channels_last_gives_the_same_maps():
    """NHWC convolutions sum in another order, so values differ in the last bits and a ReLU mask may flip at a
    near-zero unit: per map, Pearson r >= 0.9999 (a channel mix-up or a transposed map gives r far below)."""
    configs = {nhwc: WorkerConfig(model="bench_resnet", methods=METHODS, targets="top5", map_dtype="float32",
                                  device="cpu", channels_last=nhwc) for nhwc in (False, True)}
    workers = {nhwc: AttributionWorker(config) for nhwc, config in configs.items()}
    assert workers[True].channels_last and not workers[False].channels_last
    conv = next(m for m in workers[True].spec.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    decoded = _decoded(workers[False].spec, 4)
    out = {nhwc: _maps(_rows(worker(decoded)["attributions"])) for nhwc, worker in workers.items()}
    assert out[True].keys() == out[False].keys() and len(out[True]) == 4 * len(METHODS) * 5
    for key, expected in out[False].items():
        got = out[True][key]
        r = np.corrcoef(got.ravel(), expected.ravel())[0, 1] if expected.std() > 0 else 1.0
        assert r >= 0.9999, (key, r)
    # the check catches a real layout bug: a transposed map correlates far less
    sample = out[False][("s0", "saliency", next(k[2] for k in out[False] if k[:2] == ("s0", "saliency")))]
    assert np.corrcoef(sample.ravel(), sample.T.ravel())[0, 1] < 0.9


def test_device_images_is_the_plain_normalisation():
    spec, nhwc = load_model("bench_resnet", None, "cpu", None)
    assert not nhwc  # automatic: only on CUDA with a half precision
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    expected = spec.preprocessing.normalise(torch.from_numpy(pixels).float() / 255.0)
    torch.testing.assert_close(device_images(spec, pixels), expected, rtol=0, atol=0)
    last = device_images(spec, pixels, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(last, expected, rtol=0, atol=0)


_FAULTS_SCRIPT = """
import resource, torch
from workers.device import load_model
load_model("bench_resnet", None, "cpu", 1)
counts = []
for _ in range(8):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2 ** 20)  # 64 MiB, freed at once
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sum(counts[3:]))  # the first ones may still grow the heap
"""


def test_actor_process_keeps_freed_memory():
    """An actor's load_model makes its process keep freed memory: after three 64 MiB tensors, five more fault in
    (almost) no pages, while with XAI_MALLOC=system (glibc's defaults) each is a fresh mapping that faults at least
    once (16,384 times with 4 KiB pages; once per 2 MiB where transparent huge pages are always on). Counted in fresh
    processes, as the setting is process-wide; compared with each other, so the page size does not matter."""
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        pytest.skip("glibc only")
    faults = {}
    for malloc in ("retain", "system"):
        env = {**os.environ, "XAI_MALLOC": malloc, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True,
                              check=True)
        faults[malloc] = int(done.stdout.strip().splitlines()[-1])
    assert faults["system"] >= 5 and faults["retain"] * 20 <= faults["system"], faults


def test_malloc_bench_dry_run(tmp_path):
    """bench.malloc end to end on a small model: both modes measured in their own process, per batch size."""
    from bench import malloc

    out = tmp_path / "malloc.json"
    assert malloc.main(["--model", "bench_resnet", "--methods", "saliency,gradcam", "--images", "2", "--calls", "2",
                        "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"system", "retain"}
    for result in report["results"].values():
        assert result["batch_sizes"] == [2, 1] and result["images"] == 3 and len(result["rss_mib"]) == 2
        assert all(v > 0 for v in result["cpu_s_per_image_by_batch"].values())
    assert report["ratios"]["cpu"] > 0


def test_method_out_of_memory_runs_on_halves_and_keeps_the_size(monkeypatch, caplog):
    """A method that runs out of device memory on the batch is run on halves of it (8 -> 4 -> 2 images here, where
    more than 2 "do not fit"), with the top-5 targets of the whole batch, and keeps that size for the next batch:
    every row is there, no error row, and the maps are the whole-batch run's (per map Pearson r >= 0.9999: other
    batch sizes may sum in another order; a map given to the wrong sample correlates far less)."""
    import workers.attribution_worker as aw

    real, sizes = aw.attribute_with_extras, []

    def small_device(method, spec, images, targets, **kw):
        sizes.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(method, spec, images, targets, **kw)

    config = WorkerConfig(model="bench_resnet", methods=["saliency", "gradcam"], targets="top5",
                          map_dtype="float32", device="cpu")
    whole = _maps(_rows(AttributionWorker(config)(_decoded(AttributionWorker(config).spec, 8))["attributions"]))
    worker = AttributionWorker(config)
    decoded = _decoded(worker.spec, 8)
    monkeypatch.setattr(aw, "attribute_with_extras", small_device)
    with caplog.at_level("WARNING", logger=aw.__name__):
        out = worker(decoded)
    assert _rows(out["errors"]) == []
    chunked = _maps(_rows(out["attributions"]))
    assert chunked.keys() == whole.keys() and len(chunked) == 8 * 2 * 5
    for key, expected in whole.items():
        r = np.corrcoef(chunked[key].ravel(), expected.ravel())[0, 1] if expected.std() > 0 else 1.0
        assert r >= 0.9999, (key, r)
    other = whole[next(k for k in whole if k[:2] == ("s1", "saliency"))]
    first = whole[next(k for k in whole if k[:2] == ("s0", "saliency"))]
    assert np.corrcoef(first.ravel(), other.ravel())[0, 1] < 0.9  # the check sees a map of another sample
    assert sizes == [8, 4, 2, 2, 2, 2, 8, 4, 2, 2, 2, 2] and worker.chunk_sizes == {"saliency": 2, "gradcam": 2}
    assert [r.getMessage() for r in caplog.records] == [
        f"{m} ran out of memory on {n} images at once (CUDA out of memory. Tried to allocate 2.00 GiB); now {n // 2} "
        "per call" for m in ("saliency", "gradcam") for n in (8, 4)]
    sizes.clear()
    worker(decoded)  # the next batch starts at the size that fitted: no failed attempt
    assert sizes == [2] * 8


def test_method_that_never_fits_gives_error_rows_not_a_failed_batch(monkeypatch):
    """Out of memory even for one image: that method's samples become error rows naming it; the other method's
    rows are all there."""
    import workers.attribution_worker as aw

    real = aw.attribute_with_extras

    def no_room_for_gradcam(method, spec, images, targets, **kw):
        if method == "gradcam":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(method, spec, images, targets, **kw)

    worker = AttributionWorker(WorkerConfig(model="bench_resnet", methods=["saliency", "gradcam"], targets="top1",
                                            device="cpu"))
    decoded = _decoded(worker.spec, 4)
    monkeypatch.setattr(aw, "attribute_with_extras", no_room_for_gradcam)
    out = worker(decoded)
    errors = _rows(out["errors"])
    assert sorted((e["key"], e["method"]) for e in errors) == [(f"s{i}", "gradcam") for i in range(4)]
    assert {e["reason"] for e in errors} == {"CUDA out of memory. Tried to allocate 20.00 MiB"}
    assert sorted(r["key"] for r in _rows(out["attributions"])) == [f"s{i}" for i in range(4)]
    assert worker.chunk_sizes == {"gradcam": 1}
