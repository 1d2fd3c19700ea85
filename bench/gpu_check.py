"""One-call GPU check (issue 13): agreement with the CPU, method throughput, the pipeline and evaluate, in one JSON.

    python -m bench.gpu_check [--device cuda|cpu] [--out DIR] [--tiny] [--methods core|all|a,b] [--budget-s 240]
                              [--sections agreement,throughput,pipeline,evaluate] [--models resnet50,vgg16] …

Made to run once on a lent GPU (``bench/gpu_check.sh``): at most ~4 minutes on one H200/A100 including model
loading, a table printed per section, and ``DIR/gpu_check.json`` rewritten after every section, so a crash,
a kill or an overrun never loses what was measured before it. ``--device cpu --tiny`` runs the very same code
paths in seconds on the benchmark's small CNNs (``tests/test_gpu_check.py``), so the script cannot rot.

Sections (each guarded: one that fails records ``{"error": "..."}`` and the others still run):

(a) **agreement** — every registry method on 2 real photos (ResNet-50, random weights with random non-zero
    BatchNorm statistics and biases as in ``bench.methods``, 224 px), fp32 (TF32 off) on ``--device`` and on the
    CPU, same weights, images and targets: ``methods.<name>.max_rel_diff_vs_cpu`` = max |device − cpu| /
    max |cpu| over both maps. Costly methods get the cheap options of :data:`CHEAP_OPTIONS` (stored in
    ``methods.<name>.agreement.options``). SmoothGrad/VarGrad draw their noise from the device's own generator,
    so CPU and CUDA cannot draw the same noise: they are compared at ``noise=0`` (the tunnel's batching and
    averaging). RISE draws its masks from a CPU generator, so its masks are the same on both.
(b) **throughput** — img/s of each method (default the core five: saliency, gbp, gradcam, tr_gbp (top-5
    removal: 1 forward + 5 backward), a_fmi; ``--methods all``: every one) at batch 64 for fp32/tf32/bf16/fp16
    on ResNet-50 and VGG-16, next to the compute floor in the same precision (``bench.methods.floor_passes``:
    one forward + the method's backward passes, plain autograd) and Captum's equivalent where one exists
    (``bench.methods.reference_fns``: Saliency, GuidedBackprop, LayerGradCam; with ``--methods all`` also
    IntegratedGradients, DeepLift, NoiseTunnel), all run inside the same ``compute_precision``. Median of
    ``--repeats`` timed calls after one warm-up, interleaved (``bench.methods.interleaved``), with
    ``torch.cuda.synchronize`` around every call; cuDNN benchmark mode on. A precision a method refuses is
    recorded with the refusal's line instead of a number. Units are skipped (with a note) once the section's
    share of the time budget is spent.
(c) **pipeline** — ``jobs.attribute`` end to end (read → decode → one actor on one GPU → Parquet → commit) on
    ``--pipeline-images`` (2,048) synthetic images, next to the same method calls in a bare loop in this process
    (``bench.pipeline.bare_loop``, decode not timed). The actor is :class:`bench.gpu_probe.ProbeWorker` (the
    product's worker plus a stats file), which gives the actor's own peak GPU memory and the steady-state rate
    (from the end of its first batch to the end of its last, so Ray, actor start-up and model loading are left
    out); GPU utilisation is sampled by a thread every 0.2 s (:class:`GpuSampler`: pynvml, else nvidia-smi).
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
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attribution import models
from attribution.errors import AttributionError
from attribution.methods import REGISTRY, attribute, get_method
from attribution.precision import PRECISIONS, compute_precision
from bench.methods import (CORE_METHODS, _device_name, _git_commit, _versions, agreement, build_images, build_spec,
                           floor_passes, interleaved, mixed_targets, photo_batch, reference_fns)

DEFAULT_OUT = Path("bench/results/gpu_check")
JSON_NAME = "gpu_check.json"
SECTIONS = ("agreement", "throughput", "pipeline", "evaluate")
# Cumulative share of --budget-s by the end of each section: a section's units stop at its mark, and what a
# section leaves unused goes to the next. pipeline/evaluate cannot stop half-way: they start only when at least
# MIN_START_S of the whole budget is left (a guess from the expected run times; 0 for --tiny).
BUDGET_MARKS = {"agreement": 0.20, "throughput": 0.55, "pipeline": 0.85, "evaluate": 1.0}
MIN_START_S = {"pipeline": 45.0, "evaluate": 25.0}
# Options that keep the costly methods to a few model passes (the JSON stores what each method got); CAMERAS
# gets two scales, the input size and 100 px more (see cheap_options).
CHEAP_OPTIONS: dict[str, dict[str, Any]] = {
    "rise": {"masks": 64, "batch_size": 64},
    "extremal_perturbation": {"iterations": 5},
    "ig": {"steps": 8},
    "gig": {"steps": 8},
    "xrai": {"base_options": {"steps": 4}},
    "smoothgrad": {"samples": 4},
    "vargrad": {"samples": 4},
}
NOISE_TUNNELS = ("smoothgrad", "vargrad")
# Throughput batch caps where a method's cost per image is far above a gradient pass (XRAI segments each image
# on the CPU; RISE runs masks x images forwards): images per second stays comparable, the section stays short.
THROUGHPUT_BATCH_CAP = {"xrai": 4, "rise": 8, "extremal_perturbation": 16, "gig": 16}
# The methods whose references include a Captum class (bench.methods.reference_fns); only those are timed.
CAPTUM_METHODS = ("saliency", "gbp", "gradcam", "ig", "deeplift", "smoothgrad", "vargrad")


# ---------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What one run measures (from the command line; ``--tiny`` changes the defaults, not the code paths)."""

    device: torch.device
    tiny: bool
    out: Path
    budget_s: float
    sections: list[str]
    seed: int
    agreement_model: str
    agreement_images: int
    models: list[str]
    methods: list[str]
    precisions: list[str]
    batch: int
    repeats: int
    warmup: bool
    pipeline_model: str
    pipeline_images: int
    pipeline_unique: int
    pipeline_batch: int
    pipeline_methods: list[str]
    pipeline_targets: str
    pipeline_precision: str
    shard_size: int
    evaluate_images: int
    evaluate_worker_images: int
    evaluate_metrics: list[str]
    evaluate_floor_forwards: int
    min_start_s: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "out")}
        return {"device": str(self.device), "out": str(self.out), **out}


