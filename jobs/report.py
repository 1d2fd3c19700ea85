"""python -m jobs.report: evaluate, attribution and sanity runs in, tables, plots, heatmap grids and ONE HTML page out.

    python -m jobs.report --runs runs/metrics runs/maps runs/sanity --out runs/report [--grid-images 6]
        [--shards 'shards/val-{000000..000049}.tar'] [--ebpg-sample 500 --ebpg-repeats 5 --seed 0]
        [--ibd-keep 0.5] [--screenshot]

Each --runs directory is recognised by its manifest.json ("job": evaluate | attribute | sanity); several
evaluate runs (one per model, say) are combined; the attribution run an evaluate run was computed from is read
too when it is reachable. Output::

    OUT/index.html                    the report: one self-contained page (inline CSS, images as data: URIs)
    OUT/index.png                     with --screenshot: the page in headless Chromium
    OUT/tables/main_<model>.csv|.md   per model, rows = methods, columns = EBPG, IBD-AUC, MoRF/LeRF AUC,
                                      insertion Acc/Softmax-AUC, class discrimination, FMI accuracy, time/img
    OUT/tables/metric_<metric>.csv|.md  the papers' layout: rows = models, columns = methods
    OUT/tables/aggregates.csv|.md     every aggregate, long format (mean, std, n, protocol)
    OUT/tables/curves.csv             the mean MoRF/LeRF/insertion curves
    OUT/tables/sanity.csv|.md         mean similarity per randomisation step (sanity runs)
    OUT/figures/*.png                 curve plots, heatmap grids, the sanity runs' figures

A rebuild into the same OUT replaces what an earlier report wrote in OUT/tables and OUT/figures.
Aggregation follows the papers (jobs.reporting.aggregates; the protocols are attribution.metrics.protocols).
Prints the path of index.html last.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from attribution.errors import AttributionError
from jobs import figures
from jobs.common import JobError, expand_shards, fail
from jobs.reporting import grids, page
from jobs.reporting.aggregates import CURVE_METRICS, GROUP, Protocol, aggregate, mean_curves
from jobs.reporting.runs import Run, load_runs
from jobs.reporting.screenshot import find_chromium, screenshot
from jobs.reporting.tables import (
    COLUMN_BY_METRIC,
    Table,
    long_table,
    main_tables,
    method_labels,
    method_order,
    metric_tables,
    run_table,
    sanity_table,
    slug,
    table_label,
)
from schemas.storage import StorageError, resolve_filesystem
from workers.shards import shard_name

SCREENSHOT_WIDTH, MAX_SCREENSHOT_HEIGHT = 1400, 20000
REPORT_FILE_SUFFIXES = (".csv", ".md", ".png")
DEDUP = ["key", "shard", "model", "weights", "method", "options", "target", "metric"]
CURVE_AXES = {
    "morf": ("MoRF: target probability as the most relevant pixels are removed (AUC ↓)", "pixels removed (%)",
             "softmax probability of the target"),
    "lerf": ("LeRF: target probability as the least relevant pixels are removed (AUC ↑)", "pixels removed (%)",
             "softmax probability of the target"),
    "road_morf": ("ROAD MoRF: target probability, most relevant pixels imputed (AUC ↓)", "pixels removed (%)",
                  "softmax probability of the target"),
    "road_lerf": ("ROAD LeRF: target probability, least relevant pixels imputed (AUC ↑)", "pixels removed (%)",
                  "softmax probability of the target"),
    "road_morf_accuracy": ("ROAD MoRF: accuracy, most relevant pixels imputed (AUC ↓)", "pixels removed (%)",
                           "share classified as the target"),
    "road_lerf_accuracy": ("ROAD LeRF: accuracy, least relevant pixels imputed (AUC ↑)", "pixels removed (%)",
                           "share classified as the target"),
    "insertion_accuracy": ("Insertion: Accuracy@PI (AUC ↑)", "pixels inserted into a black image, PI (%)",
                           "Accuracy@PI"),
    "insertion_softmax": ("Insertion: Softmax-Ratio@PI (AUC ↑)", "pixels inserted into a black image, PI (%)",
                          "Softmax-Ratio@PI"),
}


@dataclass
class ReportConfig:
    """One report. ``runs``: run directories/URIs; ``out``: a local folder; ``shards``: input shards for the
    heatmap grids' photos (default: those the runs recorded); ``grid_images``: rows per heatmap grid (0: none)."""

    runs: list[str]
    out: str
    shards: list[str] | None = None
    grid_images: int = 6
    protocol: Protocol = field(default_factory=Protocol)
    screenshot: bool = False
    title: str = "Attribution maps at dataset scale: report"
    quiet: bool = False
    claims: pd.DataFrame | None = None  # jobs.claims: columns paper, claim, setting, measured, verdict


