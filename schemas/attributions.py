"""Tables written by ``jobs.attribute``: one row per (sample, method, target), and one row per failed sample.

Maps are a fixed-shape tensor column (``arrow.fixed_shape_tensor``, [S, S]) so plain pyarrow, pandas (a flat
array of S·S values per row) and DuckDB read them. A stored map is ``map_scale``-normalised (``map_scale`` = max
|map|, 1 for an all-zero map), so float16 storage keeps full relative precision whatever the method's magnitude;
it may be stored smaller than the input (S < I, area-averaged) and quantised (int8/uint8): schemas.maps says how,
and ``schemas.reader.maps_of`` gives the method's values at the input size.
"""
from __future__ import annotations

import pyarrow as pa

from schemas.maps import INPUT_SIZE, MAP_DTYPES
from schemas.validation import SchemaError, validate_table

BOXES = pa.list_(pa.list_(pa.float32()))
LAYER_MAP = pa.struct([("name", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
                       ("values", pa.list_(pa.float32()))])

_FIELDS: list[tuple[str, pa.DataType, bool, str]] = [
    ("key", pa.string(), False, "sample key (tar member name before the first '.')"),
    ("shard", pa.string(), False, "input shard file name, e.g. val-000003.tar"),
    ("model", pa.string(), False, "model name, e.g. resnet50"),
    ("weights", pa.string(), True, "weights name or checkpoint path; null = random init"),
    ("method", pa.string(), False, "attribution method name (attribution.methods.REGISTRY)"),
    ("options", pa.string(), False, "method options as JSON"),
    ("target", pa.int32(), False, "class index the map explains"),
    ("target_kind", pa.string(), False, "how the target was chosen: label | top1 | top5"),
    ("target_rank", pa.int8(), False, "rank of target among the model's top-5 predictions (0 = top-1), -1 if absent"),
    ("label", pa.int32(), False, "ground-truth class index, -1 if unknown"),
    ("wnid", pa.string(), True, "ground-truth WordNet id"),
    ("top5", pa.list_(pa.int32(), 5), False, "the model's top-5 classes"),
    ("top5_prob", pa.list_(pa.float32(), 5), False, "their softmax probabilities"),
    ("width", pa.int32(), False, "original image width, pixels"),
    ("height", pa.int32(), False, "original image height, pixels"),
    ("bboxes", BOXES, False, "ground-truth boxes [x0, y0, x1, y1] in original pixels"),
    ("bboxes_input", BOXES, False, "the same boxes in map pixels (after resize + centre crop), clipped"),
    ("map_scale", pa.float32(), False, "max |map| of the stored map: value = map · map_scale (int8: / 127, "
     "uint8: / 255)"),
    ("fmi", pa.list_(pa.float32()), True, "A-FMI feature map importance vector [K] (a_fmi with --fmi)"),
    ("layers", pa.list_(LAYER_MAP), True, "TR-GBP per-layer maps at their own resolution (tr_gbp with --layers)"),
    ("seconds", pa.float32(), False, "method time per image on this worker, seconds (batch time / batch size)"),
]


def attribution_schema(map_size: int = 224, map_dtype: str = "float32", input_size: int | None = None) -> pa.Schema:
    """Schema of attribution rows; ``map`` is a fixed-shape tensor [map_size, map_size] of ``map_dtype`` (float16,
    float32, int8, uint8) whose field metadata records ``input_size`` (default: map_size), the size readers upsample
    it back to."""
    if map_dtype not in MAP_DTYPES:
        raise SchemaError(f"map dtype must be one of {', '.join(MAP_DTYPES)}, got {map_dtype!r}")
    fields = [pa.field(name, dtype, nullable, metadata={"doc": doc}) for name, dtype, nullable, doc in _FIELDS]
    map_type = pa.fixed_shape_tensor(MAP_DTYPES[map_dtype], [map_size, map_size])
    after = [f.name for f in fields].index("bboxes_input") + 1
    doc = "the map [S, S] (S <= input size, area-averaged), divided by map_scale (int8: x127, uint8: x255, rounded)"
    fields.insert(after, pa.field("map", map_type, False,
                                  metadata={"doc": doc, INPUT_SIZE: str(input_size or map_size)}))
    return pa.schema(fields)


ERROR_SCHEMA = pa.schema([
    pa.field("key", pa.string(), False, metadata={"doc": "sample key ('' when the shard itself failed)"}),
    pa.field("shard", pa.string(), False, metadata={"doc": "input shard file name"}),
    pa.field("stage", pa.string(), False, metadata={"doc": "read | decode | attribute"}),
    pa.field("method", pa.string(), True, metadata={"doc": "method that failed (stage attribute)"}),
    pa.field("reason", pa.string(), False, metadata={"doc": "one-line reason"}),
])


def validate_attributions(table: pa.Table, map_size: int, map_dtype: str) -> None:
    """Raise SchemaError unless ``table`` has exactly the attribution schema (maps [map_size, map_size] of
    ``map_dtype``) and sane values."""
    validate_table(table, attribution_schema(map_size, map_dtype), "attributions")


def validate_errors(table: pa.Table) -> None:
    """Raise SchemaError unless ``table`` has exactly the error schema."""
    validate_table(table, ERROR_SCHEMA, "errors")


__all__ = ["ERROR_SCHEMA", "MAP_DTYPES", "SchemaError", "attribution_schema", "validate_attributions",
           "validate_errors"]
