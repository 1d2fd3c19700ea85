"""Time per image of the attribution methods, next to a reference library and the compute floor.

    python -m bench.methods [--model resnet18] [--batch 8] [--repeats 3] [--device cpu|cuda]
                            [--out bench/results/methods.json]

For each of the five core methods (``--methods all``: every method in ``attribution.methods.REGISTRY``; the
baselines get the 1 forward + 1 backward floor) the same model, batch and (mixed) targets are timed three ways,
interleaved round by round so that a busy machine slows all of them alike:

* **ours**: ``attribution.methods.attribute(method, spec, images, targets)``;
* **reference**: the reference library's equivalent where one exists (Captum ``Saliency``, ``GuidedBackprop``,
  ``LayerGradCam`` + bilinear ``interpolate``; ``pytorch_grad_cam.GradCAM``); none for TR-GBP and A-FMI.
  Captum's guided backprop needs one non-in-place ``nn.ReLU`` module per call site, so it runs on a private deep
  copy whose ReLUs are distinct non-in-place modules (ResNet blocks get a patched ``forward``; ReLU6 becomes an
  ``nn.ReLU`` subclass computing relu6, for which Captum's rule relu(grad_in) is exactly guided ReLU6);
* **floor**: the passes the method cannot avoid, in plain autograd: one forward and one input-gradient backward
  per class column (saliency, gbp, gradcam; Grad-CAM's own backward stops at the target layer, so it can and
  does come in well under this floor), one forward and one backward per top-5 class (+1 per target column
  outside the top 5) for tr_gbp, and for a_fmi one no-grad forward of the features over the batch plus the
  reference image, then the head forward (paired batch) and one backward to the feature maps per column.

Reported: median seconds per image over ``--repeats`` timed runs after one warm-up run (min and all runs go into
the JSON), ours/reference, ours/floor (goal <= 1.15) and tr_gbp/gbp (goal <= 3). Each reference map is also
compared with ours (max |ours - ref| / max |ref|) so a fast-but-wrong method shows up.

Random-weight torchvision models have all-zero effective biases (fresh BatchNorm is the identity, VGG's biases
are initialised to 0), which would let TR-GBP skip every bias unit. Unless ``--init-stats keep`` is given (or
real weights are loaded), BatchNorm statistics/affine parameters and conv/linear biases are given random
non-zero values, as in a trained network; the timing of the other methods does not depend on it.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attribution import models
from attribution.methods import REGISTRY, attribute

DEFAULT_OUT = Path("bench/results/methods.json")
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera")
TOP_K = 5  # TR-GBP's default top_k: its floor is one backward per top-k class
# The methods this benchmark is about (the registry also holds slower baselines such as RISE: use --methods all).
CORE_METHODS = ("saliency", "gbp", "gradcam", "tr_gbp", "a_fmi")
GOAL_FLOOR = 1.15
GOAL_TR_GBP = 3.0


# ---------------------------------------------------------------------------------------------------- inputs
def build_spec(name: str, weights: str | None, init_stats: str, device: torch.device, seed: int) -> models.ModelSpec:
    """The model under test, in eval mode on ``device``."""
    spec = models.load(name, weights=weights, seed=seed)
    if weights is None and init_stats == "random":
        randomise_biases(spec.module, seed + 1)
    return spec.to(device)


def randomise_biases(module: nn.Module, seed: int) -> None:
    """Give every BatchNorm random running statistics and affine parameters and every conv/linear bias random
    values (a trained network's effective biases are non-zero; a freshly initialised one's are all zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)


def photo_batch(spec: models.ModelSpec, batch: int) -> Tensor:
    """``batch`` real photographs from scikit-image (cycled), normalised [B, 3, S, S]."""
    from PIL import Image
    from skimage import data
    tensors = [spec.preprocessing(Image.fromarray(np.asarray(getattr(data, n)()))) for n in PHOTOS]
    return torch.stack([tensors[i % len(tensors)] for i in range(batch)])


def build_images(spec: models.ModelSpec, kind: str, batch: int, seed: int) -> Tensor:
    size = spec.preprocessing.input_size
    if kind == "photos":
        images = photo_batch(spec, batch)
    else:
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images.to(spec.device)


