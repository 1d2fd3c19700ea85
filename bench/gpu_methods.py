"""bench.gpu_check's sections on the methods themselves: (a) agreement of every method with the CPU in fp32, and
(b) throughput (images per second) per model and precision, next to the compute floor and Captum."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from attribution import models
from attribution.errors import AttributionError
from attribution.methods import REGISTRY, attribute, get_method
from attribution.precision import compute_precision
from bench.floors import floor_passes
from bench.gpu_plan import NOISE_TUNNELS, Budget, Plan, cheap_options
from bench.gpu_report import fmt, one_line, print_table
from bench.inputs import build_images, build_spec, mixed_targets, photo_batch
from bench.references import agreement, reference_fns
from bench.timing import free_memory, median_seconds, sync

# Throughput batch caps where a method's cost per image is far above a gradient pass (XRAI segments each image
# on the CPU; RISE runs masks x images forwards): images per second stays comparable, the section stays short.
THROUGHPUT_BATCH_CAP = {"xrai": 4, "rise": 8, "extremal_perturbation": 16, "gig": 16}
# The methods whose references include a Captum class (bench.references.reference_fns); only those are timed.
CAPTUM_METHODS = ("saliency", "gbp", "gradcam", "ig", "deeplift", "smoothgrad", "vargrad")


def in_precision(precision: str, device: torch.device, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run inside ``compute_precision(precision, device)`` (floors and references)."""
    def run() -> Any:
        with compute_precision(precision, device):
            return fn()
    return run


def section_agreement(plan: Plan, report: dict, budget: Budget) -> None:
    """Every registry method in fp32 on ``plan.device`` and on the CPU: methods.<name>.max_rel_diff_vs_cpu."""
    cpu = torch.device("cpu")
    cpu_spec = build_spec(plan.agreement_model, None, "random", cpu, plan.seed)
    dev_spec = build_spec(plan.agreement_model, None, "random", plan.device, plan.seed)
    images = photo_batch(cpu_spec, plan.agreement_images)
    targets = mixed_targets(cpu_spec, images)
    dev_images, dev_targets = images.to(plan.device), targets.to(plan.device)
    size = cpu_spec.preprocessing.input_size
    report["settings"]["agreement"] = {"model": plan.agreement_model, "images": plan.agreement_images,
                                       "input_size": size, "targets": targets.tolist(), "precision": "fp32"}
    rows = []
    for name in REGISTRY:
        entry = report["methods"].setdefault(name, {})
        options = cheap_options(name, size, deterministic=True)
        info: dict[str, Any] = {"options": options}
        if name in NOISE_TUNNELS:
            info["note"] = "noise drawn per device: compared at noise=0"
        entry["agreement"] = info
        if budget.expired("agreement"):
            entry["max_rel_diff_vs_cpu"] = None
            info["skipped"] = budget.note("agreement")
            rows.append([name, "-", "-", "-", "skipped (budget)"])
            continue
        try:
            t0 = time.perf_counter()
            dev_maps = attribute(name, dev_spec, dev_images, dev_targets, precision="fp32", **options)
            sync(plan.device)
            t1 = time.perf_counter()
            cpu_maps = attribute(name, cpu_spec, images, targets, precision="fp32", **options)
            t2 = time.perf_counter()
            diff = agreement(name, "cpu", dev_maps, cpu_maps)
            entry["max_rel_diff_vs_cpu"] = diff
            info.update(seconds_device=t1 - t0, seconds_cpu=t2 - t1)
            rows.append([name, f"{diff:.2e}", fmt(t1 - t0, 3), fmt(t2 - t1, 3), ""])
        except Exception as exc:  # noqa: BLE001 -- one method's failure is a row, not a lost section
            entry["max_rel_diff_vs_cpu"] = None
            info["error"] = one_line(exc)
            rows.append([name, "-", "-", "-", one_line(exc)[:80]])
    print_table(f"(a) agreement: {plan.agreement_model}, {plan.agreement_images} photos, fp32, {plan.device} vs cpu",
                ["method", "max rel diff", f"{plan.device.type} s (device)", "cpu s (reference)", "note"], rows)


