"""Which compute precisions each method may run in, and the evidence (one place; Method.check_precision reads it).

The rule, the same for every method: a precision is allowed when its maps keep a mean Spearman rank correlation
of at least 0.99 with the fp32 maps (the issue's goal) on the real EfficientNet-Lite0 and the 7 sample photos
(``python -m bench.precision``, CPU autocast, 1 thread): bf16 over all five top-5 class maps of each image
(``--targets top5``, TR-GBP's own setting, 35 maps), fp16 over the top-1 maps (fp16 autocast is emulated on the
CPU: TR-GBP's top-1 alone took 540 s). fp32 is always allowed. tf32 rounds matmul/convolution inputs to the same
10-bit mantissa as fp16 but keeps fp32 outputs, so it is allowed where fp16 is, until a GPU run measures it
(``bench.precision --device cuda``). A precision not measured for a method is refused.

Measured (mean / min Spearman, max |Δmap| / max|map|, mean |ΔEBPG|):

======== ===================================== =====================================
method   bf16 (top-5, 35 maps)                 fp16 (top-1, 7 maps)
======== ===================================== =====================================
saliency 0.832 / 0.760, 1.7, 0.005             0.970 / 0.945, 0.42, 0.002
gbp      0.956 / 0.938, 0.65, 0.001            0.995 / 0.992, 0.48, 0.001
gradcam  0.9995 / 0.997, 0.074, 0.001          1.0000 / 1.0000, 0.003, 0.000
tr_gbp   0.9895 / 0.912, 0.88, 0.012           0.9995 / 0.9985, 0.061, 0.003
a_fmi    0.998 / 0.992, 0.11, 0.003            not measured
======== ===================================== =====================================

Pixel-level gradient maps (saliency, GBP) are what bf16's 8-bit mantissa hurts: the ranks of their many small
values reshuffle. Maps built from feature maps (Grad-CAM, A-FMI) keep them; TR-GBP falls just short in bf16 (its
lower-ranked classes' maps, after the top-5 mean is removed, are small differences of large bias terms).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

# method -> {precision: mean Spearman of its maps vs fp32, measured by bench.precision as the docstring says}
MEASURED: dict[str, dict[str, float]] = {
    "saliency": {"bf16": 0.832, "fp16": 0.970},
    "gbp": {"bf16": 0.956, "fp16": 0.995},
    "gradcam": {"bf16": 0.9995, "fp16": 1.0000},
    "tr_gbp": {"bf16": 0.9895, "fp16": 0.9995},
    "a_fmi": {"bf16": 0.998},
}
POLICY_TARGETS = {"bf16": "top5", "fp16": "top1"}  # the targets each precision was measured on
MIN_SPEARMAN = 0.99
_MEASURING: contextvars.ContextVar[bool] = contextvars.ContextVar("measuring_precisions", default=False)


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Let every method run in every precision inside the block: for bench.precision, which measures the
    deviations this policy is made of. Not for producing maps."""
    token = _MEASURING.set(True)
    try:
        yield
    finally:
        _MEASURING.reset(token)


def allowed_precisions(method: str) -> tuple[str, ...]:
    """The precisions ``method`` may run in: fp32, plus each measured one that meets :data:`MIN_SPEARMAN`
    (tf32 where fp16 does)."""
    if _MEASURING.get():
        return ("fp32", "tf32", "bf16", "fp16")
    measured = MEASURED.get(method, {})
    ok = [p for p in ("bf16", "fp16") if measured.get(p, 0.0) >= MIN_SPEARMAN]
    tf32 = ["tf32"] if "fp16" in ok else []
    return ("fp32", *tf32, *ok)


def refusal_reason(method: str, precision: str) -> str:
    """Why ``precision`` is refused for ``method``, in a few words with the measured figure."""
    value = MEASURED.get(method, {}).get("fp16" if precision == "tf32" else precision)
    if value is None:
        return f"not measured for {method} (python -m bench.precision)"
    return (f"its maps' mean Spearman vs fp32 was {value:.4g} on EfficientNet-Lite0, below {MIN_SPEARMAN}"
            + (" with fp16, whose mantissa tf32 shares" if precision == "tf32" else ""))
