"""CPU step between the shard reader and the attribution actors: decode, resize, crop; a bad sample -> error row."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowTensorArray

from attribution.images import SampleError, decode_sample
from attribution.preprocessing import Preprocessing
from workers.crash_guard import guarded

DECODED_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("shard_total", pa.int64()), ("stage", pa.string()),
    ("error", pa.string()), ("label", pa.int64()), ("wnid", pa.string()), ("width", pa.int64()),
    ("height", pa.int64()), ("bboxes", pa.string()), ("bboxes_input", pa.string()),
])


def decode_batch(batch: pa.Table, preprocessing: Preprocessing) -> pa.Table:
    """Raw sample rows (workers.shards.RAW_SCHEMA) -> decoded rows (DECODED_SCHEMA + ``pixels``).

    ``pixels``: uint8 [N, 3, S, S] (zeros for failed rows); ``stage``/``error``: None, or where and why the
    sample failed (read errors pass through); boxes as JSON text (original pixels and map pixels). A sample that
    kills the decoding process twice becomes a decode error (workers.crash_guard).
    """
    return guarded(batch, lambda rows: _decode(rows, preprocessing), "decode")


def _decode(batch: pa.Table, preprocessing: Preprocessing) -> pa.Table:
    size = preprocessing.input_size
    n = batch.num_rows
    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
    pixels = np.zeros((n, 3, size, size), dtype=np.uint8)
    columns = {name: batch.column(name).to_pylist() for name in batch.column_names}
    for i in range(n):
        key, shard = columns["key"][i], columns["shard"][i]
        stage, error = columns["stage"][i], columns["error"][i]
        sample = None
        if error is None:
            try:
                sample = decode_sample(columns["jpg"][i], columns["cls"][i], columns["json"][i], preprocessing)
            except SampleError as exc:
                stage, error = "decode", str(exc)
        out["key"].append(key)
        out["shard"].append(shard)
        out["shard_total"].append(columns["shard_total"][i])
        out["stage"].append(stage)
        out["error"].append(error)
        if sample is None:
            for column, empty in (("label", -1), ("wnid", None), ("width", 0), ("height", 0),
                                  ("bboxes", "[]"), ("bboxes_input", "[]")):
                out[column].append(empty)
            continue
        pixels[i] = sample.pixels
        out["label"].append(sample.label)
        out["wnid"].append(sample.wnid)
        out["width"].append(sample.width)
        out["height"].append(sample.height)
        out["bboxes"].append(json.dumps(sample.bboxes))
        out["bboxes_input"].append(json.dumps(sample.bboxes_input))
    table = pa.Table.from_pydict(out, schema=DECODED_SCHEMA)
    return table.append_column("pixels", ArrowTensorArray.from_numpy(pixels))
