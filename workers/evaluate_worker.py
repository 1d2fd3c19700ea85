"""The Ray actor of jobs.evaluate: pins the model once and turns decoded samples + their stored maps into metric rows.

Why images flow through the pipeline and maps are looked up (not the other way round): the model-based metrics
need the pixels, the map-only ones need nothing but the maps, and a shard's tar and its attribution Parquet hold
the same samples. So the job streams the shards exactly like jobs.attribute (read -> decode on CPU tasks ->
actors), and each actor reads the maps of its batch's keys from the attribution run's committed Parquet files
with a key filter (the files are sorted by key in small row groups, so the filter reads little). No shuffle,
no join of 50,000 × methods × targets maps across the cluster, and resumable per shard like the attribution job.
The map-only metrics come from workers.map_metrics (the same function serves jobs.evaluate's image-free path).
"""
from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import torch

from attribution.errors import error_reason
from attribution.precision import compute_precision
from attribution.metrics.perturbation import black_baseline, curve_auc, perturbation_curves, pixel_order
from attribution.metrics.road import DEFAULT_FRACTIONS as ROAD_FRACTIONS
from attribution.metrics.road import PIXEL_NOISE, SOLVE_DTYPES, noise_for, road_curves
from schemas.metrics import METRIC_ERROR_SCHEMA, METRIC_SCHEMA
from workers.batches import DecodedBatch, error_row
from workers.crash_guard import guarded
from workers.device import device_images, exit_if_device_lost, load_model
from workers.map_metrics import (ATTRIBUTION_COLUMNS, MAP_METRICS, RowContext, map_metric_rows,
                                 sort_attribution_rows)
from schemas.reader import OutputReader, maps_of

MODEL_METRICS = ("morf", "lerf", "insertion", "road_morf", "road_lerf")
METRICS = MAP_METRICS + MODEL_METRICS
DEFAULT_METRICS = tuple(m for m in METRICS if not m.startswith("road_"))  # ROAD (CG solves) is opt-in
LERF_ABS_METHODS = ("gbp", "gig")  # TR-GBP App. D: signed gradient maps are ranked by |map| for LeRF


@dataclass
class EvaluateConfig:
    """What every actor of an evaluation run computes.

    ``attributions``: the attribution run's output directory; ``model``/``weights``: the model it used (the job
    reads them from that run's manifest); ``methods``: None = every method found; ``morf_steps``: MoRF/LeRF curves
    at fractions 0, 1/n, …, 1 of the pixels; ``insertion_steps``: insertion at PI = 100/n, 2·100/n, …, 100 %
    (n = 20: the A-FMI paper's 5, 10, …, 100 %); ``border``: IBD's frame width in map pixels; ``road_fractions``:
    the shares of pixels ROAD removes (default 0.1 … 0.9); ``road_noise``: its σ in [0, 1] pixel units (the
    authors' 0.01; divided by the preprocessing std for the normalised images); ``road_seed``: a sample's noise
    comes from crc32(f"{road_seed}:{key}") (then attribution.metrics.road.step_seed per order and step), so it is
    the same for every method, batch composition and rerun; ``road_dtype``: the imputation solve's precision,
    "float64" (default) or "float32" (2-4x faster on a CPU, far more on GPUs with slow float64; imputed pixels
    within ~2e-4 pixel units of the exact solution, >= 45x below the noise: attribution.metrics.road.linear_imputation).
    """

    attributions: str
    model: str
    weights: str | None = None
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    methods: list[str] | None = None
    morf_steps: int = 10
    insertion_steps: int = 20
    lerf_abs_methods: list[str] = field(default_factory=lambda: list(LERF_ABS_METHODS))
    border: int = 16
    chunk_size: int = 64
    precision: str = "fp32"
    road_fractions: list[float] = field(default_factory=lambda: list(ROAD_FRACTIONS))
    road_noise: float = PIXEL_NOISE
    road_seed: int = 0
    road_dtype: str = "float64"
    device: str | None = None
    threads: int | None = None

    def morf_fractions(self) -> list[float]:
        """Pixel fractions of the MoRF/LeRF curves: 0, 1/n, …, 1."""
        return [i / self.morf_steps for i in range(self.morf_steps + 1)]

    def insertion_fractions(self) -> list[float]:
        """Pixel fractions of the insertion curves: 1/n, …, 1 (PI / 100)."""
        return [i / self.insertion_steps for i in range(1, self.insertion_steps + 1)]


