"""The report's tables: the papers' layouts (methods × metrics per model, models × methods per metric), the long
table of every aggregate, the sanity table and the runs table — each as Markdown/HTML text and as a CSV frame.
The numbers come from :mod:`jobs.reporting.aggregates`. CSV files hold fractions and seconds; the Markdown/HTML
tables show EBPG, IBD-AUC and FMI accuracy in percent, as the papers do.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Sequence

import numpy as np
import pandas as pd

from jobs.figures import method_title
from jobs.reporting.aggregates import GROUP, group_frame, group_key

METHOD_ORDER = ("saliency", "gbp", "smoothgrad", "vargrad", "ig", "gig", "deeplift", "lrp", "fullgrad", "gradcam",
                "cameras", "xrai", "extremal_perturbation", "rise", "tr_gbp", "a_fmi")
MISSING = "—"


@dataclass(frozen=True)
class Column:
    """One column of the main table: ``metric`` in the long aggregates, its header, whether higher is better,
    shown in percent, with ± std, and its meaning (the page's legend)."""

    metric: str
    header: str
    higher_is_better: bool
    percent: bool
    with_std: bool
    digits: int
    meaning: str

    @property
    def arrow(self) -> str:
        """↑ when higher is better, else ↓."""
        return "↑" if self.higher_is_better else "↓"

    def format(self, mean: float, std: float) -> str:
        """The cell text: '52.2 ± 1.4' (percent columns ×100), '0.1234 ± 0.0456', or '—' when undefined."""
        if mean is None or not math.isfinite(mean):
            return MISSING
        scale = 100.0 if self.percent else 1.0
        text = f"{mean * scale:.{self.digits}f}"
        if self.with_std and std is not None and math.isfinite(std):
            text += f" ± {std * scale:.{self.digits}f}"
        return text


COLUMNS = (
    Column("ebpg", "EBPG (%)", True, True, True, 1,
           "Energy-based pointing game (TR-GBP §5.3.1): share of the (non-negative) map energy inside the "
           "ground-truth box, on images with one box covering < 50 % of the image; mean ± std over 5 repeats of "
           "500 random images. A map with no positive pixel has no energy to share: it has no EBPG and is left "
           "out (not counted as 0); the table's notes say how many maps that concerns."),
    Column("ibd_auc", "IBD-AUC (%)", True, True, False, 2,
           "Intensity of boundary dependencies (TR-GBP §5.4): share of the map in the 16-px border; after dropping "
           "the half of the images with the smallest IBD, ROC-AUC of IBD as a score for 'the prediction is wrong'. "
           "A map with no positive pixel has no IBD and is left out, as for EBPG (counted in the notes)."),
    Column("morf", "MoRF AUC", False, False, True, 4,
           "Area under the target's softmax probability as the most relevant pixels are removed (set to black), "
           "0 to 100 % (TR-GBP App. D): a faster drop, i.e. a lower area, is better. (TR-GBP's Fig. 6 caption "
           "states the opposite direction for its own plotted quantity; for the probability itself lower is "
           "better, as in Samek et al. 2016.)"),
    Column("lerf", "LeRF AUC", True, False, True, 4,
           "Area under the target's softmax probability as the least relevant pixels are removed first: the "
           "prediction should survive, so higher is better. Signed gradient maps (GBP, GIG) are ranked by |map|."),
    Column("road_morf", "ROAD MoRF AUC", False, False, True, 4,
           "ROAD (Rong et al. 2022): as MoRF, but the removed 10 … 90 % of the pixels are filled by noisy linear "
           "imputation (each the weighted mean of its 8 neighbours, solved jointly, + noise σ = 0.01) instead of "
           "black, so the shape of the removed region no longer tells the model the class; lower is better."),
    Column("road_lerf", "ROAD LeRF AUC", True, False, True, 4,
           "ROAD with the least relevant pixels removed first (imputed as for ROAD MoRF): higher is better."),
    Column("road_morf_accuracy", "ROAD MoRF Acc-AUC", False, False, True, 4,
           "Area under ROAD's accuracy curve (share of images still classified as the target) for MoRF: lower is "
           "better."),
    Column("road_lerf_accuracy", "ROAD LeRF Acc-AUC", True, False, True, 4,
           "Area under ROAD's accuracy curve for LeRF: higher is better."),
    Column("insertion_accuracy", "Insertion Acc-AUC", True, False, True, 4,
           "Area under Accuracy@PI (A-FMI App. A.3): the top PI % pixels (PI = 5 … 100) inserted into a black "
           "image, 1 while it is still classified as the target class."),
    Column("insertion_softmax", "Insertion Softmax-AUC", True, False, True, 4,
           "Area under Softmax-Ratio@PI (A-FMI App. A.3): the target's probability on the insertion image divided "
           "by its probability on the full image."),
    Column("class_discrimination", "Class discrimination", False, False, True, 4,
           "Mean pairwise Spearman correlation of an image's top-5 class maps: lower means the maps differ more "
           "between classes (more class-discriminative)."),
    Column("fmi_prototype_accuracy", "FMI prototype acc. (%)", True, True, False, 1,
           "A-FMI §4.1: FMI vectors as image features, class prototypes = class means, held-out images classified "
           "by cosine similarity; accuracy (the paper: 88.4 % on ImageNet)."),
    Column("seconds", "Time / image (s)", False, False, True, 4,
           "The method's wall time per image in the attribution run (batch time / batch size), seconds."),
)
COLUMN_BY_METRIC = {c.metric: c for c in COLUMNS}


@dataclass
class Table:
    """A table as shown (``headers``/``rows`` of text) and as written to CSV (``frame``, numbers)."""

    name: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The table as a Markdown section: '### title', the pipe table, then the notes."""
        lines = [f"### {self.title}", "", _md_row(self.headers), _md_row(["---"] * len(self.headers))]
        lines += [_md_row(row) for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def table_label(model: str, weights: str | None, all_weights: Sequence[str | None]) -> str:
    """How a (model, weights) table is named: the model, plus the weights when the model comes with several —
    a checkpoint by its file name (its whole path only where two checkpoints share that name)."""
    if len(set(all_weights)) <= 1:
        return model
    if not weights:
        return f"{model} (random init)"
    name = PurePosixPath(str(weights).replace("\\", "/")).name
    names = [PurePosixPath(str(w).replace("\\", "/")).name for w in set(all_weights) if w]
    return f"{model} ({name if names.count(name) == 1 else weights})"


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "table"


def method_order(method: str) -> tuple[int, str]:
    """Sort key putting methods in the papers' column order (unknown methods before TR-GBP/A-FMI)."""
    if method in METHOD_ORDER:
        position = METHOD_ORDER.index(method)
        return (position if position < METHOD_ORDER.index("tr_gbp") else position + 1000, method)
    return (METHOD_ORDER.index("tr_gbp") + 500, method)


def method_labels(frame: pd.DataFrame) -> dict[tuple, str]:
    """(model, weights, method, options) -> the label shown for it: the method's title, plus its options when the
    same model has several option sets of that method."""
    labels = {}
    keys = {group_key(k) for k in frame[GROUP].itertuples(index=False, name=None)}
    for key in keys:
        model, weights, method, options = key
        siblings = {k[3] for k in keys if k[:3] == (model, weights, method)}
        label = method_title(method)
        if len(siblings) > 1:
            label += f" {_compact(options)}"
        labels[key] = label
    return labels


def _compact(options: str | None) -> str:
    try:
        parsed = json.loads(options or "{}")
    except ValueError:
        return str(options)
    if not parsed:
        return "(defaults)"
    return "(" + ", ".join(f"{k}={v}" for k, v in sorted(parsed.items())) + ")"


def _ordered_keys(frame: pd.DataFrame) -> list[tuple]:
    keys = {group_key(k) for k in frame[GROUP].itertuples(index=False, name=None)}
    return sorted(keys, key=lambda k: (k[0], str(k[1]), method_order(k[2]), str(k[3])))


def main_tables(aggregates: pd.DataFrame) -> list[Table]:
    """One table per (model, weights): rows = methods, columns = COLUMNS (TR-GBP Tables 1/2, A-FMI Table 1 in one).
    Columns without any value are left out of that table."""
    if aggregates.empty:
        return []
    labels = method_labels(aggregates)
    frame = group_frame(aggregates)
    weights_of = frame.groupby("model")["weights"].agg(lambda s: list(s))
    tables = []
    for (model, weights), group in frame.groupby(["model", "weights"], dropna=False, sort=True):
        weights = None if isinstance(weights, float) and math.isnan(weights) else weights
        title_label = table_label(model, weights, weights_of[model])
        present = [c for c in COLUMNS if (group["metric"] == c.metric).any()]
        index, images = {}, {}
        for k, m, mean, std, n, count in zip(group[GROUP].itertuples(index=False, name=None), group["metric"],
                                             group["mean"], group["std"], group["n"], group["images"]):
            index[(group_key(k), m)] = (mean, std, n)
            images[group_key(k)] = max(images.get(group_key(k), 0), int(count))
        headers = ["Method", "Images"] + [f"{c.header} {c.arrow}" for c in present]
        rows, records = [], []
        for key in _ordered_keys(group):
            n_images = images[key]
            row = [labels[key], str(n_images)]
            record = {"method": key[2], "options": key[3], "label": labels[key], "images": n_images}
            for c in present:
                mean, std, n = index.get((key, c.metric), (math.nan, math.nan, 0))
                row.append(c.format(mean, std))
                record[c.metric] = mean
                if c.with_std:
                    record[f"{c.metric}_std"] = std
                record[f"{c.metric}_n"] = n
            rows.append(row)
            records.append(record)
        notes = [("↑ higher is better, ↓ lower is better; EBPG, IBD-AUC and FMI accuracy in percent, the other "
                  "columns as fractions (AUCs) or seconds; mean ± std over images (EBPG: over the protocol's "
                  "repeats)")]
        notes += _left_out_notes(group, labels, present)
        tables.append(Table(name=f"main_{slug(title_label)}", title=f"{title_label}: methods × metrics",
                            headers=headers, rows=rows, frame=pd.DataFrame(records), notes=notes))
    return tables


def _left_out_notes(group: pd.DataFrame, labels: dict[tuple, str], present: list[Column]) -> list[str]:
    """'TR-GBP: EBPG (%) leaves out 28 maps with no positive pixel …' for every aggregate with ``left_out`` > 0."""
    if "left_out" not in group:
        return []
    headers = {c.metric: c.header for c in present}
    notes = []
    for k, metric, left_out, n in zip(group[GROUP].itertuples(index=False, name=None), group["metric"],
                                      group["left_out"], group["n"]):
        if metric in headers and left_out and left_out > 0:
            notes.append(f"{labels[group_key(k)]}: {headers[metric]} leaves out {int(left_out)} of "
                         f"{int(left_out) + int(n)} maps with no positive pixel (undefined there, not counted as 0)")
    return notes


def metric_tables(aggregates: pd.DataFrame) -> list[Table]:
    """The papers' own layout, one table per metric: rows = models, columns = methods (TR-GBP Tables 1 and 2,
    A-FMI Table 1). Only metrics with at least one value."""
    if aggregates.empty:
        return []
    frame = group_frame(aggregates)
    labels = method_labels(frame)
    weights_of = frame.groupby("model")["weights"].agg(lambda s: list(s))
    tables = []
    for column in COLUMNS:
        rows_of = frame[frame["metric"] == column.metric]
        if rows_of.empty:
            continue
        keys = _ordered_keys(rows_of)
        method_columns: list[str] = []
        for key in sorted(keys, key=lambda k: (method_order(k[2]), str(k[3]))):
            if labels[key] not in method_columns:
                method_columns.append(labels[key])
        values: dict[tuple[str, str], tuple[float, float]] = {}
        models: list[str] = []
        for k, mean, std in zip(rows_of[GROUP].itertuples(index=False, name=None), rows_of["mean"], rows_of["std"]):
            k = group_key(k)
            model_label = table_label(k[0], k[1], weights_of[k[0]])
            if model_label not in models:
                models.append(model_label)
            values[(model_label, labels[k])] = (mean, std)
        models.sort()
        headers = [f"{column.header} {column.arrow}"] + method_columns
        rows, records = [], []
        for model_label in models:
            rows.append([model_label] + [column.format(*values.get((model_label, m), (math.nan, math.nan)))
                                         for m in method_columns])
            record = {"model": model_label}
            for m in method_columns:
                mean, std = values.get((model_label, m), (math.nan, math.nan))
                record[m] = mean
                if column.with_std:
                    record[f"{m} std"] = std
            records.append(record)
        tables.append(Table(name=f"metric_{column.metric}",
                            title=f"{column.header} {column.arrow} ({'higher' if column.higher_is_better else 'lower'}"
                                  " is better): models × methods",
                            headers=headers, rows=rows, frame=pd.DataFrame(records)))
    return tables


def long_table(aggregates: pd.DataFrame) -> Table:
    """Every aggregate, one row each (the CSV every other table is cut from)."""
    frame = group_frame(aggregates)
    order = sorted(range(len(frame)), key=lambda i: (str(frame["model"].iat[i]), str(frame["weights"].iat[i]),
                                                     method_order(frame["method"].iat[i]),
                                                     str(frame["options"].iat[i]), str(frame["metric"].iat[i])))
    frame = frame.iloc[order].reset_index(drop=True)
    headers = ["Model", "Weights", "Method", "Options", "Metric", "Mean", "Std", "n", "Protocol"]
    rows = [[r.model, r.weights or "random init", r.method, r.options, r.metric, _number(r.mean), _number(r.std),
             str(r.n), r.protocol] for r in frame.itertuples(index=False)]
    return Table(name="aggregates", title="Every aggregate (long format)", headers=headers, rows=rows, frame=frame)


def _number(value: float) -> str:
    return MISSING if value is None or not math.isfinite(value) else f"{value:.6g}"


def sanity_table(rows: pd.DataFrame) -> Table:
    """Cascading randomisation (TR-GBP §5.2.2): per (model, method, step) the mean ± std over images of the
    similarity to the original map (Spearman of map and of |map|, SSIM). Lower = the map reacts to the weights."""
    frame = group_frame(rows)
    records = []
    for key, group in frame.groupby(GROUP + ["step"], dropna=False, sort=False):
        key = group_key(key)
        record = dict(zip(GROUP + ["step"], key))
        record["randomised"] = str(group["randomised"].iloc[0])
        record["images"] = int(group[["shard", "key"]].drop_duplicates().shape[0])
        for metric in ("spearman", "spearman_abs", "ssim"):
            values = group[metric].to_numpy(dtype=np.float64, na_value=np.nan)
            values = values[np.isfinite(values)]
            record[metric] = float(values.mean()) if values.size else math.nan
            record[f"{metric}_std"] = float(values.std()) if values.size else math.nan
        records.append(record)
    out = pd.DataFrame(records)
    if out.empty:
        return Table("sanity", "Sanity check", [], [], out)
    order = sorted(range(len(out)), key=lambda i: (str(out["model"].iat[i]), str(out["weights"].iat[i]),
                                                   method_order(out["method"].iat[i]), str(out["options"].iat[i]),
                                                   int(out["step"].iat[i])))
    out = out.iloc[order].reset_index(drop=True)
    labels = method_labels(out)

    def cell(mean: float, std: float) -> str:
        return MISSING if not math.isfinite(mean) else f"{mean:.3f} ± {std:.3f}"

    headers = ["Model", "Method", "Step", "Randomised (cumulative from the top)", "Images", "Spearman ↓",
               "Spearman |map| ↓", "SSIM ↓"]
    rows_text = [[r.model, labels[group_key((r.model, r.weights, r.method, r.options))], str(int(r.step)),
                  r.randomised or "(original model)", str(r.images), cell(r.spearman, r.spearman_std),
                  cell(r.spearman_abs, r.spearman_abs_std), cell(r.ssim, r.ssim_std)]
                 for r in out.itertuples(index=False)]
    return Table("sanity", "Sanity check: similarity to the original map under cascading randomisation",
                 headers, rows_text, out,
                 notes=[("mean ± std over images; a method that passes the check loses similarity (↓) as more "
                         "layers are randomised (Adebayo et al. 2018)")])


def run_table(rows: Sequence[dict]) -> Table:
    """The 'which runs' table: one row per run, dicts with kind, path, models, images, precision, hardware (what
    its times per image were measured on), started, status."""
    headers = ["Kind", "Path", "Models", "Images", "Precision", "Hardware", "Started", "Status"]
    frame = pd.DataFrame(list(rows), columns=["kind", "path", "models", "images", "precision", "hardware", "started",
                                              "status"])
    text = [[str(r[c]) for c in frame.columns] for r in rows]
    return Table("runs", "Runs this report was built from", headers, text, frame)


__all__ = ["COLUMNS", "COLUMN_BY_METRIC", "Column", "Table", "long_table", "main_tables", "method_labels",
           "method_order", "metric_tables", "run_table", "sanity_table", "slug", "table_label"]
