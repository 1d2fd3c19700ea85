"""jobs.report: aggregates equal hand-computed values (papers' protocols), tables/plots/grids/HTML are written, the
page is self-contained, a real attribution run gives a heatmap grid, and the page opens in headless Chromium."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from attribution.metrics.protocols import ebpg_protocol
from jobs import figures, report
from jobs.reporting import grids
from jobs.reporting.aggregates import Protocol
from jobs.reporting.screenshot import find_chromium, screenshot
from jobs.reporting.tables import table_label
from schemas.metrics import (
    DATASET_METRIC_SCHEMA,
    METRIC_SCHEMA,
    SANITY_SCHEMA,
    validate_dataset_metrics,
    validate_metrics,
    validate_sanity,
)

SHARD = "toy-000000.tar"
KEYS = [f"k{i}" for i in range(9)]          # k8: label unknown (correct is null)
# EBPG of method beta: eligible images k0..k3 (+ k6 with a null value), ineligible k4 (2 boxes), k5 (box >= 50 %)
BETA_EBPG = {"k0": 0.1, "k1": 0.2, "k2": 0.3, "k3": 0.4, "k4": 0.9, "k5": 0.95, "k6": None}
BOXES = {"k4": (2, 0.3), "k5": (1, 0.6)}   # (n_boxes, box_share); every other image: one box covering 20 %
# IBD: alpha's wrong predictions (k6, k7) have the largest IBD -> IBD-AUC 1; beta by hand below
ALPHA_IBD = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.75]
BETA_IBD = [0.9, 0.8, 0.3, 0.2, 0.1, 0.05, 0.85, 0.01, 0.99]
# kept by the IBD protocol (largest half of the 8 known): 0.9 right, 0.85 wrong, 0.8 right, 0.3 right -> AUC 2/3
CORRECT = [True] * 6 + [False, False, None]


def metric_row(key: str, method: str, metric: str, value: float | None, *, model: str = "toy", rank: int = 0,
               steps: list[float] | None = None, curve: list[float] | None = None,
               weights: str | None = "imagenet") -> dict:
    i = KEYS.index(key)
    n_boxes, share = BOXES.get(key, (1, 0.2))
    return {"key": key, "shard": SHARD, "model": model, "weights": weights, "method": method, "options": "{}",
            "target": 10 + rank, "target_kind": "top5", "target_rank": rank, "label": -1 if CORRECT[i] is None else 10,
            "top1": 10 if CORRECT[i] in (True, None) else 11, "correct": CORRECT[i], "n_boxes": n_boxes,
            "box_share": share, "metric": metric, "value": value, "steps": steps, "curve": curve}


def toy_rows() -> list[dict]:
    rows = []
    for i, key in enumerate(KEYS):
        eligible = key not in BOXES
        rows.append(metric_row(key, "alpha", "ebpg", 1.0 if eligible else 0.0))
        if key in BETA_EBPG:
            rows.append(metric_row(key, "beta", "ebpg", BETA_EBPG[key]))
        rows.append(metric_row(key, "alpha", "ibd", ALPHA_IBD[i]))
        rows.append(metric_row(key, "beta", "ibd", BETA_IBD[i]))
        # maps of the other top-5 classes (rank 1) must not enter any aggregate
        rows.append(metric_row(key, "alpha", "ebpg", 0.0, rank=1))
        rows.append(metric_row(key, "beta", "ibd", 5.0 if CORRECT[i] else 0.0, rank=1))
    steps = [0.0, 0.5, 1.0]
    rows += [metric_row("k0", "alpha", "morf", 0.55, steps=steps, curve=[1.0, 0.6, 0.0]),
             metric_row("k1", "alpha", "morf", 0.35, steps=steps, curve=[1.0, 0.2, 0.0]),
             metric_row("k0", "beta", "morf", 0.7, steps=steps, curve=[1.0, 0.8, 0.2]),
             metric_row("k0", "alpha", "lerf", 0.9, steps=steps, curve=[1.0, 0.9, 0.7]),
             metric_row("k0", "alpha", "insertion_accuracy", 0.5, steps=[0.5, 1.0], curve=[0.0, 1.0]),
             metric_row("k1", "alpha", "insertion_accuracy", 1.0, steps=[0.5, 1.0], curve=[1.0, 1.0]),
             metric_row("k0", "alpha", "insertion_softmax", 0.25, steps=[0.5, 1.0], curve=[0.1, 0.4]),
             metric_row("k0", "alpha", "class_discrimination", 0.2),
             metric_row("k1", "alpha", "class_discrimination", 0.4),
             metric_row("k0", "alpha", "seconds", 0.1),
             metric_row("k1", "alpha", "seconds", 0.3)]
    return rows


def write_committed(folder: Path, kind: str, table: pa.Table) -> None:
    (folder / kind / SHARD).mkdir(parents=True)
    pq.write_table(table, folder / kind / SHARD / "part-0.parquet")
    (folder / "_commits").mkdir()
    (folder / "_commits" / f"{SHARD}.json").write_text(json.dumps(
        {"shard": SHARD, "files": [f"{kind}/{SHARD}/part-0.parquet"], "samples": 9, "rows": table.num_rows,
         "error_rows": 0}))


def write_evaluate_run(folder: Path, rows: list[dict], dataset: list[dict] | None = None,
                       manifest: dict | None = None) -> Path:
    table = pa.Table.from_pylist(rows, schema=METRIC_SCHEMA)
    validate_metrics(table)
    folder.mkdir(parents=True)
    write_committed(folder, "metrics", table)
    if dataset:
        dataset_table = pa.Table.from_pylist(dataset, schema=DATASET_METRIC_SCHEMA)
        validate_dataset_metrics(dataset_table)
        pq.write_table(dataset_table, folder / "dataset_metrics.parquet")
    (folder / "manifest.json").write_text(json.dumps(
        {"job": "evaluate", "status": "complete", "started": "2026-11-22T10:00:00+0000",
         "config": {"attributions": str(folder.parent / "no-such-attribution-run"), "shards": [],
                    **(manifest or {}).get("config", {})},
         **{k: v for k, v in (manifest or {}).items() if k != "config"}}))
    return folder


def write_sanity_run(folder: Path) -> Path:
    rows = []
    for step, randomised in enumerate(["", "classifier", "conv_head"]):
        for i, key in enumerate(("k0", "k1")):
            for method, drop in (("gbp", 0.0), ("tr_gbp", 0.4)):
                similarity = 1.0 - drop * step + 0.1 * i * (step > 0)
                rows.append({"key": key, "shard": SHARD, "model": "toy", "weights": "imagenet", "method": method,
                             "options": "{}", "target": 10, "step": step, "randomised": randomised,
                             "spearman": similarity, "spearman_abs": similarity, "ssim": similarity})
    table = pa.Table.from_pylist(rows, schema=SANITY_SCHEMA)
    validate_sanity(table)
    (folder / "sanity").mkdir(parents=True)
    pq.write_table(table, folder / "sanity" / "part-0.parquet")
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (64, 1))).convert("RGB").save(
        folder / "sanity_grid.png")
    (folder / "manifest.json").write_text(json.dumps({"job": "sanity", "status": "complete",
                                                      "started": "2026-11-22T11:00:00+0000"}))
    return folder


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    toy = write_evaluate_run(root / "eval_toy", toy_rows(), dataset=[
        {"model": "toy", "weights": "imagenet", "method": "alpha", "options": "{}",
         "metric": "fmi_prototype_accuracy", "value": 0.875, "n": 8, "detail": "{}"}],
        manifest={"config": {"precision": "bf16"}, "hardware": {"cpus": 32.0, "gpus": 8.0, "gpu_types": ["A10G"]}})
    other = write_evaluate_run(root / "eval_toy2", [
        metric_row("k0", "alpha", "morf", 0.2, model="toy2", steps=[0.0, 1.0], curve=[1.0, 0.0], weights=None),
        metric_row("k1", "alpha", "morf", 0.4, model="toy2", steps=[0.0, 1.0], curve=[1.0, 0.4], weights=None)])
    return {"toy": toy, "toy2": other, "sanity": write_sanity_run(root / "sanity")}


PROTOCOL = Protocol(ebpg_sample=3, ebpg_repeats=4, seed=7, ibd_keep=0.5)


@pytest.fixture(scope="module")
def toy_report(toy_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    index = report.build(report.ReportConfig(runs=[str(toy_runs["toy"]), str(toy_runs["toy2"]),
                                                   str(toy_runs["sanity"])], out=str(out), protocol=PROTOCOL,
                                             quiet=True))
    assert index == out / "index.html"
    return out


def test_main_table_numbers_are_the_papers_protocols(toy_report):
    table = pd.read_csv(toy_report / "tables" / "main_toy.csv").set_index("method")
    alpha, beta = table.loc["alpha"], table.loc["beta"]
    # EBPG: only eligible primary rows (value 1); ineligible and rank-1 rows (value 0) left out
    assert (alpha["ebpg"], alpha["ebpg_std"], alpha["ebpg_n"]) == (1.0, 0.0, 7)
    eligible = [BETA_EBPG[k] for k in ("k0", "k1", "k2", "k3")]   # (shard, key) order; k6 null dropped
    mean, std = ebpg_protocol(eligible, sample=3, repeats=4, seed=7)
    assert beta["ebpg"] == pytest.approx(mean, abs=1e-12) and beta["ebpg_std"] == pytest.approx(std, abs=1e-12)
    assert beta["ebpg_n"] == 4 and std > 0 and 0.2 < mean < 0.3
    # IBD-AUC: null-label image and rank-1 rows excluded
    assert alpha["ibd_auc"] == 1.0 and beta["ibd_auc"] == pytest.approx(2 / 3, abs=1e-12)
    assert alpha["ibd_auc_n"] == beta["ibd_auc_n"] == 8
    # curve AUCs and per-image values: mean ± population std
    assert (alpha["morf"], alpha["morf_std"]) == pytest.approx((0.45, 0.1), abs=1e-12)
    assert (beta["morf"], beta["morf_std"], beta["morf_n"]) == (0.7, 0.0, 1)
    assert alpha["lerf"] == 0.9 and math.isnan(beta["lerf"])
    assert (alpha["insertion_accuracy"], alpha["insertion_accuracy_std"]) == pytest.approx((0.75, 0.25))
    assert alpha["insertion_softmax"] == 0.25
    assert alpha["class_discrimination"] == pytest.approx(0.3, abs=1e-12)
    assert (alpha["seconds"], alpha["seconds_std"]) == pytest.approx((0.2, 0.1), abs=1e-12)
    assert math.isnan(beta["seconds"])
    assert alpha["fmi_prototype_accuracy"] == 0.875 and math.isnan(beta["fmi_prototype_accuracy"])
    assert alpha["images"] == beta["images"] == 9
    markdown = (toy_report / "tables" / "main_toy.md").read_text()
    assert "| Method | Images | EBPG (%) ↑ | IBD-AUC (%) ↑ | MoRF AUC ↓ | LeRF AUC ↑ |" in markdown
    assert "| alpha | 9 | 100.0 ± 0.0 | 100.00 | 0.4500 ± 0.1000 | 0.9000 ± 0.0000 |" in markdown
    assert f"| beta | 9 | {100 * mean:.1f} ± {100 * std:.1f} | 66.67 | 0.7000 ± 0.0000 | — |" in markdown


def test_table_label_names_checkpoints_by_file_name_unless_ambiguous():
    assert table_label("m", "imagenet", ["imagenet"]) == "m"                        # one weights: the model alone
    runs = ["/r/models/m.pt", "/r/models/m_shortcut.pt", None]
    assert table_label("m", "/r/models/m.pt", runs) == "m (m.pt)"
    assert table_label("m", None, runs) == "m (random init)"
    same_name = ["/a/m.pt", "/b/m.pt"]
    assert table_label("m", "/b/m.pt", same_name) == "m (/b/m.pt)"
    assert table_label("m", "s3://bucket/x/m.pt", ["s3://bucket/x/m.pt", "imagenet"]) == "m (m.pt)"


def test_rebuild_replaces_the_earlier_reports_files(toy_runs, tmp_path):
    first = report.build(report.ReportConfig(runs=[str(toy_runs["toy"]), str(toy_runs["toy2"])], out=str(tmp_path),
                                             protocol=PROTOCOL, quiet=True)).parent
    assert (first / "tables" / "main_toy2.csv").exists()
    (first / "tables" / "notes.txt").write_text("mine")                         # not a report file: kept
    report.build(report.ReportConfig(runs=[str(toy_runs["toy"])], out=str(tmp_path), protocol=PROTOCOL, quiet=True))
    tables = sorted(p.name for p in (tmp_path / "tables").iterdir())
    assert "main_toy2.csv" not in tables and "main_toy.csv" in tables and "notes.txt" in tables


def test_runs_are_combined_and_curves_averaged(toy_report):
    morf = pd.read_csv(toy_report / "tables" / "metric_morf.csv").set_index("model")
    assert morf.loc["toy", "alpha"] == pytest.approx(0.45) and morf.loc["toy2", "alpha"] == pytest.approx(0.3)
    assert morf.loc["toy", "beta"] == 0.7 and math.isnan(morf.loc["toy2", "beta"])
    curves = pd.read_csv(toy_report / "tables" / "curves.csv")
    alpha = curves[(curves["model"] == "toy") & (curves["method"] == "alpha") & (curves["metric"] == "morf")]
    assert alpha["step"].tolist() == [0.0, 0.5, 1.0]
    assert alpha["value"].tolist() == pytest.approx([1.0, 0.4, 0.0]) and set(alpha["n"]) == {2}
    toy2 = curves[curves["model"] == "toy2"]
    assert toy2["value"].tolist() == pytest.approx([1.0, 0.2])
    long = pd.read_csv(toy_report / "tables" / "aggregates.csv")
    assert set(long["metric"]) == {"ebpg", "ibd_auc", "morf", "lerf", "insertion_accuracy", "insertion_softmax",
                                   "class_discrimination", "seconds", "fmi_prototype_accuracy"}
    for name in ("morf", "lerf", "insertion_accuracy", "insertion_softmax"):
        with Image.open(toy_report / "figures" / f"curves_toy_{name}.png") as image:
            assert image.size == (640, 440)
    assert (toy_report / "figures" / "curves_toy2_morf.png").is_file()
    assert not (toy_report / "figures" / "curves_toy2_lerf.png").exists()


def test_only_the_primary_maps_rows_are_loaded(toy_runs):
    """A top-5 run's other maps' rows enter no aggregate (rank 1 here): they are dropped while the files are read."""
    from jobs.reporting.runs import load_run

    rows = load_run(str(toy_runs["toy"])).rows
    assert len(rows) == sum(1 for r in toy_rows() if r["target_rank"] == 0) and set(rows["target_rank"]) == {0}


def test_report_scale_bench_dry_run(tmp_path):
    """bench.report_scale end to end on a few synthetic images: the runs it writes are what it says, and the report
    over them is measured in a child process."""
    from bench import report_scale

    out = tmp_path / "report_scale.json"
    assert report_scale.main(["--images", "12", "--methods", "2", "--shard-size", "5", "--curve-steps", "3",
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (entry,) = result["results"]
    assert entry["metric_rows"] == 12 * 2 * 15 and entry["attribution_rows"] == 12 * 2 * 5
    assert entry["seconds"] > 0 and entry["peak_rss_bytes"] > 2 ** 20
    assert result["extrapolated"] is None  # one size: nothing to extrapolate from


def test_runs_table_says_what_the_times_were_measured_on(toy_report):
    runs = pd.read_csv(toy_report / "tables" / "runs.csv", keep_default_na=False)
    runs["run"] = runs["path"].map(lambda p: Path(p).name)
    runs = runs.set_index("run")
    assert (runs.loc["eval_toy", "precision"], runs.loc["eval_toy", "hardware"]) == ("bf16", "8 GPU (A10G), 32 CPU")
    assert (runs.loc["eval_toy2", "precision"], runs.loc["eval_toy2", "hardware"]) == ("fp32", "")  # none recorded
    assert "| Kind | Path | Models | Images | Precision | Hardware | Started | Status |" in (
        toy_report / "tables" / "runs.md").read_text()


def test_sanity_table_and_figures(toy_report):
    sanity = pd.read_csv(toy_report / "tables" / "sanity.csv")
    tr = sanity[sanity["method"] == "tr_gbp"].set_index("step")
    assert tr["spearman"].tolist() == pytest.approx([1.0, 0.65, 0.25])     # mean of (1 - 0.4 step, + 0.1)
    assert tr["spearman_std"].tolist() == pytest.approx([0.0, 0.05, 0.05])
    assert tr["randomised"].fillna("").tolist() == ["", "classifier", "conv_head"] and set(tr["images"]) == {2}
    assert sanity[sanity["method"] == "gbp"]["ssim"].tolist() == pytest.approx([1.0, 1.05, 1.05])
    with Image.open(toy_report / "figures" / "sanity_0_sanity_grid.png") as image:
        assert image.size == (256, 64)


def embedded_sources(page: str) -> list[str]:
    return re.findall(r'(?:src|href|srcset|poster|data)\s*=\s*"([^"]*)"', page, flags=re.IGNORECASE)


def test_html_page_holds_every_table_and_only_data_uris(toy_report):
    page = (toy_report / "index.html").read_text(encoding="utf-8")
    tables = sorted(p.stem for p in (toy_report / "tables").glob("*.md"))
    assert {"main_toy", "main_toy2", "metric_ebpg", "metric_morf", "aggregates", "sanity", "runs"} <= set(tables)
    for name in tables:
        assert f'id="table-{name}"' in page, name
    assert "100.0 ± 0.0" in page and "66.67" in page and "87.5" in page
    sources = embedded_sources(page)
    assert len(sources) == 4 + 1 + 1   # toy's 4 curves, toy2's MoRF curve, the sanity figure
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.format == "PNG"
    assert not re.search(r"https?://|<script|url\(|@import|<link|<iframe", page, flags=re.IGNORECASE)
    assert "↑" in page and "↓" in page and "higher is better" in page and "lower is better" in page
    # which runs: paths, kinds, models, images, dates; missing parts noted
    assert page.count('<td class="text">') >= 3
    for run in ("eval_toy", "eval_toy2", "sanity"):
        assert run in page
    assert "2026-11-22T10:00:00+0000" in page
    assert "no heatmap grid" in page and "no-such-attribution-run" in page


def test_cli_errors_are_one_line(tmp_path, toy_runs, capsys):
    empty = tmp_path / "empty_eval"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"job": "evaluate", "config": {}}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"job": "train"}))
    cases = [(["--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")], "is not a directory"),
             (["--runs", str(tmp_path), "--out", str(tmp_path / "r")], "is not a run: no manifest.json"),
             (["--runs", str(empty), "--out", str(tmp_path / "r")], "is an empty evaluate run"),
             (["--runs", str(other), "--out", str(tmp_path / "r")], "has job 'train'"),
             (["--runs", str(toy_runs["toy"]), "--out", str(toy_runs["toy"] / "manifest.json")],
              "exists and is not a directory"),
             (["--runs", str(toy_runs["toy"]), "--out", str(tmp_path / "r"), "--grid-images", "-1"],
              "--grid-images must be non-negative")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            report.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_heatmap_grid_colours_and_size(tmp_path):
    signed = np.ones((40, 40), np.float32)
    signed[:, 20:] = -1.0                               # left half red (> 0), right half blue (< 0)
    ramp = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (40, 1))
    path = figures.heatmap_grid([[signed, ramp, None]], out=tmp_path / "g.png", row_labels=["row"],
                                col_labels=["signed", "ramp", "empty"], signed=[True, False, False])
    with Image.open(path) as image:
        assert image.size == figures.figure_size_px(1, 3) == (660, 315)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    panel = figures.CELL_INCHES * figures.DPI
    y = int(figures.HEADER_INCHES * figures.DPI + figures.TITLE_INCHES * 0.7 * figures.DPI + panel / 2)
    red, blue = pixels[y, int(panel * 0.3)], pixels[y, int(panel * 0.7)]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red       # bwr at +vmax
    assert blue[2] > 200 and blue[0] < 60 and blue[1] < 60, blue   # bwr at -vmax
    import matplotlib
    lut = matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255
    position = [int(np.argmin(((lut - pixels[y, int(panel * x)]) ** 2).sum(axis=1))) / 255 for x in (1.1, 1.5, 1.9)]
    assert position == pytest.approx([0.1, 0.5, 0.9], abs=0.06)     # inferno from 0 to the 99th percentile
    sparse = np.zeros(1000)
    sparse[3] = -2.0
    assert figures.colour_limits(sparse, signed=True) == (-2.0, 2.0)   # 99th percentile 0 -> max |value|
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 column labels"):
        figures.heatmap_grid([[signed]], out=tmp_path / "x.png", row_labels=["r"], col_labels=["a", "b"])


# ------------------------------------------------------------------------------------ a real attribution run
@pytest.fixture(scope="module")
def attribution_run(ray_session, tmp_path_factory) -> Path:
    """jobs.attribute on the real sample photos (EfficientNet-Lite0, saliency + gradcam, top-1 maps)."""
    from attribution.data.sample_sets import photo_samples
    from attribution.data.shards import write_shards
    from jobs.attribute import AttributeConfig, run
    from workers.attribution_worker import WorkerConfig

    root = tmp_path_factory.mktemp("attribution")
    shards = write_shards(photo_samples(), root / "shards", "photos", 4, log=lambda *_: None)
    worker = WorkerConfig(model="efficientnet_lite0", weights="imagenet", methods=["saliency", "gradcam"],
                          targets="top1")
    run(AttributeConfig(shards=[shards.pattern], out=str(root / "maps"), worker=worker, batch_size=4, quiet=True))
    return root / "maps"


@pytest.fixture(scope="module")
def full_report(attribution_run, toy_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full_report")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        index = report.main(["--runs", str(toy_runs["toy"]), str(attribution_run), str(toy_runs["sanity"]),
                             "--out", str(out), "--grid-images", "3", "--ebpg-sample", "3", "--ebpg-repeats", "4",
                             "--seed", "7"])
    assert printed.getvalue().strip().splitlines()[-1] == f"Report: {index}" and index == out / "index.html"
    return out


def test_real_attribution_run_gives_a_heatmap_grid_and_times(full_report, attribution_run):
    grid = full_report / "figures" / "grid_0_efficientnet_lite0.png"
    with Image.open(grid) as image:
        title = figures.wrap_title(grids.GRID_TITLE.format(model="efficientnet_lite0", what="top-1"), 3)
        assert image.size == figures.figure_size_px(rows=3, columns=1 + 2, title_lines=len(title))
        pixels = np.asarray(image.convert("RGB")).astype(float)
    panel = int(figures.CELL_INCHES * figures.DPI)
    top = int((figures.HEADER_INCHES + figures.TITLE_LINE_INCHES * (len(title) - 2)
               + figures.TITLE_INCHES * 0.7) * figures.DPI)
    photo = pixels[top + 20: top + panel - 20, 10: panel - 10]
    assert photo.std() > 30                                          # a real photo in the first column
    frame = pd.read_parquet(attribution_run / "attributions")
    expected = frame.groupby("method")["seconds"].mean()
    main = pd.read_csv(full_report / "tables" / "main_efficientnet_lite0.csv").set_index("method")
    assert main["seconds"].to_dict() == pytest.approx(expected.to_dict(), rel=1e-6)
    assert set(main["images"]) == {len(frame["key"].unique())}
    page = (full_report / "index.html").read_text(encoding="utf-8")
    assert "grid_0" not in page and page.count("data:image/png;base64,") == 4 + 1 + 1


@pytest.mark.skipif(find_chromium() is None, reason="no chromium binary (apt-get install chromium); the CI "
                                                     "script installs it")
def test_report_page_opens_in_headless_chromium(full_report, tmp_path):
    shot = screenshot(full_report / "index.html", tmp_path / "index.png", width=1400, height=4000)
    assert shot.console == []                       # the page logged nothing: no failed load, no error
    with Image.open(shot.path) as image:
        assert image.size == (1400, 4000)
        pixels = np.asarray(image.convert("RGB")).astype(float)
    assert pixels.std() > 20                         # not blank
    ink = pixels.sum(axis=-1) < 600
    assert ink.mean() > 0.02                         # text, tables and plots, not a white page
    assert ink.any(axis=1).mean() > 0.5              # content spread down the page, not one line at the top


@pytest.mark.skipif(find_chromium() is None, reason="no chromium binary (apt-get install chromium); the CI "
                                                     "script installs it")
def test_screenshot_option_writes_the_whole_page(attribution_run, toy_runs, tmp_path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report.main(["--runs", str(toy_runs["toy"]), str(attribution_run), str(toy_runs["sanity"]),
                     "--out", str(tmp_path), "--grid-images", "3", "--screenshot"])
    lines = printed.getvalue().strip().splitlines()
    assert lines[-2] == f"Screenshot: {tmp_path / 'index.png'}" and not any("console" in line for line in lines)
    with Image.open(tmp_path / "index.png") as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB")).astype(float)
    assert width == 1400 and 4000 < height < 20000   # the whole page, its empty bottom cropped
    assert (pixels[-200:].sum(axis=-1) < 600).any()  # the page's last figure reaches the bottom of the picture
