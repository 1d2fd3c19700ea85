"""How a model-pinning actor sets up its device and moves a batch onto it, in one place (all three workers).

On CUDA: ``cudnn.benchmark`` (a run has one input size, so the autotuned kernels are reused for every batch),
channels_last weights and images where it pays (bf16/fp16 autocast: tensor-core convolutions are NHWC; the
``channels_last`` setting forces it either way), and each batch's uint8 pixels copied from pinned host memory
with ``non_blocking`` (the normalisation runs on the device). On the CPU none of it applies unless forced.

On every device the actor's process keeps the memory it frees (:func:`retain_freed_memory`; ``XAI_MALLOC=system``
keeps glibc's defaults): PyTorch's CPU allocator does not cache, so without it every large tensor — on the CPU the
activations and gradients, on a GPU the host copies of a batch's maps — is a fresh mmap whose pages fault in one by
one.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

import numpy as np
import torch

from attribution import models
from attribution.errors import AttributionError

HALF_PRECISIONS = ("bf16", "fp16")


def load_model(model: str, weights: str | None, device: str | None, threads: int | None, precision: str = "fp32",
               channels_last: bool | None = None) -> tuple[models.ModelSpec, bool]:
    """The actor's own copy of ``model`` on ``device`` (None: CUDA when available), with ``threads`` torch CPU
    threads (None: leave as is). Returns (spec, whether images go in channels_last). ``channels_last`` None: on
    CUDA with a half ``precision``, else not. The device is checked first (:func:`resolve_device`). Also makes this
    process keep the memory it frees (module docstring) unless ``XAI_MALLOC=system``."""
    if threads:
        torch.set_num_threads(threads)
    if os.environ.get("XAI_MALLOC", "retain") != "system":
        retain_freed_memory()
    target = resolve_device(device, precision)
    spec = models.load(model, weights, device=target)
    use_nhwc = channels_last if channels_last is not None else (target.type == "cuda"
                                                                and precision in HALF_PRECISIONS)
    if target.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if use_nhwc:
        spec.module.to(memory_format=torch.channels_last)  # the actor's own model, loaded above
    return spec, use_nhwc


def resolve_device(device: str | None, precision: str = "fp32") -> torch.device:
    """The torch device an actor computes on: ``device`` (None: CUDA when available, else the CPU), or one
    AttributionError line naming why it cannot be used, before any model is loaded:

    * CUDA asked for (the jobs give every actor that holds a GPU ``cuda``) but this torch sees no GPU: a CPU-only
      torch wheel, a driver older than the wheel's CUDA, or ``CUDA_VISIBLE_DEVICES`` empty. Without this check such
      an actor would run the whole job on one CPU thread while its GPU idles.
    * ``precision`` bf16 on a GPU without bf16 tensor cores (compute capability below 8.0: V100, T4), where autocast
      would emulate bf16 more slowly than fp32; fp16 is the half precision such GPUs have."""
    target = torch.device(device) if device else models.default_device()
    if target.type != "cuda":
        return target
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
        raise AttributionError(f"device {target} asked for, but torch {torch.__version__} ({build}) sees no GPU on "
                               f"{platform.node()}{shown}: install a torch build that matches the node's CUDA "
                               f"driver, or run the actors on the CPU (--device cpu)")
    if precision == "bf16" and torch.cuda.get_device_capability(target) < (8, 0):
        major, minor = torch.cuda.get_device_capability(target)
        raise AttributionError(f"--precision bf16 needs bf16 tensor cores (compute capability 8.0 or newer); "
                               f"{torch.cuda.get_device_name(target)} has {major}.{minor}: use fp16, tf32 or fp32")
    return target


def retain_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory instead of returning it to the OS (mallopt: mmap threshold 1 GiB, no
    trimming, 256 MiB top pad), for this whole process. PyTorch's CPU allocator does not cache, so by default every
    large tensor is a fresh mmap whose pages fault in one by one, each zeroed by the kernel. Measured
    (bench/malloc.py, ResNet-18, 5 methods, top-5, 1 thread, batches of 16): ~1.3 million page faults per batch ->
    ~1,000, 9-19 % less CPU time (three runs), peak resident set +11 %, flat from call to call. Returns False where
    this is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)
                    and libc.mallopt(m_top_pad, 1 << 28))
    except (OSError, AttributeError):
        return False


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device (or the host) running out of memory: torch's OutOfMemoryError (CUDA), or a
    RuntimeError saying so (the CPU allocator's "not enough memory", other backends' "out of memory")."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


class DeviceLostError(RuntimeError):
    """An actor's GPU stopped working again after Ray restarted the actor: the job stops
    (:func:`exit_if_device_lost`)."""


DEVICE_LOST_EXIT_CODE = 75  # the status an actor process ends with when its CUDA context is lost


def device_is_healthy(device: torch.device) -> bool:
    """False when ``device`` is a CUDA device whose context no longer works — after a sticky error (an illegal
    memory access, a device-side assert, an uncorrectable ECC error) a synchronize or a one-element kernel fails;
    always True on the CPU."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return bool((torch.ones(1, device=device) + 1).item() == 2)
    except Exception:  # noqa: BLE001 -- whatever CUDA raises here means the context is gone
        return False


