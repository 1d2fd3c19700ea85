"""One-call GPU check (issue 13): agreement with the CPU, method throughput, the pipeline and evaluate, in one JSON.

    python -m bench.gpu_check [--device cuda|cpu] [--out DIR] [--tiny] [--methods core|all|a,b] [--budget-s 240]
                              [--sections agreement,throughput,pipeline,evaluate] [--models resnet50,vgg16] …

Made to run once on a lent GPU (``bench/gpu_check.sh``): at most ~4 minutes on one H200/A100 including model
loading, a table printed per section, and ``DIR/gpu_check.json`` rewritten after every section, so a crash,
a kill or an overrun never loses what was measured before it. ``--device cpu --tiny`` runs the very same code
paths in seconds on the benchmark's small CNNs (``tests/test_gpu_check.py``), so the script cannot rot.

Sections (each guarded: one that fails records ``{"error": "..."}`` and the others still run):

(a) **agreement** — every registry method on 2 real photos (ResNet-50, random weights with random non-zero
    BatchNorm statistics and biases as in ``bench.inputs``, 224 px), fp32 (TF32 off) on ``--device`` and on the
    CPU, same weights, images and targets: ``methods.<name>.max_rel_diff_vs_cpu`` = max |device − cpu| /
    max |cpu| over both maps. Costly methods get the cheap options of :data:`bench.gpu_plan.CHEAP_OPTIONS`
    (stored in ``methods.<name>.agreement.options``). SmoothGrad/VarGrad draw their noise from the device's own
    generator, so CPU and CUDA cannot draw the same noise: they are compared at ``noise=0`` (the tunnel's batching
    and averaging). RISE draws its masks from a CPU generator, so its masks are the same on both.
(b) **throughput** — img/s of each method (default the core five: saliency, gbp, gradcam, tr_gbp (top-5
    removal: 1 forward + 5 backward), a_fmi; ``--methods all``: every one) at batch 64 for fp32/tf32/bf16/fp16
    on ResNet-50 and VGG-16, next to the compute floor in the same precision (``bench.floors.floor_passes``:
    one forward + the method's backward passes, plain autograd) and Captum's equivalent where one exists
    (``bench.references.reference_fns``: Saliency, GuidedBackprop, LayerGradCam; with ``--methods all`` also
    IntegratedGradients, DeepLift, NoiseTunnel), all run inside the same ``compute_precision``. Median of
    ``--repeats`` timed calls after one warm-up, interleaved (``bench.timing.interleaved``), with
    ``torch.cuda.synchronize`` around every call; cuDNN benchmark mode on. A precision a method refuses is
    recorded with the refusal's line instead of a number. Units are skipped (with a note) once the section's
    share of the time budget is spent.
(c) **pipeline** — ``jobs.attribute`` end to end (read → decode → one actor on one GPU → Parquet → commit) on
    ``--pipeline-images`` (2,048) synthetic images, next to the same method calls in a bare loop in this process
    (``bench.pipeline.bare_loop``, decode not timed). The actor is :class:`bench.gpu_probe.ProbeWorker` (the
    product's worker plus a stats file), which gives the actor's own peak GPU memory and the steady-state rate
    (from the end of its first batch to the end of its last, so Ray, actor start-up and model loading are left
    out); GPU utilisation is sampled by a thread every 0.2 s (:class:`bench.gpu_sampler.GpuSampler`: pynvml, else
    nvidia-smi).
(d) **evaluate** — ``jobs.evaluate``'s perturbation metrics (MoRF, LeRF, insertion) on the pipeline's maps
    (or, when that section did not run, on a small Grad-CAM run made first), end to end, and its actor class
    called in this process on decoded batches (steady state, no Ray); next to the forward-pass floor: the same
    number of perturbed images through the model in a bare loop (timed on up to ``--evaluate-floor-forwards``
    of them, in the job's chunk size and precision).

JSON layout (``gpu_check.json``; numbers in images per second unless the key says otherwise, null where not
measured):

* ``environment``: GPU name, capability, memory, driver; torch, CUDA, cuDNN, Ray, Captum versions; CPUs; commit.
* ``settings``: the plan (models, batch, repeats, precisions, images, options) and the time budget.
* ``sections.<section>``: ``status`` ok | error | skipped, ``seconds``, ``error`` / ``note``.
* ``methods.<name>``: ``max_rel_diff_vs_cpu``; ``agreement`` {options, seconds_device, seconds_cpu, note};
  ``images_per_second.<precision>``, ``floor_images_per_second.<precision>``,
  ``captum_images_per_second.<precision>`` (and ``captum``: its class) on the first throughput model
  (ResNet-50), and the same per model under ``models.<model>`` together with ``batch``, ``options``,
  ``floor_passes``, ``fraction_of_floor.<precision>`` (ours / floor), ``captum`` {label: {precision: img/s}},
  ``refused`` / ``errors`` / ``skipped`` {precision: line}.
* ``throughput``: per model, the driver's peak GPU memory (bytes).
* ``pipeline``: ``images_per_second`` (images / wall seconds of ``run()``, Ray already started),
  ``bare_loop_images_per_second``, ``ratio_to_bare``, ``steady_images_per_second``, ``steady_ratio_to_bare``,
  ``gpu_busy_fraction`` (mean utilisation over the run, 0..1; null on the CPU) and ``gpu_busy_fraction_steady``,
  ``peak_gpu_memory_bytes`` (the actor's ``torch.cuda.max_memory_allocated``; null on the CPU),
  ``peak_gpu_memory_reserved_bytes``, ``device_memory_used_peak_bytes`` (what the sampler saw, all processes),
  ``actor_ready_seconds``, ``ray_start_seconds``, ``images``, ``maps_written``, ``errors``, settings.
* ``evaluate``: ``images_per_second`` (job end to end), ``worker_images_per_second`` (in process, steady),
  ``floor_images_per_second``, ``floor_forwards_per_second``, ``forwards_per_image``, ``ratio_to_floor``,
  ``worker_ratio_to_floor``, settings.

This module is the command line and the guarded run of the sections; the sections live in ``bench.gpu_methods``
(a, b) and ``bench.gpu_pipeline`` (c, d), the plan, cheap options and budget in ``bench.gpu_plan``, the JSON and
tables in ``bench.gpu_report``, the GPU sampler in ``bench.gpu_sampler``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from attribution.methods import REGISTRY
from attribution.precision import PRECISIONS
# main() looks the section functions up here when it runs them (tests replace gpu_check.section_agreement)
from bench.gpu_methods import section_agreement, section_throughput
from bench.gpu_pipeline import Shards, section_evaluate, section_pipeline, synthetic_shards
from bench.gpu_plan import BUDGET_MARKS, CHEAP_OPTIONS, JSON_NAME, MIN_START_S, SECTIONS, Budget, Plan, auto_precision
from bench.gpu_report import environment, one_line, write_report
from bench.method_settings import CORE_METHODS
from bench.timing import free_memory

DEFAULT_OUT = Path("bench/results/gpu_check")


def parse_args(argv: list[str] | None) -> Plan:
    """The command line (``argv``; None: ``sys.argv[1:]``) as a checked :class:`~bench.gpu_plan.Plan`."""
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for {JSON_NAME} (default {DEFAULT_OUT})")
    p.add_argument("--tiny", action="store_true",
                   help="seconds, not minutes: the benchmark's small CNNs, few images, 1 repeat (the test)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="time budget in seconds; sections and units past their share are skipped (default 240)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--methods", default="core",
                   help="throughput methods: core (saliency,gbp,gradcam,tr_gbp,a_fmi), all, or a comma list")
    p.add_argument("--models", default=None, help="throughput models (default resnet50,vgg16; tiny: bench_resnet)")
    p.add_argument("--precisions", default=None,
                   help=f"throughput precisions (default {','.join(PRECISIONS)}; tiny: fp32,bf16)")
    p.add_argument("--batch", type=int, default=None, help="throughput batch (default 64; tiny 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per unit (default 3; tiny 1)")
    p.add_argument("--pipeline-images", type=int, default=None, help="synthetic images (default 2048; tiny 32)")
    p.add_argument("--pipeline-methods", default="tr_gbp", help="methods of the pipeline run (default tr_gbp)")
    p.add_argument("--pipeline-targets", default="top5", choices=("top1", "top5", "label"))
    p.add_argument("--pipeline-precision", default="auto", choices=("auto", *PRECISIONS),
                   help="auto (default): bf16, else tf32, else fp32, the first every pipeline method allows")
    p.add_argument("--evaluate-images", type=int, default=None,
                   help="images the evaluate job scores (whole shards; default 512; tiny 32)")
    p.add_argument("--evaluate-metrics", default="morf,lerf,insertion")
    p.add_argument("--evaluate-floor-forwards", type=int, default=None,
                   help="perturbed images the floor loop times at most (default 8192; tiny 256)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine (use --device cpu)")
    sections = [s for s in a.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    methods = list(CORE_METHODS) if a.methods == "core" else list(REGISTRY) if a.methods == "all" \
        else a.methods.split(",")
    pipeline_methods = a.pipeline_methods.split(",")
    bad = [m for m in methods + pipeline_methods if m not in REGISTRY]
    tiny = a.tiny
    precisions = a.precisions.split(",") if a.precisions else (["fp32", "bf16"] if tiny else list(PRECISIONS))
    bad_precision = [x for x in precisions if x not in PRECISIONS]
    if unknown or bad or bad_precision:
        p.error(f"unknown section {unknown[0]!r}" if unknown else f"unknown precision {bad_precision[0]!r}"
                if bad_precision else f"unknown method {bad[0]!r}; known: {', '.join(REGISTRY)}")
    pipeline_images = a.pipeline_images or (32 if tiny else 2048)
    model_names = a.models.split(",") if a.models else (["bench_resnet"] if tiny else ["resnet50", "vgg16"])
    return Plan(
        device=torch.device(a.device), tiny=tiny, out=a.out, budget_s=a.budget_s, sections=sections, seed=a.seed,
        agreement_model="bench_resnet" if tiny else "resnet50", agreement_images=2,
        models=model_names, methods=methods, precisions=precisions,
        batch=a.batch or (2 if tiny else 64), repeats=a.repeats or (1 if tiny else 3), warmup=not tiny,
        pipeline_model="bench_resnet" if tiny else "resnet50", pipeline_images=pipeline_images,
        pipeline_unique=min(pipeline_images, 8 if tiny else 64), pipeline_batch=8 if tiny else 64,
        pipeline_methods=pipeline_methods, pipeline_targets=a.pipeline_targets,
        pipeline_precision=a.pipeline_precision if a.pipeline_precision != "auto" else
        auto_precision(pipeline_methods), shard_size=8 if tiny else 256,
        evaluate_images=a.evaluate_images or (32 if tiny else 512), evaluate_worker_images=16 if tiny else 192,
        evaluate_metrics=a.evaluate_metrics.split(","),
        evaluate_floor_forwards=a.evaluate_floor_forwards or (256 if tiny else 8192),
        min_start_s={} if tiny else dict(MIN_START_S),
    )


def run_section(name: str, fn: Callable[[], None], plan: Plan, report: dict, budget: Budget) -> None:
    """Run one section guarded: its status, seconds and error line go to report["sections"]; the JSON is written."""
    t0 = time.perf_counter()
    status: dict[str, Any] = {"status": "ok"}
    min_start = plan.min_start_s.get(name, 0.0)
    if name not in plan.sections:
        status = {"status": "skipped", "note": "not in --sections"}
    elif budget.remaining() <= 0 or (min_start and budget.remaining() < min_start):
        status = {"status": "skipped", "note": f"skipped: time budget ({budget.remaining():.0f} s left of "
                                               f"{budget.seconds:.0f} s; this section needs ~{min_start:.0f} s)"}
    else:
        print(f"\n== {name} ({budget.elapsed():.0f} s into the run)", flush=True)
        try:
            fn()
        except KeyboardInterrupt:  # SIGINT from bench/gpu_check.sh's timeout: record, write the JSON, stop
            report["sections"][name] = {"status": "error", "error": "interrupted (SIGINT: time limit?)",
                                        "seconds": time.perf_counter() - t0}
            write_report(report, plan)
            raise
        except Exception as exc:  # noqa: BLE001 -- a failing section must not lose the others (GPU time is short)
            traceback.print_exc()
            status = {"status": "error", "error": one_line(exc)}
            print(f"{name}: FAILED: {one_line(exc)}", flush=True)
            free_memory(plan.device)
    status["seconds"] = time.perf_counter() - t0
    report["sections"][name] = status
    if name in ("pipeline", "evaluate") and status["status"] != "ok":
        report[name]["error" if status["status"] == "error" else "skipped"] = status.get("error") or status["note"]
    if status["status"] == "skipped" and name in plan.sections:
        print(f"\n== {name}: {status['note']}", flush=True)
    write_report(report, plan)


def main(argv: list[str] | None = None) -> dict:
    """Run every section of the plan (guarded, within the budget), write ``gpu_check.json`` after each, and return
    the report (the layout of the module docstring)."""
    plan = parse_args(argv)
    budget = Budget(plan.budget_s)
    import warnings
    warnings.filterwarnings("ignore", module=r"captum\..*")
    warnings.filterwarnings("ignore", message=".*backward hook.*")
    if plan.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the worker on CUDA: autotuned kernels per shape
    report: dict[str, Any] = {"check": "bench.gpu_check", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "environment": {}, "settings": {"plan": plan.as_json(), "cheap_options": CHEAP_OPTIONS,
                                                              "budget_marks": BUDGET_MARKS},
                              "sections": {}, "methods": {}, "throughput": {}, "pipeline": {}, "evaluate": {}}
    try:
        report["environment"] = environment(plan.device)
    except Exception as exc:  # noqa: BLE001
        report["environment"] = {"error": one_line(exc)}
    env = report["environment"]
    print(f"gpu_check: {env.get('gpu_name') or env.get('device_name')} | torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}, cuDNN {env.get('cudnn_version')}) | {plan.device} | "
          f"{'tiny' if plan.tiny else 'full'} | budget {plan.budget_s:.0f} s -> {plan.out / JSON_NAME}", flush=True)
    path = write_report(report, plan)

    try:  # Ray serves the pipeline and evaluate sections only: without it those fail and the rest still runs
        import ray
        ray_was_up = ray.is_initialized()
    except ImportError:
        ray, ray_was_up = None, False
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    cache: dict[str, Shards] = {}

    def shards() -> Shards:
        if "shards" not in cache:
            cache["shards"] = synthetic_shards(plan, work)
        return cache["shards"]

    try:
        run_section("agreement", lambda: section_agreement(plan, report, budget), plan, report, budget)
        run_section("throughput", lambda: section_throughput(plan, report, budget), plan, report, budget)
        run_section("pipeline", lambda: section_pipeline(plan, report, work, shards), plan, report, budget)
        run_section("evaluate", lambda: section_evaluate(plan, report, work, shards), plan, report, budget)
    finally:
        report["wall_s"] = budget.elapsed()
        path = write_report(report, plan)
        shutil.rmtree(work, ignore_errors=True)
        if ray is not None and not ray_was_up and ray.is_initialized():
            ray.shutdown()
    failed = [n for n, s in report["sections"].items() if s["status"] != "ok"]
    print(f"\nwrote {path.resolve()} ({report['wall_s']:.0f} s; sections not ok: {', '.join(failed) or 'none'})",
          flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
