"""Per-image metric rows -> the papers' aggregates (one long frame) and mean curves.

Which rows count: one map per (image, model, method, options), the *primary* one — every row of a ``label`` or
``top1`` run, the top-1 row (``target_rank == 0``) of a ``top5`` run. That is the map the perturbation metrics
were computed on (jobs.evaluate), so every column of a table describes the same maps; the other four class maps
of a top5 run only enter through class discrimination.

Aggregates (``attribution.metrics.protocols`` for the two dataset-level protocols):

=========================  ========================================================================================
``ebpg``                   ebpg_protocol on the primary EBPG rows with ``n_boxes == 1 and box_share < 0.5``
                           (TR-GBP App. C), in (shard, key) order so the random subsets do not depend on how
                           the files were read: mean ± std of ``repeats`` means of ``sample`` random images
``ibd_auc``                ibd_auc_protocol(IBD, wrong = ~correct) on the primary IBD rows with a known label
                           (TR-GBP §5.4): drop the lower half by IBD, ROC-AUC for "prediction wrong"
``morf`` ``lerf``          mean ± std (population, ddof = 0) of the per-image curve AUCs
``insertion_accuracy``     idem (A-FMI App. A.3)
``insertion_softmax``      idem
``road_morf`` ``road_lerf`` idem (ROAD, noisy linear imputation); ``road_*_accuracy``: mean of the per-image top-1
                           hit AUCs (= the AUC of ROAD's accuracy curve)
``class_discrimination``   mean ± std of the per-image values
``seconds``                mean ± std of the per-image times (evaluate's ``seconds`` rows; for a method that has none,
                           the attribution run's ``seconds`` column, one value per image)
``fmi_prototype_accuracy`` as jobs.evaluate computed it (dataset_metrics.parquet)
=========================  ========================================================================================

Null/NaN values (e.g. an all-zero map) are left out of every mean; ``n`` says how many images each aggregate used.
EBPG and IBD of a map with no positive pixel are undefined (NaN, attribution.metrics.localisation): those maps are
left out and counted in ``left_out`` (also named in ``protocol``), and an aggregate whose every map is such a map
is still a row (mean NaN), so the report can say why its cell is empty.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from attribution.metrics.protocols import ebpg_protocol, ibd_auc_protocol

CURVE_METRICS = ("morf", "lerf", "insertion_accuracy", "insertion_softmax",
                 "road_morf", "road_lerf", "road_morf_accuracy", "road_lerf_accuracy")
MEAN_METRICS = CURVE_METRICS + ("class_discrimination", "seconds")
GROUP = ["model", "weights", "method", "options"]
# Methods in the papers' column order (baselines first, the two papers' methods last); others in between.

@dataclass(frozen=True)
class Protocol:
    """Sizes of the papers' protocols: EBPG ``ebpg_sample`` images × ``ebpg_repeats`` repeats drawn with
    ``seed``; IBD-AUC on the ``ibd_keep`` share of images with the largest IBD."""

    ebpg_sample: int = 500
    ebpg_repeats: int = 5
    seed: int = 0
    ibd_keep: float = 0.5


# The primary maps' rows as an Arrow filter (what :func:`primary_rows` keeps): for reading only those rows of a run
PRIMARY = (pc.field("target_kind") != "top5") | (pc.field("target_rank") == 0)


def primary_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the primary maps (see the module docstring): target_kind != 'top5' or target_rank == 0 (as
    :data:`PRIMARY`)."""
    if frame.empty:
        return frame
    return frame[(frame["target_kind"] != "top5") | (frame["target_rank"] == 0)]


