"""Per-image metric rows -> the papers' aggregates, tables (CSV + Markdown) and mean curves.

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
``class_discrimination``   mean ± std of the per-image values
``seconds``                mean ± std of the per-image times (evaluate's ``seconds`` rows; for a method that has none,
                           the attribution run's ``seconds`` column, one value per image)
``fmi_prototype_accuracy`` as jobs.evaluate computed it (dataset_metrics.parquet)
=========================  ========================================================================================

Null/NaN values (e.g. an all-zero map) are left out of every mean; ``n`` says how many images each aggregate used.
CSV files hold fractions and seconds; the Markdown/HTML tables show EBPG, IBD-AUC and FMI accuracy in percent, as
the papers do.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from attribution.metrics.protocols import ebpg_protocol, ibd_auc_protocol
from jobs.figures import method_title

CURVE_METRICS = ("morf", "lerf", "insertion_accuracy", "insertion_softmax")
MEAN_METRICS = CURVE_METRICS + ("class_discrimination", "seconds")
GROUP = ["model", "weights", "method", "options"]
# Methods in the papers' column order (baselines first, the two papers' methods last); others in between.
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
           "500 random images."),
    Column("ibd_auc", "IBD-AUC (%)", True, True, False, 2,
           "Intensity of boundary dependencies (TR-GBP §5.4): share of the map in the 16-px border; after dropping "
           "the half of the images with the smallest IBD, ROC-AUC of IBD as a score for 'the prediction is wrong'."),
    Column("morf", "MoRF AUC", False, False, True, 4,
           "Area under the target's softmax probability as the most relevant pixels are removed (set to black), "
           "0 to 100 % (TR-GBP App. D): a faster drop, i.e. a lower area, is better. (TR-GBP's Fig. 6 caption "
           "states the opposite direction for its own plotted quantity; for the probability itself lower is "
           "better, as in Samek et al. 2016.)"),
    Column("lerf", "LeRF AUC", True, False, True, 4,
           "Area under the target's softmax probability as the least relevant pixels are removed first: the "
           "prediction should survive, so higher is better. Signed gradient maps (GBP, GIG) are ranked by |map|."),
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


@dataclass(frozen=True)
class Protocol:
    """Sizes of the papers' protocols: EBPG ``ebpg_sample`` images × ``ebpg_repeats`` repeats drawn with
    ``seed``; IBD-AUC on the ``ibd_keep`` share of images with the largest IBD."""

    ebpg_sample: int = 500
    ebpg_repeats: int = 5
    seed: int = 0
    ibd_keep: float = 0.5


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


def primary_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the primary maps (see the module docstring): target_kind != 'top5' or target_rank == 0."""
    if frame.empty:
        return frame
    return frame[(frame["target_kind"] != "top5") | (frame["target_rank"] == 0)]


