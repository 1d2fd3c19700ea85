"""The demo end to end: sample shards -> jobs.attribute on embedded Ray -> PNG grid from the Parquet output."""
from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from attribution.data.sample_sets import photo_samples
from jobs import demo


def test_demo_runs_the_pipeline_and_draws_the_grid(ray_session, tmp_path, capsys):
    path = demo.main(["--out", str(tmp_path / "demo"), "--targets", "top1"])
    assert path.is_absolute() and path.parent == (tmp_path / "demo").resolve()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == demo.figure_size_px(rows=len(photo_samples()))
    frame = pd.read_parquet(tmp_path / "demo" / "maps" / "attributions")
    assert len(frame) == len(photo_samples()) * len(demo.METHODS)
    assert set(frame["method"]) == set(demo.METHODS)
    lines = capsys.readouterr().out.splitlines()
    assert f"Demo figure: {path}" in lines
    report = (tmp_path / "demo" / "report" / "index.html").resolve()
    assert lines[-1] == f"Report: {report}"
    html = report.read_text()
    for heading in ("TR-GBP", "A-FMI", "Grad-CAM", "EBPG", "Insertion", "sanity"):
        assert heading.lower() in html.lower(), heading
    assert any(line.startswith("Parquet: ") and "attributions" in line for line in lines)
    assert any(line.startswith("[2/2] committed photos-000001.tar") for line in lines)


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--no-such-option"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        demo.main(["--methods", "gbp,lime"])
    assert exc.value.code == 2
    from attribution.methods import REGISTRY
    assert capsys.readouterr().err.strip() == f"demo: error: unknown method 'lime'; known: {', '.join(REGISTRY)}"
