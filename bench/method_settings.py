"""What each attribution method runs with in the benchmarks: the method groups, and per method the options for
``attribute()`` (the references get the same steps / samples / iterations) and how many images are timed.

:data:`FAST_SETTINGS` keep a 2-core CPU run short and still meaningful (``python -m bench.methods``, and the cost
options of ``bench.precision``); :data:`FULL_SETTINGS` are the papers' settings (``--full``).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

from attribution.methods import REGISTRY

# The methods this benchmark is about (the registry also holds slower baselines such as RISE: use --methods all).
CORE_METHODS = ("saliency", "gbp", "gradcam", "tr_gbp", "a_fmi")
# Methods with many inner model passes (path steps, masks, optimiser iterations): the speed-up over the reference
# is what the issue asks for.
ITERATIVE_METHODS = ("ig", "gig", "rise", "extremal_perturbation", "xrai")

# Per method: ``options`` for attribute() (the reference gets the same steps/samples/iterations), ``images``: time
# ours and the references on the first N images of the batch only, ``ref_images``: the references only on the
# first N (they run one image at a time, so their time per image does not depend on N), ``warmup``: False skips
# the warm-up call (the first timed call's maps are compared instead). Unlisted keys take DEFAULT_SETTING.
DEFAULT_SETTING: dict[str, Any] = {"options": {}, "images": None, "ref_images": None, "warmup": True}
FAST_SETTINGS: dict[str, dict[str, Any]] = {
    "fullgrad": {"options": {"scaling": "channel", "eps": 1e-7}},  # pytorch-grad-cam's per-channel scaling
    "ig": {"options": {"steps": 32, "internal_batch_size": 64}},
    "lrp": {"options": {"epsilon": 1e-6}},
    "smoothgrad": {"options": {"samples": 16, "noise": 0.15, "internal_batch_size": 64}},
    "vargrad": {"options": {"samples": 16, "noise": 0.15, "internal_batch_size": 64}},
    "gig": {"options": {"steps": 16}, "ref_images": 2},
    "xrai": {"options": {"base_options": {"steps": 8, "internal_batch_size": 64}}, "ref_images": 2},
    "rise": {"options": {"masks": 1000, "batch_size": 64}, "images": 1, "warmup": False},
    "extremal_perturbation": {"options": {"iterations": 100}, "images": 2, "warmup": False},
}
# --full: the papers' settings (A-FMI App. A.2: IG 100 path steps, XRAI / EP / RISE official implementations
# with their defaults; TR-GBP: Guided IG as the saliency package, 200 steps; SmoothGrad paper: 50 samples).
FULL_SETTINGS: dict[str, dict[str, Any]] = {
    **FAST_SETTINGS,
    "ig": {"options": {"steps": 100, "internal_batch_size": 64}},
    "smoothgrad": {"options": {"samples": 50, "noise": 0.15, "internal_batch_size": 64}},
    "vargrad": {"options": {"samples": 50, "noise": 0.15, "internal_batch_size": 64}},
    "gig": {"options": {"steps": 200}, "ref_images": 1, "warmup": False},
    "xrai": {"options": {"base_options": {"steps": 100, "internal_batch_size": 64}}, "ref_images": 2},
    "rise": {"options": {"masks": 4000, "batch_size": 64}, "images": 1, "warmup": False},
    "extremal_perturbation": {"options": {"iterations": 800}, "images": 1, "warmup": False},
}


def method_setting(method: str, full: bool = False) -> dict[str, Any]:
    """The benchmark setting of ``method``: {"options": dict, "images": int | None, "ref_images": int | None,
    "warmup": bool} (FAST_SETTINGS, or FULL_SETTINGS with ``full``; defaults from DEFAULT_SETTING)."""
    table = FULL_SETTINGS if full else FAST_SETTINGS
    return {**copy.deepcopy(DEFAULT_SETTING), **copy.deepcopy(table.get(method, {}))}


def option(method: str, options: dict[str, Any], name: str) -> Any:
    """``options[name]``, else the default of keyword ``name`` of the registry method's ``_attribute``."""
    if name in options:
        return options[name]
    return inspect.signature(REGISTRY[method]._attribute).parameters[name].default