def mixed_targets(spec: models.ModelSpec, images: Tensor) -> Tensor:
    """Image i gets its own rank-(i mod 5) predicted class: different classes and ranks within one batch, all
    inside the top 5 (so TR-GBP needs exactly 5 backward passes)."""
    with torch.no_grad():
        top = spec.module(images).topk(TOP_K, dim=1).indices
    rank = torch.arange(images.shape[0], device=images.device) % TOP_K
    return top.gather(1, rank[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------------- references
class GuidedReLU6(nn.ReLU):
    """relu6 as an ``nn.ReLU`` subclass, so that Captum's guided-backprop hook (grad_in <- relu(grad_in), attached to
    every ``nn.ReLU``) applies: relu(grad_out · 1[0 < x < 6]) is exactly the guided ReLU6 rule."""

    def __init__(self) -> None:
        super().__init__(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x)


def _basic_block_forward(self, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu_a(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu_b(out + identity)


def _bottleneck_forward(self, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu_a(self.bn1(self.conv1(x)))
    out = self.relu_b(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu_c(out + identity)


def distinct_relu_copy(module: nn.Module) -> nn.Module:
    """A deep copy in which every ReLU call site has its own non-in-place ``nn.ReLU`` (ReLU6: :class:`GuidedReLU6`)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    clone = copy.deepcopy(module)
    for m in list(clone.modules()):
        if isinstance(m, BasicBlock):
            m.relu_a, m.relu_b = nn.ReLU(), nn.ReLU()
            m.forward = types.MethodType(_basic_block_forward, m)
            del m.relu
        elif isinstance(m, Bottleneck):
            m.relu_a, m.relu_b, m.relu_c = nn.ReLU(), nn.ReLU(), nn.ReLU()
            m.forward = types.MethodType(_bottleneck_forward, m)
            del m.relu
    for parent in list(clone.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, child_name, nn.ReLU())
            elif type(child) is nn.ReLU6:
                setattr(parent, child_name, GuidedReLU6())
    return clone.eval()


def reference_fns(method: str, spec: models.ModelSpec, images: Tensor, targets: Tensor) -> dict[str, Callable]:
    """Reference implementations of ``method``: label -> fn() returning maps [B, H, W] comparable with ours."""
    size = tuple(images.shape[-2:])
    if method == "saliency":
        from captum.attr import Saliency
        saliency = Saliency(spec.module)
        return {"captum.Saliency": lambda: saliency.attribute(images, target=targets, abs=True).amax(dim=1)}
    if method == "gbp":
        from captum.attr import GuidedBackprop
        guided = GuidedBackprop(distinct_relu_copy(spec.module))
        return {"captum.GuidedBackprop": lambda: guided.attribute(images, target=targets).sum(dim=1)}
    if method == "gradcam":
        from captum.attr import LayerAttribution, LayerGradCam
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        layer_cam = LayerGradCam(spec.module, spec.target_layer)

        def captum_gradcam() -> Tensor:
            cam = layer_cam.attribute(images, target=targets, relu_attributions=True)
            return LayerAttribution.interpolate(cam, size, "bilinear")[:, 0]

        # pytorch-grad-cam calls loss.backward() (fills parameters' .grad): give it a private copy of the model.
        pgc_model = copy.deepcopy(spec.module)
        pgc_layer = _same_submodule(spec.module, spec.target_layer, pgc_model)
        pgc_targets = [ClassifierOutputTarget(int(t)) for t in targets]

        def pgc_gradcam() -> Tensor:
            with PGCGradCAM(model=pgc_model, target_layers=[pgc_layer]) as cam:
                out = cam(input_tensor=images, targets=pgc_targets)  # numpy [B, H, W], min-max scaled per image
            pgc_model.zero_grad(set_to_none=True)
            return torch.from_numpy(out)

        return {"captum.LayerGradCam+interpolate": captum_gradcam, "pytorch_grad_cam.GradCAM": pgc_gradcam}
    return {}


def _same_submodule(original: nn.Module, sub: nn.Module, clone: nn.Module) -> nn.Module:
    name = next(n for n, m in original.named_modules() if m is sub)
    return clone.get_submodule(name)


def _minmax(maps: Tensor) -> Tensor:
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo + 1e-7)).view_as(maps)


def agreement(method: str, label: str, ours: Tensor, ref: Tensor) -> float:
    """max |ours − ref| / max |ref| (pytorch-grad-cam min-max scales its maps: ours is scaled alike first)."""
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    if label.startswith("pytorch_grad_cam"):
        ours = _minmax(ours)
    if ours.shape != ref.shape:
        return float("nan")
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


# ---------------------------------------------------------------------------------------------------- floors
def floor_passes(method: str, spec: models.ModelSpec, images: Tensor, targets: Tensor) -> tuple[Callable, str]:
    """The unavoidable passes of ``method`` in plain autograd, and a description of them."""
    columns = targets[:, None]
    if method == "tr_gbp":
        with torch.no_grad():
            top = spec.module(images).topk(TOP_K, dim=1).indices
        extra = [] if bool((top == targets[:, None]).any(1).all()) else [targets[:, None]]
        columns = torch.cat([top, *extra], dim=1)
    if method == "a_fmi":
        from attribution.methods.a_fmi import reference_images
        ref = reference_images(spec, "black", images)

        def head_floor() -> None:
            with torch.no_grad():
                both = spec.features(torch.cat([images, ref]))
            b = images.shape[0]
            leaf = both[:b].clone().requires_grad_(True)
            logits = spec.head(torch.cat([leaf, both[b:].expand_as(leaf)]))[:b]
            for m in range(columns.shape[1]):
                torch.autograd.grad(logits.gather(1, columns[:, m:m + 1]).sum(), leaf,
                                    retain_graph=m < columns.shape[1] - 1)

        return head_floor, "features fwd (B+1, no grad) + head fwd (2B) + 1 head bwd"

    def backprop_floor() -> None:
        x = images.detach().requires_grad_(True)
        logits = spec.module(x)
        for m in range(columns.shape[1]):
            torch.autograd.grad(logits.gather(1, columns[:, m:m + 1]).sum(), x, retain_graph=m < columns.shape[1] - 1)

    return backprop_floor, f"1 fwd + {columns.shape[1]} input-grad bwd"


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForeignLoad:
    """CPU time other processes used while a timed call ran, in cores (Linux /proc/stat; None elsewhere).

    Timings on a shared machine are only comparable when nobody else computes meanwhile: with 2 cores and a
    second busy process, OpenMP threads wait on each other and a run can be 10x slower."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy_s(self) -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / self.tick

    def start(self) -> None:
        self._busy0, self._own0, self._wall0 = self._busy_s(), _own_cpu_s(), time.perf_counter()

    def stop(self) -> float | None:
        busy = self._busy_s()
        wall = time.perf_counter() - self._wall0
        if busy is None or self._busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self._busy0) - (_own_cpu_s() - self._own0)) / wall


def wait_until_quiet(meter: ForeignLoad, max_foreign: float, budget_s: float) -> None:
    """Sleep in 0.3 s probes until other processes use at most ``max_foreign`` cores (or ``budget_s`` is spent)."""
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline:
        meter.start()
        time.sleep(0.3)
        load = meter.stop()
        if load is None or load <= max_foreign:
            return


def retain_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory instead of returning it to the OS (mallopt: mmap threshold 1 GiB,
    no trimming). PyTorch's CPU allocator does not cache, so by default every large tensor is a fresh mmap whose
    pages fault in one by one: on a small VM that page-fault (system) time is a large, noisy share of each
    backward pass. Returns False where this is not glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)
                    and libc.mallopt(m_top_pad, 1 << 28))
    except (OSError, AttributeError):
        return False


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def interleaved(fns: dict[str, Callable], repeats: int, device: torch.device, max_foreign: float,
                retries: int, wait_quiet_s: float = 0.0
                ) -> tuple[dict, dict[str, list[float]], dict[str, list[float | None]]]:
    """One warm-up call of each fn (its result kept), then ``repeats`` rounds timing each fn once per round.

    A timed call during which other processes used more than ``max_foreign`` cores is retried (after a short
    pause) up to ``retries`` times; the foreign load of each kept run is returned too. With ``wait_quiet_s`` > 0,
    each timed call first waits up to that long for the other processes to go quiet."""
    results: dict[str, Any] = {}
    for label, fn in fns.items():
        results[label] = fn()
        _sync(device)
    times: dict[str, list[float]] = {label: [] for label in fns}
    loads: dict[str, list[float | None]] = {label: [] for label in fns}
    meter = ForeignLoad()
    for _ in range(repeats):
        for label, fn in fns.items():
            for attempt in range(retries + 1):
                if wait_quiet_s > 0:
                    wait_until_quiet(meter, max_foreign, wait_quiet_s)
                gc.collect()
                _sync(device)
                meter.start()
                start = time.perf_counter()
                fn()
                _sync(device)
                elapsed = time.perf_counter() - start
                foreign = meter.stop()
                if foreign is None or foreign <= max_foreign or attempt == retries:
                    break
                time.sleep(0.5)
            times[label].append(elapsed)
            loads[label].append(foreign)
    return results, times, loads


def _stats(times: list[float], loads: list[float | None], batch: int) -> dict[str, Any]:
    per_image = [t / batch for t in times]
    return {"s_per_image": statistics.median(per_image), "min_s_per_image": min(per_image),
            "runs_s_per_image": per_image,
            "foreign_cores": [None if v is None else round(v, 2) for v in loads]}


def bench_method(method: str, spec: models.ModelSpec, images: Tensor, targets: Tensor, repeats: int,
                 max_foreign: float = 0.3, retries: int = 1, wait_quiet_s: float = 0.0) -> dict:
    batch = images.shape[0]
    refs = reference_fns(method, spec, images, targets)
    floor, floor_desc = floor_passes(method, spec, images, targets)
    fns = {"ours": lambda: attribute(method, spec, images, targets), **refs, "floor": floor}
    results, times, loads = interleaved(fns, repeats, spec.device, max_foreign, retries, wait_quiet_s)
    ours = _stats(times["ours"], loads["ours"], batch)
    floor_stats = _stats(times["floor"], loads["floor"], batch)
    row: dict[str, Any] = {"method": method, "ours": ours, "floor": {**floor_stats, "passes": floor_desc},
                           "ours_over_floor": ours["s_per_image"] / floor_stats["s_per_image"], "references": []}
    for label in refs:
        ref_stats = _stats(times[label], loads[label], batch)
        row["references"].append({"name": label, **ref_stats,
                                  "ours_over_reference": ours["s_per_image"] / ref_stats["s_per_image"],
                                  "max_rel_diff": agreement(method, label, results["ours"], results[label])})
    return row


# ---------------------------------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    head = ("method", "ours s/img", "reference", "ref s/img", "ours/ref", "ref diff", "floor s/img", "ours/floor")
    lines = []
    for row in rows:
        refs = row["references"] or [None]
        for i, ref in enumerate(refs):
            first = i == 0
            lines.append((
                row["method"] if first else "",
                f"{row['ours']['s_per_image']:.4f}" if first else "",
                ref["name"] if ref else "-",
                f"{ref['s_per_image']:.4f}" if ref else "-",
                f"{ref['ours_over_reference']:.2f}" if ref else "-",
                f"{ref['max_rel_diff']:.1e}" if ref else "-",
                f"{row['floor']['s_per_image']:.4f}" if first else "",
                f"{row['ours_over_floor']:.2f}" if first else "",
            ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def summary(rows: list[dict]) -> tuple[dict, list[str]]:
    by_name = {r["method"]: r for r in rows}
    goals: dict[str, Any] = {}
    lines = []
    if "tr_gbp" in by_name and "gbp" in by_name:
        ratio = by_name["tr_gbp"]["ours"]["s_per_image"] / by_name["gbp"]["ours"]["s_per_image"]
        floor_ratio = by_name["tr_gbp"]["floor"]["s_per_image"] / by_name["gbp"]["floor"]["s_per_image"]
        goals["tr_gbp_over_gbp"] = {"value": ratio, "goal": GOAL_TR_GBP, "met": ratio <= GOAL_TR_GBP,
                                    "floor_ratio": floor_ratio}
        lines.append(f"  tr_gbp / gbp = {ratio:.2f}  (goal <= {GOAL_TR_GBP:g}: {'met' if ratio <= GOAL_TR_GBP else 'NOT met'}; "
                     f"the same ratio of the floors: {floor_ratio:.2f})")
    for r in rows:
        v = r["ours_over_floor"]
        goals[f"{r['method']}_over_floor"] = {"value": v, "goal": GOAL_FLOOR, "met": v <= GOAL_FLOOR}
        lines.append(f"{r['method']:>8} / floor = {v:.2f}  (goal <= {GOAL_FLOOR:g}: {'met' if v <= GOAL_FLOOR else 'NOT met'}; "
                     f"floor: {r['floor']['passes']})")
    return goals, lines


def _disturbed_runs(row: dict, max_foreign: float) -> int:
    entries = [row["ours"], row["floor"], *row["references"]]
    return sum(1 for e in entries for v in e["foreign_cores"] if v is not None and v > max_foreign)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("torchvision", "captum", "grad-cam"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _git_commit() -> str | None:
    """HEAD of the checkout the benchmark ran from (+ "-dirty" when attribution/ has uncommitted changes)."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "attribution"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=models.MODEL_NAMES)
    p.add_argument("--weights", default=None,
                   help="weights for models.load (default: 'imagenet' for efficientnet_lite0, else random)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--images", default="auto", choices=("auto", "random", "photos"),
                   help="random normal tensors or real scikit-image photos (auto: photos with real weights)")
    p.add_argument("--init-stats", default="random", choices=("random", "keep"),
                   help="random-weight models: give BatchNorm stats and biases random non-zero values (default)")
    p.add_argument("--methods", default=",".join(CORE_METHODS),
                   help=f"comma-separated registry names, or 'all' (default: {','.join(CORE_METHODS)})")
    p.add_argument("--malloc", default="system", choices=("system", "retain"),
                   help="CPU memory: glibc's default (system), or keep freed memory in the process (retain: "
                        "removes page-fault time, as jemalloc/tcmalloc would)")
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
    if args.images == "auto":
        args.images = "random" if args.weights is None else "photos"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module=r"captum\..*")  # "Setting backward hooks on ReLU activations" etc.
    warnings.filterwarnings("ignore", message=".*backward hook.*")
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
    print(f"bench: {args.model} (weights={args.weights or 'random'}), batch {args.batch}, {args.images} images, "
          f"targets {targets.tolist()}, {args.repeats} repeats, {device} ({_device_name(device)}), "
          f"{torch.get_num_threads()} threads, malloc {malloc}, torch {torch.__version__}, commit {_git_commit()}",
          flush=True)

    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        row = bench_method(method, spec, images, targets, args.repeats, args.max_foreign, args.retries,
                           args.wait_quiet)
        rows.append(row)
        disturbed = _disturbed_runs(row, args.max_foreign)
        print(f"  {method}: ours {row['ours']['s_per_image']:.4f} s/img, floor {row['floor']['s_per_image']:.4f} "
              f"s/img ({time.perf_counter() - t0:.1f} s"
              f"{f'; {disturbed} timed runs shared the CPU with other processes' if disturbed else ''})", flush=True)

    goals, goal_lines = summary(rows)
    disturbed = sum(_disturbed_runs(r, args.max_foreign) for r in rows)
    print()
    print(table(rows))
    print()
    print("\n".join(goal_lines))
    if disturbed:
        print(f"WARNING: {disturbed} timed runs overlapped other processes using > {args.max_foreign:g} cores "
              f"(after {args.retries} retries each): timings are noisy, rerun on a quiet machine")
    report = {
        "model": args.model, "weights": args.weights, "init_stats": args.init_stats if args.weights is None else None,
        "batch": args.batch, "repeats": args.repeats, "images": args.images, "targets": targets.tolist(),
        "device": str(device), "device_name": _device_name(device), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "malloc": malloc, "versions": _versions(), "git_commit": _git_commit(), "torch": torch.__version__,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "timing": "median over repeats of wall seconds per image after one warm-up; ours, references and floor "
                  "interleaved round by round",
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
