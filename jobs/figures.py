"""The one place that draws figures: heatmap grids (paper Fig. 4 style) and curve plots, as PNG (matplotlib, Agg).

Heatmap colours: a signed column uses a diverging colormap (``bwr``: red > 0 > blue) with symmetric limits at
±(99th percentile of |map|) of each cell; a non-negative column a sequential one (``inferno``) from 0 to the
cell's 99th percentile. Values beyond the limits saturate. A cell whose percentile is 0 falls back to its max
|value| (or 1 for an all-zero map), so a sparse map is not drawn blank. Overlaid columns (coarse maps such as
Grad-CAM) are drawn at 60 % opacity over the row's photo in grey.

Layout: every panel is ``CELL_INCHES`` square with room for a title above it; the figure's size in pixels is
:func:`figure_size_px`, which depends only on the number of rows and columns.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

DIVERGING_CMAP, SEQUENTIAL_CMAP = "bwr", "inferno"
CELL_INCHES = 2.2        # each panel is CELL_INCHES square (plus room for titles)
TITLE_INCHES = 0.45      # extra height per row for the panel titles
HEADER_INCHES = 0.5      # the figure title above the first row (two lines; more lines add TITLE_LINE_INCHES each)
TITLE_LINE_INCHES = 0.17
DPI = 100
PERCENTILE = 99.0        # colour limits per cell
OVERLAY_ALPHA = 0.6

METHOD_TITLES = {"saliency": "Saliency", "gbp": "Guided Backprop", "gradcam": "Grad-CAM", "tr_gbp": "TR-GBP",
                 "a_fmi": "A-FMI", "ig": "Integrated Gradients", "deeplift": "DeepLIFT", "lrp": "LRP-ε",
                 "gig": "Guided IG", "xrai": "XRAI", "fullgrad": "FullGrad", "cameras": "CAMERAS", "rise": "RISE",
                 "extremal_perturbation": "Extremal Perturbation", "smoothgrad": "SmoothGrad",
                 "vargrad": "VarGrad"}
OVERLAID_METHODS = frozenset({"gradcam", "a_fmi", "cameras", "rise", "extremal_perturbation", "xrai"})


def method_title(method: str) -> str:
    """The display name of a method (``tr_gbp`` -> ``TR-GBP``); unknown names are returned unchanged."""
    return METHOD_TITLES.get(method, method)


def figure_size_px(rows: int, columns: int, title_lines: int = 2) -> tuple[int, int]:
    """(width, height) in pixels of a heatmap grid of ``rows`` × ``columns`` panels (photo column included) whose
    title takes ``title_lines`` lines after wrapping (up to two fit in the standard header)."""
    return round(columns * CELL_INCHES * DPI), round((_header_inches(title_lines)
                                                      + rows * (CELL_INCHES + TITLE_INCHES)) * DPI)


def _header_inches(title_lines: int) -> float:
    return HEADER_INCHES + TITLE_LINE_INCHES * max(0, title_lines - 2)


def wrap_title(title: str | None, columns: int) -> list[str]:
    """The lines of a grid title wrapped to the width of ``columns`` panels (about 8 px per character)."""
    if not title:
        return []
    width = max(20, int(columns * CELL_INCHES * DPI / 8))
    return [line for part in title.splitlines() for line in (textwrap.wrap(part, width) or [""])]


def colour_limits(values: np.ndarray, signed: bool, percentile: float = PERCENTILE) -> tuple[float, float]:
    """(vmin, vmax) for one map (any shape, float): ±p-th percentile of |values| if ``signed``, else 0 to the
    p-th percentile; falls back to max |values| (or 1) when that percentile is 0."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (-1.0, 1.0) if signed else (0.0, 1.0)
    top = float(np.percentile(np.abs(finite) if signed else finite, percentile))
    top = top if top > 0 else float(np.abs(finite).max()) or 1.0
    return (-top, top) if signed else (0.0, top)


def _per_column(value: Sequence[bool] | bool, columns: int, name: str) -> list[bool]:
    if isinstance(value, (bool, np.bool_)):
        return [bool(value)] * columns
    flags = [bool(v) for v in value]
    if len(flags) != columns:
        raise ValueError(f"heatmap_grid: {name} has {len(flags)} entries for {columns} columns")
    return flags


