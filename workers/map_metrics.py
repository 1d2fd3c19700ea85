"""Metrics that need nothing but the stored maps (EBPG, IBD, class discrimination, time), in one place.

Two callers:

- ``EvaluateWorker`` (the model-pinning actor of jobs.evaluate) calls :func:`map_metric_rows` on the attribution
  rows it fetched for its batch of decoded images, next to the model-based metrics;
- when a run asks for map-only metrics alone, jobs.evaluate reads no image and loads no model: it maps
  :class:`ShardMapMetrics` over the attribution run's committed Parquet files, one shard per call, streaming each
  file in key order (a sample's rows of one method are never split across files: one write batch holds all of
  them; with per-method map layouts its methods may sit in several files, whose rows are merged per sample).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from attribution.errors import error_reason
from attribution.metrics.discrimination import class_discrimination
from attribution.metrics.localisation import border_intensity, box_area_share, box_mask, energy_pointing_game
from schemas.metrics import METRIC_ERROR_SCHEMA, METRIC_SCHEMA
from schemas.reader import OutputReader, maps_of
from workers.batches import ipc_blob, output_schema

MAP_METRICS = ("ebpg", "ibd", "class_discrimination", "seconds")
ATTRIBUTION_COLUMNS = ["key", "shard", "model", "weights", "method", "options", "target", "target_kind",
                       "target_rank", "label", "top5", "width", "height", "bboxes", "bboxes_input", "map",
                       "map_scale", "seconds"]
OUTPUT = output_schema("metrics")
_ORDER = [("shard", "ascending"), ("key", "ascending"), ("method", "ascending"), ("target_rank", "ascending"),
          ("target", "ascending")]


def sort_attribution_rows(table: pa.Table) -> pa.Table:
    """Attribution rows in the order the metrics expect: by shard, key, method, target rank, target."""
    return table.sort_by(_ORDER)


class RowContext:
    """The metadata of a set of attribution rows (``ATTRIBUTION_COLUMNS`` but the map) and how to turn one of them
    into a metric row (schemas.metrics.METRIC_SCHEMA). ``sample_of[r]``: the sample row ``r`` belongs to."""

    def __init__(self, meta: dict[str, list], sample_of: list[int]) -> None:
        self.meta, self.sample_of = meta, sample_of
        self.top1 = [int(top5[0]) for top5 in meta["top5"]]
        self._box: dict[int, tuple[int, float | None]] = {}
        for r in range(len(sample_of)):
            if sample_of[r] not in self._box:
                self._box[sample_of[r]] = _box_share(meta["bboxes"][r], meta["width"][r], meta["height"][r])

    def groups(self) -> dict[tuple[int, str, str], list[int]]:
        """(sample, method, options) -> its rows, in target-rank order."""
        groups: dict[tuple[int, str, str], list[int]] = {}
        for r, i in enumerate(self.sample_of):
            groups.setdefault((i, self.meta["method"][r], self.meta["options"][r]), []).append(r)
        return groups

    def primary(self) -> list[int]:
        """The rows whose map the per-image metrics (EBPG, IBD, MoRF/LeRF, insertion) score: every row of label/top1
        runs, the top-1 row of top5 runs (the papers score one map per image: the class the image is explained
        for; the other four maps of a top5 run serve class discrimination)."""
        return [r for r in range(len(self.sample_of))
                if self.meta["target_kind"][r] != "top5" or self.meta["target_rank"][r] == 0]

    def first_per_method(self) -> list[int]:
        """One row per (sample, method, options): the first (lowest target rank)."""
        return [rows[0] for rows in self.groups().values()]

    def row(self, r: int, metric: str, value: float, steps: list[float] | None = None,
            curve: list[float] | None = None) -> dict:
        """The metric row of attribution row ``r`` (value NaN/inf -> null)."""
        meta = self.meta
        label = int(meta["label"][r])
        n_boxes, share = self._box[self.sample_of[r]]
        return {
            "key": meta["key"][r], "shard": meta["shard"][r], "model": meta["model"][r],
            "weights": meta["weights"][r], "method": meta["method"][r], "options": meta["options"][r],
            "target": int(meta["target"][r]), "target_kind": meta["target_kind"][r],
            "target_rank": int(meta["target_rank"][r]), "label": label, "top1": int(self.top1[r]),
            "correct": (self.top1[r] == label) if label >= 0 else None,
            "n_boxes": n_boxes, "box_share": share, "metric": metric,
            "value": value if np.isfinite(value) else None, "steps": steps, "curve": curve,
        }


def map_metric_rows(context: RowContext, maps: torch.Tensor, metrics: Sequence[str],
                    border: int = 16) -> list[tuple[int, dict]]:
    """The map-only metric rows of a set of attribution rows, as (attribution row, metric row) pairs.

    ``maps``: [R, S, S], the rows' maps (any scale: every metric here is scale-invariant); ``metrics``: any of
    :data:`MAP_METRICS` (others are ignored); ``border``: IBD's frame width in map pixels. EBPG and IBD score the
    primary map of each (sample, method) (:meth:`RowContext.primary`), EBPG only on images with boxes (box masks
    from ``bboxes_input``, in map pixels); class discrimination one row per (sample, method) with ≥ 2 top5 maps;
    seconds one row per (sample, method).
    """
    wanted = set(metrics)
    meta = context.meta
    out: list[tuple[int, dict]] = []
    if "ebpg" in wanted:
        with_boxes = [r for r in context.primary() if meta["bboxes_input"][r]]
        if with_boxes:
            h, w = maps.shape[-2:]
            masks = torch.stack([box_mask(meta["bboxes_input"][r], h, w) for r in with_boxes]).to(maps.device)
            values = energy_pointing_game(maps[with_boxes], masks).tolist()
            out += [(r, context.row(r, "ebpg", float(v))) for r, v in zip(with_boxes, values)]
    if "ibd" in wanted:
        primary = context.primary()
        if primary:
            values = border_intensity(maps[primary], border=border).tolist()
            out += [(r, context.row(r, "ibd", v)) for r, v in zip(primary, values)]
    if "class_discrimination" in wanted:
        by_size: dict[int, list[list[int]]] = {}
        for rows in context.groups().values():
            ranked = [r for r in rows if meta["target_kind"][r] == "top5"]
            if len(ranked) >= 2:
                by_size.setdefault(len(ranked), []).append(ranked)
        for members in by_size.values():
            values = class_discrimination(torch.stack([maps[rows] for rows in members])).tolist()  # [G, T, S, S]
            out += [(rows[0], context.row(rows[0], "class_discrimination", float(v)))
                    for rows, v in zip(members, values)]
    if "seconds" in wanted:
        out += [(r, context.row(r, "seconds", float(meta["seconds"][r]))) for r in context.first_per_method()]
    return out


@dataclass
class MapMetricsConfig:
    """What a map-only evaluation computes: ``attributions`` (the attribution run's directory or URI), the
    ``metrics`` (a subset of :data:`MAP_METRICS`), ``methods`` (None = all), IBD's ``border`` (map pixels) and
    how many attribution rows to read at a time."""

    attributions: str
    metrics: Sequence[str] = MAP_METRICS
    methods: Sequence[str] | None = None
    border: int = 16
    read_rows: int = 512


class ShardMapMetrics:
    """Ray Data callable: rows ``shard`` (shard names of the attribution run) in; one row per shard out
    (workers.batches.output_schema: ``shard``, ``shard_total`` = ``samples`` = the samples with maps in the shard,
    ``keys`` in key order, and the IPC blobs ``metrics`` (METRIC_SCHEMA rows) and ``errors`` (METRIC_ERROR_SCHEMA
    rows)), the format ``workers.staging.write_metric_parts`` stages. A sample whose metrics fail gets one error row;
    the others are kept."""

    def __init__(self, config: MapMetricsConfig) -> None:
        self.config = config
        self.store = OutputReader(config.attributions)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list[Any]] = {name: [] for name in OUTPUT.names}
        for shard in batch.column("shard").to_pylist():
            merged: dict[str, tuple[list[dict], list[dict]]] = {}
            for key, rows, errors in self._shard_units(shard):  # a sample's methods may sit in several files
                merged.setdefault(key, ([], []))[0].extend(rows)
                merged[key][1].extend(errors)
            keys = sorted(merged)
            for name, value in (("shard", shard), ("shard_total", len(keys)), ("samples", len(keys)), ("keys", keys)):
                out[name].append(value)
            out["metrics"].append(ipc_blob([row for key in keys for row in merged[key][0]], METRIC_SCHEMA))
            out["errors"].append(ipc_blob([row for key in keys for row in merged[key][1]], METRIC_ERROR_SCHEMA))
        return pa.Table.from_pydict(out, schema=OUTPUT)

    def _shard_units(self, shard: str) -> Iterator[tuple[str, list[dict], list[dict]]]:
        """(key, metric rows, error rows) for every sample of ``shard`` with attribution rows. A chunk of samples
        is scored at once; if that fails, sample by sample, so one bad sample costs one error row."""
        for table in self._samples(shard):
            keys = list(dict.fromkeys(table.column("key").to_pylist()))
            try:
                by_key = self._rows(table)
                for key in keys:
                    yield key, by_key.get(key, []), []
            except Exception:  # noqa: BLE001 -- a failing chunk becomes error rows, not a failed job
                for key in keys:
                    try:
                        yield key, self._rows(table.filter(pc.equal(table.column("key"), key))).get(key, []), []
                    except Exception as exc:  # noqa: BLE001
                        yield key, [], [{"key": key, "shard": shard, "stage": "evaluate", "method": None,
                                         "reason": error_reason(exc)}]

    def _samples(self, shard: str) -> Iterator[pa.Table]:
        """The shard's attribution rows in tables of whole samples (≈ ``read_rows`` rows each), key-sorted."""
        methods = list(self.config.methods) if self.config.methods else None
        for path in (self.store.path(f) for f in self.store.committed_files("attributions", [shard])):
            carry: pa.Table | None = None
            with self.store.fs.open_input_file(path) as handle:
                reader = pq.ParquetFile(handle)
                for record_batch in reader.iter_batches(batch_size=self.config.read_rows,
                                                        columns=ATTRIBUTION_COLUMNS):
                    table = pa.Table.from_batches([record_batch])
                    if methods:
                        table = table.filter(pc.is_in(table.column("method"), pa.array(methods)))
                    if carry is not None:
                        table = pa.concat_tables([carry, table])
                    if not table.num_rows:
                        continue
                    last = table.column("key")[-1]
                    complete = pc.not_equal(table.column("key"), last)
                    carry = table.filter(pc.invert(complete))
                    if pc.any(complete).as_py():
                        yield table.filter(complete)
            if carry is not None and carry.num_rows:
                yield carry

    def _rows(self, table: pa.Table) -> dict[str, list[dict]]:
        """{key: its metric rows} for a table of whole samples."""
        table = sort_attribution_rows(table)
        meta = {name: table.column(name).to_pylist() for name in ATTRIBUTION_COLUMNS if name != "map"}
        index = {key: i for i, key in enumerate(dict.fromkeys(meta["key"]))}
        context = RowContext(meta, [index[key] for key in meta["key"]])
        by_key: dict[str, list[dict]] = {}
        for _, row in map_metric_rows(context, torch.from_numpy(maps_of(table)), self.config.metrics,
                                      self.config.border):
            by_key.setdefault(row["key"], []).append(row)
        return by_key


def _box_share(boxes: list[list[float]], width: int, height: int) -> tuple[int, float | None]:
    """(number of boxes, area share of their union in the original image)."""
    if not boxes or width <= 0 or height <= 0:
        return len(boxes or []), None
    return len(boxes), float(box_area_share(boxes, width, height))


__all__ = ["ATTRIBUTION_COLUMNS", "MAP_METRICS", "MapMetricsConfig", "RowContext", "ShardMapMetrics",
           "map_metric_rows", "sort_attribution_rows"]
