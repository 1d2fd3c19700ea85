"""bench.metrics' ROAD section (which bench/gpu_check.sh runs on a lent GPU) at a tiny size: every variant is
reported, the forward-pass floor is there, and the two preconditioners give the same ROAD values."""
from __future__ import annotations

import json

from bench import metrics


def test_road_section_reports_every_variant_and_the_floor(tmp_path):
    out = tmp_path / "road.json"
    report = metrics.main(["--only", "road", "--batch", "2", "--road-batch", "2", "--size", "48", "--chunk-size", "8",
                           "--out", str(out)])
    assert json.loads(out.read_text())["metrics"] == json.loads(json.dumps(report["metrics"]))
    (row,) = report["metrics"]
    variants = {(o["dtype"], o["preconditioner"]): o for o in row["ours"]}
    assert set(variants) == {("float64", "multigrid"), ("float32", "multigrid"), ("float64", "jacobi")}
    assert row["floor"]["images_per_s"] > 0 and all(o["floor_ratio"] > 0 for o in row["ours"])
    multigrid, jacobi = variants["float64", "multigrid"], variants["float64", "jacobi"]
    assert multigrid["solver"]["converged"] and jacobi["solver"]["converged"]
    assert multigrid["solver"]["iterations"] < jacobi["solver"]["iterations"]
    # same pixels within the stopping rule and the same noise: the same distance to pytorch-grad-cam's ROAD
    assert abs(multigrid["max_abs_diff"] - jacobi["max_abs_diff"]) < 1e-6