def group_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose NaN ``weights`` are None, so groupby keys compare equal across runs."""
    out = frame.copy()
    out["weights"] = out["weights"].astype(object).where(out["weights"].notna(), None)
    return out


def group_key(row) -> tuple:
    """A (model, weights, method, options[, …]) group key with NaN entries as None."""
    return tuple(None if (isinstance(v, float) and math.isnan(v)) else v for v in row)


def _values(frame: pd.DataFrame) -> np.ndarray:
    return frame["value"].to_numpy(dtype=np.float64, na_value=np.nan)


def aggregate(metrics: pd.DataFrame, dataset: pd.DataFrame | None = None,
              attribution_seconds: pd.DataFrame | None = None, protocol: Protocol = Protocol()) -> pd.DataFrame:
    """The long table of aggregates: one row per (model, weights, method, options, metric) with ``mean``, ``std``
    (NaN where not defined), ``n`` (images used) and ``images`` (distinct images of that method in the run).

    ``metrics``: rows of schemas.metrics.METRIC_SCHEMA (pandas); ``dataset``: rows of DATASET_METRIC_SCHEMA;
    ``attribution_seconds``: attribution rows (at least key, shard, model, weights, method, options,
    target_kind, target_rank, seconds) whose time is used for methods without evaluate ``seconds`` rows.
    Metric names: ebpg, ibd_auc, morf, lerf, insertion_accuracy, insertion_softmax, class_discrimination,
    fmi_prototype_accuracy, seconds.
    """
    out: list[dict] = []
    primary = group_frame(primary_rows(metrics)) if len(metrics) else pd.DataFrame(columns=GROUP)
    images: dict[tuple, int] = {}
    for key, group in primary.groupby(GROUP, dropna=False, sort=False):
        key = group_key(key)
        images[key] = int(group[["shard", "key"]].drop_duplicates().shape[0])
        by_metric = dict(tuple(group.groupby("metric", sort=False)))
        ebpg = by_metric.get("ebpg")
        if ebpg is not None:
            eligible = ebpg[(ebpg["n_boxes"] == 1) & (ebpg["box_share"].astype(float) < 0.5)] \
                .sort_values(["shard", "key"], kind="stable")
            values = _values(eligible)
            empty = int((~np.isfinite(values)).sum())  # maps with no positive pixel: no EBPG, left out
            values = values[np.isfinite(values)]
            if values.size:
                mean, std = ebpg_protocol(values, sample=protocol.ebpg_sample, repeats=protocol.ebpg_repeats,
                                          seed=protocol.seed)
                out.append(_agg(key, "ebpg", mean, std, values.size, images[key],
                                f"{min(protocol.ebpg_sample, values.size)} of {values.size} eligible images x "
                                f"{protocol.ebpg_repeats} repeats, seed {protocol.seed}" + _left_out(empty),
                                left_out=empty))
            elif empty:
                out.append(_agg(key, "ebpg", math.nan, math.nan, 0, images[key], _left_out(empty), left_out=empty))
        ibd = by_metric.get("ibd")
        if ibd is not None:
            known = ibd[ibd["correct"].notna()]
            values = _values(known)
            finite = np.isfinite(values)
            empty = int((~finite).sum())  # maps with no positive pixel: no IBD, left out
            if finite.any():
                wrong = ~known["correct"].astype(bool).to_numpy()
                auc = ibd_auc_protocol(values[finite], wrong[finite], keep=protocol.ibd_keep)
                out.append(_agg(key, "ibd_auc", auc, math.nan, int(finite.sum()), images[key],
                                f"largest {protocol.ibd_keep:.0%} by IBD of {int(finite.sum())} images with a "
                                f"known label ({int(wrong[finite].sum())} wrong)" + _left_out(empty),
                                left_out=empty))
            elif empty:
                out.append(_agg(key, "ibd_auc", math.nan, math.nan, 0, images[key], _left_out(empty),
                                left_out=empty))
        for metric in MEAN_METRICS:
            rows = by_metric.get(metric)
            if rows is None:
                continue
            values = _values(rows)
            values = values[np.isfinite(values)]
            if values.size:
                out.append(_agg(key, metric, float(values.mean()), float(values.std()), values.size, images[key],
                                "mean ± std over images"))
    have_seconds = {group_key((o["model"], o["weights"], o["method"], o["options"])) for o in out
                    if o["metric"] == "seconds"}
    if attribution_seconds is not None and len(attribution_seconds):
        timed = group_frame(primary_rows(attribution_seconds)).drop_duplicates(["shard", "key"] + GROUP)
        for key, group in timed.groupby(GROUP, dropna=False, sort=False):
            key = group_key(key)
            if key in have_seconds:
                continue
            values = group["seconds"].to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            images.setdefault(key, len(group))
            if values.size:
                out.append(_agg(key, "seconds", float(values.mean()), float(values.std()), values.size,
                                images[key], "mean ± std over images (attribution run)"))
                have_seconds.add(key)
    if dataset is not None and len(dataset):
        for row in group_frame(dataset).itertuples(index=False):
            key = group_key((row.model, row.weights, row.method, row.options))
            value = float(row.value) if row.value is not None else math.nan
            out.append(_agg(key, str(row.metric), value, math.nan, int(row.n), images.get(key, int(row.n)),
                            str(row.detail)))
    columns = GROUP + ["metric", "mean", "std", "n", "images", "protocol", "left_out"]
    return pd.DataFrame(out, columns=columns)


def _left_out(empty: int) -> str:
    return f"; {empty} maps with no positive pixel left out (no energy to share)" if empty else ""


def _agg(key: tuple, metric: str, mean: float, std: float, n: int, images: int, protocol: str,
         left_out: int = 0) -> dict:
    """One aggregate row; ``left_out``: maps without a value (EBPG/IBD of a map with no positive pixel)."""
    model, weights, method, options = key
    return {"model": model, "weights": weights, "method": method, "options": options, "metric": metric,
            "mean": float(mean), "std": float(std), "n": int(n), "images": int(images), "protocol": protocol,
            "left_out": int(left_out)}


def mean_curves(metrics: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Mean curve per (model, weights, method, options, metric) for the curve metrics, from the primary rows:
    long frame with ``step`` (fraction of pixels), ``value`` (mean over images of the curve at that step,
    NaNs left out) and ``n`` (curves averaged). All rows of one metric share ``steps``; where runs with
    different steps are combined, the most common steps are kept and a note says how many curves were left out.
    Returns (frame, notes)."""
    columns = GROUP + ["metric", "step", "value", "n"]
    if metrics.empty:
        return pd.DataFrame(columns=columns), []
    rows = group_frame(primary_rows(metrics))
    rows = rows[rows["metric"].isin(CURVE_METRICS) & rows["curve"].notna() & rows["steps"].notna()]
    out, notes = [], []
    for key, group in rows.groupby(GROUP + ["metric"], dropna=False, sort=False):
        key = group_key(key)
        steps = [tuple(np.asarray(s, dtype=np.float64).round(6)) for s in group["steps"]]
        common, count = Counter(steps).most_common(1)[0]
        if count < len(steps):
            notes.append(f"{key[0]} {key[2]} {key[4]}: {len(steps) - count} curves with other steps left out of "
                         "the mean curve")
        curves = np.stack([np.asarray(c, dtype=np.float64) for c, s in zip(group["curve"], steps) if s == common])
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(np.where(np.isfinite(curves), curves, np.nan), axis=0)
        for step, value in zip(common, mean):
            out.append(dict(zip(GROUP + ["metric"], key), step=float(step), value=float(value), n=len(curves)))
    return pd.DataFrame(out, columns=columns), notes


__all__ = ["CURVE_METRICS", "GROUP", "MEAN_METRICS", "Protocol", "aggregate", "group_frame", "group_key",
           "mean_curves", "primary_rows"]
