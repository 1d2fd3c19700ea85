"""Heatmap grids (paper Fig. 4 style) from an attribution run: a few images × the run's methods, photo first.

Which maps: the primary map of each (image, method) — the label map of a ``label`` run, the top-1 map otherwise
(jobs.reporting.aggregates.primary_rows). Which images: the first ``n`` images, in (shard, key) order, that have a
map for every method (so a grid needs one shard read in the usual case). Photos are decoded from the input
shards exactly as the attribution job did (workers.shards.read_shard + attribution.images.decode_sample + the
model's preprocessing), so they line up with the maps pixel for pixel. When a shard cannot be read the grid is
drawn without photos and a note says why.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from attribution.errors import AttributionError
from attribution.images import SampleError, decode_sample
from attribution.models import class_names_for, preprocessing_for
from attribution.preprocessing import Preprocessing
from jobs import figures
from jobs.reporting.runs import Run
from jobs.reporting.aggregates import GROUP, primary_rows
from jobs.reporting.tables import method_labels, method_order, slug
from workers.shards import read_shard
from schemas.reader import OutputReader, maps_of

GRID_TITLE = ("{model}: the {what} map of each image (row title: key, class, probability)\n"
              "signed maps in bwr (red > 0 > blue, ±99th percentile of |map| per panel); "
              "non-negative maps in inferno (0 to the 99th percentile)")


def _preprocessing(model: str, weights: str | None = None) -> Preprocessing:
    try:
        return preprocessing_for(model, weights)
    except AttributionError:
        return Preprocessing()


def _class_names(model: str, weights: str | None = None) -> list[str]:
    """The model's class names ([] when it has none or cannot be read: rows then show the class index)."""
    try:
        return class_names_for(model, weights) or []
    except AttributionError:
        return []


def _photos(keys: list[tuple[str, str]], shard_uris: dict[str, str], model: str,
            weights: str | None = None) -> tuple[list[np.ndarray] | None, str | None]:
    """uint8 [S, S, 3] photo per (shard, key), or (None, why) when any of them cannot be had."""
    preprocessing = _preprocessing(model, weights)
    found: dict[tuple[str, str], np.ndarray] = {}
    for shard in sorted({s for s, _ in keys}):
        uri = shard_uris.get(shard)
        if uri is None:
            return None, f"the input shard {shard} is not recorded by any run (give --shards)"
        wanted = {k for s, k in keys if s == shard}
        for row in read_shard(uri):
            if row["key"] == "" and row["error"] is not None:
                return None, f"{uri}: {row['error']} (give --shards)"
            if row["key"] not in wanted:
                continue
            if row["error"] is not None:
                return None, f"sample {row['key']} of {uri}: {row['error']}"
            try:
                sample = decode_sample(row["jpg"], row["cls"], row["json"], preprocessing)
            except SampleError as exc:
                return None, f"sample {row['key']} of {uri}: {exc}"
            found[(shard, row["key"])] = sample.pixels.transpose(1, 2, 0)
    missing = [k for k in keys if k not in found]
    if missing:
        return None, f"sample {missing[0][1]} is not in {shard_uris.get(missing[0][0])}"
    return [found[k] for k in keys], None


def attribution_grid(run: Run, out: Path, *, n_images: int, shard_uris: dict[str, str]) -> tuple[Path | None,
                                                                                                list[str]]:
    """Draw the grid of attribution run ``run`` to ``out`` (a PNG path): ``n_images`` rows × one column per
    (method, options) of the run, the photo first. ``shard_uris``: shard file name -> URI of the input shards.
    Returns (the PNG path or None when there is nothing to draw, notes about what is missing)."""
    notes: list[str] = []
    meta = primary_rows(run.rows)
    if meta.empty or n_images < 1:
        return None, notes
    labels = method_labels(meta)
    columns = sorted(labels, key=lambda k: (method_order(k[2]), str(k[3])))
    meta = meta.assign(_column=[labels_key(r) for r in meta[GROUP].itertuples(index=False, name=None)])
    counts = meta.groupby(["shard", "key"])["_column"].nunique()
    keys = sorted(sorted(counts.index, key=lambda k: (-counts[k], k))[:n_images])  # most complete, then in order

    wanted = [k for _, k in keys]
    table = OutputReader(run.uri).read(keys=wanted, columns=["key", "shard", "model", "weights", "method", "options",
                                                              "target", "target_kind", "target_rank", "top5",
                                                              "top5_prob", "map", "map_scale"])
    kinds = table.column("target_kind").to_numpy(zero_copy_only=False)
    ranks = table.column("target_rank").to_numpy()
    table = table.filter((kinds != "top5") | (ranks == 0))
    maps = maps_of(table)
    rows = table.drop_columns(["map"]).to_pandas()
    cells: list[list[np.ndarray | None]] = [[None] * len(columns) for _ in keys]
    row_of = {k: i for i, k in enumerate(keys)}
    column_of = {c: j for j, c in enumerate(columns)}
    first: dict[tuple[str, str], dict] = {}
    for i, r in enumerate(rows.itertuples(index=False)):
        at = (r.shard, r.key)
        column = labels_key((r.model, r.weights, r.method, r.options))
        if at not in row_of or column not in column_of:
            continue
        cells[row_of[at]][column_of[column]] = maps[i]
        first.setdefault(at, r._asdict())
    names = _class_names(run.models[0] if run.models else "", run.manifest.get("config", {}).get("weights"))
    row_labels = []
    for at in keys:
        r = first[at]
        target, top5 = int(r["target"]), [int(t) for t in r["top5"]]
        name = names[target] if 0 <= target < len(names) else str(target)
        prob = f" ({float(r['top5_prob'][top5.index(target)]):.2f})" if target in top5 else ""
        row_labels.append(f"{at[1]}\n{name[:28]}{prob}")
    photos, why = _photos(keys, shard_uris, run.models[0] if run.models else "",
                          run.manifest.get("config", {}).get("weights"))
    if photos is None:
        notes.append(f"heatmap grid of {run.uri} drawn without photos: {why}")
    signed = [any(cells[i][j] is not None and bool((cells[i][j] < 0).any()) for i in range(len(keys)))
              for j in range(len(columns))]
    overlay = [photos is not None and c[2] in figures.OVERLAID_METHODS for c in columns]
    kind = set(rows["target_kind"])
    what = "label-class" if kind == {"label"} else "top-1"
    model = ", ".join(run.models)
    path = figures.heatmap_grid(cells, out=out, row_labels=row_labels, col_labels=[labels[c] for c in columns],
                                images=photos, signed=signed, overlay=overlay,
                                title=GRID_TITLE.format(model=model, what=what))
    if len(keys) < n_images:
        notes.append(f"{run.uri} has {len(keys)} images with maps, fewer than the {n_images} asked for")
    return path, notes


def labels_key(row: tuple) -> tuple:
    """(model, weights, method, options) with NaN weights as None (how method_labels keys its result)."""
    return tuple(None if (isinstance(v, float) and math.isnan(v)) else v for v in row)


def grid_name(run: Run, index: int) -> str:
    """The grid's PNG file name for the ``index``-th attribution run."""
    return f"grid_{index}_{slug('_'.join(run.models) or 'run')}.png"


__all__ = ["attribution_grid", "grid_name"]
