"""Time per image of every attribution method, next to its reference library and the compute floor.

    python -m bench.methods [--model resnet18] [--batch 8] [--repeats 3] [--device cpu|cuda] [--methods all]
                            [--full] [--out bench/results/methods.json]

The A-FMI paper's Table 1 (seconds per image per method), measured here: for each method (default: the five core
methods; ``--methods all``: every method in ``attribution.methods.REGISTRY``) the same model, images and (mixed)
targets are timed three ways, interleaved round by round so that a busy machine slows all of them alike:

* **ours**: ``attribution.methods.attribute(method, spec, images, targets, **options)`` with the method's options
  from :data:`bench.method_settings.FAST_SETTINGS` (default: settings that keep a 2-core CPU run short and still
  meaningful) or :data:`~bench.method_settings.FULL_SETTINGS` (``--full``: the papers' settings: IG 100 steps,
  Guided IG 200, RISE 4000 masks, extremal perturbation 800 iterations, XRAI on a 100-step IG, SmoothGrad/VarGrad
  50 samples);
* **reference**: the reference library computing the same maps on the same model, images and targets, with the
  same steps / samples / iterations (see :func:`bench.references.reference_fns`; one note per reference is
  printed and stored):
  Captum (``Saliency``, ``GuidedBackprop``, ``LayerGradCam``, ``IntegratedGradients``, ``DeepLift``,
  ``NoiseTunnel``), pytorch-grad-cam (``GradCAM``, ``FullGrad``), zennit (``Epsilon`` composite + canonizer),
  the ``saliency`` package (``GuidedIG``, ``XRAI``: numpy, one image at a time, which is how it runs) and
  TorchRay (``extremal_perturbation``, ``rise``); none for TR-GBP, A-FMI and CAMERAS. Where a reference is slow
  a setting times it (or both) on the first few images of the batch only (``images`` / ``ref_images``; the table
  says so): time *per image* is what is compared. Captum's guided backprop and DeepLift need one non-in-place
  ``nn.ReLU`` module per call site, so they run on a private deep copy whose ReLUs are distinct non-in-place
  modules (ResNet blocks get a patched ``forward``; ReLU6 becomes an ``nn.ReLU`` subclass computing relu6);
* **floor**: the passes a gradient method cannot avoid, in plain autograd: one forward and one input-gradient
  backward per class column (saliency, gbp, gradcam and every baseline, for which ours/floor is the cost in units
  of one gradient pass; Grad-CAM's own backward stops at the target layer, so it can and does come in well under
  this floor), one forward and one backward per top-5 class (+1 per target column outside the top 5) for
  tr_gbp, and for a_fmi one no-grad forward of the features over the batch plus the reference image, then the
  head forward (paired batch) and one backward to the feature maps per column.

Reported: median seconds per image over ``--repeats`` timed runs after one warm-up run (settings may skip the
warm-up of very slow methods; min and all runs go into the JSON), ours/reference and the speed-up
reference/ours, ours/floor (goal <= 1.15 for the core methods) and tr_gbp/gbp (goal <= 3). Each reference map is
compared with ours (max |ours - ref| / max |ref| over the images both computed) so a fast-but-wrong method shows
up; "n/a (random)" where the reference draws its own random numbers (SmoothGrad/VarGrad noise).

Random-weight torchvision models have all-zero effective biases (fresh BatchNorm is the identity, VGG's biases
are initialised to 0), which would let TR-GBP skip every bias unit. Unless ``--init-stats keep`` is given (or
real weights are loaded), BatchNorm statistics/affine parameters and conv/linear biases are given random
non-zero values, as in a trained network; the timing of the other methods does not depend on it. Images are
real photographs from scikit-image (offline) unless ``--images random``: XRAI's segmentation depends on them.

This module is the command line and the per-method run; the parts live in ``bench.method_settings`` (the
settings), ``bench.inputs`` (model, photos, targets), ``bench.references`` and ``bench.reference_adapters`` (the
reference libraries, the agreement measure), ``bench.floors`` (the compute floor), ``bench.timing`` (interleaved
timing, foreign load) and ``bench.methods_report`` (table, notes, goals).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attribution import models
from attribution.methods import REGISTRY, attribute
from bench.floors import floor_passes
from bench.inputs import build_images, build_spec, mixed_targets
from bench.method_settings import CORE_METHODS, DEFAULT_SETTING, method_setting
from bench.methods_report import disturbed_runs, format_options, notes, summary, table
from bench.provenance import device_name, git_commit, versions
from bench.references import agreement, reference_fns
from bench.timing import interleaved, per_image_stats
from workers.device import retain_freed_memory

DEFAULT_OUT = Path("bench/results/methods.json")


def bench_method(method: str, spec: models.ModelSpec, images: Tensor, targets: Tensor, repeats: int,
                 max_foreign: float = 0.3, retries: int = 1, wait_quiet_s: float = 0.0,
                 setting: dict[str, Any] | None = None) -> dict:
    """Time ``method`` (ours, its references, its floor; interleaved) on ``images`` [B, C, H, W] / ``targets`` [B]
    with ``setting`` (see :func:`method_setting`; default: the fast setting). Returns the JSON row: seconds per
    image (median, min, runs), foreign load per run, ours/reference, speed-up, max relative difference."""
    setting = method_setting(method) if setting is None else setting
    options = setting["options"]
    if setting["images"]:
        images, targets = images[:setting["images"]], targets[:setting["images"]]
    batch = images.shape[0]
    refs = reference_fns(method, spec, images, targets, options, setting["ref_images"])
    floor, floor_desc = floor_passes(method, spec, images, targets)
    fns = {"ours": lambda: attribute(method, spec, images, targets, **options),
           **{r.label: r.fn for r in refs}, "floor": floor}
    results, times, loads = interleaved(fns, repeats, spec.device, max_foreign, retries, wait_quiet_s,
                                        warmup=setting["warmup"])
    ours = per_image_stats(times["ours"], loads["ours"], batch)
    floor_stats = per_image_stats(times["floor"], loads["floor"], batch)
    row: dict[str, Any] = {"method": method, "options": options, "images": batch, "warmup": setting["warmup"],
                           "ours": ours, "floor": {**floor_stats, "passes": floor_desc},
                           "ours_over_floor": ours["s_per_image"] / floor_stats["s_per_image"], "references": []}
    for ref in refs:
        ref_stats = per_image_stats(times[ref.label], loads[ref.label], ref.images)
        diff = agreement(method, ref.label, results["ours"], results[ref.label]) if ref.compare != "random" else None
        row["references"].append({"name": ref.label, "images": ref.images, **ref_stats,
                                  "ours_over_reference": ours["s_per_image"] / ref_stats["s_per_image"],
                                  "speedup": ref_stats["s_per_image"] / ours["s_per_image"],
                                  "compare": ref.compare, "max_rel_diff": diff, "note": ref.note})
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``argv``; None: ``sys.argv[1:]``), checked: ``--methods all`` expanded to the registry."""
    p = argparse.ArgumentParser(prog="python -m bench.methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=models.MODEL_NAMES)
    p.add_argument("--weights", default=None,
                   help="weights for models.load (default: 'imagenet' for efficientnet_lite0, else random)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--images", default="photos", choices=("random", "photos"),
                   help="real scikit-image photos (default; XRAI segments them) or random normal tensors")
    p.add_argument("--init-stats", default="random", choices=("random", "keep"),
                   help="random-weight models: give BatchNorm stats and biases random non-zero values (default)")
    p.add_argument("--methods", default=",".join(CORE_METHODS),
                   help=f"comma-separated registry names, or 'all' (default: {','.join(CORE_METHODS)})")
    p.add_argument("--malloc", default="system", choices=("system", "retain"),
                   help="CPU memory: glibc's default (system), or keep freed memory in the process (retain: "
                        "removes page-fault time, as jemalloc/tcmalloc would)")
    p.add_argument("--full", action="store_true",
                   help="the papers' settings (FULL_SETTINGS: IG 100 steps, GIG 200, RISE 4000 masks, extremal "
                        "perturbation 800 iterations, ...) instead of the short FAST_SETTINGS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-foreign", type=float, default=0.3,
                   help="retry a timed run during which other processes used more than this many cores")
    p.add_argument("--retries", type=int, default=1, help="retries of a run disturbed by other processes")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each timed run, wait up to this long for other processes to go quiet (shared "
                        "machines; default 0: do not wait)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    if args.methods == "all":
        args.methods = ",".join(REGISTRY)
    unknown = [m for m in args.methods.split(",") if m not in REGISTRY]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; known: {', '.join(REGISTRY)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    if args.weights is None and args.model == models.EFFICIENTNET_LITE0:
        args.weights = "imagenet"
    return args


def main(argv: list[str] | None = None) -> dict:
    """Time every method of ``--methods``, print the table and goals, write the JSON report to ``--out`` and
    return it (seconds per image, ratios and settings; the keys listed in the module docstring)."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module=r"captum\..*")  # "Setting backward hooks on ReLU activations" etc.
    warnings.filterwarnings("ignore", message=".*backward hook.*")
    warnings.filterwarnings("ignore", message=".*torch.meshgrid.*")  # TorchRay's mask generator
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    malloc = args.malloc
    if malloc == "retain" and not retain_freed_memory():
        print("bench: --malloc retain: not glibc, keeping the system allocator's defaults", flush=True)
        malloc = "system"
    started = time.perf_counter()
    spec = build_spec(args.model, args.weights, args.init_stats, device, args.seed)
    images = build_images(spec, args.images, args.batch, args.seed)
    targets = mixed_targets(spec, images)
    load_before = os.getloadavg()
    mode = "full" if args.full else "fast"
    settings = {m: method_setting(m, args.full) for m in args.methods.split(",")}
    print(f"bench: {args.model} (weights={args.weights or 'random'}), batch {args.batch}, {args.images} images, "
          f"targets {targets.tolist()}, {args.repeats} repeats, {device} ({device_name(device)}), "
          f"{torch.get_num_threads()} threads, malloc {malloc}, torch {torch.__version__}, commit {git_commit()}",
          flush=True)
    print(f"settings ({mode}; options go to attribute(), the references get the same steps/samples/iterations; "
          f"images / ref_images: only the first N images of the batch are timed):")
    for m, s in settings.items():
        extra = {k: v for k, v in s.items() if k != "options" and v != DEFAULT_SETTING[k]}
        print(f"  {m}: {format_options(s['options']) or '(defaults)'}{'  ' + json.dumps(extra) if extra else ''}",
              flush=True)

    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        row = bench_method(method, spec, images, targets, args.repeats, args.max_foreign, args.retries,
                           args.wait_quiet, settings[method])
        rows.append(row)
        disturbed = disturbed_runs(row, args.max_foreign)
        refs = ", ".join(f"{r['name']} {r['s_per_image']:.4f}" for r in row["references"])
        print(f"  {method}: ours {row['ours']['s_per_image']:.4f} s/img{f', {refs}' if refs else ''}, floor "
              f"{row['floor']['s_per_image']:.4f} s/img ({time.perf_counter() - t0:.1f} s"
              f"{f'; {disturbed} timed runs shared the CPU with other processes' if disturbed else ''})", flush=True)

    goals, goal_lines = summary(rows)
    disturbed = sum(disturbed_runs(r, args.max_foreign) for r in rows)
    print()
    print(table(rows, args.batch))
    print()
    print("\n".join(goal_lines))
    if any(r["references"] for r in rows):
        print("\nreferences:")
        print("\n".join(notes(rows)))
    if disturbed:
        print(f"WARNING: {disturbed} timed runs overlapped other processes using > {args.max_foreign:g} cores "
              f"(after {args.retries} retries each): timings are noisy, rerun on a quiet machine")
    report = {
        "model": args.model, "weights": args.weights, "init_stats": args.init_stats if args.weights is None else None,
        "batch": args.batch, "repeats": args.repeats, "images": args.images, "targets": targets.tolist(),
        "settings_mode": mode, "settings": settings,
        "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "malloc": malloc, "versions": versions(), "git_commit": git_commit(), "torch": torch.__version__,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "timing": "median over repeats of wall seconds per image after one warm-up (none where a setting says "
                  "warmup false); ours, references and floor interleaved round by round",
        "max_foreign_cores": args.max_foreign, "retries": args.retries, "wait_quiet_s": args.wait_quiet,
        "disturbed_runs": disturbed,
        "methods": rows, "goals": goals, "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out.resolve()} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
