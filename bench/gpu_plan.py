"""What one ``bench.gpu_check`` run measures and in how much time: the sections, the plan from the command line,
the cheap options of the costly methods, the precisions a method allows, and the time budget per section."""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attribution.errors import AttributionError
from attribution.methods import get_method

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
        """The plan as JSON (device and out folder as strings)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "out")}
        return {"device": str(self.device), "out": str(self.out), **out}


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
    ``deterministic``: noise tunnels at zero noise, see ``bench.gpu_check``'s docstring)."""
    options = copy.deepcopy(CHEAP_OPTIONS.get(method, {}))
    if method == "cameras":
        options["resolutions"] = [input_size, input_size + 100]
    if deterministic and method in NOISE_TUNNELS:
        options["noise"] = 0.0
    return options


class Budget:
    """Wall-clock budget of the run: ``remaining()`` seconds overall, ``expired(section)`` once the section's
    cumulative share (:data:`BUDGET_MARKS`) is spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        """Seconds left of the whole budget (negative once overrun)."""
        return self.seconds - self.elapsed()

    def expired(self, section: str) -> bool:
        """Whether ``section``'s cumulative share of the budget is spent."""
        return self.elapsed() > self.seconds * BUDGET_MARKS[section]

    def note(self, section: str) -> str:
        """The line recorded for a unit of ``section`` skipped because its share is spent."""
        return (f"skipped: time budget ({self.elapsed():.0f} s of {self.seconds:.0f} s spent; {section}'s share ends "
                f"at {self.seconds * BUDGET_MARKS[section]:.0f} s)")
