"""The Ray actor that pins one model on one device and turns decoded samples into attribution rows."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from attribution import models
from attribution.errors import AttributionError, error_reason
from attribution.methods import attribute_with_extras, get_method
from attribution.precision import compute_precision
from schemas.attributions import ERROR_SCHEMA, attribution_schema
from schemas.maps import MapLayout
from workers.batches import DecodedBatch, error_row, ipc_blob

TARGET_KINDS = ("label", "top1", "top5")


@dataclass
class WorkerConfig:
    """What every actor of a run computes: model, methods with their options, targets, how maps are stored, and
    the compute ``precision`` of the top-k forward and of every method (attribution.precision).

    Storage (schemas.maps): ``map_size`` S (None: the input size) and ``map_dtype`` for every method, overridden per
    method by ``map_sizes`` / ``map_dtypes`` ({method: value})."""

    model: str
    weights: str | None = None
    methods: list[str] = field(default_factory=lambda: ["saliency"])
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: str = "top1"
    map_dtype: str = "float16"
    map_size: int | None = None
    map_sizes: dict[str, int] = field(default_factory=dict)
    map_dtypes: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"
    fmi: bool = False
    layers: bool = False
    device: str | None = None
    threads: int | None = None

    def options_for(self, method: str) -> dict[str, Any]:
        """Options passed to ``method``: the user's, plus what --fmi / --layers ask for."""
        options = dict(self.method_options.get(method, {}))
        if method == "a_fmi" and self.fmi:
            options["return_fmi"] = True
        if method == "tr_gbp" and self.layers:
            options["return_layers"] = True
        return options

    def layout_for(self, method: str, input_size: int) -> MapLayout:
        """How ``method``'s maps are stored for a model with ``input_size``; ValueError for a size above it."""
        size = self.map_sizes.get(method, self.map_size) or input_size
        return MapLayout(size=int(size), dtype=self.map_dtypes.get(method, self.map_dtype), input_size=input_size)