def parse_args(argv: list[str] | None) -> Plan:
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


def auto_precision(methods: list[str]) -> str:
    """bf16, else tf32, else fp32: the first precision every one of ``methods`` allows."""
    return next(p for p in ("bf16", "tf32", "fp32") if all(allows(m, p) for m in methods))


def allows(method: str, precision: str) -> bool:
    """Whether ``method`` may run in ``precision`` (``Method.check_precision``)."""
    try:
        get_method(method).check_precision(precision)
    except AttributionError:
        return False
    return True


def cheap_options(method: str, input_size: int, *, deterministic: bool = False) -> dict[str, Any]:
    """The options ``method`` runs with here (:data:`CHEAP_OPTIONS`; CAMERAS: two scales from ``input_size``;
    ``deterministic``: noise tunnels at zero noise, see the module docstring)."""
    options = copy.deepcopy(CHEAP_OPTIONS.get(method, {}))
    if method == "cameras":
        options["resolutions"] = [input_size, input_size + 100]
    if deterministic and method in NOISE_TUNNELS:
        options["noise"] = 0.0
    return options


# ---------------------------------------------------------------------------------------------------- helpers
class Budget:
    """Wall-clock budget of the run: ``remaining()`` seconds overall, ``expired(section)`` once the section's
    cumulative share (:data:`BUDGET_MARKS`) is spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def expired(self, section: str) -> bool:
        return self.elapsed() > self.seconds * BUDGET_MARKS[section]

    def note(self, section: str) -> str:
        return (f"skipped: time budget ({self.elapsed():.0f} s of {self.seconds:.0f} s spent; {section}'s share ends "
                f"at {self.seconds * BUDGET_MARKS[section]:.0f} s)")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def in_precision(precision: str, device: torch.device, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run inside ``compute_precision(precision, device)`` (floors and references)."""
    def run() -> Any:
        with compute_precision(precision, device):
            return fn()
    return run


def median_seconds(fns: dict[str, Callable[[], Any]], plan: Plan) -> dict[str, float]:
    """Median wall seconds per call of each fn (warm-up unless --tiny; interleaved round by round; CUDA synced)."""
    _, times, _ = interleaved(fns, plan.repeats, plan.device, max_foreign=math.inf, retries=0, warmup=plan.warmup)
    return {label: statistics.median(t) for label, t in times.items()}


def finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None, tuples lists, other objects their str."""
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_report(report: dict, plan: Plan) -> Path:
    plan.out.mkdir(parents=True, exist_ok=True)
    path = plan.out / JSON_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(finite(report), indent=2))
    tmp.replace(path)
    return path


def print_table(title: str, head: list[str], rows: list[list[Any]]) -> None:
    """A plain text table (numbers formatted by the caller)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)] if cells else [len(h) for h in head]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    print(f"\n{title}")
    print(fmt.format(*head))
    print("-+-".join("-" * w for w in widths))
    for r in cells:
        print(fmt.format(*r))
    sys.stdout.flush()


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def environment(device: torch.device) -> dict[str, Any]:
    """Facts about the machine and the software the numbers come from."""
    env: dict[str, Any] = {"device": str(device), "device_name": _device_name(device), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                           "versions": _versions(), "git_commit": _git_commit(),
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                           else None, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    try:
        import ray
        env["versions"]["ray"] = ray.__version__
    except ImportError:
        env["versions"]["ray"] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_name=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_bytes=int(props.total_memory), gpu_multiprocessors=props.multi_processor_count,
                   bf16_supported=torch.cuda.is_bf16_supported(),
                   cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=False).stdout.strip()
            env["nvidia_smi"] = smi.splitlines()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = one_line(exc)
    return env


