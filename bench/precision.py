"""How far each method's maps move from fp32 in each compute precision (the evidence behind Method.precisions).

    python -m bench.precision [--model efficientnet_lite0] [--methods all] [--precisions bf16,fp16]
                              [--device cpu] [--threads 1] [--out bench/results/precision.json]

On the real EfficientNet-Lite0 (ImageNet weights, offline) and the 7 sample photos, top-1 targets (``--targets
top5``: all five class maps per image): every
method's maps in fp32 and in each other precision, same batch and threads. Per method and precision: the
Spearman rank correlation of each map with its fp32 map (mean and minimum over the images), the maximum of
max|map − map_fp32| / max|map_fp32| over the images, the mean |ΔEBPG| over the photos with boxes, and whether the
maps are finite. bf16/fp16 autocast run on the CPU too, so this is measurable without a GPU (tf32 only differs
on CUDA). Costly methods run with bench.method_settings' FAST_SETTINGS (IG 32 steps, RISE 1000 masks, …).
Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from attribution import models
from attribution.data.sample_sets import photo_samples
from attribution.images import decode_sample
from attribution.methods import REGISTRY, attribute
from attribution.methods.precisions import measuring
from attribution.metrics.localisation import box_mask, energy_pointing_game
from attribution.metrics.similarity import spearman
from bench.method_settings import FAST_SETTINGS

# the options that keep costly methods short: bench.method_settings' FAST_SETTINGS (IG 32 steps, RISE 1000 masks, …)
COST_OPTIONS = {name: setting["options"] for name, setting in FAST_SETTINGS.items()}


def photos(spec: models.ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample photos, decoded and normalised [N, 3, S, S], and their box masks [N, S, S] (empty = none)."""
    decoded = [decode_sample(s.image(), str(s.meta["label"]).encode(), json.dumps(s.meta).encode(),
                             spec.preprocessing) for s in photo_samples()]
    size = spec.preprocessing.input_size
    pixels = torch.from_numpy(np.stack([d.pixels for d in decoded]))
    masks = torch.stack([box_mask(d.bboxes_input, size, size) for d in decoded])
    return spec.preprocessing.normalise(pixels.float() / 255.0), masks


def deviation(ref: torch.Tensor, other: torch.Tensor, masks: torch.Tensor) -> dict:
    """Spearman (mean, min), max relative difference, mean |ΔEBPG| (photos with boxes) of maps [N, H, W]."""
    finite = bool(torch.isfinite(other).all())
    if not finite:
        return {"finite": False, "spearman_mean": None, "spearman_min": None, "max_rel_diff": None,
                "ebpg_abs_diff": None}
    if len(masks) != len(ref):  # top-5: the boxes of each image for each of its maps
        masks = masks.repeat_interleave(len(ref) // len(masks), dim=0)
    rho = spearman(ref.flatten(1).double(), other.flatten(1).double())
    scale = ref.abs().amax(dim=(1, 2)).clamp_min(1e-30)
    rel = ((ref - other).abs().amax(dim=(1, 2)) / scale).max()
    boxed = masks.flatten(1).any(dim=1)
    ebpg = (energy_pointing_game(ref[boxed], masks[boxed]) - energy_pointing_game(other[boxed], masks[boxed]))
    rho = rho[~torch.isnan(rho)]  # a constant map pair (e.g. an all-zero Grad-CAM) has no rank correlation
    return {"finite": True, "spearman_mean": float(rho.mean()) if len(rho) else None,
            "spearman_min": float(rho.min()) if len(rho) else None,
            "max_rel_diff": float(rel), "ebpg_abs_diff": float(torch.nan_to_num(ebpg).abs().mean())}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints the table, writes the JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--methods", default="all")
    p.add_argument("--precisions", default="bf16,fp16")
    p.add_argument("--targets", default="top1", choices=("top1", "top5"),
                   help="top5: all five class maps of each image (TR-GBP's own setting)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/precision.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    spec = models.load(a.model, a.weights, device=torch.device(a.device))
    images, masks = photos(spec)
    images = images.to(spec.device)
    with torch.no_grad():
        top = spec.module(images).topk(5, dim=1).indices
    targets = top[:, 0] if a.targets == "top1" else top
    methods = list(REGISTRY) if a.methods == "all" else a.methods.split(",")
    precisions = a.precisions.split(",")
    results: dict = {}
    print(f"{a.model} on {len(images)} photos, {a.targets}, {a.device}, {a.threads} thread(s); deviation from fp32")
    print(f"{'method':<22} {'prec':<5} {'spearman mean':>13} {'min':>7} {'max rel diff':>12} {'|dEBPG|':>8} "
          f"{'s':>6}")
    for method in methods:
        options = COST_OPTIONS.get(method, {})
        ref = attribute(method, spec, images, targets, **options).cpu().flatten(0, -3)  # [N·T, H, W]
        results[method] = {}
        for precision in precisions:
            start = time.perf_counter()
            try:
                with measuring():  # the policy is what this measures: let every precision run
                    other = attribute(method, spec, images, targets, precision=precision,
                                      **options).cpu().flatten(0, -3)
            except Exception as exc:  # noqa: BLE001 -- a refusal is a result too
                results[method][precision] = {"error": str(exc).splitlines()[0]}
                print(f"{method:<22} {precision:<5} refused: {str(exc).splitlines()[0][:70]}")
                continue
            row = {**deviation(ref, other, masks), "seconds": time.perf_counter() - start}
            results[method][precision] = row
            fmt = (lambda v, f: f"{v:{f}}" if v is not None else "nan")
            print(f"{method:<22} {precision:<5} {fmt(row['spearman_mean'], '13.5f')} {fmt(row['spearman_min'], '7.4f')} "
                  f"{fmt(row['max_rel_diff'], '12.3g')} {fmt(row['ebpg_abs_diff'], '8.4f')} {row['seconds']:6.1f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "device": a.device, "threads": a.threads, "images": len(images),
                               "targets": a.targets,
                               "options": COST_OPTIONS, "methods": results, "torch": torch.__version__,
                               "machine": platform.processor() or platform.machine()}, indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
