"""The Ray actor that pins one model on one device and turns decoded samples into attribution rows."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from attribution.errors import AttributionError, error_reason
from attribution.methods import attribute_with_extras, get_method
from attribution.methods.targets import TopKTargets, plain_forward_targets
from attribution.precision import compute_precision
from schemas.attributions import ERROR_SCHEMA, attribution_schema
from schemas.maps import MapLayout
from workers.batches import DecodedBatch, error_row
from workers.crash_guard import guarded
from workers.device import (device_images, exit_if_device_lost, is_out_of_memory, load_model,
                            release_cached_memory)

TARGET_KINDS = ("label", "top1", "top5")
log = logging.getLogger(__name__)


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
    channels_last: bool | None = None  # None: on CUDA with bf16/fp16 (workers.device)

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

    Input: decoded rows (workers.decode, as a pyarrow table). Output (workers.batches.output_schema): one row per
    input shard of the batch — ``shard``, ``shard_total``, ``samples``, ``keys`` and two Arrow IPC blobs,
    ``attributions`` (rows of schemas.attributions, one per sample x method x target, built column by column from
    one host copy per method and batch; one IPC stream per map layout) and ``errors`` (rows of ERROR_SCHEMA). A
    method that fails on the batch is retried per sample, so one bad sample costs one
    error row, not the batch. A method that runs out of device memory is run on halves of the batch instead, and
    keeps that smaller size for the next batches (``chunk_sizes``: {method: images per call}; a warning is logged
    at each halving).
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.spec, self.channels_last = load_model(config.model, config.weights, config.device, config.threads,
                                                   config.precision, config.channels_last)
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
        self.chunk_sizes: dict[str, int] = {}
        self.last_seconds: dict[str, float] = {}  # {method: seconds} of the last call (what jobs.plan reads)

    def __call__(self, table: pa.Table) -> pa.Table:
        self.calls += 1
        self.last_seconds = {}
        return guarded(table, self._call, "attribute")  # a sample that kills the process: an error row

    def _call(self, table: pa.Table) -> pa.Table:
        decoded = DecodedBatch(table)
        tables: dict[MapLayout, list[pa.Table]] = {layout: [] for layout in self.schemas}
        if decoded.good:
            self._attribute(decoded, tables)
        merged = [pa.concat_tables(parts) if len(parts) > 1 else parts[0] for parts in tables.values() if parts]
        return decoded.output("attributions", None, ERROR_SCHEMA, tables=merged)

    def _attribute(self, decoded: DecodedBatch, tables: dict[MapLayout, list[pa.Table]]) -> None:
        spec, batch, good, errors = self.spec, decoded.columns, decoded.good, decoded.errors
        images = device_images(spec, batch["pixels"][good], self.channels_last)
        # top1/top5: the first method's own forward pass decides the targets (no separate forward); a method that
        # can (predicts_targets) runs first, the rows keep the order of --methods
        forward = TopKTargets(5 if self.config.targets == "top5" else 1)
        targets: torch.Tensor | TopKTargets = forward
        valid = list(range(len(good)))
        if self.config.targets == "label":
            self._forward(images, forward)  # the top-5 columns of the rows
            targets, valid = self._label_targets(batch, good, forward.num_classes, errors)
            if not valid:
                return
            images, targets = images[valid], targets.to(spec.device)[valid]
        chosen = [good[v] for v in valid]
        samples = decoded.sample_arrays()
        predicted = None
        built: dict[str, pa.Table] = {}
        for method in self._run_order():
            options = self.config.options_for(method)
            start = time.perf_counter()
            results = self._run_method(method, images, targets, options, chosen, batch, errors)
            self.last_seconds[method] = time.perf_counter() - start
            seconds = self.last_seconds[method] / len(chosen)
            if predicted is None:  # one device -> host copy per batch for what every row repeats
                self._forward(images, forward)  # no-op unless the first method failed before its forward
                top = forward.top5[valid] if self.config.targets == "label" else forward.top5
                prob = forward.top5_prob[valid] if self.config.targets == "label" else forward.top5_prob
                targets = targets if self.config.targets == "label" else forward.classes
                predicted = PredictedTargets(targets.cpu().numpy(), _pad5(top.cpu().numpy(), -1),
                                             _pad5(prob.cpu().numpy(), 0.0))
            if not results:
                continue
            done = sorted(results)
            layout = self.layouts[method]
            host = self._to_host([results[j] for j in done], layout)
            keep = list(range(len(done)))
            if host["negative"] is not None:
                for n in np.flatnonzero(host["negative"].any(axis=1)):
                    errors[chosen[done[n]]].append(error_row(batch, chosen[done[n]], "attribute", method,
                                                             "map has negative values; --map-dtype uint8 stores "
                                                             "non-negative maps only (use int8)"))
                keep = [n for n in keep if not host["negative"][n].any()]
            if keep:
                rows = RowBlock(method, _options_json(options), np.array([chosen[done[n]] for n in keep]),
                                np.array([done[n] for n in keep]), np.array(keep), seconds)
                built[method] = self._table(self.schemas[layout], samples, predicted, host, rows)
        for method in self.config.methods:
            if method in built:
                tables[self.layouts[method]].append(built[method])

    def _run_order(self) -> list[str]:
        """--methods, with the first one that decides top-k targets from its own forward pass moved to the front
        (top1/top5 runs), so no method needs a separate forward pass."""
        methods = list(self.config.methods)
        first = next((m for m in methods if get_method(m).predicts_targets), methods[0])
        return [first] + [m for m in methods if m != first] if self.config.targets != "label" else methods

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

    def _forward(self, images: torch.Tensor, forward: TopKTargets) -> None:
        """Resolve ``forward`` with one plain forward pass (in the run's precision) unless a method already has."""
        if not forward.resolved:
            with compute_precision(self.config.precision, self.spec.device):
                plain_forward_targets(self.spec.module, images, forward)

    def _label_targets(self, batch, good, num_classes: int, errors) -> tuple[torch.Tensor, list[int]]:
        """(labels [J, 1] of the good samples, positions of those with a usable label); the others get an error
        row."""
        labels = torch.tensor([int(batch["label"][i]) for i in good])
        valid = []
        for j, i in enumerate(good):
            if 0 <= int(labels[j]) < num_classes:
                valid.append(j)
            else:
                errors[i].append(error_row(batch, i, "attribute", None,
                                           f"--targets label: sample has no usable label ({int(labels[j])})"))
        return labels[:, None], valid

    def _run_method(self, method, images, targets, options, chosen, batch, errors) -> dict[int, Any]:
        """{position in batch: (maps [T,S,S], extras)}; failures become error rows.

        The method runs on the whole batch, or on consecutive chunks of ``chunk_sizes[method]`` images once it has
        run out of memory: each time it does, the chunk that failed is retried at half the size (down to 1 image)
        and the size is kept for the next batches. Any other failure of a chunk retries its samples one at a
        time, to find the culprits."""
        n = len(chosen)
        size = min(self.chunk_sizes.get(method, n), n)
        out: dict[int, Any] = {}
        start = 0
        while start < n:
            stop = min(start + size, n)
            if stop - start < n and isinstance(targets, TopKTargets):  # chunks need the classes up front
                self._forward(images, targets)
                targets = targets.classes
            out_of_memory = False
            try:
                chunk_targets = targets if isinstance(targets, TopKTargets) else targets[start:stop]
                result = attribute_with_extras(method, self.spec, images[start:stop], chunk_targets,
                                               precision=self.config.precision, **options)
                out.update({start + j: _slice(result, j) for j in range(stop - start)})
                start = stop
                continue
            except Exception as exc:  # noqa: BLE001 -- any failure of one method on one batch becomes error rows
                out_of_memory = is_out_of_memory(exc) and stop - start > 1
                reason = error_reason(exc)
            if out_of_memory:  # outside the handler: its traceback no longer holds the failed chunk's tensors
                release_cached_memory(self.spec.device)
                size = self.chunk_sizes[method] = max(1, (stop - start) // 2)
                log.warning("%s ran out of memory on %d images at once (%s); now %d per call", method, stop - start,
                            reason, size)
                continue
            exit_if_device_lost(self.spec.device, f"{method}: {reason}")  # a dead GPU: no error rows, a new actor
            if isinstance(targets, TopKTargets):  # find the culprit(s): retry one sample at a time
                self._forward(images, targets)
                targets = targets.classes
            for j in range(start, stop):
                try:
                    result = attribute_with_extras(method, self.spec, images[j:j + 1], targets[j:j + 1],
                                                   precision=self.config.precision, **options)
                    out[j] = _slice(result, 0)
                except Exception as exc:  # noqa: BLE001
                    errors[chosen[j]].append(error_row(batch, chosen[j], "attribute", method, error_reason(exc)))
            start = stop
        return out

    def _table(self, schema: pa.Schema, samples: dict[str, pa.Array], predicted: "PredictedTargets",
               host: dict[str, Any], rows: "RowBlock") -> pa.Table:
        """The rows of schemas.attributions for one method's maps: one per (kept sample, target column), sample
        major, built column by column from ``host`` (see :meth:`_to_host`) without a Python dict per row."""
        columns = {"key", "shard", "label", "wnid", "width", "height", "bboxes", "bboxes_input"}
        targets = predicted.targets[rows.positions]  # [J, T]
        per_target = targets.shape[1]
        count = targets.size
        top5 = np.repeat(predicted.top5[rows.positions], per_target, axis=0)  # [R, 5]
        flat_targets = targets.reshape(-1)
        hits = top5 == flat_targets[:, None]
        rank = np.where(hits.any(axis=1), hits.argmax(axis=1), -1)
        index = pa.array(np.repeat(rows.samples, per_target))
        maps = host["map"][rows.host]
        data: dict[str, pa.Array] = {name: samples[name].take(index) for name in columns}
        data.update({
            "model": _repeat(self.config.model, pa.string(), count),
            "weights": _repeat(self.config.weights, pa.string(), count),
            "method": _repeat(rows.method, pa.string(), count),
            "options": _repeat(rows.options, pa.string(), count),
            "target": pa.array(flat_targets.astype(np.int32)),
            "target_kind": _repeat(self.config.targets, pa.string(), count),
            "target_rank": pa.array(rank.astype(np.int8)),
            "top5": pa.FixedSizeListArray.from_arrays(pa.array(top5.reshape(-1).astype(np.int32)), 5),
            "top5_prob": pa.FixedSizeListArray.from_arrays(pa.array(
                np.repeat(predicted.top5_prob[rows.positions], per_target, axis=0).reshape(-1).astype(np.float32)), 5),
            "map": pa.FixedShapeTensorArray.from_numpy_ndarray(
                np.ascontiguousarray(maps.reshape(count, *maps.shape[2:]))),
            "map_scale": pa.array(host["scale"][rows.host].reshape(-1).astype(np.float32)),
            "fmi": _lists(host["fmi"][rows.host]) if "fmi" in host else pa.nulls(count, schema.field("fmi").type),
            "layers": (_layer_lists(host["layers"], rows.host, schema.field("layers").type) if "layers" in host
                       else pa.nulls(count, schema.field("layers").type)),
            "seconds": _repeat(rows.seconds, pa.float32(), count),
        })
        return pa.Table.from_arrays([data[name] for name in schema.names], schema=schema)


@dataclass
class PredictedTargets:
    """What the top-k forward gave for the batch's valid samples, on the host: ``targets`` [J, T] (the classes
    the maps explain), ``top5`` [J, 5] (class indices, -1 padded) and ``top5_prob`` [J, 5] (softmax, 0 padded)."""

    targets: np.ndarray
    top5: np.ndarray
    top5_prob: np.ndarray


@dataclass
class RowBlock:
    """One method's kept samples in a batch: ``samples`` [J] (positions in the decoded batch), ``positions`` [J]
    (positions among the valid samples, i.e. in PredictedTargets), ``host`` [J] (positions in the host maps);
    ``seconds``: the method's time per image."""

    method: str
    options: str
    samples: np.ndarray
    positions: np.ndarray
    host: np.ndarray
    seconds: float


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
        return relative.to(getattr(torch, layout.dtype)).cpu().numpy(), scale.cpu().numpy(), None  # cast on the device
    levels = torch.round(relative * layout.levels)
    negative = (levels.amin(dim=(-2, -1)) < 0).cpu().numpy() if layout.dtype == "uint8" else None
    low = -layout.levels if layout.dtype == "int8" else 0
    stored = levels.clamp(low, layout.levels).to(getattr(torch, layout.dtype)).cpu().numpy()
    return stored, scale.cpu().numpy(), negative


def _pad5(values: np.ndarray, fill: float) -> np.ndarray:
    """[J, k] (k <= 5) -> [J, 5], padded with ``fill``."""
    return np.pad(values, ((0, 0), (0, 5 - values.shape[1])), constant_values=fill)


def _repeat(value: Any, dtype: pa.DataType, count: int) -> pa.Array:
    return pa.nulls(count, dtype) if value is None else pa.repeat(pa.scalar(value, dtype), count)


def _lists(values: np.ndarray) -> pa.Array:
    """[J, T, K] -> a list<float32> array of J·T rows of K values."""
    rows, width = values.shape[0] * values.shape[1], values.shape[-1]
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1).astype(np.float32)))


def _layer_lists(layers: dict[str, np.ndarray], host: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """TR-GBP's per-layer maps {name: [J', T, h, w]} of the kept samples ``host`` as one list of structs per row."""
    chosen = {name: m[host] for name, m in layers.items()}
    first = next(iter(chosen.values()))
    return pa.array([[{"name": name, "height": m.shape[-2], "width": m.shape[-1], "values": m[n, t].ravel().tolist()}
                      for name, m in chosen.items()]
                     for n in range(first.shape[0]) for t in range(first.shape[1])], type=dtype)


def _slice(result, j: int) -> tuple[torch.Tensor, dict]:
    """Sample j's maps [T, S, S] and extras (each [T, …]) from an Attribution over [B, T] targets."""
    def take(value):
        return {k: take(v) for k, v in value.items()} if isinstance(value, dict) else value[j]
    return result.maps[j], take(result.extras)


def _options_json(options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if k not in ("return_fmi", "return_layers")}
    return json.dumps(shown, sort_keys=True, default=str)