class EvaluateWorker:
    """Ray Data callable class: decoded samples (workers.decode) in; out one row per shard of the batch
    (workers.batches.output_schema) with two Arrow IPC blobs: ``metrics`` (rows of schemas.metrics.METRIC_SCHEMA)
    and ``errors`` (rows of METRIC_ERROR_SCHEMA). A batch that fails is retried sample by sample, so one bad
    sample costs one error row."""

    def __init__(self, config: EvaluateConfig) -> None:
        self.config = config
        self.spec, self.channels_last = load_model(config.model, config.weights, config.device, config.threads,
                                                   config.precision)
        device = self.spec.device
        self.size = self.spec.preprocessing.input_size
        self.baseline = black_baseline(self.spec.preprocessing).to(device)
        self.maps = OutputReader(config.attributions)  # a snapshot of its commits: listed once, on first use
        self.last_seconds: dict[str, float] = {}  # {step: seconds} of the last call (what jobs.plan reads)

    def __call__(self, table: pa.Table) -> pa.Table:
        self.last_seconds = {}
        return guarded(table, self._call, "evaluate")  # a sample that kills the process: an error row

    def _call(self, table: pa.Table) -> pa.Table:
        decoded = DecodedBatch(table)
        batch, rows, errors, good = decoded.columns, decoded.rows, decoded.errors, decoded.good
        if good:
            reason = None
            try:
                self._evaluate(batch, good, rows, errors)
            except Exception as exc:  # noqa: BLE001 -- a failure on one batch becomes error rows, not a failed job
                reason = error_reason(exc)
            if reason is not None:
                exit_if_device_lost(self.spec.device, reason)  # a dead GPU: no error rows, a new actor
                for i in good:  # find the culprit(s): retry one sample at a time
                    rows[i], errors[i] = [], []
                    try:
                        self._evaluate(batch, [i], rows, errors)
                    except Exception as exc:  # noqa: BLE001
                        rows[i] = []
                        errors[i].append(error_row(batch, i, "evaluate", None, error_reason(exc)))
        return decoded.output("metrics", METRIC_SCHEMA, METRIC_ERROR_SCHEMA)

    # ------------------------------------------------------------------------------------------------ one batch
    def _evaluate(self, batch: dict[str, Any], good: list[int], rows: list[list[dict]],
                  errors: list[list[dict]]) -> None:
        with self._timed("read maps"):
            table = self._maps_for(batch, good)
        position = {(batch["shard"][i], batch["key"][i]): i for i in good}
        found = {(s, k) for s, k in zip(table.column("shard").to_pylist(), table.column("key").to_pylist())}
        for (shard, key), i in position.items():
            if (shard, key) not in found:
                errors[i].append(error_row(batch, i, "evaluate", None, "no attribution rows for this sample in "
                                        f"{self.config.attributions} (failed or filtered there)"))
        if not table.num_rows:
            return
        device = self.spec.device
        meta = {name: table.column(name).to_pylist() for name in ATTRIBUTION_COLUMNS if name != "map"}
        maps = torch.from_numpy(maps_of(table)).to(device)
        sample_of = [position[(s, k)] for s, k in zip(meta["shard"], meta["key"])]
        images = device_images(self.spec, batch["pixels"][good], self.channels_last)
        image_of = [good.index(i) for i in sample_of]
        context = RowContext(meta, sample_of)
        wanted = set(self.config.metrics)
        with self._timed("map metrics"):
            out = map_metric_rows(context, maps, self.config.metrics, self.config.border)
        if wanted & set(MODEL_METRICS):
            with compute_precision(self.config.precision, device):  # the perturbed images' forward passes
                out += self._perturbation(context, maps, images, image_of, wanted)
        for r, row in out:
            rows[sample_of[r]].append(row)

    def _maps_for(self, batch: dict[str, Any], good: list[int]) -> pa.Table:
        """The attribution rows of the batch's samples (all methods, or the configured ones), sorted."""
        tables = [self.maps.read(shards=[shard], keys=[batch["key"][i] for i in good if batch["shard"][i] == shard],
                                 methods=self.config.methods, columns=ATTRIBUTION_COLUMNS)
                  for shard in sorted({batch["shard"][i] for i in good})]
        tables = [t for t in tables if t.column_names]  # a shard without committed maps gives a column-less table
        if not tables:
            return pa.table({name: pa.array([], pa.string()) for name in ("key", "shard")})
        return sort_attribution_rows(pa.concat_tables(tables))

    # ------------------------------------------------------------------------------------------------ metrics
    def _perturbation(self, context: RowContext, maps: torch.Tensor, images: torch.Tensor, image_of: list[int],
                      wanted: set[str]) -> list[tuple[int, dict]]:
        """MoRF/LeRF/insertion/ROAD of the primary maps (see RowContext.primary)."""
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
                with self._timed(name):  # ends with the rows' host copy, so the device work is inside
                    by_abs = torch.tensor([context.meta["method"][r] in cfg.lerf_abs_methods for r in primary])
                    order = pixel_order(m, most_relevant_first=(name == "morf"))
                    if name == "lerf" and bool(by_abs.any()):
                        order_abs = pixel_order(m, most_relevant_first=False, by_abs=True)
                        order = torch.where(by_abs.to(order.device)[:, None], order_abs, order)
                    prob = perturbation_curves(spec.module, imgs, order, targets, fractions, mode="remove",
                                               baseline=self.baseline, chunk_size=cfg.chunk_size)["prob"]
                    out += self._curve_rows(context, primary, name, prob, fractions)
        if "insertion" in wanted:
            out += self._insertion(context, primary, m, imgs, targets)
        orders = [name[len("road_"):] for name in ("road_morf", "road_lerf") if name in wanted]
        if orders:
            with self._timed("road"):
                out += self._road(context, primary, m, imgs, targets, orders)
        return out

    def _insertion(self, context: RowContext, primary: list[int], m: torch.Tensor, imgs: torch.Tensor,
                   targets: torch.Tensor) -> list[tuple[int, dict]]:
        """Insertion accuracy and softmax-ratio curves of the primary maps ``m`` [P, S, S] on ``imgs``."""
        cfg, spec = self.config, self.spec
        with self._timed("insertion"):
            fractions = cfg.insertion_fractions()
            order = pixel_order(m, most_relevant_first=True)
            curves = perturbation_curves(spec.module, imgs, order, targets, fractions, mode="insert",
                                         baseline=self.baseline, chunk_size=cfg.chunk_size)
            with torch.no_grad():
                reference = spec.module(imgs).softmax(dim=1).gather(1, targets[:, None])
            return (self._curve_rows(context, primary, "insertion_accuracy", curves["top1"], fractions)
                    + self._curve_rows(context, primary, "insertion_softmax", curves["prob"] / reference, fractions))

    def _road(self, context: RowContext, primary: list[int], m: torch.Tensor, imgs: torch.Tensor,
              targets: torch.Tensor, orders: list[str]) -> list[tuple[int, dict]]:
        """ROAD curves (``orders``: morf and/or lerf) of the primary maps ``m`` [P, S, S] on ``imgs``."""
        cfg, out = self.config, []
        fractions = list(cfg.road_fractions)
        by_abs = torch.tensor([context.meta["method"][r] in cfg.lerf_abs_methods for r in primary])
        seeds = [zlib.crc32(f"{cfg.road_seed}:{context.meta['key'][r]}".encode()) for r in primary]
        road = road_curves(self.spec.module, imgs, m, targets, fractions, orders=orders, lerf_by_abs=by_abs,
                           noise=noise_for(self.spec.preprocessing, cfg.road_noise), seeds=seeds,
                           chunk_size=cfg.chunk_size, dtype=SOLVE_DTYPES[cfg.road_dtype])
        for order in orders:  # probability AUC; and the top-1 hits, whose mean over images is the accuracy
            out += self._curve_rows(context, primary, f"road_{order}", road[order]["prob"], fractions)
            out += self._curve_rows(context, primary, f"road_{order}_accuracy", road[order]["top1"], fractions)
        return out

    @contextlib.contextmanager
    def _timed(self, step: str) -> Iterator[None]:
        """Add the wall time of the block to ``last_seconds[step]`` (the blocks end with a host copy of their
        results, so the device's work is inside)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.last_seconds[step] = self.last_seconds.get(step, 0.0) + time.perf_counter() - start

    @staticmethod
    def _curve_rows(context: RowContext, primary: list[int], metric: str, curves: torch.Tensor,
                    fractions: list[float]) -> list[tuple[int, dict]]:
        areas = curve_auc(curves, fractions).tolist()
        values = curves.float().cpu().tolist()
        return [(r, context.row(r, metric, area, fractions, curve))
                for r, area, curve in zip(primary, areas, values)]


__all__ = ["DEFAULT_METRICS", "EvaluateConfig", "EvaluateWorker", "LERF_ABS_METHODS", "METRICS"]