def section_throughput(plan: Plan, report: dict, budget: Budget) -> None:
    """img/s of each method per precision and model, next to its floor and Captum."""
    report["settings"]["throughput"] = {"models": plan.models, "methods": plan.methods, "batch": plan.batch,
                                        "repeats": plan.repeats, "warmup": plan.warmup, "precisions": plan.precisions,
                                        "batch_caps": THROUGHPUT_BATCH_CAP,
                                        "timing": "median wall seconds per call, CUDA-synchronised; "
                                                  "images per second = batch / median"}
    section: dict[str, Any] = report.setdefault("throughput", {})
    for index, model in enumerate(plan.models):
        if budget.expired("throughput"):
            section[model] = {"skipped": budget.note("throughput")}
            continue
        if plan.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(plan.device)
        spec = build_spec(model, None, "random", plan.device, plan.seed)
        images = build_images(spec, "photos", plan.batch, plan.seed)
        targets = mixed_targets(spec, images)
        rows = []
        for name in plan.methods:
            result = _throughput_method(plan, budget, spec, name, images, targets)
            entry = report["methods"].setdefault(name, {})
            entry.setdefault("models", {})[model] = result
            if index == 0:
                entry["images_per_second"] = result["images_per_second"]
                entry["floor_images_per_second"] = result["floor_images_per_second"]
                if result["captum"]:
                    label = next(iter(result["captum"]))
                    entry["captum"], entry["captum_images_per_second"] = label, result["captum"][label]
            for precision in plan.precisions:
                ours = result["images_per_second"].get(precision)
                floor = result["floor_images_per_second"].get(precision)
                captum = {k: v.get(precision) for k, v in result["captum"].items()}
                why = (result["refused"].get(precision) or result["errors"].get(precision)
                       or result["skipped"].get(precision) or "")
                rows.append([name, result["batch"], precision, fmt(ours), fmt(floor),
                             fmt(result["fraction_of_floor"].get(precision), 2),
                             " ".join(f"{k.split('.', 1)[-1]} {fmt(v)}" for k, v in captum.items()) or "-",
                             why[:70]])
        section[model] = {"peak_gpu_memory_bytes": int(torch.cuda.max_memory_allocated(plan.device))
                          if plan.device.type == "cuda" else None}
        print_table(f"(b) throughput: {model}, batch {plan.batch}, {plan.device}, img/s (median of {plan.repeats})",
                    ["method", "batch", "precision", "ours", "floor", "ours/floor", "captum", "note"], rows)
        del spec, images, targets
        free_memory(plan.device)


def _throughput_method(plan: Plan, budget: Budget, spec: models.ModelSpec, name: str, images: torch.Tensor,
                       targets: torch.Tensor) -> dict[str, Any]:
    """One method on one model: every precision (ours, floor, Captum), refusals and errors as lines."""
    batch = min(plan.batch, THROUGHPUT_BATCH_CAP.get(name, plan.batch))
    images, targets = images[:batch], targets[:batch]
    options = cheap_options(name, spec.preprocessing.input_size)
    result: dict[str, Any] = {"batch": batch, "options": options, "images_per_second": {},
                              "floor_images_per_second": {}, "fraction_of_floor": {}, "captum": {}, "refused": {},
                              "errors": {}, "skipped": {}, "floor_passes": None}
    try:
        floor, result["floor_passes"] = floor_passes(name, spec, images, targets)
        refs = []
        if name in CAPTUM_METHODS:
            try:
                refs = [r for r in reference_fns(name, spec, images, targets, options)
                        if r.label.startswith("captum")]
            except Exception as exc:  # noqa: BLE001 -- Captum missing or failing: ours and the floor still count
                result["captum_error"] = one_line(exc)
    except Exception as exc:  # noqa: BLE001
        result["errors"] = {p: one_line(exc) for p in plan.precisions}
        return result
    for precision in plan.precisions:
        if budget.expired("throughput"):
            result["skipped"][precision] = budget.note("throughput")
            continue
        try:
            get_method(name).check_precision(precision)
        except AttributionError as exc:
            result["refused"][precision] = str(exc)
            continue
        fns = {"ours": lambda p=precision: attribute(name, spec, images, targets, precision=p, **options),
               "floor": in_precision(precision, plan.device, floor),
               **{r.label: in_precision(precision, plan.device, r.fn) for r in refs}}
        try:
            seconds = median_seconds(fns, plan.repeats, plan.device, warmup=plan.warmup)
        except Exception as exc:  # noqa: BLE001 -- e.g. out of memory: one line, then the next precision
            result["errors"][precision] = one_line(exc)
            free_memory(plan.device)
            continue
        ours, floor_ips = batch / seconds["ours"], batch / seconds["floor"]
        result["images_per_second"][precision] = ours
        result["floor_images_per_second"][precision] = floor_ips
        result["fraction_of_floor"][precision] = ours / floor_ips
        for r in refs:
            result["captum"].setdefault(r.label, {})[precision] = batch / seconds[r.label]
    return result