class AttributionWorker:
    """Ray Data callable class: the constructor loads the model once; ``__call__(batch)`` returns a batch.

    Input: decoded rows (workers.decode, as a pyarrow table). Output: one row per sample — ``key``, ``shard``,
    ``shard_total`` and two Arrow IPC blobs, ``attributions`` (rows of schemas.attributions, one per method x
    target; one IPC stream per map layout, one after the other) and ``errors`` (rows of ERROR_SCHEMA). Keeping a sample's rows in one row means Ray can split blocks anywhere without
    splitting a sample. A method that fails on the batch is retried per sample, so one bad sample costs one
    error row, not the batch.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        device = torch.device(config.device) if config.device else models.default_device()
        self.spec = models.load(config.model, config.weights, device=device)
        for method in config.methods:
            get_method(method).check_precision(config.precision)  # unknown names, refused precisions: once, here
        self.size = self.spec.preprocessing.input_size
        try:
            self.layouts = {method: config.layout_for(method, self.size) for method in config.methods}
        except ValueError as exc:
            raise AttributionError(f"{config.model}: {exc}") from None
        self.schemas = {layout: attribution_schema(layout.size, layout.dtype, self.size)
                        for layout in dict.fromkeys(self.layouts.values())}
        self.calls = 0

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        self.calls += 1
        decoded = DecodedBatch(table)
        by_layout = {layout: [[] for _ in decoded.rows] for layout in self.schemas}
        if decoded.good:
            self._attribute(decoded.columns, decoded.good, by_layout, decoded.errors)
        blobs = [b"".join(ipc_blob(rows[i], self.schemas[layout]) for layout, rows in by_layout.items())
                 for i in range(len(decoded.rows))]
        return decoded.output("attributions", None, ERROR_SCHEMA, result_blobs=blobs)

    def _attribute(self, batch: dict[str, np.ndarray], good: list[int], by_layout: dict[MapLayout, list[list[dict]]],
                   errors: list[list[dict]]) -> None:
        spec = self.spec
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good])).to(spec.device)
        images = spec.preprocessing.normalise(pixels.float() / 255.0)
        with torch.no_grad(), compute_precision(self.config.precision, spec.device):
            probs = spec.module(images).float().softmax(dim=1)
        k = min(5, probs.shape[1])
        top_prob, top = probs.topk(k, dim=1)
        targets, valid = self._targets(batch, good, top, probs.shape[1], errors)
        if not valid:
            return
        images, targets = images[valid], targets[valid]
        chosen = [good[v] for v in valid]
        # one device -> host copy per batch for what every row repeats
        targets_host, top_host, prob_host = targets.tolist(), top[valid].tolist(), top_prob[valid].tolist()
        for method in self.config.methods:
            options = self.config.options_for(method)
            start = time.perf_counter()
            results = self._run_method(method, images, targets, options, chosen, batch, errors)
            seconds = (time.perf_counter() - start) / len(chosen)
            if not results:
                continue
            done = sorted(results)
            layout = self.layouts[method]
            host = self._to_host([results[j] for j in done], layout)
            rows = by_layout[layout]
            for n, j in enumerate(done):
                i = chosen[j]
                if host["negative"] is not None and host["negative"][n].any():
                    errors[i].append(error_row(batch, i, "attribute", method, "map has negative values; "
                                               "--map-dtype uint8 stores non-negative maps only (use int8)"))
                    continue
                for t, target in enumerate(targets_host[j]):
                    rows[i].append(self._row(batch, i, method, options, target, top_host[j], prob_host[j],
                                             host, n, t, seconds))

    def _to_host(self, results: list[tuple[torch.Tensor, dict]], layout: MapLayout) -> dict[str, Any]:
        """The maps of one method for J samples ([T, H, W] each, on the device) as host arrays in ``layout``
        (schemas.maps), one copy per kind: ``map`` [J, T, S, S] (area-averaged to S, divided by ``scale``, then
        cast or quantised), ``scale`` [J, T] (max |area-averaged map|, 1 where that is 0 or not finite),
        ``negative`` [J, T] (uint8 only: a value would quantise below 0; else None), ``fmi`` [J, T, K] and
        ``layers`` {name: [J, T, h, w]} when present."""
        stored, scale, negative = encode_maps(torch.stack([m for m, _ in results]), layout)
        host: dict[str, Any] = {"map": stored, "scale": scale, "negative": negative}
        extras = [e for _, e in results]
        if extras[0].get("fmi") is not None:
            host["fmi"] = torch.stack([e["fmi"] for e in extras]).float().cpu().numpy()
        if extras[0].get("layers") is not None:
            host["layers"] = {name: torch.stack([e["layers"][name] for e in extras]).float().cpu().numpy()
                              for name in extras[0]["layers"]}
        return host

    def _targets(self, batch, good, top, num_classes, errors) -> tuple[torch.Tensor, list[int]]:
        kind = self.config.targets
        if kind == "top1":
            return top[:, :1], list(range(len(good)))
        if kind == "top5":
            return top, list(range(len(good)))
        labels = torch.tensor([int(batch["label"][i]) for i in good], device=top.device)
        valid = []
        for j, i in enumerate(good):
            if 0 <= int(labels[j]) < num_classes:
                valid.append(j)
            else:
                errors[i].append(error_row(batch, i, "attribute", None,
                                           f"--targets label: sample has no usable label ({int(labels[j])})"))
        return labels[:, None], valid

    def _run_method(self, method, images, targets, options, chosen, batch, errors) -> dict[int, Any]:
        """{position in batch: (maps [T,S,S], extras)}; failures become error rows."""
        try:
            result = attribute_with_extras(method, self.spec, images, targets, precision=self.config.precision,
                                           **options)
            return {j: _slice(result, j) for j in range(len(chosen))}
        except Exception:  # noqa: BLE001 -- any failure of one method on one batch becomes error rows
            pass  # find the culprit(s): retry one sample at a time
        out = {}
        for j in range(len(chosen)):
            try:
                result = attribute_with_extras(method, self.spec, images[j:j + 1], targets[j:j + 1],
                                               precision=self.config.precision, **options)
                out[j] = _slice(result, 0)
            except Exception as exc:  # noqa: BLE001
                errors[chosen[j]].append(error_row(batch, chosen[j], "attribute", method, error_reason(exc)))
        return out

    def _row(self, batch, i, method, options, target: int, top: list[int], top_prob: list[float],
             host: dict[str, Any], n: int, t: int, seconds: float) -> dict:
        """Row of schemas.attributions for sample ``i``'s target column ``t`` (the n-th sample of ``host``)."""
        top_list = top + [-1] * (5 - len(top))
        prob_list = top_prob + [0.0] * (5 - len(top_prob))
        layers = host.get("layers")
        return {
            "key": batch["key"][i], "shard": batch["shard"][i], "model": self.config.model,
            "weights": self.config.weights, "method": method, "options": _options_json(options),
            "target": target, "target_kind": self.config.targets,
            "target_rank": top_list.index(target) if target in top_list else -1,
            "label": int(batch["label"][i]), "wnid": batch["wnid"][i], "top5": top_list, "top5_prob": prob_list,
            "width": int(batch["width"][i]), "height": int(batch["height"][i]),
            "bboxes": json.loads(batch["bboxes"][i]), "bboxes_input": json.loads(batch["bboxes_input"][i]),
            "map": host["map"][n, t], "map_scale": float(host["scale"][n, t]),
            "fmi": host["fmi"][n, t].tolist() if "fmi" in host else None,
            "layers": [{"name": name, "height": m.shape[-2], "width": m.shape[-1], "values": m[n, t].ravel().tolist()}
                       for name, m in layers.items()] if layers is not None else None,
            "seconds": seconds,
        }