def _group_frame(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["weights"] = out["weights"].astype(object).where(out["weights"].notna(), None)
    return out


def _key(row) -> tuple:
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
    primary = _group_frame(primary_rows(metrics)) if len(metrics) else pd.DataFrame(columns=GROUP)
    images: dict[tuple, int] = {}
    for key, group in primary.groupby(GROUP, dropna=False, sort=False):
        key = _key(key)
        images[key] = int(group[["shard", "key"]].drop_duplicates().shape[0])
        by_metric = dict(tuple(group.groupby("metric", sort=False)))
        ebpg = by_metric.get("ebpg")
        if ebpg is not None:
            eligible = ebpg[(ebpg["n_boxes"] == 1) & (ebpg["box_share"].astype(float) < 0.5)] \
                .sort_values(["shard", "key"], kind="stable")
            values = _values(eligible)
            values = values[np.isfinite(values)]
            if values.size:
                mean, std = ebpg_protocol(values, sample=protocol.ebpg_sample, repeats=protocol.ebpg_repeats,
                                          seed=protocol.seed)
                out.append(_agg(key, "ebpg", mean, std, values.size, images[key],
                                f"{min(protocol.ebpg_sample, values.size)} of {values.size} eligible images x "
                                f"{protocol.ebpg_repeats} repeats, seed {protocol.seed}"))
        ibd = by_metric.get("ibd")
        if ibd is not None:
            known = ibd[ibd["correct"].notna()]
            values = _values(known)
            finite = np.isfinite(values)
            if finite.any():
                wrong = ~known["correct"].astype(bool).to_numpy()
                auc = ibd_auc_protocol(values[finite], wrong[finite], keep=protocol.ibd_keep)
                out.append(_agg(key, "ibd_auc", auc, math.nan, int(finite.sum()), images[key],
                                f"largest {protocol.ibd_keep:.0%} by IBD of {int(finite.sum())} images with a "
                                f"known label ({int(wrong[finite].sum())} wrong)"))
        for metric in MEAN_METRICS:
            rows = by_metric.get(metric)
            if rows is None:
                continue
            values = _values(rows)
            values = values[np.isfinite(values)]
            if values.size:
                out.append(_agg(key, metric, float(values.mean()), float(values.std()), values.size, images[key],
                                "mean ± std over images"))
    have_seconds = {_key((o["model"], o["weights"], o["method"], o["options"])) for o in out
                    if o["metric"] == "seconds"}
    if attribution_seconds is not None and len(attribution_seconds):
        timed = _group_frame(primary_rows(attribution_seconds)).drop_duplicates(["shard", "key"] + GROUP)
        for key, group in timed.groupby(GROUP, dropna=False, sort=False):
            key = _key(key)
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
        for row in _group_frame(dataset).itertuples(index=False):
            key = _key((row.model, row.weights, row.method, row.options))
            value = float(row.value) if row.value is not None else math.nan
            out.append(_agg(key, str(row.metric), value, math.nan, int(row.n), images.get(key, int(row.n)),
                            str(row.detail)))
    columns = GROUP + ["metric", "mean", "std", "n", "images", "protocol"]
    return pd.DataFrame(out, columns=columns)


def _agg(key: tuple, metric: str, mean: float, std: float, n: int, images: int, protocol: str) -> dict:
    model, weights, method, options = key
    return {"model": model, "weights": weights, "method": method, "options": options, "metric": metric,
            "mean": float(mean), "std": float(std), "n": int(n), "images": int(images), "protocol": protocol}


def table_label(model: str, weights: str | None, all_weights: Sequence[str | None]) -> str:
    """How a (model, weights) table is named: the model, plus the weights when the model comes with several."""
    if len(set(all_weights)) <= 1:
        return model
    return f"{model} ({weights if weights else 'random init'})"


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
    keys = {_key(k) for k in frame[GROUP].itertuples(index=False, name=None)}
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
    keys = {_key(k) for k in frame[GROUP].itertuples(index=False, name=None)}
    return sorted(keys, key=lambda k: (k[0], str(k[1]), method_order(k[2]), str(k[3])))


def main_tables(aggregates: pd.DataFrame) -> list[Table]:
    """One table per (model, weights): rows = methods, columns = COLUMNS (TR-GBP Tables 1/2, A-FMI Table 1 in one).
    Columns without any value are left out of that table."""
    if aggregates.empty:
        return []
    labels = method_labels(aggregates)
    frame = _group_frame(aggregates)
    weights_of = frame.groupby("model")["weights"].agg(lambda s: list(s))
    tables = []
    for (model, weights), group in frame.groupby(["model", "weights"], dropna=False, sort=True):
        weights = None if isinstance(weights, float) and math.isnan(weights) else weights
        title_label = table_label(model, weights, weights_of[model])
        present = [c for c in COLUMNS if (group["metric"] == c.metric).any()]
        index, images = {}, {}
        for k, m, mean, std, n, count in zip(group[GROUP].itertuples(index=False, name=None), group["metric"],
                                             group["mean"], group["std"], group["n"], group["images"]):
            index[(_key(k), m)] = (mean, std, n)
            images[_key(k)] = max(images.get(_key(k), 0), int(count))
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
        tables.append(Table(name=f"main_{slug(title_label)}", title=f"{title_label}: methods × metrics",
                            headers=headers, rows=rows, frame=pd.DataFrame(records), notes=notes))
    return tables


def metric_tables(aggregates: pd.DataFrame) -> list[Table]:
    """The papers' own layout, one table per metric: rows = models, columns = methods (TR-GBP Tables 1 and 2,
    A-FMI Table 1). Only metrics with at least one value."""
    if aggregates.empty:
        return []
    frame = _group_frame(aggregates)
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
            k = _key(k)
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
    frame = _group_frame(aggregates)
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


def mean_curves(metrics: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Mean curve per (model, weights, method, options, metric) for the curve metrics, from the primary rows:
    long frame with ``step`` (fraction of pixels), ``value`` (mean over images of the curve at that step,
    NaNs left out) and ``n`` (curves averaged). All rows of one metric share ``steps``; where runs with
    different steps are combined, the most common steps are kept and a note says how many curves were left out.
    Returns (frame, notes)."""
    columns = GROUP + ["metric", "step", "value", "n"]
    if metrics.empty:
        return pd.DataFrame(columns=columns), []
    rows = _group_frame(primary_rows(metrics))
    rows = rows[rows["metric"].isin(CURVE_METRICS) & rows["curve"].notna() & rows["steps"].notna()]
    out, notes = [], []
    for key, group in rows.groupby(GROUP + ["metric"], dropna=False, sort=False):
        key = _key(key)
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


def sanity_table(rows: pd.DataFrame) -> Table:
    """Cascading randomisation (TR-GBP §5.2.2): per (model, method, step) the mean ± std over images of the
    similarity to the original map (Spearman of map and of |map|, SSIM). Lower = the map reacts to the weights."""
    frame = _group_frame(rows)
    records = []
    for key, group in frame.groupby(GROUP + ["step"], dropna=False, sort=False):
        key = _key(key)
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
    rows_text = [[r.model, labels[_key((r.model, r.weights, r.method, r.options))], str(int(r.step)),
                  r.randomised or "(original model)", str(r.images), cell(r.spearman, r.spearman_std),
                  cell(r.spearman_abs, r.spearman_abs_std), cell(r.ssim, r.ssim_std)]
                 for r in out.itertuples(index=False)]
    return Table("sanity", "Sanity check: similarity to the original map under cascading randomisation",
                 headers, rows_text, out,
                 notes=[("mean ± std over images; a method that passes the check loses similarity (↓) as more "
                         "layers are randomised (Adebayo et al. 2018)")])


def run_table(rows: Sequence[dict]) -> Table:
    """The 'which runs' table: one row per run, dicts with kind, path, models, images, started, status."""
    headers = ["Kind", "Path", "Models", "Images", "Started", "Status"]
    frame = pd.DataFrame(list(rows), columns=["kind", "path", "models", "images", "started", "status"])
    text = [[str(r[c]) for c in frame.columns] for r in rows]
    return Table("runs", "Runs this report was built from", headers, text, frame)


__all__ = ["COLUMNS", "COLUMN_BY_METRIC", "CURVE_METRICS", "Column", "Protocol", "Table", "aggregate",
           "long_table", "main_tables", "mean_curves", "method_labels", "method_order", "metric_tables",
           "primary_rows", "run_table", "sanity_table", "slug", "table_label"]
