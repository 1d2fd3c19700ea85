"""workers.device: the actors' device setup and batch transfer. channels_last (automatic on CUDA with bf16/fp16,
forced here on the CPU) gives the same maps as the default layout; the transfer is the plain normalisation."""
from __future__ import annotations

import numpy as np
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