def exit_if_device_lost(device: torch.device, reason: str) -> None:
    """Call after a failure on ``device`` (``reason``: its one-line message). If the device no longer works
    (:func:`device_is_healthy`), every later batch of this process would fail too, and those failures would be
    committed as error rows; instead the actor process ends (status DEVICE_LOST_EXIT_CODE), so that Ray starts a new
    actor (a fresh CUDA context) and runs the batch again, as after any actor crash. An actor that Ray already
    restarted raises DeviceLostError instead: a second loss means a broken GPU or a fault that recurs, and the job
    stops with that line rather than restart forever (Ray Data restarts actors without limit). Outside a Ray actor
    (a worker called in-process, e.g. by a benchmark) it raises DeviceLostError too. Returns when the device
    works."""
    if device_is_healthy(device):
        return
    in_actor = restarted = False
    try:
        import ray
        if ray.is_initialized():
            context = ray.get_runtime_context()
            in_actor = context.get_actor_id() is not None
            restarted = in_actor and context.was_current_actor_reconstructed
    except Exception:  # noqa: BLE001 -- no Ray context to ask: not an actor
        pass
    where = f"{device} on {platform.node()}"
    if not in_actor:
        raise DeviceLostError(f"{where} stopped working ({reason})")
    if restarted:
        raise DeviceLostError(f"{where} stopped working again after the actor was restarted ({reason})")
    print(f"{where} stopped working ({reason}); ending this actor so that Ray restarts it", file=sys.stderr,
          flush=True)
    os._exit(DEVICE_LOST_EXIT_CODE)


def release_cached_memory(device: torch.device) -> None:
    """Give the blocks PyTorch's CUDA allocator caches back to the device (after an out-of-memory error, so that a
    smaller retry starts from a defragmented pool); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (else ``platform.processor()``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_images(spec: models.ModelSpec, pixels: np.ndarray, channels_last: bool = False) -> torch.Tensor:
    """uint8 pixels [N, 3, S, S] (host) -> normalised float32 images [N, 3, S, S] on the model's device: one
    copy of the uint8 batch (pinned and non-blocking on CUDA), then /255 and the model's normalisation there."""
    host = torch.from_numpy(np.ascontiguousarray(pixels))
    if spec.device.type == "cuda":
        host = host.pin_memory()
    images = spec.preprocessing.normalise(host.to(spec.device, non_blocking=True).float() / 255.0)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


__all__ = ["DEVICE_LOST_EXIT_CODE", "DeviceLostError", "HALF_PRECISIONS", "device_images", "device_name", "device_is_healthy",
           "exit_if_device_lost", "is_out_of_memory", "load_model", "release_cached_memory", "resolve_device",
           "retain_freed_memory"]