def build(config: ReportConfig) -> Path:
    """Build the report; returns the absolute path of ``OUT/index.html``. JobError (one line) for a directory
    that is not a run, an empty run, an unusable --out."""
    say = (lambda *a: None) if config.quiet else (lambda *a: print(*a, flush=True))
    if not config.runs:
        raise JobError("no --runs given")
    out = Path(config.out).resolve()
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {out} exists and is not a directory")
    runs, notes = load_runs(config.runs)
    for part in ("tables", "figures"):
        _empty_dir(out / part)
    for note in notes:
        say(f"note: {note}")
    evaluate = [r for r in runs if r.kind == "evaluate"]
    attribute = [r for r in runs if r.kind == "attribute"]
    sanity = [r for r in runs if r.kind == "sanity"]
    table_files: dict[str, list[str]] = {}

    def write(table: Table, markdown: bool = True) -> Table:
        files = [f"tables/{table.name}.csv"]
        table.frame.to_csv(out / files[0], index=False)
        if markdown:
            files.append(f"tables/{table.name}.md")
            (out / files[1]).write_text(table.markdown(), encoding="utf-8")
        table_files[table.name] = files
        return table

    sections: list[page.Section] = []
    runs_section = page.Section("Runs", "runs", tables=[write(_runs_table(runs))], notes=list(notes))
    sections.append(runs_section)
    if config.claims is not None and not config.claims.empty:
        frame = config.claims.astype(str)
        claims = Table("claims", "The papers' claims, measured (python -m jobs.claims)",
                       [c.capitalize() for c in frame.columns], frame.values.tolist(), frame)
        sections.append(page.Section("Claims", "claims", tables=[write(claims)]))
    sections.append(page.Section("Legend", "legend", intro=page.legend()
                                 + "<p>CSV files hold fractions and seconds; the tables here show EBPG, IBD-AUC and "
                                   "FMI accuracy in percent, as the papers do. One map per image and method counts: "
                                   "the label map of a <code>--targets label</code> run, else the top-1 map. "
                                   "<i>n</i> in the CSVs = the images an aggregate used.</p>"))

    # ---- tables
    metrics = _combine([r.rows for r in evaluate], DEDUP, notes_to=runs_section.notes)
    dataset = _combine([r.dataset_metrics for r in evaluate], None)
    attributions = _combine([r.rows for r in attribute], None)
    aggregates = aggregate(metrics, dataset, attributions, config.protocol)
    results = page.Section("Results per model", "results")
    if aggregates.empty:
        results.notes.append("no evaluate or attribution run given: no metric tables")
    else:
        results.tables = [write(t) for t in main_tables(aggregates)]
        if not evaluate:
            results.notes.append("no evaluate run given: the tables show only the time per image, from the "
                                 "attribution runs")
        missing = [c.header for c in COLUMN_BY_METRIC.values() if not (aggregates["metric"] == c.metric).any()]
        if missing and evaluate:
            results.notes.append(f"not in these runs: {', '.join(missing)}")
    sections.append(results)
    if not aggregates.empty:
        sections.append(page.Section("Per metric across models (the papers' layout)", "per-metric",
                                     tables=[write(t) for t in metric_tables(aggregates)]))

    # ---- curves
    curves, curve_notes = mean_curves(metrics)
    curves.to_csv(out / "tables" / "curves.csv", index=False)
    curve_section = page.Section("Perturbation curves", "curves", notes=curve_notes)
    if curves.empty:
        curve_section.notes.append("no MoRF, LeRF or insertion rows in the evaluate runs: no curve plots")
    else:
        curve_section.figures = _curve_plots(curves, aggregates, out / "figures")
        curve_section.intro = ("Mean curve over images per method; the legend gives each method's mean AUC. "
                               "Data: <code>tables/curves.csv</code>.")
    sections.append(curve_section)

    # ---- heatmap grids
    grid_section = page.Section("Heatmap grids", "grids")
    if not attribute:
        grid_section.notes.append("no attribution run given or reachable: no heatmap grid")
    elif config.grid_images == 0:
        grid_section.notes.append("--grid-images 0: no heatmap grid")
    else:
        shard_uris: dict[str, str] = {}
        for run in runs:
            shard_uris.update(run.shard_uris())
        if config.shards:
            shard_uris.update({shard_name(u): u for u in expand_shards(config.shards)})
        for i, run in enumerate(attribute):
            path, grid_notes = grids.attribution_grid(run, out / "figures" / grids.grid_name(run, i),
                                                      n_images=config.grid_images, shard_uris=shard_uris)
            grid_section.notes += grid_notes
            if path is not None:
                grid_section.figures.append(page.Figure(path, f"{', '.join(run.models)}: maps of "
                                                              f"{min(run.images, config.grid_images)} images",
                                                        f"from {run.uri}", wide=True))
    sections.append(grid_section)

    # ---- sanity
    sanity_section = page.Section("Sanity check (cascading randomisation)", "sanity")
    if not sanity:
        sanity_section.notes.append("no sanity run given (python -m jobs.sanity): no sanity figures")
    else:
        sanity_section.tables.append(write(sanity_table(_combine([r.rows for r in sanity], None))))
        for i, run in enumerate(sanity):
            for source in run.figures:
                name = f"sanity_{i}_{slug(Path(source).name)}"
                _copy(source, out / "figures" / name)
                sanity_section.figures.append(page.Figure(out / "figures" / name, Path(source).name,
                                                          f"from {run.uri}", wide=True))
            if not run.figures:
                sanity_section.notes.append(f"{run.uri} has no PNG figures")
    sections.append(sanity_section)

    everything = write(long_table(aggregates)) if not aggregates.empty else None
    if everything is not None:
        sections.append(page.Section("All aggregates", "aggregates", tables=[everything]))

    subtitle = (f"generated {time.strftime('%Y-%m-%d %H:%M:%S %z')} from {len(runs)} runs "
                f"({len(evaluate)} evaluate, {len(attribute)} attribute, {len(sanity)} sanity); "
                f"EBPG protocol: {config.protocol.ebpg_sample} images × {config.protocol.ebpg_repeats} repeats, "
                f"seed {config.protocol.seed}; IBD-AUC on the largest {config.protocol.ibd_keep:.0%} by IBD")
    index = out / "index.html"
    index.write_text(page.render_page(config.title, subtitle, sections, table_files), encoding="utf-8")
    if config.screenshot:
        if find_chromium() is None:
            say("warning: no chromium binary found: no screenshot (apt-get install chromium)")
        else:
            shot = screenshot(index, out / "index.png", width=SCREENSHOT_WIDTH, height=_page_height(sections),
                              trim=True)
            for line in shot.console:
                say(f"warning: console message on the page: {line}")
            say(f"Screenshot: {shot.path}")
    say(f"Report: {index}")
    return index