def heatmap_grid(cells: Sequence[Sequence[np.ndarray | None]], *, out: str | Path, row_labels: Sequence[str],
                 col_labels: Sequence[str], images: Sequence[np.ndarray] | None = None,
                 signed: Sequence[bool] | bool = False, overlay: Sequence[bool] | bool = False,
                 title: str | None = None) -> Path:
    """Draw a grid of heatmaps and save it as a PNG; returns the PNG's path.

    ``cells[r][c]``: a 2-D float map [H, W] (any units; colour limits are per cell, see the module docstring) or
    None for an empty panel. ``row_labels``: one per row; ``col_labels``: one per map column. ``images``: one
    uint8 [H, W, 3] RGB photo per row, drawn as an extra first column titled with the row label (without photos
    the row label goes above the first map of the row). ``signed``: per map column (or one bool for all): diverging
    symmetric colormap vs sequential from 0. ``overlay``: per map column: draw the map over the row's photo in
    grey (needs ``images``). ``title``: figure title above the grid. Size in pixels: :func:`figure_size_px`
    (rows, map columns + 1 if ``images``, the title's lines after :func:`wrap_title`). Raises ValueError on
    inconsistent arguments.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(cells)
    columns = len(col_labels)
    if rows == 0 or columns == 0:
        raise ValueError("heatmap_grid: no cells to draw")
    if len(row_labels) != rows:
        raise ValueError(f"heatmap_grid: {len(row_labels)} row labels for {rows} rows")
    for r, row in enumerate(cells):
        if len(row) != columns:
            raise ValueError(f"heatmap_grid: row {r} has {len(row)} cells for {columns} column labels")
        for c, cell in enumerate(row):
            if cell is not None and np.asarray(cell).ndim != 2:
                raise ValueError(f"heatmap_grid: cell [{r}][{c}] has shape {np.shape(cell)}, expected [H, W]")
    if images is not None:
        if len(images) != rows:
            raise ValueError(f"heatmap_grid: {len(images)} images for {rows} rows")
        for r, image in enumerate(images):
            if np.asarray(image).ndim != 3 or np.asarray(image).shape[-1] != 3:
                raise ValueError(f"heatmap_grid: image {r} has shape {np.shape(image)}, expected [H, W, 3]")
    signs = _per_column(signed, columns, "signed")
    overlays = _per_column(overlay, columns, "overlay")
    if any(overlays) and images is None:
        raise ValueError("heatmap_grid: overlay needs images")

    offset = 1 if images is not None else 0
    total = columns + offset
    title_lines = wrap_title(title, total)
    width, height = figure_size_px(rows, total, len(title_lines))
    fig, axes = plt.subplots(rows, total, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    height_in = height / DPI
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.08 / height_in,
                        top=1 - (_header_inches(len(title_lines)) + TITLE_INCHES * 0.7) / height_in,
                        wspace=0.04, hspace=TITLE_INCHES / CELL_INCHES)
    for r in range(rows):
        photo = None
        if images is not None:
            photo = np.asarray(images[r])
            axes[r, 0].imshow(photo)
            axes[r, 0].set_title(row_labels[r], fontsize=9)
        for c in range(columns):
            ax = axes[r, c + offset]
            if images is None and c == 0:  # no photo column: the row label goes above the row's first map
                ax.set_title(f"{' · '.join(row_labels[r].splitlines())}\n{col_labels[c]}", fontsize=8.5)
            else:
                ax.set_title(col_labels[c], fontsize=10)
            cell = cells[r][c]
            if cell is None:
                ax.set_facecolor("#eeeeee")
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=10, color="#888888",
                        transform=ax.transAxes)
                continue
            values = np.asarray(cell, dtype=np.float32)
            vmin, vmax = colour_limits(values, signs[c])
            cmap = DIVERGING_CMAP if signs[c] else SEQUENTIAL_CMAP
            if overlays[c] and photo is not None:
                ax.imshow(photo.astype(np.float32).mean(axis=-1) / 255.0, cmap="gray", vmin=0, vmax=1,
                          extent=(0, values.shape[1], values.shape[0], 0))
                ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, alpha=OVERLAY_ALPHA,
                          extent=(0, values.shape[1], values.shape[0], 0))
            else:
                ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title_lines:
        fig.suptitle("\n".join(title_lines), fontsize=10, y=1 - 0.06 / height_in, va="top")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def curve_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, out: str | Path, title: str,
               xlabel: str, ylabel: str) -> Path:
    """One line per entry of ``curves`` (label -> (steps [K], values [K]), floats in any units) in one plot,
    saved as a PNG (6.4 × 4.4 inches at 100 dpi); returns its path. Raises ValueError for no curves or
    steps/values of different lengths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError(f"curve_plot: no curves for {title!r}")
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=DPI)
    for label, (steps, values) in curves.items():
        x, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"curve_plot: curve {label!r} has {x.size} steps but {y.size} values")
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, label=label)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


__all__ = ["CELL_INCHES", "DPI", "HEADER_INCHES", "METHOD_TITLES", "OVERLAID_METHODS", "TITLE_INCHES",
           "colour_limits", "curve_plot", "figure_size_px", "heatmap_grid", "method_title", "wrap_title"]
