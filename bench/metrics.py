"""Images per second of the batched perturbation metrics, next to Quantus on the same model, images and maps.

    python -m bench.metrics [--quick] [--model resnet18] [--batch 8] [--size 192] [--steps 24] [--repeats 3]
                            [--method saliency] [--chunk-size 64,8] [--device cpu|cuda] [--wait-quiet SECONDS]
                            [--road-batch 4] [--road-repeats 1] [--only morf,insertion,road]
                            [--out bench/results/metrics.json]

Inputs (built with bench.inputs' helpers): the model with random weights (BatchNorm statistics randomised as a
trained network's), a batch of real scikit-image photos (preprocessed at ``--size``), the targets = each photo's
own top-1..5 class (as bench.methods), and the maps of ``--method`` for those targets. Timed, interleaved round
by round (one warm-up call each, then ``--repeats`` rounds, median):

* **morf** — ours: ``perturbation_curves(mode="remove")``, black baseline, fractions 1/S … 1 (S = ``--steps``);
  Quantus: ``PixelFlipping`` on the same model behind a normalisation layer (so that Quantus' scalar fill 0.0 is
  black in pixel space, as ours; Quantus' own "black" is the per-image minimum of the input, not black),
  ``features_in_step`` = 3·H·W/S (Quantus counts each channel value as a feature; 3·H·W/S values = all channels
  of H·W/S pixels per step), softmax on, the whole batch in one call.
* **insertion** — ours: ``perturbation_curves(mode="insert")`` from the black image; Quantus has no insertion
  metric, so its ``PixelFlipping`` loop is driven from the black image with a perturb function that copies the
  image's pixels in (:func:`insert_from_source`), i.e. the same steps through the same Quantus machinery.

* **road** — ours: ``road.road_curves`` (MoRF and LeRF, fractions 0.1 … 0.9, σ = 0.01 in pixel units, CG on
  all images × steps of a chunk at once) on the first ``--road-batch`` images; pytorch-grad-cam:
  ``ROADMostRelevantFirstAverage`` + ``ROADLeastRelevantFirstAverage`` (percentiles 10 … 90, its
  ``NoisyLinearImputer``: one scipy ``spsolve`` per image and step on the CPU) on the same model, images and maps,
  ``ClassifierOutputSoftmaxTarget``. Both impute the normalised images with σ = 0.01 (pytorch-grad-cam: in
  normalised units; ours: 0.01 / std, i.e. the authors' pixel units), so "agreement" is only indicative: the mean
  over steps of (p - p on the image), ours vs pytorch-grad-cam, differs by the noise draws and σ, and by
  pytorch-grad-cam's percentile thresholds (ties) vs our rank counting. Each reference call takes seconds per
  image, so ROAD has its own ``--road-repeats`` (default 1, after one warm-up of ours only). Ours also runs at the
  first chunk size with the float32 solve (``--road-dtype float32`` of jobs.evaluate), marked "float32", and with
  the Jacobi preconditioner (the solver before the multigrid one, same pixels), marked "jacobi". The floor: the
  model's forward passes alone over the same 18 imputed images per image at the first chunk size (what ROAD
  would cost if imputing were free); "ours / floor" is ours' time over it.

Ours is timed at each ``--chunk-size`` (perturbed images per forward pass): large chunks are what a GPU wants;
on a small CPU, batches beyond ~8 images run slower per image (cache), so compare at chunk 8 there.

Why 192 px and S = 24 (not 224 px and the papers' 20 insertion steps): Quantus asserts that
``features_in_step`` divides H·W, while it perturbs the C·H·W channel values; whole pixels per step therefore
need 3·H·W/S to divide H·W, i.e. 3 | S and S | H·W. 224² = 2¹⁰·7² is not divisible by 3, so at 224 px Quantus
can only remove fractions of pixels per step; 192² = 2¹²·3² works with S = 12, 24, 48 … (``--quick``: S = 12).
Agreement is reported as max |ours - Quantus| over the probability curves (ties in a map may be ordered
differently: Quantus' argsort is not stable).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attribution import models
from attribution.methods import attribute
from attribution.metrics.perturbation import (
    black_baseline,
    perturbation_curves,
    pixel_order,
)
from attribution.metrics.road import DEFAULT_FRACTIONS as ROAD_FRACTIONS
from attribution.metrics.road import SOLVE_DTYPES, noise_for, road_curves
from attribution.preprocessing import Preprocessing
from bench.inputs import build_spec, mixed_targets, photo_batch
from bench.provenance import device_name, git_commit, versions
from bench.tables import text_table
from bench.timing import interleaved, per_image_stats

DEFAULT_OUT = Path("bench/results/metrics.json")


class PixelSpaceModel(nn.Module):
    """``module`` behind its normalisation: pixels in [0, 1] [B, 3, H, W] -> logits (for Quantus' fills)."""

    def __init__(self, module: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.module((x - self.mean) / self.std)


def insert_from_source(arr: np.ndarray, indices: np.ndarray, source: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Quantus perturb function for insertion: copy ``source`` [N, F] into ``arr`` [N, F] at ``indices`` [N, I]."""
    out = arr.copy()
    rows = np.arange(arr.shape[0])[:, None]
    out[rows, indices] = source[rows, indices]
    return out


def quantus_curves(model: nn.Module, pixels: np.ndarray, maps: np.ndarray, targets: np.ndarray, steps: int, *,
                   mode: str = "remove", device: str = "cpu") -> np.ndarray:
    """Quantus PixelFlipping probability curves [N, steps]: ``model`` takes pixels in [0, 1]; ``mode`` "remove"
    sets the top pixels of ``maps`` [N, H, W] to 0.0 (black), "insert" starts from black and copies them in."""
    import quantus
    n, c, h, w = pixels.shape
    if steps % 3 or (h * w) % steps:
        raise ValueError(f"whole pixels per Quantus step need 3 | steps and steps | H*W; got {steps} steps for "
                         f"{h}x{w} (use e.g. 192 px with 12, 24 or 48 steps)")
    kwargs: dict[str, Any] = {"perturb_baseline": 0.0}
    x = pixels
    if mode == "insert":
        kwargs = {"perturb_func": insert_from_source, "perturb_func_kwargs": {"source": pixels.reshape(n, -1)}}
        x = np.zeros_like(pixels)
    metric = quantus.PixelFlipping(features_in_step=c * h * w // steps, abs=False, normalise=False,
                                   disable_warnings=True, display_progressbar=False, **kwargs)
    curves = metric(model=model, x_batch=x, y_batch=targets, a_batch=maps[:, None], softmax=True,
                    batch_size=n, device=device, channel_first=True)
    return np.asarray(curves, dtype=np.float64)


def bench_metric(name: str, ours: dict[int, Callable[[], Tensor]], reference: Callable[[], np.ndarray],
                 batch: int, repeats: int, device: torch.device, max_foreign: float = 0.3,
                 wait_quiet_s: float = 0.0) -> dict:
    """Time ours (one entry per chunk size) and Quantus interleaved; images/s, speed-up, agreement."""
    fns: dict[str, Callable] = {f"ours_chunk{c}": fn for c, fn in ours.items()}
    fns["quantus"] = reference
    results, times, loads = interleaved(fns, repeats, device, max_foreign=max_foreign, retries=2,
                                        wait_quiet_s=wait_quiet_s)
    q = per_image_stats(times["quantus"], loads["quantus"], batch)
    row: dict[str, Any] = {"metric": name, "quantus": {**q, "images_per_s": 1 / q["s_per_image"]}, "ours": []}
    for chunk in ours:
        label = f"ours_chunk{chunk}"
        o = per_image_stats(times[label], loads[label], batch)
        diff = float(np.abs(results[label].double().cpu().numpy() - results["quantus"]).max())
        row["ours"].append({"chunk_size": chunk, **o, "images_per_s": 1 / o["s_per_image"],
                            "speedup": q["s_per_image"] / o["s_per_image"], "max_abs_diff": diff})
    return row


def table(rows: list[dict]) -> str:
    """The results (rows of :func:`bench_metric` / :func:`bench_road`) as a text table, one line per chunk size."""
    head = ("metric", "chunk", "ours img/s", "reference img/s", "speed-up (ref/ours s)", "max |ours - ref|",
            "ours / floor")
    lines = [(r["metric"] if i == 0 else "", " ".join([str(o["chunk_size"])] + [
                 v for v in (o.get("dtype"), o.get("preconditioner")) if v in ("float32", "jacobi")]),
              f"{o['images_per_s']:.2f}",
              f"{r['quantus']['images_per_s']:.2f}" if i == 0 else "", f"{o['speedup']:.2f}x",
              f"{o['max_abs_diff']:.1e}", f"{o['floor_ratio']:.1f}x" if "floor_ratio" in o else "")
             for r in rows for i, o in enumerate(r["ours"])]
    return text_table(head, lines)


def gradcam_road(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor) -> np.ndarray:
    """pytorch-grad-cam's ROAD: [N, 2] = (MoRF, LeRF) mean over percentiles 10 … 90 of p_target(imputed) - p_target
    (its default ``return_diff``), one spsolve per image and percentile."""
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    cams = maps.detach().cpu().numpy().astype(np.float32)
    tg = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    morf = ROADMostRelevantFirstAverage()(images, cams, tg, model)
    lerf = ROADLeastRelevantFirstAverage()(images, cams, tg, model)
    return np.stack([morf, lerf], axis=1).astype(np.float64)


def ours_road(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, noise: Tensor, chunk: int,
              dtype: torch.dtype = torch.float64, preconditioner: str = "multigrid") -> tuple[Tensor, dict]:
    """Ours, in pytorch-grad-cam's units: [N, 2] = mean over steps of p - p on the image (MoRF, LeRF); + solver
    (``dtype``/``preconditioner``: the imputation solve's)."""
    out = road_curves(model, images, maps, targets, noise=noise.to(images.device), chunk_size=chunk, dtype=dtype,
                      preconditioner=preconditioner)
    with torch.inference_mode():
        p0 = model(images).float().softmax(dim=1).gather(1, targets[:, None])[:, 0]
    diff = torch.stack([out[o]["prob"].mean(dim=1) - p0 for o in ("morf", "lerf")], dim=1).double().cpu()
    info = out["solver"]
    return diff, {"iterations": info.iterations, "max_residual": info.max_residual, "converged": info.converged}


def forward_floor(model: nn.Module, images: Tensor, chunk: int) -> Callable[[], Tensor]:
    """ROAD's forward passes alone: the model over 2 orders x 9 fractions copies of ``images`` [N, C, H, W] in
    chunks of ``chunk``, under inference mode. Returns the timed callable (its result: the logits' sum)."""
    copies = images.repeat_interleave(2 * len(ROAD_FRACTIONS), dim=0)

    def run() -> Tensor:
        with torch.inference_mode():
            return sum(model(copies[i:i + chunk]).float().sum() for i in range(0, len(copies), chunk))
    return run


def bench_road(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, noise: Tensor, chunks: list[int],
               repeats: int, device: torch.device, max_foreign: float, wait_quiet_s: float) -> dict:
    """ROAD (MoRF + LeRF at 9 fractions) images/s, ours at each chunk size (float64 solve) and at the first chunk
    size with the float32 solve (jobs.evaluate --road-dtype float32) and with the Jacobi preconditioner, vs
    pytorch-grad-cam and the forward-pass floor, interleaved."""
    solver: dict[str, dict] = {}
    variants = {f"ours_chunk{c}": (c, "float64", "multigrid") for c in chunks}
    variants[f"ours_chunk{chunks[0]}_float32"] = (chunks[0], "float32", "multigrid")
    variants[f"ours_chunk{chunks[0]}_jacobi"] = (chunks[0], "float64", "jacobi")

    def ours(name: str) -> Callable[[], Tensor]:
        chunk, dtype, preconditioner = variants[name]

        def run() -> Tensor:
            diff, solver[name] = ours_road(model, images, maps, targets, noise, chunk, SOLVE_DTYPES[dtype],
                                           preconditioner)
            return diff
        return run

    for name in variants:  # warm-up of ours only: the reference's one-time costs are negligible next to its solves
        ours(name)()
    fns: dict[str, Callable] = {name: ours(name) for name in variants}
    fns["forward_floor"] = forward_floor(model, images, chunks[0])
    fns["forward_floor"]()
    fns["pytorch_grad_cam"] = lambda: gradcam_road(model, images, maps, targets)
    results, times, loads = interleaved(fns, repeats, device, max_foreign=max_foreign, retries=0,
                                        wait_quiet_s=wait_quiet_s, warmup=False)
    batch = images.shape[0]
    ref = per_image_stats(times["pytorch_grad_cam"], loads["pytorch_grad_cam"], batch)
    floor = per_image_stats(times["forward_floor"], loads["forward_floor"], batch)
    row: dict[str, Any] = {"metric": "road", "reference": "pytorch-grad-cam ROAD{Most,Least}RelevantFirstAverage",
                           "quantus": {**ref, "images_per_s": 1 / ref["s_per_image"]},
                           "floor": {**floor, "images_per_s": 1 / floor["s_per_image"], "chunk_size": chunks[0],
                                     "what": "the model's 18 forward passes per image alone"}, "ours": []}
    for name, (chunk, dtype, preconditioner) in variants.items():
        o = per_image_stats(times[name], loads[name], batch)
        diff = float(np.abs(results[name].numpy() - results["pytorch_grad_cam"]).max())
        row["ours"].append({"chunk_size": chunk, "dtype": dtype, "preconditioner": preconditioner, **o,
                            "images_per_s": 1 / o["s_per_image"], "speedup": ref["s_per_image"] / o["s_per_image"],
                            "max_abs_diff": diff, "floor_ratio": o["s_per_image"] / floor["s_per_image"],
                            "solver": solver[name]})
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.metrics", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: batch 4, 12 steps")
    p.add_argument("--model", default="resnet18", choices=models.MODEL_NAMES)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=192, help="image side in pixels (3 must divide size*size)")
    p.add_argument("--steps", type=int, default=24, help="curve points (3 | steps and steps | size*size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", default="saliency", help="attribution method whose maps rank the pixels")
    p.add_argument("--chunk-size", default="64,8",
                   help="perturbed images per forward pass (ours), comma-separated to time several")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-foreign", type=float, default=0.3,
                   help="retry (twice) a timed run during which other processes used more than this many cores")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each timed run, wait up to this long for other processes to go quiet")
    p.add_argument("--only", default="morf,insertion,road", help="comma-separated subset of morf, insertion, road")
    p.add_argument("--road-batch", type=int, default=4, help="images for ROAD (the reference solves per image)")
    p.add_argument("--road-repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    if not args.only or set(args.only) - {"morf", "insertion", "road"}:
        p.error(f"--only: a subset of morf, insertion, road; got {args.only}")
    if args.quick:
        args.batch, args.steps = min(args.batch, 4), 12
    try:
        args.chunk_sizes = [int(c) for c in str(args.chunk_size).split(",") if c.strip()]
    except ValueError:
        p.error(f"--chunk-size: comma-separated integers, got {args.chunk_size!r}")
    if not args.chunk_sizes or min(args.chunk_sizes) < 1:
        p.error("--chunk-size values must be >= 1")
    if args.batch < 1 or args.repeats < 1 or args.steps < 1:
        p.error("--batch, --repeats and --steps must be >= 1")
    if set(args.only) & {"morf", "insertion"} and (args.steps % 3 or (args.size * args.size) % args.steps):
        p.error(f"--steps {args.steps} with --size {args.size}: Quantus needs 3 | steps and steps | size*size")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    spec = build_spec(args.model, None, "random", device, args.seed)
    spec = dataclasses.replace(spec, preprocessing=Preprocessing(input_size=args.size,
                                                                 resize_size=round(args.size * 256 / 224)))
    images = photo_batch(spec, args.batch).to(device)
    targets = mixed_targets(spec, images)
    maps = attribute(args.method, spec, images, targets)
    pre = spec.preprocessing
    pixels = pre.denormalise(images)
    pixel_model = PixelSpaceModel(spec.module, pre.mean, pre.std).to(device).eval()
    base = black_baseline(pre).to(device)
    fractions = [i / args.steps for i in range(1, args.steps + 1)]
    np_pixels, np_maps, np_targets = (t.detach().cpu().numpy() for t in (pixels, maps, targets))
    print(f"bench: {args.model} (random weights), {args.batch} photos at {images.shape[-1]} px, {args.method} maps, "
          f"{args.steps} steps, chunks {args.chunk_sizes}, {args.repeats} repeats, {device} ({device_name(device)}), "
          f"{torch.get_num_threads()} threads; metrics {','.join(args.only)} (road: {min(args.road_batch, args.batch)} "
          f"images, {args.road_repeats} repeats)", flush=True)

    rows = []
    for name, mode in (("morf", "remove"), ("insertion", "insert")):
        if name not in args.only:
            continue
        order = pixel_order(maps)

        def ours(chunk: int, mode: str = mode, order: Tensor = order) -> Callable[[], Tensor]:
            return lambda: perturbation_curves(spec.module, images, order, targets, fractions, mode=mode,
                                               baseline=base, chunk_size=chunk)["prob"]

        def reference(mode: str = mode) -> np.ndarray:
            return quantus_curves(pixel_model, np_pixels, np_maps, np_targets, args.steps, mode=mode,
                                  device=str(device))

        t0 = time.perf_counter()
        rows.append(bench_metric(name, {c: ours(c) for c in args.chunk_sizes}, reference, args.batch, args.repeats,
                                 device, args.max_foreign, args.wait_quiet))
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    if "road" in args.only:
        k = min(args.road_batch, args.batch)
        t0 = time.perf_counter()
        rows.append(bench_road(spec.module, images[:k], maps[:k], targets[:k], noise_for(pre), args.chunk_sizes,
                               args.road_repeats, device, args.max_foreign, args.wait_quiet))
        print(f"  road ({k} images, MoRF + LeRF at 9 fractions): {time.perf_counter() - t0:.1f} s", flush=True)
        for o in rows[-1]["ours"]:
            print(f"    ours chunk {o['chunk_size']} {o['dtype']} {o['preconditioner']}: CG {o['solver']}", flush=True)

    print()
    print(table(rows))
    report = {
        "model": args.model, "weights": None, "batch": args.batch, "steps": args.steps, "method": args.method,
        "chunk_sizes": args.chunk_sizes, "repeats": args.repeats, "quick": args.quick, "only": args.only,
        "road_batch": min(args.road_batch, args.batch), "road_repeats": args.road_repeats, "size": args.size,
        "device": str(device),
        "device_name": device_name(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "versions": versions(), "git_commit": git_commit(), "targets": targets.tolist(),
        "timing": "median over repeats of wall seconds per image after one warm-up; ours and Quantus interleaved",
        "max_foreign_cores": args.max_foreign, "wait_quiet_s": args.wait_quiet,
        "disturbed_runs": sum(1 for r in rows for e in [r["quantus"], *r["ours"]] for v in e["foreign_cores"]
                              if v is not None and v > args.max_foreign),
        "metrics": rows, "wall_s": time.perf_counter() - started,
    }
    try:
        from importlib.metadata import version
        report["versions"]["quantus"] = version("quantus")
        report["versions"]["grad-cam"] = version("grad-cam")
    except ImportError:  # informational only
        report["versions"]["quantus"] = "unknown"
    if report["disturbed_runs"]:
        print(f"WARNING: {report['disturbed_runs']} timed runs overlapped other processes using > "
              f"{args.max_foreign:g} cores: timings are noisy, rerun on a quiet machine (--wait-quiet 30)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out.resolve()} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