def _empty_dir(path: Path) -> None:
    """Create ``path``, or remove the tables and figures an earlier report left in it (a rebuild with other runs
    would otherwise keep stale files beside the new ones). Only the report's own kinds of file go."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.iterdir():
        if old.is_file() and old.suffix in REPORT_FILE_SUFFIXES:
            old.unlink()


def _page_height(sections: Sequence[page.Section]) -> int:
    """A generous estimate of the page's height in CSS pixels at SCREENSHOT_WIDTH (the screenshot is taken with a
    window this tall, then its empty bottom is cropped)."""
    from PIL import Image

    height = 1200
    for section in sections:
        height += 120 + 60 * len(section.notes)
        for table in section.tables:
            height += 140 + 40 * len(table.rows) + 24 * len(table.notes)
        for figure in section.figures:
            with Image.open(figure.path) as image:
                width, tall = image.size
            shown = min(width, SCREENSHOT_WIDTH - 40) if figure.wide else 640
            height += 60 + int(tall * shown / width)
    return min(height, MAX_SCREENSHOT_HEIGHT)


def _runs_table(runs: Sequence[Run]) -> Table:
    rows = [{"kind": r.kind, "path": r.uri, "models": ", ".join(r.models), "images": r.images,
             "precision": r.precision, "hardware": r.hardware, "started": r.started, "status": r.status}
            for r in runs]
    return run_table(rows)


def _combine(frames: Sequence[pd.DataFrame], dedup: list[str] | None, notes_to: list[str] | None = None
             ) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if dedup and len(frames) > 1:  # one run's rows are unique (its commits are exactly once): no string copy of them
        keys = frame[dedup].astype(str)
        duplicated = keys.duplicated()
        if duplicated.any():
            frame = frame[~duplicated.to_numpy()].reset_index(drop=True)
            if notes_to is not None:
                notes_to.append(f"{int(duplicated.sum())} metric rows appear in more than one evaluate run; "
                                "each counts once")
    return frame


def _curve_plots(curves: pd.DataFrame, aggregates: pd.DataFrame, folder: Path) -> list[page.Figure]:
    labels = method_labels(curves)
    frame = curves.copy()
    frame["weights"] = frame["weights"].astype(object).where(frame["weights"].notna(), None)
    all_weights = frame.groupby("model")["weights"].agg(list)
    auc = {(tuple(None if (isinstance(v, float) and math.isnan(v)) else v for v in k), m): mean
           for k, m, mean in zip(aggregates[GROUP].itertuples(index=False, name=None), aggregates["metric"],
                                 aggregates["mean"])}
    out = []
    for (model, weights), per_model in frame.groupby(["model", "weights"], dropna=False, sort=True):
        weights = None if isinstance(weights, float) and math.isnan(weights) else weights
        label = table_label(model, weights, all_weights[model])
        for metric in CURVE_METRICS:
            rows = per_model[per_model["metric"] == metric]
            if rows.empty:
                continue
            lines = {}
            keys = {(model, weights, m, o) for m, o in zip(rows["method"], rows["options"])}
            for key in sorted(keys, key=lambda k: (method_order(k[2]), str(k[3]))):
                part = rows[(rows["method"] == key[2]) & (rows["options"] == key[3])].sort_values("step")
                area = auc.get((key, metric), math.nan)
                name = labels[key] + (f" (AUC {area:.3f})" if math.isfinite(area) else "")
                lines[name] = ((part["step"] * 100).tolist(), part["value"].tolist())
            title, xlabel, ylabel = CURVE_AXES[metric]
            path = figures.curve_plot(lines, out=folder / f"curves_{slug(label)}_{metric}.png",
                                      title=f"{label}\n{title}", xlabel=xlabel, ylabel=ylabel)
            out.append(page.Figure(path, f"{label}: {metric}", f"mean over {int(rows['n'].max())} images"))
    return out


def _copy(source: str, target: Path) -> None:
    fs, path = resolve_filesystem(source)
    with fs.open_input_stream(path) as f:
        target.write_bytes(f.read())


def parse_args(argv: Sequence[str] | None = None) -> ReportConfig:
    """CLI -> ReportConfig; any bad argument exits with one error line."""
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="evaluate / attribute / sanity output dirs (or URIs)")
    p.add_argument("--out", required=True, help="local folder for the report (index.html, tables/, figures/)")
    p.add_argument("--shards", nargs="+", default=None,
                   help="input shards for the grids' photos (default: those the runs recorded)")
    p.add_argument("--grid-images", type=int, default=6, help="images (rows) per heatmap grid; 0: no grid")
    p.add_argument("--ebpg-sample", type=int, default=500, help="EBPG protocol: images per repeat (default 500)")
    p.add_argument("--ebpg-repeats", type=int, default=5, help="EBPG protocol: repeats (default 5)")
    p.add_argument("--seed", type=int, default=0, help="EBPG protocol: random seed (default 0)")
    p.add_argument("--ibd-keep", type=float, default=0.5,
                   help="IBD-AUC protocol: share of images kept, largest IBD first (default 0.5)")
    p.add_argument("--screenshot", action="store_true",
                   help="also write OUT/index.png, the page in headless Chromium (skipped when none is installed)")
    p.add_argument("--title", default=ReportConfig.title, help="the page's title")
    a = p.parse_args(argv)
    if a.grid_images < 0:
        fail("--grid-images must be non-negative")
    if a.ebpg_sample < 1 or a.ebpg_repeats < 1:
        fail("--ebpg-sample and --ebpg-repeats must be at least 1")
    if not 0.0 < a.ibd_keep <= 1.0:
        fail("--ibd-keep must be in (0, 1]")
    return ReportConfig(runs=a.runs, out=a.out, shards=a.shards, grid_images=a.grid_images,
                        protocol=Protocol(a.ebpg_sample, a.ebpg_repeats, a.seed, a.ibd_keep),
                        screenshot=a.screenshot, title=a.title)


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI entry point; returns the path of index.html."""
    config = parse_args(argv)
    try:
        return build(config)
    except (JobError, AttributionError, StorageError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


if __name__ == "__main__":
    main()
    sys.exit(0)
