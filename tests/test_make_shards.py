"""jobs.make_shards: ImageNet layout (VOC XML and CSV boxes) and the offline sample set -> WebDataset shards.

A hand-made ImageNet-layout fixture (7 tiny images: 3 good, 4 bad) is converted, then read back with the
``webdataset`` package and with plain ``tarfile``.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds
from PIL import Image

from attribution.data import imagenet as imagenet_data
from attribution.data import sample_sets, shards
from jobs import make_shards
from schemas.samples import SAMPLE_SCHEMA, SYNTHETIC_CLASSES, sample_row, validate_sample_json
from schemas.validation import validate_table

REPO = Path(__file__).resolve().parents[1]
WNIDS_FILE = "n01440764 tench, Tinca tinca\nn02123045 tabby, tabby cat\n\nn02123159 tiger cat\nn07920052 espresso\n"

# stem -> (size, image format, objects [(wnid, box)] or a special annotation, expected outcome)
GOOD = {
    "ILSVRC2012_val_00000001": {"label": 0, "wnid": "n01440764", "width": 48, "height": 32,
                                "bboxes": [[4, 5, 30, 28]], "bbox_wnids": ["n01440764"]},
    "ILSVRC2012_val_00000002": {"label": 1, "wnid": "n02123045", "width": 40, "height": 40,
                                "bboxes": [[10, 2, 40, 39], [1, 1, 12, 12]], "bbox_wnids": ["n02123045", "n02123159"]},
    # a PNG source, and a box 1 px past the right edge (clipped from 31 to 30)
    "ILSVRC2012_val_00000006": {"label": 3, "wnid": "n07920052", "width": 30, "height": 20,
                                "bboxes": [[2, 3, 30, 20]], "bbox_wnids": ["n07920052"]},
}
BAD = {  # stem -> reason kind, with XML boxes / with the CSV
    "ILSVRC2012_val_00000003": ("no annotation", "no annotation"),
    "ILSVRC2012_val_00000004": ("unreadable XML", "malformed CSV row"),
    "ILSVRC2012_val_00000005": ("unknown wnid", "unknown wnid"),
    "ILSVRC2012_val_00000007": ("bad bbox", "bad bbox"),
}


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    return Image.fromarray(np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8))


def _xml(stem: str, width: int, height: int, objects) -> str:
    parts = [f"<annotation><folder>val</folder><filename>{stem}</filename>"
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for wnid, (x0, y0, x1, y1) in objects:
        parts.append(f"<object><name>{wnid}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                     f"<ymax>{y1}</ymax></bndbox></object>")
    return "\n".join(parts) + "</annotation>\n"


@pytest.fixture
def imagenet(tmp_path: Path) -> dict[str, Path]:
    """ImageNet val layout: images/, boxes/ (VOC XML), boxes.csv (LOC_val_solution form), wnids.txt."""
    images, boxes = tmp_path / "images", tmp_path / "boxes"
    images.mkdir()
    boxes.mkdir()
    objects = {
        "ILSVRC2012_val_00000001": [("n01440764", (4, 5, 30, 28))],
        "ILSVRC2012_val_00000002": [("n02123045", (10, 2, 40, 39)), ("n02123159", (1, 1, 12, 12))],
        "ILSVRC2012_val_00000005": [("n00000000", (1, 1, 5, 5))],
        "ILSVRC2012_val_00000006": [("n07920052", (2, 3, 31, 20))],
        "ILSVRC2012_val_00000007": [("n01440764", (0, 0, 100, 100))],
    }
    sizes = {"ILSVRC2012_val_00000006": (30, 20), "ILSVRC2012_val_00000007": (32, 32)}
    for i in range(1, 8):
        stem = f"ILSVRC2012_val_{i:08d}"
        width, height = GOOD.get(stem, {}).get("width"), GOOD.get(stem, {}).get("height")
        width, height = (width, height) if width else sizes.get(stem, (24, 16))
        if stem == "ILSVRC2012_val_00000006":
            _image(width, height, i).save(images / f"{stem}.png")
        else:
            _image(width, height, i).save(images / f"{stem}.JPEG", quality=90)
        if stem in objects:
            (boxes / f"{stem}.xml").write_text(_xml(stem, width, height, objects[stem]))
    (boxes / "ILSVRC2012_val_00000004.xml").write_text("<annotation><size><width>24</wid")  # truncated XML
    rows = ["ImageId,PredictionString"]
    for stem, objs in objects.items():
        rows.append(stem + "," + " ".join(f"{w} {x0} {y0} {x1} {y1}" for w, (x0, y0, x1, y1) in objs) + " ")
    rows.append("ILSVRC2012_val_00000004,n01440764 1 2")  # malformed: 3 tokens
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "wnids.txt").write_text(WNIDS_FILE)
    return {"images": images, "boxes": boxes, "csv": tmp_path / "boxes.csv", "wnids": tmp_path / "wnids.txt",
            "root": tmp_path}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = make_shards.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _read_tar(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_imagenet_xml_shards_read_back(imagenet, capsys):
    out = imagenet["root"] / "out"
    rc, stdout, stderr = _run(capsys, "imagenet", "--images", imagenet["images"], "--boxes", imagenet["boxes"],
                              "--wnids", imagenet["wnids"], "--out", out, "--shard-size", 2)
    assert rc == 0, stderr
    # two shards (2 + 1 samples), pattern printed and in shards.json
    pattern = f"{out.resolve()}/val-{{000000..000001}}.tar"
    assert pattern in stdout
    assert sorted(p.name for p in out.glob("*.tar")) == ["val-000000.tar", "val-000001.tar"]
    manifest = json.loads((out / "shards.json").read_text())
    entry = manifest["sets"]["val"]
    assert entry["pattern"] == pattern
    assert [(s["file"], s["samples"]) for s in entry["shards"]] == [("val-000000.tar", 2), ("val-000001.tar", 1)]
    assert entry["num_samples"] == 3 and entry["num_skipped"] == 4

    # bad inputs: one warning line each naming the file and the reason, counted in the summary
    for stem, (kind, _) in BAD.items():
        lines = [line for line in stderr.splitlines() if stem in line]
        assert len(lines) == 1 and lines[0].startswith("warning: skipped") and kind in lines[0], (stem, stderr)
    assert "3 samples in 2 shards, 4 skipped" in stdout
    assert {s["file"]: s["kind"] for s in entry["skipped"]} == {
        "ILSVRC2012_val_00000003.JPEG": "no annotation", "ILSVRC2012_val_00000004.JPEG": "unreadable XML",
        "ILSVRC2012_val_00000005.JPEG": "unknown wnid", "ILSVRC2012_val_00000007.JPEG": "bad bbox"}

    # webdataset reads it through the brace pattern: keys sorted, labels, boxes as in the fixture
    samples = list(wds.WebDataset(pattern, shardshuffle=False))
    assert [s["__key__"] for s in samples] == sorted(GOOD)
    for sample in samples:
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        expected = GOOD[key]
        assert int(sample["cls"]) == expected["label"]
        assert {k: meta[k] for k in expected} == expected
        assert meta["key"] == key and meta["source"] == "imagenet"
        assert validate_sample_json(meta, key, wnids=imagenet_data.read_wnids(imagenet["wnids"])) == []
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.format == "JPEG" and image.size == (expected["width"], expected["height"])
    # JPEG sources are stored untouched; the PNG source was encoded as JPEG
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["ILSVRC2012_val_00000001"]["jpg"] == (imagenet["images"] / "ILSVRC2012_val_00000001.JPEG").read_bytes()
    assert by_key["ILSVRC2012_val_00000006"]["jpg"][:3] == b"\xff\xd8\xff"

    # plain tarfile: members adjacent in jpg, cls, json order, fixed metadata
    members = _read_tar(out / "val-000000.tar") + _read_tar(out / "val-000001.tar")
    names = [m.name for m, _ in members]
    assert names == [f"{k}.{s}" for k in sorted(GOOD) for s in ("jpg", "cls", "json")]
    assert all(m.isfile() and m.uid == 0 and m.gid == 0 and m.uname == "" and m.mtime == shards.TAR_MTIME
               for m, _ in members)
    assert [data for m, data in members if m.name.endswith(".cls")] == [b"0", b"1", b"3"]


def test_shipped_wnid_list_gives_imagenet_labels(imagenet, capsys):
    out = imagenet["root"] / "out"
    rc, stdout, stderr = _run(capsys, "imagenet", "--images", imagenet["images"], "--boxes", imagenet["boxes"],
                              "--out", out, "--prefix", "valx")
    assert rc == 0, stderr
    assert "valx: 3 samples in 1 shards" in stdout and f"{out.resolve()}/valx-000000.tar" in stdout
    members = _read_tar(out / "valx-000000.tar")
    labels = {m.name.split(".")[0]: int(data) for m, data in members if m.name.endswith(".cls")}
    assert labels == {"ILSVRC2012_val_00000001": 0, "ILSVRC2012_val_00000002": 281, "ILSVRC2012_val_00000006": 967}


def test_csv_boxes_give_the_same_shards(imagenet, capsys):
    xml_out, csv_out = imagenet["root"] / "xml", imagenet["root"] / "csv"
    common = ["--images", imagenet["images"], "--wnids", imagenet["wnids"], "--shard-size", 2]
    assert _run(capsys, "imagenet", "--boxes", imagenet["boxes"], "--out", xml_out, *common)[0] == 0
    rc, stdout, stderr = _run(capsys, "imagenet", "--boxes-csv", imagenet["csv"], "--out", csv_out, *common)
    assert rc == 0, stderr
    for name in ("val-000000.tar", "val-000001.tar"):
        assert (xml_out / name).read_bytes() == (csv_out / name).read_bytes()
    for stem, (_, kind) in BAD.items():
        assert any(stem in line and kind in line for line in stderr.splitlines()), (stem, kind, stderr)


def test_same_input_gives_byte_identical_shards(imagenet, capsys):
    args = ["imagenet", "--images", imagenet["images"], "--boxes", imagenet["boxes"], "--wnids", imagenet["wnids"],
            "--shard-size", 1]
    first, second = imagenet["root"] / "a", imagenet["root"] / "b"
    assert _run(capsys, *args, "--out", first)[0] == 0
    assert _run(capsys, *args, "--out", second)[0] == 0
    names = sorted(p.name for p in first.glob("*.tar"))
    assert names == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    # a re-run with bigger shards into the same folder removes the now stale third shard
    assert _run(capsys, *args[:-1], "2", "--out", first)[0] == 0
    assert sorted(p.name for p in first.glob("*.tar")) == ["val-000000.tar", "val-000001.tar"]
    assert not list(first.glob("*.tmp"))


def test_limit(imagenet, capsys):
    out = imagenet["root"] / "out"
    rc, stdout, _ = _run(capsys, "imagenet", "--images", imagenet["images"], "--boxes", imagenet["boxes"],
                         "--wnids", imagenet["wnids"], "--out", out, "--limit", 2)
    assert rc == 0
    names = [m.name for m, _ in _read_tar(out / "val-000000.tar")]
    assert names == [f"ILSVRC2012_val_0000000{i}.{s}" for i in (1, 2) for s in ("jpg", "cls", "json")]


def test_bad_command_lines_exit_2_with_one_line(imagenet, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--images", tmp_path / "nope", "--boxes", imagenet["boxes"]], "is not a directory"),
        (["--images", imagenet["images"], "--boxes", tmp_path / "nope"], "is not a directory"),
        (["--images", imagenet["images"], "--boxes-csv", tmp_path / "nope.csv"], "is not a file"),
        (["--images", empty, "--boxes", imagenet["boxes"]], "no images"),
        (["--images", imagenet["images"], "--boxes", imagenet["boxes"], "--wnids", imagenet["csv"]],
         "does not start with a wnid"),
    ]
    for args, message in cases:
        rc, stdout, stderr = _run(capsys, "imagenet", *args, "--out", tmp_path / "out")
        assert rc == 2, args
        assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr, stderr
    assert not (tmp_path / "out").exists()
    # the real command line: exit status 2, no traceback
    proc = subprocess.run([sys.executable, "-m", "jobs.make_shards", "imagenet", "--images", str(tmp_path / "nope"),
                           "--boxes", str(imagenet["boxes"]), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: --images") and len(proc.stderr.strip().splitlines()) == 1


def test_shipped_wnid_list():
    wnids = imagenet_data.imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert (wnids[0], wnids[281], wnids[967], wnids[999]) == ("n01440764", "n02123045", "n07920052", "n15075141")
    from attribution.models import imagenet_class_names
    names = imagenet_class_names()
    for wnid, name in [("n01440764", "tench"), ("n02123045", "tabby"), ("n07920052", "espresso"),
                       ("n15075141", "toilet tissue"), ("n04485082", "tripod"), ("n03773504", "missile"),
                       ("n03763968", "military uniform"), ("n01751748", "sea snake")]:
        assert names[wnids.index(wnid)] == name
    # LOC_synset_mapping.txt format is accepted (line i = class i)
    assert imagenet_data._parse_wnids(WNIDS_FILE, "test") == ["n01440764", "n02123045", "n02123159", "n07920052"]


def test_sample_mode(tmp_path, capsys):
    out = tmp_path / "sample"
    rc, stdout, stderr = _run(capsys, "sample", "--out", out)
    assert rc == 0, stderr
    manifest = json.loads((out / "shards.json").read_text())
    assert set(manifest["sets"]) == {"photos", "synthetic"}
    assert manifest["sets"]["photos"]["num_shards"] >= 2 and manifest["sets"]["synthetic"]["num_shards"] >= 2
    assert manifest["sets"]["synthetic"]["num_samples"] == 24
    assert f"{out.resolve()}/synthetic-{{000000..000005}}.tar" in stdout

    wnids = imagenet_data.imagenet_wnids()
    rows = []
    for set_name, entry in manifest["sets"].items():
        samples = list(wds.WebDataset(entry["pattern"], shardshuffle=False))
        assert len(samples) == entry["num_samples"]
        for sample in samples:
            meta = json.loads(sample["json"])
            assert validate_sample_json(meta, sample["__key__"], wnids=wnids if set_name == "photos" else None) == []
            assert int(sample["cls"]) == meta["label"]
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                assert image.format == "JPEG" and image.size == (meta["width"], meta["height"])
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
            if set_name == "synthetic":
                _check_synthetic(meta, pixels)
            rows.append(sample_row(meta, Path(sample["__url__"]).name))
    by_key = {r["key"]: r for r in rows}
    assert by_key["chelsea"]["label"] == 281 and by_key["coffee"]["label"] == 967
    assert by_key["astronaut"]["label"] == -1 and by_key["astronaut"]["wnid"] is None
    assert by_key["chelsea"]["shard"] == "photos-000000.tar"
    labels = [r["label"] for r in rows if r["key"].startswith("synthetic_")]
    assert sorted(set(labels)) == list(range(len(SYNTHETIC_CLASSES))) and labels.count(0) == 8
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    validate_table(table, SAMPLE_SCHEMA, "samples")
    assert table.num_rows == 31


def _check_synthetic(meta: dict, pixels: np.ndarray) -> None:
    """The box is the shape's: pixels of the shape's colour near the box span the box (within JPEG blur)."""
    (x0, y0, x1, y1), = meta["bboxes"]
    assert meta["wnid"] is None and meta["source"] == "synthetic" and meta["bbox_wnids"] == [None]
    assert 0 <= x0 < x1 <= meta["width"] and 0 <= y0 < y1 <= meta["height"] and x1 - x0 >= 30
    shape = SYNTHETIC_CLASSES[meta["label"]]
    cx = (x0 + x1) // 2
    cy = (y0 + y1) // 2 if shape != "triangle" else y0 + 2 * (y1 - y0) // 3
    colour = np.median(pixels[cy - 2:cy + 3, cx - 2:cx + 3].reshape(-1, 3), axis=0)
    m = 4
    top, left = max(y0 - m, 0), max(x0 - m, 0)
    near = np.abs(pixels[top:y1 + m, left:x1 + m] - colour).max(axis=-1) < 50
    ys, xs = np.nonzero(near)
    found = [xs.min() + left, ys.min() + top, xs.max() + left + 1, ys.max() + top + 1]
    assert np.abs(np.array(found) - [x0, y0, x1, y1]).max() <= 2, (meta["key"], shape, found, (x0, y0, x1, y1))
    # a square fills its box; a disc and a triangle leave the top corners to the background
    corner = near[y0 - top + 2, x0 - left + 2]
    assert corner if shape == "square" else not corner, (meta["key"], shape)
    if shape == "square":
        assert near[y0 - top + 2:y1 - top - 2, x0 - left + 2:x1 - left - 2].mean() > 0.99


def test_synthetic_is_seeded():
    a = [s.image() for s in sample_sets.synthetic_samples(3, seed=1)]
    b = [s.image() for s in sample_sets.synthetic_samples(3, seed=1)]
    c = [s.image() for s in sample_sets.synthetic_samples(3, seed=2)]
    assert a == b and a != c


def test_validate_sample_json_flags_problems():
    good = {"key": "k1", "wnid": "n02123045", "label": 281, "width": 100, "height": 50,
            "bboxes": [[0, 0, 100, 50], [10.5, 5, 20, 30.25]], "bbox_wnids": ["n02123045", None], "source": "test"}
    assert validate_sample_json(good, "k1") == []
    assert validate_sample_json(good, "k1", wnids=imagenet_data.imagenet_wnids()) == []

    def problems(key="k1", **changes):
        meta = {**good, **changes}
        for name in [k for k, v in changes.items() if v is ...]:
            del meta[name]
        found = validate_sample_json(meta, key)
        assert found, changes
        return " | ".join(found)

    assert "outside the 100x50 image" in problems(bboxes=[[0, 0, 101, 50], [1, 1, 2, 2]])
    assert "outside the 100x50 image" in problems(bboxes=[[-1, 0, 10, 10], [1, 1, 2, 2]])
    assert "outside the 100x50 image" in problems(bboxes=[[0, 0, 10, 60], [1, 1, 2, 2]])
    assert "x1 <= x0" in problems(bboxes=[[10, 0, 10, 10], [1, 1, 2, 2]])
    assert "y1 <= y0" in problems(bboxes=[[0, 10, 10, 5], [1, 1, 2, 2]])
    assert "4 numbers" in problems(bboxes=[[0, 0, 10], [1, 1, 2, 2]])
    assert "non-finite" in problems(bboxes=[[0, 0, float("nan"), 5], [1, 1, 2, 2]])
    assert "missing field 'height'" in problems(height=...)
    assert "height must be positive" in problems(height=0)
    assert "label 1000 outside [-1, 999]" in problems(label=1000)
    assert "label -2 outside" in problems(label=-2)
    assert "'label' must be int" in problems(label=True)
    assert "'width' must be int" in problems(width=100.0)
    assert "no dots" in problems(key="a.b")
    assert "differs from the member names' key" in problems(key="k2")
    assert "2 bbox_wnids for 1 bboxes" in problems(bboxes=[[0, 0, 1, 1]])
    assert "wnid must be null" in problems(wnid="cat")
    assert "not a JSON object" in " ".join(validate_sample_json([1, 2], "k1"))
    found = validate_sample_json({**good, "label": 282}, "k1", wnids=imagenet_data.imagenet_wnids())
    assert found == ["k1: label 282 does not match wnid n02123045 (class 281)"]
