"""The Ray actor of jobs.evaluate: pins the model once and turns decoded samples + their stored maps into metric rows.

Why images flow through the pipeline and maps are looked up (not the other way round): the model-based metrics
need the pixels, the map-only ones need nothing but the maps, and a shard's tar and its attribution Parquet hold
the same samples. So the job streams the shards exactly like jobs.attribute (read -> decode on CPU tasks ->
actors), and each actor reads the maps of its batch's keys from the attribution run's committed Parquet files
with a key filter (the files are sorted by key in small row groups, so the filter reads little). No shuffle,
no join of 50,000 × methods × targets maps across the cluster, and resumable per shard like the attribution job.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from attribution import models
from attribution.metrics.discrimination import class_discrimination
from attribution.metrics.localisation import border_intensity, box_area_share, box_mask, energy_pointing_game
from attribution.metrics.perturbation import black_baseline, curve_auc, perturbation_curves, pixel_order
from schemas.metrics import METRIC_ERROR_SCHEMA, METRIC_SCHEMA
from workers.attribution_worker import ipc_blob
from workers.decode import DECODED_SCHEMA
from workers.sink import OutputStore, maps_of

MAP_METRICS = ("ebpg", "ibd", "class_discrimination", "seconds")
MODEL_METRICS = ("morf", "lerf", "insertion")
METRICS = MAP_METRICS + MODEL_METRICS
LERF_ABS_METHODS = ("gbp", "gig")  # TR-GBP App. D: signed gradient maps are ranked by |map| for LeRF
_COLUMNS = ["key", "shard", "model", "weights", "method", "options", "target", "target_kind", "target_rank",
            "label", "top5", "width", "height", "bboxes", "bboxes_input", "map", "map_scale", "seconds"]


@dataclass
class EvaluateConfig:
    """What every actor of an evaluation run computes.

    ``attributions``: the attribution run's output directory; ``model``/``weights``: the model it used (the job
    reads them from that run's manifest); ``methods``: None = every method found; ``morf_steps``: MoRF/LeRF curves
    at fractions 0, 1/n, …, 1 of the pixels; ``insertion_steps``: insertion at PI = 100/n, 2·100/n, …, 100 %
    (n = 20: the A-FMI paper's 5, 10, …, 100 %); ``border``: IBD's frame width in map pixels.
    """

    attributions: str
    model: str
    weights: str | None = None
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    methods: list[str] | None = None
    morf_steps: int = 10
    insertion_steps: int = 20
    lerf_abs_methods: list[str] = field(default_factory=lambda: list(LERF_ABS_METHODS))
    border: int = 16
    chunk_size: int = 64
    device: str | None = None
    threads: int | None = None

    def morf_fractions(self) -> list[float]:
        """Pixel fractions of the MoRF/LeRF curves: 0, 1/n, …, 1."""
        return [i / self.morf_steps for i in range(self.morf_steps + 1)]

    def insertion_fractions(self) -> list[float]:
        """Pixel fractions of the insertion curves: 1/n, …, 1 (PI / 100)."""
        return [i / self.insertion_steps for i in range(1, self.insertion_steps + 1)]


class EvaluateWorker:
    """Ray Data callable class: decoded samples (workers.decode) in, one row per sample out — ``key``, ``shard``,
    ``shard_total`` and two Arrow IPC blobs: ``metrics`` (rows of schemas.metrics.METRIC_SCHEMA) and ``errors``
    (rows of METRIC_ERROR_SCHEMA). A batch that fails is retried sample by sample, so one bad sample costs one
    error row."""

    def __init__(self, config: EvaluateConfig) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        device = torch.device(config.device) if config.device else models.default_device()
        self.spec = models.load(config.model, config.weights, device=device)
        self.size = self.spec.preprocessing.input_size
        self.baseline = black_baseline(self.spec.preprocessing).to(device)
        self.store = OutputStore(config.attributions)
        self.files = {shard: [self.store.path(f) for f in record["files"] if f.startswith("attributions/")]
                      for shard, record in self.store.committed().items()}

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        batch: dict[str, Any] = {name: table.column(name).to_pylist() for name in DECODED_SCHEMA.names}
        batch["pixels"] = table.column("pixels").combine_chunks().to_numpy()
        n = len(batch["key"])
        rows: list[list[dict]] = [[] for _ in range(n)]
        errors: list[list[dict]] = [[] for _ in range(n)]
        for i in range(n):
            if batch["error"][i] is not None:
                errors[i].append(_error(batch, i, batch["stage"][i] or "read", batch["error"][i]))
        good = [i for i in range(n) if batch["error"][i] is None]
        if good:
            try:
                self._evaluate(batch, good, rows, errors)
            except (RuntimeError, ValueError, KeyError, IndexError, OSError):
                for i in good:  # find the culprit(s): retry one sample at a time
                    rows[i], errors[i] = [], []
                    try:
                        self._evaluate(batch, [i], rows, errors)
                    except (RuntimeError, ValueError, KeyError, IndexError, OSError) as exc:
                        rows[i] = []
                        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        errors[i].append(_error(batch, i, "evaluate", reason))
        return {
            "key": batch["key"], "shard": batch["shard"], "shard_total": batch["shard_total"],
            "metrics": np.array([ipc_blob(r, METRIC_SCHEMA) for r in rows], dtype=object),
            "errors": np.array([ipc_blob(e, METRIC_ERROR_SCHEMA) for e in errors], dtype=object),
        }

    # ------------------------------------------------------------------------------------------------ one batch
    def _evaluate(self, batch: dict[str, Any], good: list[int], rows: list[list[dict]],
                  errors: list[list[dict]]) -> None:
        table = self._maps_for(batch, good)
        position = {(batch["shard"][i], batch["key"][i]): i for i in good}
        found = {(s, k) for s, k in zip(table.column("shard").to_pylist(), table.column("key").to_pylist())}
        for (shard, key), i in position.items():
            if (shard, key) not in found:
                errors[i].append(_error(batch, i, "evaluate", "no attribution rows for this sample in "
                                        f"{self.config.attributions} (failed or filtered there)"))
        if not table.num_rows:
            return
        device = self.spec.device
        meta = {name: table.column(name).to_pylist() for name in _COLUMNS if name != "map"}
        maps = torch.from_numpy(maps_of(table)).to(device)
        sample_of = [position[(s, k)] for s, k in zip(meta["shard"], meta["key"])]
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good])).to(device)
        images = self.spec.preprocessing.normalise(pixels.float() / 255.0)
        image_of = [good.index(i) for i in sample_of]
        context = _Context(meta, sample_of, [int(top5[0]) for top5 in meta["top5"]])
        wanted = set(self.config.metrics)
        out: list[tuple[int, dict]] = []
        if "ebpg" in wanted:
            out += self._ebpg(context, maps)
        if "ibd" in wanted:
            primary = context.primary()
            values = border_intensity(maps[primary], border=self.config.border).tolist()
            out += [(r, context.row(r, "ibd", v)) for r, v in zip(primary, values)]
        if "class_discrimination" in wanted:
            out += self._class_discrimination(context, maps)
        if "seconds" in wanted:
            out += [(r, context.row(r, "seconds", float(meta["seconds"][r]))) for r in context.first_per_method()]
        if wanted & set(MODEL_METRICS):
            out += self._perturbation(context, maps, images, image_of, wanted)
        for r, row in out:
            rows[sample_of[r]].append(row)

    def _maps_for(self, batch: dict[str, Any], good: list[int]) -> pa.Table:
        """The attribution rows of the batch's samples (all methods, or the configured ones), sorted."""
        tables = []
        for shard in sorted({batch["shard"][i] for i in good}):
            files = self.files.get(shard)
            if not files:
                continue
            keys = [batch["key"][i] for i in good if batch["shard"][i] == shard]
            condition = pc.field("key").isin(keys)
            if self.config.methods:
                condition = condition & pc.field("method").isin(self.config.methods)
            tables.append(pq.read_table(files, filesystem=self.store.fs, columns=_COLUMNS, filters=condition))
        if not tables:
            return pa.table({name: pa.array([], pa.string()) for name in ("key", "shard")})
        table = pa.concat_tables(tables)
        return table.sort_by([("shard", "ascending"), ("key", "ascending"), ("method", "ascending"),
                              ("target_rank", "ascending"), ("target", "ascending")])

    # ------------------------------------------------------------------------------------------------ metrics
    def _ebpg(self, context: "_Context", maps: torch.Tensor) -> list[tuple[int, dict]]:
        with_boxes = [r for r in context.primary() if context.meta["bboxes_input"][r]]
        if not with_boxes:
            return []
        masks = torch.stack([box_mask(context.meta["bboxes_input"][r], self.size, self.size) for r in with_boxes])
        values = energy_pointing_game(maps[with_boxes], masks.to(maps.device))
        return [(r, context.row(r, "ebpg", float(v))) for r, v in zip(with_boxes, values.tolist())]

    def _class_discrimination(self, context: "_Context", maps: torch.Tensor) -> list[tuple[int, dict]]:
        groups: dict[int, list[list[int]]] = {}
        for rows in context.groups().values():
            ranked = [r for r in rows if context.meta["target_kind"][r] == "top5"]
            if len(ranked) >= 2:
                groups.setdefault(len(ranked), []).append(ranked)
        out = []
        for size, members in groups.items():
            stacked = torch.stack([maps[rows] for rows in members])  # [G, T, S, S]
            values = class_discrimination(stacked)
            out += [(rows[0], context.row(rows[0], "class_discrimination", float(v)))
                    for rows, v in zip(members, values.tolist())]
        return out

    def _perturbation(self, context: "_Context", maps: torch.Tensor, images: torch.Tensor, image_of: list[int],
                      wanted: set[str]) -> list[tuple[int, dict]]:
        """MoRF/LeRF/insertion of the primary maps (see _Context.primary)."""
        primary = context.primary()
        if not primary:
            return []
        cfg, spec = self.config, self.spec
        m, imgs = maps[primary], images[[image_of[r] for r in primary]]
        targets = torch.tensor([context.meta["target"][r] for r in primary], device=imgs.device)
        out: list[tuple[int, dict]] = []
        if "morf" in wanted or "lerf" in wanted:
            fractions = cfg.morf_fractions()
            for name in ("morf", "lerf"):
                if name not in wanted:
                    continue
                by_abs = torch.tensor([context.meta["method"][r] in cfg.lerf_abs_methods for r in primary])
                order = pixel_order(m, most_relevant_first=(name == "morf"))
                if name == "lerf" and bool(by_abs.any()):
                    order_abs = pixel_order(m, most_relevant_first=False, by_abs=True)
                    order = torch.where(by_abs.to(order.device)[:, None], order_abs, order)
                prob = perturbation_curves(spec.module, imgs, order, targets, fractions, mode="remove",
                                           baseline=self.baseline, chunk_size=cfg.chunk_size)["prob"]
                out += self._curve_rows(context, primary, name, prob, fractions)
        if "insertion" in wanted:
            fractions = cfg.insertion_fractions()
            order = pixel_order(m, most_relevant_first=True)
            curves = perturbation_curves(spec.module, imgs, order, targets, fractions, mode="insert",
                                         baseline=self.baseline, chunk_size=cfg.chunk_size)
            with torch.no_grad():
                reference = spec.module(imgs).softmax(dim=1).gather(1, targets[:, None])
            out += self._curve_rows(context, primary, "insertion_accuracy", curves["top1"], fractions)
            out += self._curve_rows(context, primary, "insertion_softmax", curves["prob"] / reference, fractions)
        return out

    @staticmethod
    def _curve_rows(context: "_Context", primary: list[int], metric: str, curves: torch.Tensor,
                    fractions: list[float]) -> list[tuple[int, dict]]:
        areas = curve_auc(curves, fractions).tolist()
        values = curves.float().cpu().tolist()
        return [(r, context.row(r, metric, area, fractions, curve))
                for r, area, curve in zip(primary, areas, values)]


class _Context:
    """The attribution rows' metadata of one batch, and how to turn one of them into a metric row."""

    def __init__(self, meta: dict[str, list], sample_of: list[int], top1: list[int]) -> None:
        self.meta, self.sample_of, self.top1 = meta, sample_of, top1
        self._box = {}
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


def _box_share(boxes: list[list[float]], width: int, height: int) -> tuple[int, float | None]:
    """(number of boxes, area share of their union in the original image)."""
    if not boxes or width <= 0 or height <= 0:
        return len(boxes or []), None
    return len(boxes), float(box_area_share(boxes, width, height))


def _error(batch: dict[str, Any], i: int, stage: str, reason: str) -> dict:
    return {"key": batch["key"][i], "shard": batch["shard"][i], "stage": stage, "method": None, "reason": reason}


__all__ = ["EvaluateConfig", "EvaluateWorker", "LERF_ABS_METHODS", "METRICS"]