class GpuSampler:
    """Utilisation (percent of the last sample period in which a kernel ran) and used memory (bytes) of one GPU,
    read by a thread every ``interval_s``: through pynvml if importable (else the copy Ray ships), else by running
    ``nvidia-smi --query-gpu=utilization.gpu,memory.used`` once per sample (one short run per sample, not
    ``-lms``: a pipe would buffer its lines and their times would be wrong). ``samples``: (time.time(), percent,
    bytes); ``source``: where they came from; ``error``: why sampling stopped (the fields are then null)."""

    def __init__(self, index: str, interval_s: float = 0.2) -> None:
        self.index, self.interval_s = index, interval_s
        self.samples: list[tuple[float, float, int]] = []
        self.source: str | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._nvml: Any = None

    def __enter__(self) -> "GpuSampler":
        self._read = self._nvml_reader() or self._smi_reader()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                util, used = self._read()
            except Exception as exc:  # noqa: BLE001 -- a sampler that fails leaves null fields, not a failed section
                self.error = one_line(exc)
                return
            self.samples.append((time.time(), util, used))
            self._stop.wait(self.interval_s)

    def _nvml_reader(self) -> Callable[[], tuple[float, int]] | None:
        try:
            import pynvml
            self.source = "pynvml"
        except ImportError:
            try:
                from ray._private.thirdparty import pynvml
                self.source = "pynvml (the copy in ray)"
            except ImportError:
                return None
        try:
            pynvml.nvmlInit()
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(self.index)) if self.index.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(self.index))
        except Exception as exc:  # noqa: BLE001 -- fall back to nvidia-smi
            self.error = f"{self.source}: {one_line(exc)}"
            return None
        self._nvml = pynvml
        return lambda: (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        int(pynvml.nvmlDeviceGetMemoryInfo(handle).used))

    def _smi_reader(self) -> Callable[[], tuple[float, int]]:
        self.source = "nvidia-smi"
        command = ["nvidia-smi", "-i", self.index, "--query-gpu=utilization.gpu,memory.used",
                   "--format=csv,noheader,nounits"]

        def read() -> tuple[float, int]:
            text = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout
            util, used = text.strip().splitlines()[0].split(",")[:2]
            return float(util), int(float(used) * 2**20)
        return read

    def busy_fraction(self, t0: float | None = None, t1: float | None = None) -> float | None:
        """Mean utilisation in [0, 1] over the samples taken between ``t0`` and ``t1`` (None: no samples)."""
        values = [u for t, u, _ in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return sum(values) / len(values) / 100.0 if values else None

    def peak_used_bytes(self) -> int | None:
        return max((m for _, _, m in self.samples), default=None)


def gpu_index() -> str:
    """The physical GPU this process's cuda:0 is (CUDA_VISIBLE_DEVICES' first entry; nvidia-smi ignores it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


# ---------------------------------------------------------------------------------------------------- (a) agreement
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


# ---------------------------------------------------------------------------------------------------- (b) throughput
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
            seconds = median_seconds(fns, plan)
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


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class Shards:
    """The synthetic shards of the pipeline and evaluate sections."""

    samples: list
    paths: list[Path]
    pattern: str
    sizes: list[int]


def synthetic_shards(plan: Plan, work: Path) -> Shards:
    """``plan.pipeline_images`` synthetic samples (``pipeline_unique`` distinct images, repeated under new keys:
    generating each costs ~20 ms of CPU) written as shards of ``plan.shard_size``."""
    from attribution.data.sample_sets import synthetic_samples
    from attribution.data.shards import Sample, write_shards
    size = models.preprocessing_for(plan.pipeline_model, None).input_size
    base = synthetic_samples(plan.pipeline_unique, seed=plan.seed, size=size)
    samples = []
    for i in range(plan.pipeline_images):
        b, key = base[i % len(base)], f"gpucheck_{i:06d}"
        samples.append(Sample(key, {**b.meta, "key": key}, b.image))
    shard_set = write_shards(samples, work / "shards", "gpucheck", plan.shard_size, log=lambda *_: None)
    paths = [work / "shards" / s["file"] for s in shard_set.shards]
    return Shards(samples, paths, shard_set.pattern, [s["samples"] for s in shard_set.shards])


# ---------------------------------------------------------------------------------------------------- (c) pipeline
def section_pipeline(plan: Plan, report: dict, work: Path, shards: Callable[[], Shards]) -> None:
    """jobs.attribute end to end with one (GPU) actor vs a bare loop of the same calls."""
    from bench.gpu_probe import ProbeWorker, read_probe_stats
    from bench.pipeline import bare_loop
    from jobs.attribute import AttributeConfig, run
    from jobs.common import ensure_ray
    from workers.attribution_worker import WorkerConfig

    out: dict[str, Any] = report["pipeline"]
    data = shards()
    n, batch, device, precision = len(data.samples), plan.pipeline_batch, plan.device, plan.pipeline_precision
    out.update(model=plan.pipeline_model, methods=plan.pipeline_methods, targets=plan.pipeline_targets,
               precision=precision, images=n, batch=batch, shards=len(data.paths),
               unique_images=plan.pipeline_unique)
    spec = models.load(plan.pipeline_model, None, device=device)
    with compute_precision(precision, device):
        bare_loop(spec, data.samples[:batch], plan.pipeline_methods, plan.pipeline_targets, batch)  # warm-up
        bare_s = bare_loop(spec, data.samples, plan.pipeline_methods, plan.pipeline_targets, batch)
    out["bare_loop_seconds"] = bare_s
    out["bare_loop_images_per_second"] = bare_ips = n / bare_s
    del spec
    free_memory(device)

    t0 = time.perf_counter()
    ensure_ray()
    out["ray_start_seconds"] = time.perf_counter() - t0
    stats_dir = work / "actor_stats"
    worker = WorkerConfig(model=plan.pipeline_model, methods=plan.pipeline_methods, targets=plan.pipeline_targets,
                          precision=precision, device=None if device.type == "cuda" else "cpu")
    config = AttributeConfig(shards=[data.pattern], out=str(work / "maps"), worker=worker, batch_size=batch,
                             quiet=True, overwrite=True)
    sampler = GpuSampler(gpu_index()) if device.type == "cuda" else contextlib.nullcontext()
    with sampler:
        wall0 = time.time()
        start = time.perf_counter()
        summary = run(config, worker_cls=ProbeWorker, worker_kwargs={"stats_dir": str(stats_dir)})
        seconds = time.perf_counter() - start
    stats = read_probe_stats(stats_dir)
    out.update(seconds=seconds, images_per_second=summary["samples"] / seconds if seconds > 0 else None,
               maps_written=summary["maps_written"], errors=summary["errors"], samples=summary["samples"],
               actors=stats["actors"], actor_batches=stats["calls"])
    out["ratio_to_bare"] = out["images_per_second"] / bare_ips if out["images_per_second"] else None
    steady = None
    if stats["first_end"] is not None and stats["last_end"] > stats["first_end"] and stats["steady_images"]:
        steady = stats["steady_images"] / (stats["last_end"] - stats["first_end"])
    out["steady_images_per_second"] = steady
    out["steady_ratio_to_bare"] = steady / bare_ips if steady else None
    out["actor_ready_seconds"] = stats["ready"] - wall0 if stats["ready"] is not None else None
    out["peak_gpu_memory_bytes"] = stats["peak_allocated_bytes"]
    out["peak_gpu_memory_reserved_bytes"] = stats["peak_reserved_bytes"]
    if isinstance(sampler, GpuSampler):
        out["gpu_busy_fraction"] = sampler.busy_fraction(wall0, wall0 + seconds)
        out["gpu_busy_fraction_steady"] = sampler.busy_fraction(stats["first_end"], stats["last_end"])
        out["device_memory_used_peak_bytes"] = sampler.peak_used_bytes()
        out["gpu_sampler"] = {"source": sampler.source, "samples": len(sampler.samples), "error": sampler.error}
    else:
        out.update(gpu_busy_fraction=None, gpu_busy_fraction_steady=None, device_memory_used_peak_bytes=None,
                   gpu_sampler=None)
    if summary["samples"] != n or summary["errors"]:
        out["problem"] = f"{summary['samples']} of {n} images done, {summary['errors']} error rows"
    out["maps_dir"] = config.out
    mib = (lambda v: fmt(v / 2**20, 0) if v is not None else "-")
    print_table(f"(c) pipeline: {plan.pipeline_model} {','.join(plan.pipeline_methods)} {plan.pipeline_targets} "
                f"{precision}, {n} images, batch {batch}, {device}",
                ["run", "img/s", "x bare", "GPU busy", "peak GPU MiB"],
                [["bare loop (this process)", fmt(bare_ips), "1.00", "-", "-"],
                 [f"jobs.attribute ({seconds:.1f} s, Ray start {out['ray_start_seconds']:.1f} s apart)",
                  fmt(out["images_per_second"]), fmt(out["ratio_to_bare"], 2), fmt(out["gpu_busy_fraction"], 2),
                  mib(out["peak_gpu_memory_bytes"])],
                 [f"  steady (actor ready after {fmt(out['actor_ready_seconds'])} s)", fmt(steady),
                  fmt(out["steady_ratio_to_bare"], 2), fmt(out["gpu_busy_fraction_steady"], 2), ""]])


# ---------------------------------------------------------------------------------------------------- (d) evaluate
def section_evaluate(plan: Plan, report: dict, work: Path, shards: Callable[[], Shards]) -> None:
    """jobs.evaluate's perturbation metrics: end to end, in process, and the forward-pass floor."""
    import pyarrow as pa

    from jobs.attribute import AttributeConfig
    from jobs.attribute import run as attribute_run
    from jobs.evaluate import EvaluateJobConfig
    from jobs.evaluate import run as evaluate_run
    from workers.attribution_worker import WorkerConfig
    from workers.decode import decode_batch
    from workers.evaluate_worker import EvaluateConfig, EvaluateWorker
    from workers.shards import RAW_SCHEMA, read_shard, shard_name
    from workers.sink import OutputStore

    out: dict[str, Any] = report["evaluate"]
    data = shards()
    device, batch, model = plan.device, plan.pipeline_batch, plan.pipeline_model
    count, total = 0, 0
    while count < len(data.paths) and total < plan.evaluate_images:
        total += data.sizes[count]
        count += 1
    uris = [str(p) for p in data.paths[:count]]
    maps_dir = report["pipeline"].get("maps_dir")
    methods = report["pipeline"].get("methods")
    committed = set(OutputStore(maps_dir).committed()) if maps_dir else set()
    if not maps_dir or not {shard_name(u) for u in uris} <= committed:
        maps_dir, methods = str(work / "maps_evaluate"), ["gradcam"]
        worker = WorkerConfig(model=model, methods=methods, targets="top1", device=None if device.type == "cuda"
                              else "cpu")
        attribute_run(AttributeConfig(shards=uris, out=maps_dir, worker=worker, batch_size=batch, quiet=True,
                                      overwrite=True))
        out["maps"] = "a gradcam top1 run made for this section (the pipeline section's maps were not there)"
    else:
        out["maps"] = "the pipeline section's maps"
    precision_field = "precision" in {f.name for f in dataclasses.fields(EvaluateConfig)}
    precision = plan.pipeline_precision if precision_field else None
    ecfg = EvaluateConfig(attributions=maps_dir, model=model, metrics=list(plan.evaluate_metrics),
                          device=None if device.type == "cuda" else "cpu",
                          **({"precision": precision} if precision_field else {}))
    per_map = 0
    if "morf" in ecfg.metrics:
        per_map += len(ecfg.morf_fractions())
    if "lerf" in ecfg.metrics:
        per_map += len(ecfg.morf_fractions())
    if "insertion" in ecfg.metrics:
        per_map += len(ecfg.insertion_fractions()) + 1  # + the unperturbed image's reference forward
    for name in ("road_morf", "road_lerf"):
        if name in ecfg.metrics:
            per_map += len(ecfg.road_fractions)
    forwards_per_image = per_map * len(methods)  # one primary (top-1) map per image and method
    out.update(model=model, metrics=ecfg.metrics, methods=methods, shards=count, images=total, batch=batch,
               chunk_size=ecfg.chunk_size, forwards_per_image=forwards_per_image,
               precision=precision or "torch defaults (jobs.evaluate has no precision option yet)")

    job = EvaluateJobConfig(out=str(work / "metrics"), worker=ecfg, shards=uris, dataset_metrics=[],
                            batch_size=batch, overwrite=True, quiet=True)
    start = time.perf_counter()
    summary = evaluate_run(job)
    seconds = time.perf_counter() - start
    out.update(seconds=seconds, samples=summary["samples"], metric_rows=summary["metric_rows"],
               errors=summary["errors"], images_per_second=summary["samples"] / seconds if seconds > 0 else None)
    if summary["samples"] != total or summary["errors"]:
        out["problem"] = f"{summary['samples']} of {total} images done, {summary['errors']} error rows"

    # the actor class in this process: decoded batches in, metric rows out (no Ray), steady state
    rows: list[dict] = []
    for uri in uris:
        rows += read_shard(uri)
        if len(rows) >= plan.evaluate_worker_images:
            break
    rows = rows[:plan.evaluate_worker_images]
    preprocessing = models.preprocessing_for(model, None)
    decoded = decode_batch(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), preprocessing)
    batches = [decoded.slice(i, batch) for i in range(0, decoded.num_rows, batch)]
    evaluator = EvaluateWorker(ecfg)
    timed = batches[1:] or batches
    if len(batches) > 1:
        evaluator(batches[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    for b in timed:
        evaluator(b)
    sync(device)
    worker_s = time.perf_counter() - start
    worker_images = sum(b.num_rows for b in timed)
    out.update(worker_images=worker_images, worker_seconds=worker_s, worker_images_per_second=worker_images / worker_s)
    spec = evaluator.spec
    del evaluator

    # floor: the same perturbed images (count per image) through the model, bare, in the job's chunks
    chunk = ecfg.chunk_size
    size = spec.preprocessing.input_size
    floor_forwards = total * forwards_per_image
    if plan.evaluate_floor_forwards:
        floor_forwards = min(floor_forwards, plan.evaluate_floor_forwards)
    chunks = max(1, math.ceil(floor_forwards / chunk))
    x = torch.randn(chunk, 3, size, size, generator=torch.Generator().manual_seed(plan.seed)).to(device)
    context = compute_precision(precision, device) if precision else contextlib.nullcontext()
    with torch.inference_mode(), context:
        spec.module(x)  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(chunks):
            spec.module(x).float().softmax(dim=1)
        sync(device)
        floor_s = time.perf_counter() - start
    fps = chunks * chunk / floor_s
    out.update(floor_forwards_timed=chunks * chunk, floor_seconds=floor_s, floor_forwards_per_second=fps,
               floor_images_per_second=fps / forwards_per_image)
    out["ratio_to_floor"] = out["images_per_second"] / out["floor_images_per_second"]
    out["worker_ratio_to_floor"] = out["worker_images_per_second"] / out["floor_images_per_second"]
    del spec, x
    free_memory(device)
    print_table(f"(d) evaluate: {model} {','.join(ecfg.metrics)} on {total} images x {len(methods)} method(s), "
                f"{forwards_per_image} forwards per image, chunks of {chunk}, {device}",
                ["run", "img/s", "x floor"],
                [[f"jobs.evaluate end to end ({seconds:.1f} s)", fmt(out["images_per_second"]),
                  fmt(out["ratio_to_floor"], 2)],
                 [f"EvaluateWorker in process ({worker_images} images)", fmt(out["worker_images_per_second"]),
                  fmt(out["worker_ratio_to_floor"], 2)],
                 [f"forward floor ({fps:.0f} forwards/s)", fmt(out["floor_images_per_second"]), "1.00"]])


# ---------------------------------------------------------------------------------------------------- main
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
