"""Compute precision of attribution and metric passes: one context manager, used by every method and job.

    with compute_precision("bf16", device):      # autocast forward + backward, maps still come back float32
        ...

* ``fp32``: float32 everywhere, TF32 off (also for cuDNN convolutions, which PyTorch allows TF32 by default).
* ``tf32``: float32 tensors, TF32 tensor-core matmuls and convolutions on CUDA (Ampere and newer); identical
  to ``fp32`` on the CPU.
* ``bf16`` / ``fp16``: ``torch.autocast`` on the inputs' device type: matmuls and convolutions run in the
  low-precision type, reductions and losses stay float32 (PyTorch's autocast op lists). Backward passes run in
  the dtype the forward chose per op, so the guided / secant rules see the same compute dtype as their inputs
  (masks are computed from the values the layer actually produced). fp16 has 5 exponent bits: gradients of
  deep networks can underflow, so methods that rely on exact completeness refuse it (see
  :data:`attribution.methods.base.Method.precisions`).

The settings are restored on exit, also after an exception (global backend flags included).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from attribution.errors import AttributionError

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("compute_precision", default="fp32")


def current_precision() -> str:
    """The precision of the innermost :func:`compute_precision` block (``fp32`` outside any): what a method
    called by another method (a noise tunnel's base, XRAI's base) inherits when it is given none."""
    return _CURRENT.get()


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else one AttributionError line."""
    if precision not in PRECISIONS:
        raise AttributionError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def compute_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the block's forward and backward passes in ``precision`` on ``device`` (see the module docstring)."""
    check_precision(precision)
    device = torch.device(device)
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    token = _CURRENT.set(precision)
    try:
        if precision in AUTOCAST_DTYPES:
            with torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision]):
                yield
        else:
            yield
    finally:
        _CURRENT.reset(token)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
