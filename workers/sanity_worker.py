"""The Ray actor of jobs.sanity: pins one model, computes cascading-randomisation maps and their similarity rows."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from attribution.errors import AttributionError, error_reason
from attribution.methods import get_method
from attribution.precision import compute_precision
from attribution.sanity import cascading_maps, randomisation_blocks, similarity_to_original
from schemas.attributions import ERROR_SCHEMA
from schemas.metrics import SANITY_SCHEMA
from workers.batches import DecodedBatch, error_row
from workers.crash_guard import guarded
from workers.device import device_images, exit_if_device_lost, load_model

SANITY_TARGETS = ("top1", "label")
FAILURES = Exception  # any failure of one method on one batch becomes error rows, not a failed job


@dataclass
class SanityConfig:
    """What every actor of a sanity run computes.

    ``targets``: "top1" (the ORIGINAL model's top-1 class, kept at every step) or "label"; ``seed``: the
    randomisation seed (every image sees the same randomised models); ``steps``: randomise only the top
    ``steps`` blocks (None = all); ``grid_keys``: "shard/key" of the samples whose maps are returned for the figure.
    """

    model: str
    weights: str | None = None
    methods: list[str] = field(default_factory=lambda: ["gbp", "tr_gbp"])
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: str = "top1"
    seed: int = 0
    steps: int | None = None
    grid_keys: list[str] = field(default_factory=list)
    device: str | None = None
    threads: int | None = None
    precision: str = "fp32"


def grid_id(shard: str, key: str) -> str:
    """How a grid sample is named in ``SanityConfig.grid_keys``: ``shard/key``."""
    return f"{shard}/{key}"


class SanityWorker:
    """Ray Data callable class: decoded samples (workers.decode, a pyarrow table) in; out one row per shard of the
    batch (workers.batches.output_schema) with ``sanity`` (Arrow IPC stream of SANITY_SCHEMA rows: one per method x
    step), ``errors`` (IPC stream of schemas.attributions.ERROR_SCHEMA rows) and ``grid`` (a list aligned with
    ``keys``: for samples in ``grid_keys`` :func:`grid_npz` bytes, else empty). A method that fails on the batch is
    retried one sample at a time, so a bad sample costs error rows, never the job.
    """

    def __init__(self, config: SanityConfig) -> None:
        self.config = config
        if config.targets not in SANITY_TARGETS:
            raise AttributionError(f"sanity targets must be one of {', '.join(SANITY_TARGETS)}, got {config.targets!r}")
        # contiguous images: the cascade randomises copies of the model, which keep the memory format
        self.spec, _ = load_model(config.model, config.weights, config.device, config.threads, config.precision,
                                  channels_last=False)
        for method in config.methods:
            get_method(method)(None)._check_options(config.method_options.get(method, {}))
        blocks = [name for name, _ in randomisation_blocks(self.spec)]
        self.blocks = blocks[:config.steps] if config.steps is not None else blocks
        self.grid = set(config.grid_keys)

    def __call__(self, table: pa.Table) -> pa.Table:
        return guarded(table, self._call, "attribute")  # a sample that kills the process: an error row

    def _call(self, table: pa.Table) -> pa.Table:
        decoded = DecodedBatch(table)
        grids: list[bytes] = [b""] * len(decoded.rows)
        if decoded.good:
            self._sanity(decoded.columns, decoded.columns["pixels"], decoded.good, decoded.rows, decoded.errors,
                         grids)
        return decoded.output("sanity", SANITY_SCHEMA, ERROR_SCHEMA, grid=(pa.binary(), grids))

    def _sanity(self, batch: dict, pixels: np.ndarray, good: list[int], rows: list[list[dict]],
                errors: list[list[dict]], grids: list[bytes]) -> None:
        spec = self.spec
        images = device_images(spec, pixels[good])
        with torch.no_grad():
            logits = spec.module(images)
        top1 = logits.argmax(dim=1)
        if self.config.targets == "top1":
            targets, valid = top1, list(range(len(good)))
        else:
            labels = [int(batch["label"][i]) for i in good]
            valid = [j for j, label in enumerate(labels) if 0 <= label < logits.shape[1]]
            for j in sorted(set(range(len(good))) - set(valid)):
                errors[good[j]].append(error_row(batch, good[j], "attribute", None,
                                              f"--targets label: sample has no usable label ({labels[j]})"))
            targets = torch.tensor(labels, device=spec.device)
        if not valid:
            return
        images, targets = images[valid], targets[valid]
        chosen = [good[j] for j in valid]
        with compute_precision(self.config.precision, spec.device):  # every method of the cascade inherits it
            maps = self._maps(images, targets, chosen, batch, errors)  # [S+1, M, B, H, W], NaN where a method failed
        scores = similarity_to_original(maps)
        names = [""] + self.blocks
        for m, method in enumerate(self.config.methods):
            options = json.dumps(self.config.method_options.get(method, {}), sort_keys=True, default=str)
            for j, i in enumerate(chosen):
                if torch.isnan(maps[0, m, j]).all():
                    continue  # this method failed on this sample: its error row says why
                for step, randomised in enumerate(names):
                    rows[i].append({
                        "key": batch["key"][i], "shard": batch["shard"][i], "model": self.config.model,
                        "weights": self.config.weights, "method": method, "options": options,
                        "target": int(targets[j]), "step": step, "randomised": randomised,
                        **{name: _finite(scores[name][step, m, j]) for name in scores}})
        for j, i in enumerate(chosen):
            if grid_id(batch["shard"][i], batch["key"][i]) in self.grid:
                grids[i] = grid_npz(maps[:, :, j], pixels[i], self.config.methods, names, int(targets[j]))

    def _maps(self, images: torch.Tensor, targets: torch.Tensor, chosen: list[int], batch: dict,
              errors: list[list[dict]]) -> torch.Tensor:
        """All methods in one cascade (one model copy); on failure per method, then per sample."""
        config = self.config
        kwargs = {"options": config.method_options, "seed": config.seed, "steps": config.steps}
        try:
            return cascading_maps(self.spec, images, targets, config.methods, **kwargs)[1]
        except FAILURES as exc:
            reason = error_reason(exc)
        exit_if_device_lost(self.spec.device, reason)  # a dead GPU: no error rows, a new actor
        size = images.shape[-2:]
        out = torch.full((len(self.blocks) + 1, len(config.methods), len(chosen), *size), float("nan"),
                         device=images.device)
        for m, method in enumerate(config.methods):
            kwargs["options"] = {method: config.method_options.get(method, {})}
            try:
                out[:, m] = cascading_maps(self.spec, images, targets, [method], **kwargs)[1][:, 0]
                continue
            except FAILURES:
                pass
            for j, i in enumerate(chosen):
                try:
                    out[:, m, j] = cascading_maps(self.spec, images[j:j + 1], targets[j:j + 1], [method],
                                                  **kwargs)[1][:, 0, 0]
                except FAILURES as exc:
                    errors[i].append(error_row(batch, i, "attribute", method, error_reason(exc)))
        return out


def grid_npz(maps: torch.Tensor, pixels: np.ndarray, methods: list[str], names: list[str], target: int) -> bytes:
    """One grid sample as NPZ bytes: ``maps`` float32 [S+1, M, H, W] (NaN where a method failed), ``image`` uint8
    [H, W, 3] (the model's input crop), ``methods`` [M] and ``steps`` [S+1] (block names, '' at step 0) as
    text, ``target`` int."""
    buffer = io.BytesIO()
    np.savez(buffer, maps=maps.float().cpu().numpy(), image=np.ascontiguousarray(pixels.transpose(1, 2, 0)),
             methods=np.array(methods), steps=np.array(names), target=np.array(target))
    return buffer.getvalue()


def _finite(value: torch.Tensor) -> float | None:
    v = float(value)
    return v if np.isfinite(v) else None


__all__ = ["SANITY_TARGETS", "SanityConfig", "SanityWorker", "grid_id", "grid_npz"]
