"""Tables written by ``jobs.evaluate`` and ``jobs.sanity``.

**Metric rows** (``metrics/<shard>/part-*.parquet``): long format, one row per (sample, method, target, metric).
A per-image scalar is in ``value``; curve metrics (MoRF, LeRF, insertion) also keep the whole curve
(``curve`` at the pixel fractions ``steps``) and put its normalised area (AUC) in ``value``. Columns that
dataset-level protocols need (correctness of the prediction for IBD-AUC, the box statistics for the EBPG image
filter) travel with every row, so an aggregation needs nothing but this table.

Metric names (``metric``), value and unit:

=====================  ==================================================================================
``ebpg``               energy share inside the ground-truth boxes, in [0, 1] (rows only for images with boxes)
``ibd``                share of attribution in the 16-px border of the map, in [0, 1]
``morf`` / ``lerf``    AUC of the target's softmax probability while the most / least relevant pixels are removed
``insertion_accuracy`` AUC of Accuracy@PI (1 while the insertion image is still classified as the label)
``insertion_softmax``  AUC of Softmax-Ratio@PI (p̂_c / p_c on the insertion image)
``road_morf`` / ``road_lerf``  ROAD (Rong et al. 2022): AUC of the target's softmax probability while the most /
                       least relevant 10 … 90 % of the pixels are replaced by noisy linear imputation
``road_morf_accuracy`` / ``road_lerf_accuracy``  the same steps' top-1 hits (1 while the imputed image is still
                       classified as the target; their mean over images is ROAD's accuracy per step), AUC
``class_discrimination`` mean pairwise Spearman correlation of the top-5 class maps (target = top-1 class)
``seconds``            the method's time per image (from the attribution rows), seconds
=====================  ==================================================================================

**Dataset metrics** (``dataset_metrics.parquet``): one row per (model, method, options, metric) for metrics that
only exist over a data set (FMI prototype-classification accuracy).

**Sanity rows** (``sanity/part-*.parquet`` of ``jobs.sanity``): one row per (sample, method, randomisation step)
with the similarity of the map after the step to the original map.
"""
from __future__ import annotations

import pyarrow as pa

from schemas.validation import validate_table

METRIC_NAMES = ("ebpg", "ibd", "morf", "lerf", "insertion_accuracy", "insertion_softmax",
                "road_morf", "road_lerf", "road_morf_accuracy", "road_lerf_accuracy",
                "class_discrimination", "seconds")
DATASET_METRIC_NAMES = ("fmi_prototype_accuracy",)


def _schema(fields: list[tuple[str, pa.DataType, bool, str]]) -> pa.Schema:
    return pa.schema([pa.field(n, t, nullable, metadata={"doc": doc}) for n, t, nullable, doc in fields])


_RUN_FIELDS: list[tuple[str, pa.DataType, bool, str]] = [
    ("model", pa.string(), False, "model name"),
    ("weights", pa.string(), True, "weights name or checkpoint path; null = random init"),
    ("method", pa.string(), False, "attribution method name"),
    ("options", pa.string(), False, "method options as JSON"),
]

METRIC_SCHEMA = _schema([
    ("key", pa.string(), False, "sample key"),
    ("shard", pa.string(), False, "input shard file name"),
    *_RUN_FIELDS,
    ("target", pa.int32(), False, "class index the map explains"),
    ("target_kind", pa.string(), False, "label | top1 | top5"),
    ("target_rank", pa.int8(), False, "rank of the target among the model's top-5 (0 = top-1), -1 if absent"),
    ("label", pa.int32(), False, "ground-truth class index, -1 if unknown"),
    ("top1", pa.int32(), False, "the model's top-1 class on the unperturbed image"),
    ("correct", pa.bool_(), True, "top1 == label; null when the label is unknown"),
    ("n_boxes", pa.int16(), False, "number of ground-truth boxes"),
    ("box_share", pa.float32(), True, "area share of the union of the boxes in the original image; null if none"),
    ("metric", pa.string(), False, f"metric name: {', '.join(METRIC_NAMES)}"),
    ("value", pa.float64(), True, "the per-image value (AUC for curves); null/NaN when undefined (e.g. zero map)"),
    ("steps", pa.list_(pa.float32()), True, "curve metrics: pixel fractions in [0, 1] (PI/100 for insertion)"),
    ("curve", pa.list_(pa.float32()), True, "curve metrics: the curve's values at ``steps``"),
])

METRIC_ERROR_SCHEMA = _schema([
    ("key", pa.string(), False, "sample key ('' when a whole shard failed)"),
    ("shard", pa.string(), False, "input shard file name"),
    ("stage", pa.string(), False, "read | decode | evaluate"),
    ("method", pa.string(), True, "method whose rows failed"),
    ("reason", pa.string(), False, "one-line reason"),
])

DATASET_METRIC_SCHEMA = _schema([
    *_RUN_FIELDS,
    ("metric", pa.string(), False, f"dataset metric name: {', '.join(DATASET_METRIC_NAMES)}"),
    ("value", pa.float64(), True, "its value"),
    ("n", pa.int64(), False, "number of images it was computed on"),
    ("detail", pa.string(), False, "protocol details as JSON (split, folds …)"),
])

SANITY_SCHEMA = _schema([
    ("key", pa.string(), False, "sample key"),
    ("shard", pa.string(), False, "input shard file name"),
    *_RUN_FIELDS,
    ("target", pa.int32(), False, "class the maps explain (the original model's top-1 unless a label is asked)"),
    ("step", pa.int16(), False, "randomisation step: 0 = original model, k = the top k blocks randomised"),
    ("randomised", pa.string(), False, "the block randomised at this step (cumulative from the top), '' at step 0"),
    ("spearman", pa.float64(), True, "Spearman rank correlation of the map with the original map"),
    ("spearman_abs", pa.float64(), True, "Spearman rank correlation of |map| with |original map|"),
    ("ssim", pa.float64(), True, "SSIM of the min-max normalised maps"),
])


def validate_metrics(table: pa.Table) -> None:
    """Raise SchemaError unless ``table`` has exactly the metric-row schema."""
    validate_table(table, METRIC_SCHEMA, "metrics")


def validate_metric_errors(table: pa.Table) -> None:
    """Raise SchemaError unless ``table`` has exactly the metric error schema."""
    validate_table(table, METRIC_ERROR_SCHEMA, "metric errors")


def validate_dataset_metrics(table: pa.Table) -> None:
    """Raise SchemaError unless ``table`` has exactly the dataset-metric schema."""
    validate_table(table, DATASET_METRIC_SCHEMA, "dataset metrics")


def validate_sanity(table: pa.Table) -> None:
    """Raise SchemaError unless ``table`` has exactly the sanity-row schema."""
    validate_table(table, SANITY_SCHEMA, "sanity")


__all__ = ["DATASET_METRIC_NAMES", "DATASET_METRIC_SCHEMA", "METRIC_ERROR_SCHEMA", "METRIC_NAMES", "METRIC_SCHEMA",
           "SANITY_SCHEMA", "validate_dataset_metrics", "validate_metric_errors", "validate_metrics",
           "validate_sanity"]