def encode_maps(maps: torch.Tensor, layout: MapLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Maps [..., H, W] (any float dtype, any device) -> how ``layout`` stores them (schemas.maps), on the host:
    (``map`` [..., S, S] area-averaged to S, divided by ``scale``, cast or quantised; ``scale`` [...] = max |area-
    averaged map|, 1 where that is 0 or not finite; ``negative`` [...] bool for uint8 — a value would quantise
    below 0 — else None). One device -> host copy per array."""
    maps = maps.float()
    if maps.shape[-1] != layout.size or maps.shape[-2] != layout.size:
        lead = maps.shape[:-2]
        maps = F.adaptive_avg_pool2d(maps.reshape(-1, 1, *maps.shape[-2:]), layout.size)
        maps = maps.reshape(*lead, layout.size, layout.size)
    scale = maps.abs().amax(dim=(-2, -1))
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    relative = maps / scale[..., None, None]
    if not layout.levels:
        return relative.cpu().numpy().astype(layout.dtype), scale.cpu().numpy(), None
    levels = torch.round(relative * layout.levels)
    negative = (levels.amin(dim=(-2, -1)) < 0).cpu().numpy() if layout.dtype == "uint8" else None
    low = -layout.levels if layout.dtype == "int8" else 0
    stored = levels.clamp(low, layout.levels).to(getattr(torch, layout.dtype)).cpu().numpy()
    return stored, scale.cpu().numpy(), negative


def _slice(result, j: int) -> tuple[torch.Tensor, dict]:
    """Sample j's maps [T, S, S] and extras (each [T, …]) from an Attribution over [B, T] targets."""
    def take(value):
        return {k: take(v) for k, v in value.items()} if isinstance(value, dict) else value[j]
    return result.maps[j], take(result.extras)


def _options_json(options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if k not in ("return_fmi", "return_layers")}
    return json.dumps(shown, sort_keys=True, default=str)
